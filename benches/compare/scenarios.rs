//! The scenarios of issue 10, each run against the backend directly (where that
//! means something) and through every balancer in turn, one balancer at a time.

use crate::backend::{LARGE_PATH, NODE_HEADER, SMALL_PATH, XFF_HEADER, spawn_ws_nodes};
use crate::load::{Wrk, WrkResult, check_echo, http_get, open_tunnels};
use crate::net::{Addrs, NODE_PORT};
use crate::peers::{Front, Kind, Peer, Spec, TlsFiles};
use crate::procs::{Daemon, StartError};
use crate::report::{Better, Cell, Column, Figure, Report};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Connections for the small-response scenarios (issue 10: 64).
const SMALL_CONNS: usize = 64;
/// Connections for the large-body scenarios: enough to keep both cores busy.
const LARGE_CONNS: usize = 4;
/// Warm-up before a measured run (pools filled, caches hot).
const WARMUP: Duration = Duration::from_secs(1);
/// Connection cap of every balancer outside scenario 4: far above what the
/// load needs, small enough for HAProxy's file descriptor check.
const MAX_CONN: usize = 4_096;
/// Connections allowed beyond the tunnels in scenario 4 (checks, stray clients).
const TUNNEL_HEADROOM: usize = 50;
/// WebSocket handshakes in flight at once while opening tunnels.
const TUNNEL_PARALLEL: usize = 128;
/// How many tunnels are checked for an echo (all of them would take long).
const TUNNELS_ECHOED: usize = 100;
/// WebSocket path; the router classifies it as AMS signalling.
const WS_PATH: &str = "/LiveApp/websocket";

/// Each measurement: figures in the order of the scenario's rows, or why not.
type Measured = Result<Vec<f64>, String>;
/// A scenario: runs and adds its rows to the report.
type Scenario = fn(&mut Bench);
/// One column's outcome for a scenario.
type Outcome = (Column, Result<Vec<f64>, Cell>);

/// Everything the scenarios share.
pub struct Bench {
    /// Scratch directory: configs, logs, temp files.
    pub dir: PathBuf,
    /// Address allocator for balancer front ends.
    pub addrs: Addrs,
    /// Balancers found on this machine.
    pub peers: Vec<Peer>,
    /// The load generator.
    pub wrk: Wrk,
    /// Backend nginx nodes.
    pub http_nodes: Vec<IpAddr>,
    /// WebSocket echo nodes.
    pub ws_nodes: Vec<IpAddr>,
    /// Threads/workers each balancer is given.
    pub threads: usize,
    /// Idle tunnels opened in scenario 4.
    pub tunnels: usize,
    /// Length of each measured wrk run.
    pub duration: Duration,
    /// Runtime for the WebSocket client and nodes.
    pub rt: Runtime,
    /// Certificate for scenario 5, or why it could not be made.
    pub tls: Result<TlsFiles, String>,
    /// Results so far.
    pub report: Report,
}

impl Bench {
    /// Runs the scenarios whose number is in `wanted` (all when empty).
    pub fn run(&mut self, wanted: &[u8]) {
        let scenarios: [(u8, Scenario); 7] = [
            (1, Self::keep_alive),
            (2, Self::new_connections),
            (3, Self::streaming),
            (4, Self::idle_tunnels),
            (5, Self::tls_handshakes),
            (6, Self::tcp_relay),
            (7, Self::membership),
        ];
        for (n, scenario) in scenarios {
            if wanted.is_empty() || wanted.contains(&n) {
                println!("== scenario {n}");
                scenario(self);
            }
        }
    }

    /// 1: keep-alive small responses at 64 connections.
    fn keep_alive(&mut self) {
        let run = |addr: SocketAddr| -> Measured {
            let r = self.wrk_warm(addr, SMALL_PATH, SMALL_CONNS, false)?;
            Ok(vec![r.rate(), ms(r.p50_us), ms(r.p99_us)])
        };
        let mut results = vec![self.direct(&run)];
        results.extend(
            self.each_peer(1, &Front::Http, &self.http_nodes, |daemon, addr| {
                self.check_equivalence(daemon, addr)?;
                run(addr)
            }),
        );
        self.add(
            1,
            results,
            &[
                ("1 keep-alive, 64 conns: req/s", Better::Higher, 0),
                ("1 keep-alive: p50 latency ms", Better::Lower, 3),
                ("1 keep-alive: p99 latency ms", Better::Lower, 3),
            ],
        );
    }

    /// 2: a new connection per request.
    fn new_connections(&mut self) {
        let run = |addr: SocketAddr| -> Measured {
            let r = self.wrk_warm(addr, SMALL_PATH, SMALL_CONNS, true)?;
            Ok(vec![r.rate(), ms(r.p99_us)])
        };
        let mut results = vec![self.direct(&run)];
        results.extend(self.each_peer(2, &Front::Http, &self.http_nodes, |_, addr| run(addr)));
        self.add(
            2,
            results,
            &[
                ("2 new conn per request: req/s", Better::Higher, 0),
                ("2 new conn per request: p99 ms", Better::Lower, 3),
            ],
        );
    }

    /// 3: 100 MB responses streamed through; throughput and the balancer's peak RSS.
    fn streaming(&mut self) {
        let run = |addr: SocketAddr| self.wrk_large(&format!("http://{addr}{LARGE_PATH}"));
        let mut results = vec![self.direct(&|addr| Ok(vec![run(addr)?, f64::NAN]))];
        results.extend(
            self.each_peer(3, &Front::Http, &self.http_nodes, |daemon, addr| {
                daemon.reset_peak();
                let rate = run(addr)?;
                Ok(vec![rate, daemon.memory().peak_kib as f64 / 1024.0])
            }),
        );
        self.add(
            3,
            results,
            &[
                ("3 stream 100 MB bodies, 4 conns: MB/s", Better::Higher, 0),
                ("3 stream 100 MB: balancer peak RSS MiB", Better::Lower, 1),
            ],
        );
    }

    /// 4: memory per idle WebSocket tunnel.
    fn idle_tunnels(&mut self) {
        let nodes = match spawn_ws_nodes(&self.dir, &self.ws_nodes) {
            Ok(nodes) => nodes,
            Err(e) => {
                self.report
                    .notes
                    .push(format!("scenario 4 skipped: WebSocket nodes: {e}"));
                return;
            }
        };
        let count = self.tunnels;
        let results = self.each_peer(4, &Front::Http, &self.ws_nodes, |daemon, addr| {
            let before = daemon.memory().rss_kib;
            self.rt.block_on(async {
                let start = Instant::now();
                let mut tunnels = open_tunnels(addr, WS_PATH, count, TUNNEL_PARALLEL).await?;
                let open_rate = count as f64 / start.elapsed().as_secs_f64();
                check_echo(&mut tunnels[..TUNNELS_ECHOED.min(count)]).await?;
                // Let the balancer finish its per-connection set-up before measuring.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let after = daemon.memory().rss_kib;
                drop(tunnels);
                let per_tunnel = after.saturating_sub(before) as f64 / count as f64;
                Ok(vec![per_tunnel, after as f64 / 1024.0, open_rate])
            })
        });
        drop(nodes);
        self.add(
            4,
            results,
            &[
                (
                    &format!("4 idle WebSocket tunnels: KiB per tunnel ({count} open)"),
                    Better::Lower,
                    2,
                ),
                (
                    &format!("4 balancer RSS with {count} tunnels MiB"),
                    Better::Lower,
                    1,
                ),
                ("4 tunnels opened per s", Better::Higher, 0),
            ],
        );
    }

    /// 5: full TLS handshakes per second (a new connection per request, no resumption).
    fn tls_handshakes(&mut self) {
        let tls = match &self.tls {
            Ok(tls) => tls,
            Err(e) => {
                self.report
                    .notes
                    .push(format!("scenario 5 skipped: certificate: {e}"));
                return;
            }
        };
        let front = Front::Https(tls);
        let results = self.each_peer(5, &front, &self.http_nodes, |_, addr| {
            let url = format!("https://{addr}{SMALL_PATH}");
            self.wrk.run(&url, SMALL_CONNS, WARMUP, true)?;
            let r = checked(self.wrk.run(&url, SMALL_CONNS, self.duration, true))?;
            Ok(vec![r.rate()])
        });
        let results = na_hint(results, "amslb has no https listener yet");
        self.add(
            5,
            results,
            &[(
                "5 TLS full handshakes/s (ECDSA P-256, 64 conns)",
                Better::Higher,
                0,
            )],
        );
    }

    /// 6: TCP relay throughput (the RTMP path), carrying 100 MB HTTP bodies.
    fn tcp_relay(&mut self) {
        let run =
            |addr: SocketAddr| Ok(vec![self.wrk_large(&format!("http://{addr}{LARGE_PATH}"))?]);
        let mut results = vec![self.direct(&run)];
        results.extend(self.each_peer(6, &Front::Tcp, &self.http_nodes, |_, addr| run(addr)));
        let results = na_hint(results, "amslb has no tcp listener yet");
        self.add(
            6,
            results,
            &[("6 TCP relay, 4 conns: MB/s", Better::Higher, 0)],
        );
    }

    /// 7: membership change to routing; needs amslb's MongoDB source.
    fn membership(&mut self) {
        // Not measured yet: amslb has no MongoDB source, and HAProxy/nginx have no
        // equivalent (they reload a file). The row keeps the scenario visible.
        let results = vec![(
            Column::Peer(Kind::Amslb),
            Err(Cell::NotAvailable(
                "amslb has no MongoDB membership source yet; not measured".into(),
            )),
        )];
        self.add(
            7,
            results,
            &[(
                "7 MongoDB write → first routed request ms",
                Better::Lower,
                0,
            )],
        );
    }

    /// Runs `measure` against the first backend node directly.
    fn direct(&self, measure: &dyn Fn(SocketAddr) -> Measured) -> Outcome {
        let addr = SocketAddr::new(self.http_nodes[0], NODE_PORT);
        let result = measure(addr).map_err(Cell::Error);
        println!("  backend direct: {}", show(&result));
        (Column::Direct, result)
    }

    /// Starts each balancer in turn with `front` over `nodes`, runs `measure`
    /// against it, stops it. A refused config is n/a, any other failure an error.
    fn each_peer(
        &self,
        scenario: u8,
        front: &Front,
        nodes: &[IpAddr],
        mut measure: impl FnMut(&Daemon, SocketAddr) -> Measured,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        for peer in &self.peers {
            let dir = self.dir.join(format!("s{scenario}-{}", peer.kind.name()));
            let listen = self.addrs.front();
            let spec = Spec {
                front,
                listen,
                nodes,
                dir: &dir,
                max_conn: if scenario == 4 {
                    self.tunnels + TUNNEL_HEADROOM
                } else {
                    MAX_CONN
                },
                threads: self.threads,
            };
            let result = fs::create_dir_all(&dir)
                .map_err(|e| StartError::Failed(e.to_string()))
                .and_then(|_| peer.start(&spec));
            let result = match result {
                Ok(daemon) => measure(&daemon, listen)
                    .map_err(|e| Cell::Error(format!("{e} (log: {})", daemon.log_tail()))),
                Err(StartError::Refused(why)) => Err(Cell::NotAvailable(why)),
                Err(StartError::Failed(why)) => Err(Cell::Error(why)),
            };
            println!("  {}: {}", peer.kind.name(), show(&result));
            outcomes.push((Column::Peer(peer.kind), result));
        }
        outcomes
    }

    /// Four plain GETs through the balancer must reach both nodes (round-robin)
    /// and arrive with X-Forwarded-For naming the client.
    fn check_equivalence(&self, daemon: &Daemon, addr: SocketAddr) -> Result<(), String> {
        let mut nodes_seen = Vec::new();
        for _ in 0..4 {
            let response = http_get(addr, SMALL_PATH)?;
            if response.status != 200 {
                return Err(format!("equivalence check: status {}", response.status));
            }
            let xff = response.header(XFF_HEADER).unwrap_or_default();
            if !xff.contains("127.0.0.1") {
                return Err(format!(
                    "equivalence check: node saw X-Forwarded-For {xff:?}"
                ));
            }
            let node = response.header(NODE_HEADER).unwrap_or_default().to_string();
            if !nodes_seen.contains(&node) {
                nodes_seen.push(node);
            }
        }
        if nodes_seen.len() != self.http_nodes.len() {
            return Err(format!(
                "equivalence check: 4 requests reached only {nodes_seen:?} (log: {})",
                daemon.log_tail()
            ));
        }
        println!("  equivalence check passed: both nodes reached, X-Forwarded-For arrives");
        Ok(())
    }

    /// A warm-up run, then the measured one, on a small-response path.
    fn wrk_warm(
        &self,
        addr: SocketAddr,
        path: &str,
        conns: usize,
        close: bool,
    ) -> Result<WrkResult, String> {
        let url = format!("http://{addr}{path}");
        self.wrk.run(&url, conns, WARMUP, close)?;
        checked(self.wrk.run(&url, conns, self.duration, close))
    }

    /// MB/s of 100 MB bodies fetched on [`LARGE_CONNS`] connections.
    fn wrk_large(&self, url: &str) -> Result<f64, String> {
        let r = checked(self.wrk.run(url, LARGE_CONNS, self.duration, false))?;
        Ok(r.mbytes_per_s())
    }

    /// Turns one scenario's outcomes into rows: row `i` takes each column's `i`th figure.
    fn add(&mut self, scenario: u8, outcomes: Vec<Outcome>, rows: &[(&str, Better, usize)]) {
        for (i, (label, better, decimals)) in rows.iter().enumerate() {
            let cells = outcomes
                .iter()
                .map(|(column, outcome)| {
                    let cell = match outcome {
                        Ok(values) => values.get(i).map_or(Cell::Blank, |v| Cell::Value(*v)),
                        Err(cell) => cell.clone(),
                    };
                    (*column, cell)
                })
                .collect();
            self.report.figures.push(Figure {
                scenario,
                label: label.to_string(),
                better: *better,
                decimals: *decimals,
                cells,
            });
        }
    }
}

/// A wrk result, or an error when its errors make the figures doubtful.
fn checked(result: Result<WrkResult, String>) -> Result<WrkResult, String> {
    let r = result?;
    match r.doubt() {
        Some(why) => Err(why),
        None => Ok(r),
    }
}

/// Replaces amslb's n/a reason by `hint` (its own message is printed during the run).
fn na_hint(outcomes: Vec<Outcome>, hint: &str) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|(column, outcome)| match outcome {
            Err(Cell::NotAvailable(_)) if column == Column::Peer(Kind::Amslb) => {
                (column, Err(Cell::NotAvailable(hint.to_string())))
            }
            other => (column, other),
        })
        .collect()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// One line of progress for an outcome.
fn show(result: &Result<Vec<f64>, Cell>) -> String {
    match result {
        Ok(values) => values
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" / "),
        Err(Cell::NotAvailable(why)) => format!("n/a ({why})"),
        Err(Cell::Error(why)) => format!("error: {why}"),
        Err(other) => format!("{other:?}"),
    }
}

/// The scratch directory of a bench run, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("amslb-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
