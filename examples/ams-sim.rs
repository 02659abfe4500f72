//! A simulated Ant Media Server node, for trying amslb without a real cluster.
//!
//! `cargo run --example ams-sim -- edge-1 127.0.2.1:5080` starts a node called
//! `edge-1` that answers liveness probes, tells every request its id and
//! echoes WebSockets. Run one per node address of your config.

// The examples use only part of the test harness.
#[allow(dead_code)]
#[path = "../tests/support/sim.rs"]
mod sim;

use std::net::SocketAddr;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(id), Some(addr)) = (args.next(), args.next()) else {
        eprintln!("usage: ams-sim NODE_ID ADDRESS:PORT   (e.g. ams-sim edge-1 127.0.2.1:5080)");
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
    let _ = tokio::signal::ctrl_c().await;
}
