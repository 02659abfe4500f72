//! Scenario 9's load: HLS viewers of a live stream. Each viewer keeps one
//! HTTP/1.1 keep-alive connection and, once a second, fetches the playlist and
//! then the next segment (1 MB), as a player of a stream cut into 1 s segments
//! does. Viewers start at random moments within the first second, so the
//! balancer sees a steady mix, not a burst every second.
//!
//! The same viewers can also catch up ([`Pace::CatchUp`]): each fetches the
//! playlist and the next segment back to back, with no wait, as a player
//! does after a seek or a stall. The offered load is then what the balancer
//! can carry, so req/s measures its capacity for this mix.

use crate::backend::{PLAYLIST_PATH, SEGMENTS, segment_path};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// How often a viewer polls the playlist (and fetches one segment).
const PERIOD: Duration = Duration::from_secs(1);
/// Connections opened at once while the viewers join.
const CONNECT_PARALLEL: usize = 64;
/// Longest wait for one response before the viewer counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How a viewer spaces its periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// One period (playlist + segment) every [`PERIOD`], as a live player.
    Live,
    /// The next period as soon as the last one ends.
    CatchUp,
}

/// A viewer's connection, warmed by one playlist fetch.
pub struct Viewer {
    sender: SendRequest<Empty<Bytes>>,
}

/// What the viewers measured together.
#[derive(Debug, Clone, Default)]
pub struct HlsResult {
    /// Completed responses (playlists and segments).
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// From the first tick to the last viewer finishing, seconds.
    pub secs: f64,
    /// Playlist latencies (request sent to last byte), microseconds, sorted.
    pub playlist_us: Vec<u64>,
    /// Segment latencies (request sent to last byte), microseconds, sorted.
    pub segment_us: Vec<u64>,
    /// Periods a viewer started late because the previous fetches overran.
    pub late: u64,
    /// Viewers that stopped on an error, with the first error.
    pub failed: Vec<String>,
}

impl HlsResult {
    /// Responses per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// A warning when failures make the figures doubtful (more than 1% of the viewers).
    pub fn doubt(&self, viewers: usize) -> Option<String> {
        (self.requests == 0 || self.failed.len() * 100 > viewers).then(|| {
            format!(
                "{} of {viewers} viewers failed ({}), {} responses",
                self.failed.len(),
                self.failed.first().map_or("", String::as_str),
                self.requests
            )
        })
    }
}

/// The `q` quantile of sorted `values` (0 when empty).
pub fn quantile(values: &[u64], q: f64) -> u64 {
    let i = ((values.len() as f64 * q) as usize).min(values.len().saturating_sub(1));
    values.get(i).copied().unwrap_or(0)
}

/// Opens `count` viewer connections to `addr`, each fetching the playlist once.
pub async fn connect(addr: SocketAddr, count: usize) -> Result<Vec<Viewer>, String> {
    let joined: Vec<Result<Viewer, String>> = stream::iter(0..count)
        .map(|_| async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut viewer = Viewer { sender };
            fetch(&mut viewer.sender, PLAYLIST_PATH).await?;
            Ok(viewer)
        })
        .buffer_unordered(CONNECT_PARALLEL)
        .collect()
        .await;
    joined.into_iter().collect()
}

/// Lets every viewer watch for `duration` at `pace`, then merges what they measured.
pub async fn watch(viewers: Vec<Viewer>, duration: Duration, pace: Pace) -> HlsResult {
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(i, viewer)| {
            let phase = match pace {
                Pace::Live => PERIOD.mul_f64(rand::random_range(0.0..1.0)),
                Pace::CatchUp => Duration::ZERO,
            };
            tokio::spawn(view(viewer, start + phase, end, i % SEGMENTS, pace))
        })
        .collect();
    let mut total = HlsResult::default();
    for task in tasks {
        let one = task
            .await
            .unwrap_or_else(|e| (Watched::default(), Some(e.to_string())));
        let (watched, error) = one;
        total.requests += watched.requests;
        total.bytes += watched.bytes;
        total.late += watched.late;
        total.playlist_us.extend(watched.playlist_us);
        total.segment_us.extend(watched.segment_us);
        total.failed.extend(error);
    }
    total.secs = start.elapsed().as_secs_f64();
    total.playlist_us.sort_unstable();
    total.segment_us.sort_unstable();
    total
}

/// One viewer's figures.
#[derive(Default)]
struct Watched {
    requests: u64,
    bytes: u64,
    late: u64,
    playlist_us: Vec<u64>,
    segment_us: Vec<u64>,
}

/// One viewer: from `first` until `end`, the playlist then the next segment
/// (starting with segment `segment`), every [`PERIOD`] or back to back as
/// `pace` says. Returns what it measured and, if it stopped early, why.
async fn view(
    mut viewer: Viewer,
    first: Instant,
    end: Instant,
    mut segment: usize,
    pace: Pace,
) -> (Watched, Option<String>) {
    let mut watched = Watched::default();
    let mut tick = first;
    while tick < end {
        tokio::time::sleep_until(tick).await;
        let paths = [PLAYLIST_PATH.to_string(), segment_path(segment % SEGMENTS)];
        for (i, path) in paths.iter().enumerate() {
            let sent = Instant::now();
            match fetch(&mut viewer.sender, path).await {
                Ok(bytes) => {
                    let us = sent.elapsed().as_micros() as u64;
                    watched.requests += 1;
                    watched.bytes += bytes;
                    if i == 0 {
                        watched.playlist_us.push(us);
                    } else {
                        watched.segment_us.push(us);
                    }
                }
                Err(e) => return (watched, Some(e)),
            }
        }
        segment += 1;
        match pace {
            Pace::Live => {
                tick += PERIOD;
                if Instant::now() > tick {
                    watched.late += 1;
                }
            }
            Pace::CatchUp => tick = Instant::now(),
        }
    }
    (watched, None)
}

/// GETs `path` on the viewer's connection and reads the body to the end; its length.
async fn fetch(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> Result<u64, String> {
    let request = Request::get(path)
        .header("host", "bench.test")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("{path}: status {}", response.status()));
        }
        let mut body = response.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{path}: {e}"))?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
            }
        }
        Ok(bytes)
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{path}: no full response within {FETCH_TIMEOUT:?}"))?
}
