//! Side-by-side comparison of amslb with HAProxy and nginx:
//! `cargo bench --bench compare` (all scenarios) or
//! `cargo bench --bench compare -- 1 3` (scenarios 1 and 3 only).
//!
//! One neutral backend (nginx on two loopback node addresses), then each
//! balancer in turn, configured equivalently, measured with `wrk`, `h2load`
//! (scenario 8, HTTP/2 over TLS), a WebSocket client and HLS viewers
//! (scenario 9); scenario 7 (amslb only) also starts SecantusDB, a
//! MongoDB-compatible server (`pip install secantusdb==0.7.0b3`, else n/a).
//! Beside each throughput figure, the balancer's CPU time (user + system of
//! all its threads and processes, from `/proc/<pid>/stat`) during the
//! measured run, per request or per GB.
//! Prints a Markdown table and, for a full run, writes it
//! to `benches/results/latest.md`. Loopback only; bounded to a few minutes.
//! `BENCH_SECS` overrides the length of each measured run (default 5);
//! `BENCH_VIEWERS` the number of HLS viewers in scenario 9 (default 500);
//! `AMSLB_BIN` runs another amslb binary than the one built with the bench;
//! `AMSLB_BASELINE` adds an older build as one more column, run right after
//! amslb in every scenario, with an "amslb ÷ before" ratio (before/after of a
//! change in one run).

#[path = "compare/backend.rs"]
mod backend;
#[path = "compare/hls.rs"]
mod hls;
#[path = "compare/load.rs"]
mod load;
#[path = "compare/net.rs"]
mod net;
#[path = "compare/peers.rs"]
mod peers;
#[path = "compare/procs.rs"]
mod procs;
#[path = "compare/registry.rs"]
mod registry;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/scenarios.rs"]
mod scenarios;

use load::{H2load, Wrk};
use net::Addrs;
use peers::{Peer, TlsFiles};
use procs::{find_program, output};
use report::Report;
use scenarios::{Bench, ScratchDir};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};
use std::time::{Duration, Instant};

/// What to install when a program is missing.
const INSTALL: &str = "apt-get install haproxy nginx wrk nghttp2-client";
/// HLS viewers in scenario 9 unless `BENCH_VIEWERS` says otherwise.
const VIEWERS: usize = 500;
/// Idle tunnels in scenario 4.
const TUNNELS: usize = 10_000;
/// File descriptors asked for: client, balancer and node sides of every tunnel.
const WANTED_NOFILE: u64 = 200_000;

fn main() {
    if let Ok(nodes) = std::env::var(backend::WS_NODES_ENV) {
        // Re-executed as the WebSocket node process (see backend::spawn_ws_nodes).
        if let Err(e) = backend::ws_node_main(&nodes) {
            fail(&format!("websocket nodes: {e}"));
        }
        return;
    }
    let wanted: Vec<u8> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let started = Instant::now();
    let nofile = raise_nofile();
    let scratch = ScratchDir::new().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    let dir = scratch.path();
    let wrk = Wrk::find(dir).unwrap_or_else(|| fail(&format!("wrk not found: {INSTALL}")));
    let nginx = find_program("nginx")
        .unwrap_or_else(|| fail(&format!("nginx (the backend) not found: {INSTALL}")));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio runtime: {e}")));
    let addrs = Addrs::pick();
    let http_nodes = vec![addrs.host(1), addrs.host(2)];
    let backend = backend::start_http_nodes(&nginx, dir, &http_nodes)
        .unwrap_or_else(|e| fail(&format!("backend nginx: {e}")));
    // A balancer holds two descriptors per tunnel (client and node side), under
    // the same limit as this process; keep a few hundred for everything else.
    let tunnels = (usize::try_from(nofile).unwrap_or(usize::MAX) / 2)
        .saturating_sub(300)
        .min(TUNNELS);
    let mut bench = Bench {
        dir: dir.to_path_buf(),
        ws_nodes: vec![addrs.host(3), addrs.host(4)],
        addrs,
        peers: Peer::find_all(
            &amslb_binary(),
            std::env::var_os("AMSLB_BASELINE").map(PathBuf::from),
        ),
        wrk,
        h2load: H2load::find(dir),
        viewers: env_number("BENCH_VIEWERS").unwrap_or(VIEWERS),
        http_nodes,
        threads,
        tunnels,
        duration: Duration::from_secs(env_number("BENCH_SECS").unwrap_or(5)),
        rt,
        tls: TlsFiles::generate(dir),
        report: Report::default(),
    };
    if tunnels < TUNNELS && (wanted.is_empty() || wanted.contains(&4)) {
        bench.report.notes.push(format!(
            "scenario 4 opens {tunnels} tunnels, not {TUNNELS}: a balancer needs two file \
             descriptors per tunnel and the limit here is {nofile} (raising it needs CAP_SYS_RESOURCE)"
        ));
    }
    bench.run(&wanted);
    drop(backend);
    let text = format!(
        "{}\n{}\n{}",
        header(&bench, &wanted, started.elapsed()),
        bench.report.markdown(),
        threads_note(&bench)
    );
    println!("\n{text}");
    if !wanted.is_empty() {
        println!("(a partial run: benches/results/latest.md keeps the last full run)");
        return;
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/latest.md");
    let written = fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))
        .and_then(|_| fs::write(&out, &text));
    match written {
        Ok(()) => println!("written to {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}

/// A number from the environment variable `name`, if set and valid.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// The amslb built with this bench, or `AMSLB_BIN` (to compare another build).
fn amslb_binary() -> PathBuf {
    std::env::var_os("AMSLB_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_amslb")), PathBuf::from)
}

/// Raises the open-file limit (soft and hard, when allowed) and returns the soft limit.
fn raise_nofile() -> u64 {
    use rlimit::Resource;
    if Resource::NOFILE.set(WANTED_NOFILE, WANTED_NOFILE).is_err() {
        // Not root: the soft limit can still go up to the hard one.
        let _ = rlimit::increase_nofile_limit(WANTED_NOFILE);
    }
    Resource::NOFILE.get().map_or(1024, |(soft, _)| soft)
}

/// Date, machine, program versions and run settings.
fn header(bench: &Bench, wanted: &[u8], elapsed: Duration) -> String {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let manifest = env!("CARGO_MANIFEST_DIR");
    let commit =
        output(Command::new("git").args(["-C", manifest, "describe", "--always", "--dirty"]))
            .unwrap_or_default();
    let scenarios = if wanted.is_empty() {
        "all".to_string()
    } else {
        format!("{wanted:?}")
    };
    format!(
        "# amslb vs HAProxy vs nginx\n\n\
         - date: {date}\n- machine: {cpus} × {cpu}, nproc {cpus}, Linux {kernel}\n\
         - versions: {haproxy}; {nginx}; {wrk}; {h2load}; amslb {commit}\n\
         - run: scenarios {scenarios}, {secs} s per measured wrk/h2load run (+1 s warm-up), \
         {viewers} HLS viewers, loopback only, everything on the same {cpus} cores; \
         whole run {total:.0} s\n\
         - load average at the end: {load} (other work on the machine skews absolute figures; \
         ratios from one run hold better)\n",
        cpus = bench.threads,
        kernel = kernel.trim(),
        date = date.trim(),
        haproxy = version("haproxy", "-v"),
        nginx = version("nginx", "-v"),
        wrk = version("wrk", "-v"),
        h2load = version("h2load", "--version"),
        viewers = bench.viewers,
        commit = commit.trim(),
        secs = bench.duration.as_secs(),
        total = elapsed.as_secs_f64(),
    )
}

/// How many threads each balancer used, and the backend's share.
fn threads_note(bench: &Bench) -> String {
    let mut text = String::from("\nThreads:\n");
    for peer in &bench.peers {
        text += &format!(
            "- {}: {}\n",
            peer.kind.name(),
            peer.kind.threading(bench.threads)
        );
    }
    text += "- backend: nginx, 1 worker; load: wrk or h2load, 2 threads, or the HLS viewers \
             (this bench's own threads); all share the same cores\n";
    text
}

/// First line a program prints for its version flag (nginx and wrk print to stderr).
fn version(program: &str, flag: &str) -> String {
    let Some(path) = find_program(program) else {
        return format!("{program} missing");
    };
    Command::new(path)
        .arg(flag)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            let text = String::from_utf8_lossy(&text);
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

fn fail(why: &str) -> ! {
    eprintln!("compare bench: {why}");
    exit(1)
}
