//! Child processes of the bench (backend nginx, the balancers): start with output
//! to a log file, wait until they listen, read their memory, stop them cleanly.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a daemon gets to start listening before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running daemon, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Why a daemon is not serving.
#[derive(Debug)]
pub enum StartError {
    /// The program refused its configuration or exited before listening: the
    /// feature is missing in that program (reported as n/a).
    Refused(String),
    /// It was started but misbehaved (reported as an error).
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Refused(why) | StartError::Failed(why) => f.write_str(why),
        }
    }
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self, StartError> {
        let out =
            File::create(log).map_err(|e| StartError::Failed(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| StartError::Failed(format!("cannot run {name}: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Waits until every address accepts TCP connections. A daemon that exits
    /// first is `Refused` (with the end of its log); one that never listens is `Failed`.
    pub fn wait_listening(&mut self, addrs: &[SocketAddr]) -> Result<(), StartError> {
        self.wait_listening_within(addrs, START_TIMEOUT)
    }

    /// [`Daemon::wait_listening`] with another time limit (slow starters).
    pub fn wait_listening_within(
        &mut self,
        addrs: &[SocketAddr],
        limit: Duration,
    ) -> Result<(), StartError> {
        let deadline = Instant::now() + limit;
        for addr in addrs {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(StartError::Refused(format!(
                        "{} exited ({status}) before listening on {addr}: {}",
                        self.name,
                        self.log_tail()
                    )));
                }
                if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(StartError::Failed(format!(
                        "{} not listening on {addr} after {limit:?}: {}",
                        self.name,
                        self.log_tail()
                    )));
                }
                sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Last lines of the daemon's output, on one line, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_text(), 3)
    }

    /// The daemon's whole output so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Memory of the daemon and all its descendants (nginx workers), summed.
    pub fn memory(&self) -> Memory {
        process_tree(self.child.id())
            .iter()
            .map(|pid| Memory::of(*pid))
            .fold(Memory::default(), |a, b| Memory {
                rss_kib: a.rss_kib + b.rss_kib,
                peak_kib: a.peak_kib + b.peak_kib,
            })
    }

    /// CPU time (user + system) the daemon and all its descendants (nginx
    /// workers) have used so far, in seconds. A process's `/proc/<pid>/stat`
    /// counts all its threads, the ones that ended included.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = process_tree(self.child.id())
            .iter()
            .filter_map(|pid| cpu_ticks(*pid))
            .sum();
        ticks as f64 / clock_ticks_per_second()
    }

    /// Resets the peak-RSS mark (VmHWM) of the whole tree, so that a later
    /// [`Daemon::memory`] reports the peak of what ran in between.
    pub fn reset_peak(&self) {
        for pid in process_tree(self.child.id()) {
            // "5" resets the peak resident set size (proc(5), clear_refs).
            let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first: SIGKILL on the nginx master would orphan its workers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process (tree), in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    /// Current resident set (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set since start or the last reset (VmHWM).
    pub peak_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        }
    }
}

/// `root` and every process descended from it.
fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 4)
}

/// utime + stime of `pid` (fields 14 and 15 of proc(5) stat), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    Some(stat_field::<u64>(pid, 14)? + stat_field::<u64>(pid, 15)?)
}

/// Field `n` (1-based, as proc(5) numbers them, `n` > 2) of `/proc/<pid>/stat`.
fn stat_field<T: std::str::FromStr>(pid: u32, n: usize) -> Option<T> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(n - 3)?.parse().ok()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        output(Command::new("getconf").arg("CLK_TCK"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The last `n` non-empty lines of `text`, joined with " | ", without
/// terminal colour codes (amslb's log colours its levels).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    strip_colours(&lines[lines.len().saturating_sub(n)..].join(" | "))
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip up to and including the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs a program to completion and returns its stdout, or why it failed.
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let said = [out.stderr, out.stdout].concat();
        Err(format!(
            "{}: {}",
            out.status,
            tail(&String::from_utf8_lossy(&said), 3)
        ))
    }
}

/// Whether `program` is on PATH (or is a path that exists).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| program.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
