//! Router baseline: how long `route::classify` takes per request, for a
//! table of paths as an Ant Media Server cluster sees them. A plain timing loop
//! (`harness = false`): `cargo bench --bench router`.
//!
//! Each path is timed on its own, so a slow rule (the segment-name parsing of HLS,
//! the affinity `String` allocation) shows up on its own line instead of hiding in
//! an average.

use amslb::route::classify;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Realistic request lines: (label, path, query). Shares follow a playback-heavy
/// cluster: most requests are HLS/DASH segments and playlists.
const PATHS: &[(&str, &str, Option<&str>)] = &[
    ("hls playlist", "/LiveApp/streams/stream1.m3u8", None),
    (
        "hls adaptive",
        "/LiveApp/streams/stream1_adaptive.m3u8",
        None,
    ),
    (
        "hls rendition",
        "/LiveApp/streams/stream1_720p2500kbps.m3u8",
        None,
    ),
    ("hls segment", "/LiveApp/streams/stream1000000123.ts", None),
    (
        "hls rendition seg",
        "/LiveApp/streams/stream1_480p000000123.ts",
        None,
    ),
    (
        "ll-hls part",
        "/LiveApp/streams/stream1/part_12_3.m4s",
        None,
    ),
    (
        "dash manifest",
        "/LiveApp/streams/stream1/stream1.mpd",
        None,
    ),
    (
        "dash chunk",
        "/LiveApp/streams/stream1/chunk_0_00012.m4s",
        None,
    ),
    ("whip publish", "/LiveApp/whip/stream1", None),
    ("whep play", "/WebRTCAppEE/whep/stream1", None),
    ("websocket", "/LiveApp/websocket", None),
    (
        "websocket ?target",
        "/LiveApp/websocket",
        Some("target=origin"),
    ),
    ("rest (root)", "/rest/v2/version", None),
    ("rest (app)", "/LiveApp/rest/v2/broadcasts/list/0/50", None),
    ("panel", "/", None),
    ("static file", "/LiveApp/js/webrtc_adaptor.js", None),
    (
        "hls ?target + token",
        "/LiveApp/streams/stream1.m3u8",
        Some("token=abcdef0123456789&target=edge"),
    ),
];

/// Time spent measuring each path; long enough to average out timer noise.
const PER_PATH: Duration = Duration::from_millis(200);
/// Calls between two clock reads, so reading the clock is not what is measured.
const BATCH: u32 = 1_000;

fn main() {
    // `cargo bench` passes `--bench`; a name filter may follow, as with libtest.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    println!("| request | ns/classify | classifications/s |");
    println!("|---|---:|---:|");
    let mut total_ns = 0.0;
    let mut measured = 0;
    for &(label, path, query) in PATHS {
        if filter.as_deref().is_some_and(|f| !label.contains(f)) {
            continue;
        }
        let ns = time_one(path, query);
        total_ns += ns;
        measured += 1;
        println!("| {label} `{path}` | {ns:.1} | {:.2} M |", 1e3 / ns);
    }
    if measured > 0 {
        let mean = total_ns / f64::from(measured);
        println!(
            "| **mean over the table** | {mean:.1} | {:.2} M |",
            1e3 / mean
        );
    }
}

/// Mean nanoseconds per `classify` call for one path, after a short warm-up.
fn time_one(path: &str, query: Option<&str>) -> f64 {
    for _ in 0..BATCH {
        black_box(classify(black_box(path), black_box(query)));
    }
    let start = Instant::now();
    let mut calls: u64 = 0;
    while start.elapsed() < PER_PATH {
        for _ in 0..BATCH {
            black_box(classify(black_box(path), black_box(query)));
        }
        calls += u64::from(BATCH);
    }
    start.elapsed().as_nanos() as f64 / calls as f64
}
