//! Cost of recording one request in the metrics, the way the proxy does it
//! (`Metrics::with_node` + `ListenerMetrics::request_done`), on one thread and
//! on two threads hitting the same counters; and the cost of one scrape.
//!
//! Run: `cargo bench --bench metrics_hot_path`

use amslb::cluster::{Cluster, NodeSpec};
use amslb::metrics::Metrics;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: u32 = 5_000_000;

fn cluster(nodes: u8) -> Arc<Cluster> {
    let cluster = Arc::new(Cluster::new());
    cluster.update(
        (1..=nodes)
            .map(|i| NodeSpec {
                id: format!("edge-{i}"),
                group: "edge".into(),
                addr: [127, 0, 2, i].into(),
                http_port: 5080,
                rtmp_port: 1935,
                srt_port: 4200,
                drain: false,
                region: None,
            })
            .collect(),
    );
    cluster
}

fn record_loop(metrics: &Metrics, cluster: &Cluster, rounds: u32) -> Duration {
    let snapshot = cluster.snapshot();
    let nodes: Vec<_> = snapshot.nodes().cloned().collect();
    let listener = metrics.listener("play");
    let started = Instant::now();
    for i in 0..rounds {
        let node = &nodes[i as usize % nodes.len()];
        metrics.with_node(node, |m| {
            listener.request_done(
                black_box("hls"),
                Some(m),
                black_box(200),
                Duration::from_micros(700),
                0,
                black_box(1200),
            )
        });
    }
    started.elapsed()
}

fn main() {
    let cluster = cluster(8);
    let metrics = Arc::new(Metrics::new(cluster.clone()).unwrap());
    record_loop(&metrics, &cluster, 100_000); // warm up, create handles

    let one = record_loop(&metrics, &cluster, ROUNDS);
    println!(
        "record one request, 1 thread:  {:.1} ns",
        one.as_nanos() as f64 / f64::from(ROUNDS)
    );

    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (m, c) = (metrics.clone(), cluster.clone());
            std::thread::spawn(move || record_loop(&m, &c, ROUNDS))
        })
        .collect();
    let worst = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap();
    println!(
        "record one request, 2 threads on the same counters: {:.1} ns per request per thread",
        worst.as_nanos() as f64 / f64::from(ROUNDS)
    );

    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..100 {
        bytes += metrics.render(&cluster).len();
    }
    println!(
        "one /metrics scrape (8 nodes): {:.0} µs, {} bytes",
        started.elapsed().as_micros() as f64 / 100.0,
        bytes / 100
    );
}
