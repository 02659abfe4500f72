//! The scenarios, each run against the backend directly (where that
//! means something) and through every balancer in turn, one balancer at a time.

use crate::backend::{LARGE_PATH, NODE_HEADER, SMALL_PATH, XFF_HEADER, spawn_ws_nodes};
use crate::hls::{self, Pace, quantile};
use crate::load::{FullHandshakes, H2load, Wrk, WrkResult, check_echo, http_get, open_tunnels};
use crate::net::{Addrs, NODE_PORT};
use crate::peers::{Front, Kind, Peer, Spec, TLS_NAME, TlsFiles};
use crate::procs::{Daemon, StartError};
use crate::registry::{self, Registry, Secantus};
use crate::report::{Better, Cell, Column, Figure, Report};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Connections for the small-response scenarios.
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
/// Scenario 7: times node 2 joins per registry mode.
const JOINS: usize = 5;
/// Scenario 7: pause between requests while waiting for a membership change.
const JOIN_POLL: Duration = Duration::from_millis(5);
/// Scenario 7: longest wait for a join or a leave to show in routing.
const JOIN_LIMIT: Duration = Duration::from_secs(5);
/// Scenario 7: longest wait for node 1 after amslb starts (first full read).
const FIRST_JOIN_LIMIT: Duration = Duration::from_secs(15);
/// Scenario 7: requests in a row on node 1 that show node 2 has left.
const LEFT_STREAK: usize = 10;
/// Scenario 7: amslb's default `poll_interval`. Each write first waits a random
/// part of it, so that it falls at a random point of the poll cycle (right
/// after a leave was seen, it would always land just after a poll).
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Scenario 7: how long amslb's idle CPU (health checks, following the registry) is measured.
const IDLE_SPAN: Duration = Duration::from_secs(4);
/// Scenario 8: h2load connections (`-c`).
const H2_CONNS: usize = 16;
/// Scenario 8: concurrent streams per connection (`-m`).
const H2_STREAMS: usize = 16;
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
    /// The HTTP/2 load generator for scenario 8, if installed.
    pub h2load: Option<H2load>,
    /// Scenario 9's HLS viewers.
    pub viewers: usize,
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
        let scenarios: [(u8, Scenario); 9] = [
            (1, Self::keep_alive),
            (2, Self::new_connections),
            (3, Self::streaming),
            (4, Self::idle_tunnels),
            (5, Self::tls_handshakes),
            (6, Self::tcp_relay),
            (7, Self::membership),
            (8, Self::http2),
            (9, Self::hls),
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
        let run = |daemon: Option<&Daemon>, addr: SocketAddr| -> Measured {
            let (r, cpu) = self.wrk_warm(daemon, addr, SMALL_PATH, SMALL_CONNS, false)?;
            Ok(vec![
                r.rate(),
                us_per(cpu, r.requests),
                ms(r.p50_us),
                ms(r.p99_us),
            ])
        };
        let mut results = vec![self.direct(&|addr| run(None, addr))];
        results.extend(
            self.each_peer(1, &Front::Http, &self.http_nodes, |daemon, addr| {
                self.check_equivalence(daemon, addr)?;
                run(Some(daemon), addr)
            }),
        );
        self.add(
            1,
            results,
            &[
                ("1 keep-alive, 64 conns: req/s", Better::Higher, 0),
                (
                    "1 keep-alive: balancer CPU µs per request",
                    Better::Lower,
                    1,
                ),
                ("1 keep-alive: p50 latency ms", Better::Lower, 3),
                ("1 keep-alive: p99 latency ms", Better::Lower, 3),
            ],
        );
    }

    /// 2: a new connection per request.
    fn new_connections(&mut self) {
        let run = |daemon: Option<&Daemon>, addr: SocketAddr| -> Measured {
            let (r, cpu) = self.wrk_warm(daemon, addr, SMALL_PATH, SMALL_CONNS, true)?;
            Ok(vec![r.rate(), us_per(cpu, r.requests), ms(r.p99_us)])
        };
        let mut results = vec![self.direct(&|addr| run(None, addr))];
        results.extend(
            self.each_peer(2, &Front::Http, &self.http_nodes, |daemon, addr| {
                run(Some(daemon), addr)
            }),
        );
        self.add(
            2,
            results,
            &[
                ("2 new conn per request: req/s", Better::Higher, 0),
                (
                    "2 new conn per request: balancer CPU µs per request",
                    Better::Lower,
                    1,
                ),
                ("2 new conn per request: p99 ms", Better::Lower, 3),
            ],
        );
    }

    /// 3: 100 MB responses streamed through; throughput and the balancer's peak RSS.
    fn streaming(&mut self) {
        let run = |daemon: Option<&Daemon>, addr: SocketAddr| {
            self.wrk_large(daemon, &format!("http://{addr}{LARGE_PATH}"))
        };
        let mut results = vec![self.direct(&|addr| {
            let (rate, cpu) = run(None, addr)?;
            Ok(vec![rate, cpu, f64::NAN])
        })];
        results.extend(
            self.each_peer(3, &Front::Http, &self.http_nodes, |daemon, addr| {
                daemon.reset_peak();
                let (rate, cpu) = run(Some(daemon), addr)?;
                Ok(vec![rate, cpu, daemon.memory().peak_kib as f64 / 1024.0])
            }),
        );
        self.add(
            3,
            results,
            &[
                ("3 stream 100 MB bodies, 4 conns: MB/s", Better::Higher, 0),
                ("3 stream 100 MB: balancer CPU s per GB", Better::Lower, 3),
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
                let cpu = daemon.cpu_seconds();
                let mut tunnels = open_tunnels(addr, WS_PATH, count, TUNNEL_PARALLEL).await?;
                let open_rate = count as f64 / start.elapsed().as_secs_f64();
                let open_cpu = us_per(daemon.cpu_seconds() - cpu, count as u64);
                check_echo(&mut tunnels[..TUNNELS_ECHOED.min(count)]).await?;
                // Let the balancer finish its per-connection set-up before measuring.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let after = daemon.memory().rss_kib;
                drop(tunnels);
                let per_tunnel = after.saturating_sub(before) as f64 / count as f64;
                Ok(vec![per_tunnel, after as f64 / 1024.0, open_rate, open_cpu])
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
                ("4 balancer CPU µs per tunnel opened", Better::Lower, 1),
            ],
        );
    }

    /// 5: TLS handshakes per second, full ([`FullHandshakes`]: a new session
    /// every connection) and resumed (wrk, which reconnects with the session
    /// ticket of its last connection), each with one request.
    fn tls_handshakes(&mut self) {
        let Some(tls) = certificate(&self.tls, &mut self.report.notes, 5) else {
            return;
        };
        let full = FullHandshakes::new(&tls.cert, TLS_NAME);
        let front = Front::Https(tls);
        let results = self.each_peer(5, &front, &self.http_nodes, |daemon, addr| {
            let full = full.as_ref()?;
            let run = |duration| {
                self.rt
                    .block_on(full.run(addr, SMALL_PATH, SMALL_CONNS, duration))
            };
            run(WARMUP)?;
            let (full, full_cpu) = with_cpu(Some(daemon), || run(self.duration))?;
            let url = format!("https://{addr}{SMALL_PATH}");
            self.wrk.run(&url, SMALL_CONNS, WARMUP, true)?;
            let (resumed, resumed_cpu) = with_cpu(Some(daemon), || {
                checked(self.wrk.run(&url, SMALL_CONNS, self.duration, true))
            })?;
            Ok(vec![
                full.rate(),
                us_per(full_cpu, full.done),
                resumed.rate(),
                us_per(resumed_cpu, resumed.requests),
            ])
        });
        let results = na_hint(results, "amslb has no https listener yet");
        self.add(
            5,
            results,
            &[
                (
                    &format!("5 TLS full handshakes/s (ECDSA P-256, X25519, {SMALL_CONNS} conns)"),
                    Better::Higher,
                    0,
                ),
                ("5 balancer CPU µs per full handshake", Better::Lower, 1),
                (
                    &format!(
                        "5 TLS resumed handshakes/s (wrk, session ticket, {SMALL_CONNS} conns)"
                    ),
                    Better::Higher,
                    0,
                ),
                ("5 balancer CPU µs per resumed handshake", Better::Lower, 1),
            ],
        );
    }

    /// 6: TCP relay throughput (the RTMP path), carrying 100 MB HTTP bodies.
    fn tcp_relay(&mut self) {
        let run = |daemon: Option<&Daemon>, addr: SocketAddr| -> Measured {
            let (rate, cpu) = self.wrk_large(daemon, &format!("http://{addr}{LARGE_PATH}"))?;
            Ok(vec![rate, cpu])
        };
        let mut results = vec![self.direct(&|addr| run(None, addr))];
        results.extend(
            self.each_peer(6, &Front::Tcp, &self.http_nodes, |daemon, addr| {
                run(Some(daemon), addr)
            }),
        );
        let results = na_hint(results, "amslb has no tcp listener yet");
        self.add(
            6,
            results,
            &[
                ("6 TCP relay, 4 conns: MB/s", Better::Higher, 0),
                ("6 TCP relay: balancer CPU s per GB", Better::Lower, 3),
            ],
        );
    }

    /// 7: membership change to routing: how long after the MongoDB write that
    /// registers a node amslb routes a request to it. Node 1 is registered and
    /// routed first; node 2 then joins [`JOINS`] times (under a fresh id each
    /// time, after its previous document was deleted and amslb had dropped it),
    /// with a request through amslb every [`JOIN_POLL`] from the write on. Each
    /// write comes at a random moment (see [`POLL_INTERVAL`]).
    /// Once against a replica set (change streams), once against a standalone
    /// server (amslb polls every `poll_interval`, default 2 s). HAProxy and
    /// nginx have no registry to follow (they reload a file): no cells.
    fn membership(&mut self) {
        let modes = [
            (false, "change stream (replica set)"),
            (true, "polling (standalone, poll_interval 2 s)"),
        ];
        for (standalone, mode) in modes {
            let figures = self.joins(standalone).map(|(times, idle_cpu)| {
                let list: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
                println!("  amslb, {mode}: each join {} ms", list.join(", "));
                let sorted = sorted(times);
                vec![median(&sorted), sorted[sorted.len() - 1], idle_cpu]
            });
            println!("  amslb, {mode}: median / max: {}", show(&figures));
            self.add(
                7,
                vec![(Column::Peer(Kind::Amslb), figures)],
                &[
                    (
                        &format!("7 MongoDB write → first routed request, {mode}: median ms"),
                        Better::Lower,
                        1,
                    ),
                    (
                        &format!(
                            "7 MongoDB write → first routed request, {mode}: max of {JOINS} ms"
                        ),
                        Better::Lower,
                        1,
                    ),
                    (
                        &format!("7 amslb CPU when idle, {mode}: ms per s"),
                        Better::Lower,
                        2,
                    ),
                ],
            );
        }
        self.report.notes.push(format!(
            "scenario 7: amslb only (HAProxy and nginx reload a file; no registry to follow). \
             The clock starts as the registry write is sent (AMS's replace-with-upsert) and \
             stops when a response from the new node arrives; requests go every \
             {} ms on fresh connections; each write comes at a random moment, so \
             polling gives 0 to 2 s plus the read, and 5 joins a rough median. \
             Idle CPU: {} s after the joins with no requests (health checks and \
             following the registry only)",
            JOIN_POLL.as_millis(),
            IDLE_SPAN.as_secs()
        ));
    }

    /// 8: HTTP/2 over TLS, many streams per connection (as browsers fetch
    /// HLS): h2load with [`H2_CONNS`] connections × [`H2_STREAMS`] streams on
    /// the small path. The nodes are reached over HTTP/1.1 by every balancer.
    fn http2(&mut self) {
        let Some(h2load) = &self.h2load else {
            self.report.notes.push(
                "scenario 8 skipped: h2load not found (apt-get install nghttp2-client)".into(),
            );
            return;
        };
        let Some(tls) = certificate(&self.tls, &mut self.report.notes, 8) else {
            return;
        };
        let front = Front::Https2(tls);
        let results = self.each_peer(8, &front, &self.http_nodes, |daemon, addr| {
            let url = format!("https://{addr}{SMALL_PATH}");
            h2load.run(&url, H2_CONNS, H2_STREAMS, WARMUP)?;
            let (r, cpu) = with_cpu(Some(daemon), || {
                let r = h2load.run(&url, H2_CONNS, H2_STREAMS, self.duration)?;
                r.doubt().map_or(Ok(r), Err)
            })?;
            Ok(vec![
                r.rate(),
                us_per(cpu, r.succeeded),
                ms(r.p50_us),
                ms(r.p99_us),
            ])
        });
        self.add(
            8,
            results,
            &[
                (
                    &format!("8 HTTP/2 over TLS, h2load -c{H2_CONNS} -m{H2_STREAMS}: req/s"),
                    Better::Higher,
                    0,
                ),
                ("8 HTTP/2: balancer CPU µs per request", Better::Lower, 1),
                ("8 HTTP/2: p50 latency ms", Better::Lower, 2),
                ("8 HTTP/2: p99 latency ms", Better::Lower, 2),
            ],
        );
    }

    /// 9: an HLS-shaped mix: [`Bench::viewers`] viewers on keep-alive
    /// connections, each polling the playlist every second and fetching the
    /// next 1 MB segment (see `hls.rs`). The offered load is fixed (2 requests
    /// and 1 MB per viewer per second): a balancer that keeps up shows it in
    /// its latency and CPU, one that does not in req/s and late periods. So
    /// req/s there is the same for all that keep up; the same viewers then
    /// catch up (each period right after the last), where req/s is what the
    /// balancer can carry of this mix.
    fn hls(&mut self) {
        let viewers = self.viewers;
        let watch = |daemon: Option<&Daemon>, addr: SocketAddr, pace: Pace| {
            let joined = self.rt.block_on(hls::connect(addr, viewers))?;
            with_cpu(daemon, || {
                let r = self.rt.block_on(hls::watch(joined, self.duration, pace));
                r.doubt(viewers).map_or(Ok(r), Err)
            })
        };
        let run = |daemon: Option<&Daemon>, addr: SocketAddr| -> Measured {
            let (live, cpu) = watch(daemon, addr, Pace::Live)?;
            let periods = (live.segment_us.len() as f64).max(1.0);
            let (catch_up, catch_up_cpu) = watch(daemon, addr, Pace::CatchUp)?;
            Ok(vec![
                live.rate(),
                per_gb(cpu, live.bytes),
                ms(quantile(&live.playlist_us, 0.99)),
                ms(quantile(&live.segment_us, 0.99)),
                live.late as f64 * 100.0 / periods,
                catch_up.rate(),
                per_gb(catch_up_cpu, catch_up.bytes),
            ])
        };
        let mut results = vec![self.direct(&|addr| run(None, addr))];
        results.extend(
            self.each_peer(9, &Front::Http, &self.http_nodes, |daemon, addr| {
                run(Some(daemon), addr)
            }),
        );
        self.add(
            9,
            results,
            &[
                (
                    &format!("9 HLS, {viewers} viewers (playlist every 1 s + 1 MB segment): req/s"),
                    Better::Higher,
                    0,
                ),
                ("9 HLS: balancer CPU s per GB", Better::Lower, 3),
                ("9 HLS: playlist p99 ms", Better::Lower, 2),
                ("9 HLS: segment p99 ms", Better::Lower, 2),
                ("9 HLS: periods started late %", Better::Lower, 1),
                (
                    &format!("9 HLS catching up, {viewers} viewers back to back: req/s"),
                    Better::Higher,
                    0,
                ),
                ("9 HLS catching up: balancer CPU s per GB", Better::Lower, 3),
            ],
        );
    }

    /// Scenario 7 against one SecantusDB: the join times in ms and amslb's
    /// idle CPU in ms per s, or why not.
    fn joins(&self, standalone: bool) -> Result<(Vec<f64>, f64), Cell> {
        let amslb = self
            .peers
            .iter()
            .find(|p| p.kind == Kind::Amslb)
            .ok_or_else(|| Cell::Error("amslb not found".into()))?;
        let dir = self.dir.join(if standalone {
            "s7-standalone"
        } else {
            "s7-replset"
        });
        fs::create_dir_all(&dir).map_err(|e| Cell::Error(e.to_string()))?;
        let db = Secantus::start(&dir, standalone).map_err(|e| match e {
            StartError::Refused(why) => Cell::NotAvailable(why),
            StartError::Failed(why) => Cell::Error(format!("SecantusDB: {why}")),
        })?;
        let ams = self
            .rt
            .block_on(Registry::connect(&db.uri))
            .map_err(Cell::Error)?;
        let [node1, node2] = [self.http_nodes[0], self.http_nodes[1]];
        self.rt
            .block_on(ams.register("bench-node-1", node1))
            .map_err(Cell::Error)?;
        let listen = self.addrs.front();
        let cidr = format!("{}/24", self.addrs.host(0));
        let daemon = amslb
            .start_amslb(
                &dir,
                listen,
                &registry::amslb_config(listen, &db.uri, &cidr),
                // The source says at info level when it falls back to polling.
                "warn,amslb::cluster=info",
            )
            .map_err(|e| match e {
                StartError::Refused(why) => Cell::NotAvailable(why),
                StartError::Failed(why) => Cell::Error(why),
            })?;
        let measure = || -> Result<(Vec<f64>, f64), String> {
            routed_to(listen, node1, FIRST_JOIN_LIMIT)?;
            let mut times = Vec::with_capacity(JOINS);
            for i in 1..=JOINS {
                let id = format!("bench-node-2-{i}");
                std::thread::sleep(POLL_INTERVAL.mul_f64(rand::random_range(0.0..1.0)));
                let t0 = Instant::now();
                self.rt.block_on(ams.register(&id, node2))?;
                routed_to(listen, node2, JOIN_LIMIT)?;
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                self.rt.block_on(ams.remove(&id))?;
                only_routed_to(listen, node1, JOIN_LIMIT)?;
            }
            let (_, idle_cpu) = with_cpu(Some(&daemon), || {
                std::thread::sleep(IDLE_SPAN);
                Ok(())
            })?;
            // Which way amslb followed the registry decides what the figures mean.
            let polled = daemon.log_text().contains("change streams unavailable");
            if polled != standalone {
                return Err(format!(
                    "amslb {} change streams against a {} server",
                    if polled { "did not use" } else { "used" },
                    if standalone {
                        "standalone"
                    } else {
                        "replica-set"
                    }
                ));
            }
            Ok((times, idle_cpu * 1000.0 / IDLE_SPAN.as_secs_f64()))
        };
        measure().map_err(|e| Cell::Error(format!("{e} (log: {})", daemon.log_tail())))
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

    /// A warm-up run, then the measured one, on a small-response path; with
    /// the CPU seconds `daemon` used during the measured run.
    fn wrk_warm(
        &self,
        daemon: Option<&Daemon>,
        addr: SocketAddr,
        path: &str,
        conns: usize,
        close: bool,
    ) -> Result<(WrkResult, f64), String> {
        let url = format!("http://{addr}{path}");
        self.wrk.run(&url, conns, WARMUP, close)?;
        with_cpu(daemon, || {
            checked(self.wrk.run(&url, conns, self.duration, close))
        })
    }

    /// MB/s of 100 MB bodies fetched on [`LARGE_CONNS`] connections, and
    /// the CPU seconds per GB `daemon` used for them.
    fn wrk_large(&self, daemon: Option<&Daemon>, url: &str) -> Result<(f64, f64), String> {
        let (r, cpu) = with_cpu(daemon, || {
            checked(self.wrk.run(url, LARGE_CONNS, self.duration, false))
        })?;
        Ok((r.mbytes_per_s(), per_gb(cpu, r.bytes)))
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

/// Runs `f` and returns its result with the CPU seconds (user + system, all
/// threads and processes) `daemon` used meanwhile; NaN without a daemon (the
/// backend measured directly, which has no balancer).
fn with_cpu<T>(
    daemon: Option<&Daemon>,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, f64), String> {
    let before = daemon.map(Daemon::cpu_seconds);
    let value = f()?;
    let cpu = match (daemon, before) {
        (Some(daemon), Some(before)) => daemon.cpu_seconds() - before,
        _ => f64::NAN,
    };
    Ok((value, cpu))
}

/// CPU microseconds per unit of work (NaN when nothing was done).
fn us_per(cpu_s: f64, count: u64) -> f64 {
    if count == 0 {
        return f64::NAN;
    }
    cpu_s * 1e6 / count as f64
}

/// CPU seconds per GB (10^9 bytes) moved (NaN when nothing was).
fn per_gb(cpu_s: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        return f64::NAN;
    }
    cpu_s / (bytes as f64 / 1e9)
}

/// The bench's certificate, or `None` with a note that `scenario` is skipped.
fn certificate<'a>(
    tls: &'a Result<TlsFiles, String>,
    notes: &mut Vec<String>,
    scenario: u8,
) -> Option<&'a TlsFiles> {
    match tls {
        Ok(tls) => Some(tls),
        Err(e) => {
            notes.push(format!("scenario {scenario} skipped: certificate: {e}"));
            None
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

/// Sends a request through `addr` every [`JOIN_POLL`] until one is answered by
/// `node`; fails after `limit`.
fn routed_to(addr: SocketAddr, node: IpAddr, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let want = node.to_string();
    loop {
        let last = match http_get(addr, SMALL_PATH) {
            Ok(r) if r.header(NODE_HEADER) == Some(want.as_str()) => return Ok(()),
            Ok(r) => format!(
                "status {} from {}",
                r.status,
                r.header(NODE_HEADER).unwrap_or("no node")
            ),
            Err(e) => e,
        };
        if start.elapsed() > limit {
            return Err(format!(
                "no request reached {node} within {limit:?} (last: {last})"
            ));
        }
        std::thread::sleep(JOIN_POLL);
    }
}

/// Waits until [`LEFT_STREAK`] requests in a row through `addr` are answered by
/// `node` (the other node has left the rotation); fails after `limit`.
fn only_routed_to(addr: SocketAddr, node: IpAddr, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let want = node.to_string();
    let mut streak = 0;
    while streak < LEFT_STREAK {
        let answered = http_get(addr, SMALL_PATH)
            .ok()
            .is_some_and(|r| r.header(NODE_HEADER) == Some(want.as_str()));
        streak = if answered { streak + 1 } else { 0 };
        if start.elapsed() > limit {
            return Err(format!(
                "requests still went elsewhere than {node} after {limit:?}"
            ));
        }
        std::thread::sleep(JOIN_POLL);
    }
    Ok(())
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// Median of sorted, non-empty `values`.
fn median(values: &[f64]) -> f64 {
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
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
