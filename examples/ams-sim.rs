//! A simulated Ant Media Server node, for trying amslb without a real cluster.
//!
//! `cargo run --example ams-sim -- edge-1 127.0.2.1:5080` starts a node called
//! `edge-1` that answers liveness probes, tells every request its id and
//! echoes WebSockets. Run one per node address of your config. With a third
//! argument, a MongoDB URI (`mongodb://127.0.0.1:27017`), it also registers
//! itself in `clusterdb.clusternode` and refreshes it every 5 s like AMS, for
//! trying `[cluster] source = "mongodb"`.

// The examples use only part of the test harness.
#[allow(dead_code)]
#[path = "../tests/support/registry.rs"]
mod registry;
#[allow(dead_code)]
#[path = "../tests/support/secantus.rs"]
mod secantus;
#[allow(dead_code)]
#[path = "../tests/support/sim.rs"]
mod sim;

use std::net::SocketAddr;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(id), Some(addr)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: ams-sim NODE_ID ADDRESS:PORT [MONGODB_URI]   (e.g. ams-sim edge-1 127.0.2.1:5080)"
        );
        std::process::exit(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("ams-sim: bad address {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    let node = match sim::SimNode::start(&id, addr).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!("ams-sim: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("ams-sim: node {} listening on {}", node.id(), node.addr);
    let _registration = match args.next() {
        Some(uri) => {
            let registration = node.register(&uri, registry::AMS_REFRESH).await;
            eprintln!("ams-sim: registered in clusterdb.clusternode");
            Some(registration)
        }
        None => None,
    };
    let _ = tokio::signal::ctrl_c().await;
}
