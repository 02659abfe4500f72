//! The open-file limit through the real binary, started under a low soft
//! limit by `prlimit` (util-linux): amslb raises the soft limit to the hard
//! one and logs it; start-up and `amslb check` warn when the hard limit is
//! too low for `[global] max_connections`.

mod support;

use std::process::{Command, Stdio};
use support::{listener_addr, one_listener_config, wait_listening};

/// Soft and hard limits the binary is started under.
const LIMITS: &str = "--nofile=256:4096";

/// `prlimit`, or a panic saying how to install it.
fn prlimit() -> Command {
    let found = Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "prlimit not found: apt-get install util-linux (it sets the limits amslb starts under)"
    );
    let mut cmd = Command::new("prlimit");
    cmd.arg(LIMITS).arg(env!("CARGO_BIN_EXE_amslb"));
    cmd
}

/// A one-listener config with `max_connections` (no node needs to answer).
fn config(max_connections: usize) -> (std::net::SocketAddr, tempfile::TempDir) {
    let listen = listener_addr(8080);
    let text = one_listener_config(
        listen,
        &[],
        &format!("[global]\nmax_connections = {max_connections}\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lb.toml"), text).unwrap();
    (listen, dir)
}

/// `amslb check` under [`LIMITS`] on a config with `max_connections`:
/// whether it exited 0, and what it printed.
fn check(max_connections: usize) -> (bool, String) {
    let (_, dir) = config(max_connections);
    let out = prlimit()
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("lb.toml"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
    (out.status.success(), text)
}

/// The `Max open files` soft and hard limits of a running process.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn start_raises_the_soft_limit_to_the_hard_one_and_logs_it() {
    let (listen, dir) = config(1000);
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = prlimit()
        .arg("--config")
        .arg(dir.path().join("lb.toml"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_listening("amslb", &mut child, &[listen], &log_path);
    // prlimit execs amslb in its own process: the child's pid is amslb's.
    let limits = open_files_limits(child.id());
    let text = std::fs::read_to_string(&log_path).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(limits, (4096, 4096), "log:\n{text}");
    assert!(
        text.contains("open file limit 4096 (raised from 256; the hard limit)"),
        "log:\n{text}"
    );
    // 1000 connections need about 2256 descriptors: enough once raised.
    assert!(!text.contains("too low"), "log:\n{text}");
}

#[test]
fn check_warns_when_the_hard_limit_is_too_low_for_max_connections() {
    let (ok, text) = check(5000);
    // A warning, not a refusal: the config itself is valid.
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "open file limit 4096 is too low for [global] max_connections = 5000: \
             each proxied connection holds 2 file descriptors"
        ),
        "{text}"
    );
    assert!(text.contains("about 10256 are needed"), "{text}");
}

#[test]
fn check_counts_the_raised_limit_not_the_soft_one() {
    // 1000 connections need about 2256 descriptors: more than the soft 256,
    // within the hard 4096 that amslb raises to.
    let (ok, text) = check(1000);
    assert!(ok, "{text}");
    assert!(text.contains("configuration is valid"), "{text}");
    assert!(text.contains("open file limit 4096"), "{text}");
    assert!(!text.contains("too low"), "{text}");
}
