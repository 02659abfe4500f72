//! The README's first command as a newcomer runs it: the demo example with
//! `conf/demo.toml` on its fixed loopback ports (so it fails if a demo is
//! already running). It must print the status page URL and generated
//! credentials, the commands it prints must work, the status page read in
//! headless Chromium must show the nodes and the requests those commands made,
//! and SIGINT (Ctrl-C) must stop every part it started.

mod ops_support;

use ops_support::require_program;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The demo example binary, built by `cargo test` (or `cargo build --example demo`)
/// next to this test's directory.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let demo = profile_dir.join("examples").join("demo");
    assert!(
        demo.is_file(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example demo`",
        demo.display()
    );
    // `cargo test --test demo` rebuilds the library but not the examples.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let library = std::fs::read_dir(profile_dir.join("deps"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("libamslb-") && name.ends_with(".rlib")
        })
        .filter_map(|p| modified(&p))
        .max();
    assert!(
        modified(&demo) >= library,
        "{} is older than the amslb library: run `cargo build --example demo` (plain `cargo test` builds it)",
        demo.display()
    );
    demo
}

struct Demo {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGINT, as Ctrl-C in the terminal does; the exit code.
    fn interrupt(&mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SIGINT first so the demo stops what it started (a SIGKILL would
        // orphan SecantusDB and nginx); SIGKILL only if that did not work.
        if self.child.try_wait().ok().flatten().is_none() && self.interrupt().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn sh(command: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(command).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn demo_serves_status_page_runs_its_commands_and_stops_on_ctrl_c() {
    require_program("curl", "curl");
    let chromium = require_program("chromium", "chromium");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let child = Command::new(demo_binary())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut demo = Demo {
        child,
        log,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !demo.output().contains("Ctrl-C stops everything") {
        if let Some(status) = demo.child.try_wait().unwrap() {
            panic!("demo exited with {status}:\n{}", demo.output());
        }
        assert!(
            Instant::now() < deadline,
            "demo not ready:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = demo.output();
    assert!(out.contains("status page  http://127.0.0.1:6080/"), "{out}");
    let password = out
        .lines()
        .find_map(|l| l.split("credentials  user admin  password ").nth(1))
        .unwrap_or_else(|| panic!("no credentials printed:\n{out}"))
        .trim()
        .to_string();
    assert!(password.len() >= 12, "weak password {password:?}");
    assert!(
        out.contains("membership: SecantusDB") || out.contains("membership: the static"),
        "membership source not said:\n{out}"
    );

    // Every curl command it prints works, and the ones with a known answer give it.
    let commands: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("demo:   "))
        .filter(|l| l.starts_with("curl "))
        .map(|l| {
            l.split("   #")
                .next()
                .unwrap()
                .split("  #")
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(commands.len() >= 6, "too few commands printed:\n{out}");
    // Membership from SecantusDB and first health checks: wait until the play side answers.
    let wait = Instant::now() + Duration::from_secs(20);
    let mut play_requests = 1;
    while !sh("curl -sf -o /dev/null http://127.0.0.1:8081/LiveApp/streams/stream1.m3u8").0 {
        play_requests += 1;
        assert!(
            Instant::now() < wait,
            "play listener never answered:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut publish_requests = 0;
    for command in &commands {
        let (ok, body) = sh(&command.replacen("curl ", "curl -sS --max-time 5 ", 1));
        assert!(ok, "`{command}` failed:\n{body}");
        if command.contains("127.0.0.1:8081/") {
            play_requests += 1;
        }
        if command.contains("127.0.0.1:8080/") {
            publish_requests += 1;
        }
        if command.contains("stream1.m3u8") {
            assert!(
                body.contains("x-node-id: edge-"),
                "HLS not on an edge: {body}"
            );
        }
        if command.contains("/whip/") {
            assert!(
                body.contains("x-node-id: origin-1"),
                "WHIP not on the origin: {body}"
            );
        }
        if command.contains("/assign?") {
            assert!(body.contains("\"group\":\"edge\""), "assign: {body}");
        }
        if command.contains("/metrics") {
            assert!(body.contains("amslb_requests_total"), "metrics: {body}");
        }
    }

    // The status page in a real browser, logged in with the printed credentials.
    let profile = tempfile::tempdir().unwrap();
    let page = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://admin:{password}@127.0.0.1:6080/"))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&page.stdout);
    for node in ["origin-1", "edge-1", "edge-2"] {
        assert!(
            dom.contains(&format!("data-node=\"{node}\"")),
            "{node} missing:\n{dom}"
        );
    }
    // One of the printed commands drained edge-1.
    assert!(
        dom.contains("data-node=\"edge-1\" data-state=\"draining\""),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<td>play</td><td>{play_requests}</td>")),
        "play listener does not show {play_requests} requests:\n{dom}"
    );
    assert!(
        dom.contains(&format!("<td>publish</td><td>{publish_requests}</td>")),
        "publish listener does not show {publish_requests} requests:\n{dom}"
    );

    // Ctrl-C: amslb, the simulated nodes, SecantusDB and the RTMP sink all stop.
    let secantus_port: Option<u16> = out
        .lines()
        .find_map(|l| l.split("SecantusDB on 127.0.0.1:").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
    assert_eq!(
        demo.interrupt(),
        Some(0),
        "demo did not exit cleanly:\n{}",
        demo.output()
    );
    let mut parts: Vec<SocketAddr> = [
        "127.0.0.1:6080",
        "127.0.0.1:8080",
        "127.0.0.1:8081",
        "127.0.0.1:1935",
        "127.0.1.1:5080",
        "127.0.2.1:5080",
        "127.0.2.2:5080",
        "127.0.1.1:1935",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    parts.extend(secantus_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))));
    for addr in parts {
        assert!(!listening(addr), "{addr} still listening after Ctrl-C");
    }
}
