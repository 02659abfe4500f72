//! The README's first command: a whole local cluster in one process.
//!
//! `cargo run --example demo` reads `conf/demo.toml` (or the file given as the
//! first argument), starts a simulated AMS node for every `[[cluster.node]]`
//! on its own loopback address, then runs amslb with that config until Ctrl-C.

// The examples use only part of the test harness.
#[allow(dead_code)]
#[path = "../tests/support/sim.rs"]
mod sim;

use std::net::SocketAddr;
use std::path::PathBuf;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("conf/demo.toml"));
    let prepared = match amslb::reload::prepare(&path) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    };
    let config = prepared.config.clone();
    let mut nodes = Vec::new();
    for node in &config.cluster.nodes {
        let addr = SocketAddr::new(
            node.address,
            node.http_port.unwrap_or(config.cluster.http_port),
        );
        match sim::SimNode::start(&node.id, addr).await {
            Ok(sim) => nodes.push(sim),
            Err(e) => {
                eprintln!(
                    "demo: cannot start simulated node {} on {addr}: {e}",
                    node.id
                );
                std::process::exit(1);
            }
        }
        eprintln!(
            "demo: simulated AMS node {:<10} {:<7} on {addr}",
            node.id, node.group
        );
    }
    for listener in &config.listeners {
        for addr in &listener.bind {
            eprintln!(
                "demo: listener {:<8} http://{addr}/  (default group {})",
                listener.name, listener.default_group
            );
        }
    }
    if let Some(play) = config.listeners.iter().find(|l| l.name == "play") {
        let addr = play.bind[0];
        eprintln!(
            "demo: try  curl -i http://{addr}/LiveApp/streams/stream1.m3u8   (lands on an edge)"
        );
        eprintln!(
            "demo: try  curl -i -X POST http://{addr}/LiveApp/whip/stream1  (lands on the origin)"
        );
    }
    if let Err(e) = amslb::run(path, prepared).await {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}
