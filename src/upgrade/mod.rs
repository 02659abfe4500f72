//! Seamless upgrade and restart: a new amslb process takes over every
//! listening socket of the running one while the old one finishes its
//! sessions (nginx's `kill -USR2`, HAProxy's `expose-fd listeners`).
//!
//! On SIGUSR2 the old process ([`parent`]) starts the binary at its own path
//! with its own arguments and a private Unix socket named in
//! `AMSLB_UPGRADE_SOCKET`. The new process ([`child`]) checks its config as
//! any start does, connects, and receives copies of every listening socket
//! (TCP, UDP, the stats listener) as `SCM_RIGHTS` descriptors ([`wire`]);
//! its binds take those instead of binding anew (`crate::listener`). Both
//! processes now accept on the same kernel sockets, so no connection is
//! refused and no SYN lost. Once the new process is ready, the old one stops
//! receiving UDP and hands over its UDP (SRT) sessions with their connected
//! node sockets, so a node keeps seeing the same source address and the
//! session goes on in the new process. The new process writes the pid file
//! and says so; the old one stops accepting and keeps its TCP tunnels
//! (RTMP, WebSocket) and in-flight requests until they end or until
//! `[global] hard_stop_after`, then exits 0.
//!
//! If the new process fails its config check, cannot bind, or does not get
//! ready in time, the old one logs why and keeps serving as before.

pub mod child;
pub mod parent;
pub mod wire;

use crate::config::Config;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

/// Environment variable naming the old process's hand-over socket.
pub const SOCKET_ENV: &str = "AMSLB_UPGRADE_SOCKET";

/// The binary to start: the one this process runs, at its path. A binary
/// replaced on disk (the usual upgrade) shows as "`path` (deleted)"; the
/// new file at `path` is the one wanted.
pub fn executable() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if !exe.exists()
        && let Some(path) = exe.to_str().and_then(|p| p.strip_suffix(" (deleted)"))
    {
        return Ok(PathBuf::from(path));
    }
    Ok(exe)
}

/// Writes this process's pid to `path` atomically (a temporary file in the
/// same directory, then a rename), so a reader never sees it half written.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let pid = std::process::id();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "amslb.pid".into());
    let tmp = path.with_file_name(format!(".{name}.{pid}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    writeln!(file, "{pid}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the pid in `path`.
pub fn read_pid_file(path: &Path) -> io::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not hold a pid", path.display()),
        )
    })
}

/// Sends SIGUSR2 to the process named in `pid_file` and waits up to
/// `timeout` for the pid file to name another live process; returns (old,
/// new) pid. `amslb upgrade` runs this.
pub fn signal_upgrade(pid_file: &Path, timeout: std::time::Duration) -> io::Result<(u32, u32)> {
    use rustix::process::{Pid, Signal, kill_process, test_kill_process};
    let pid_of = |raw: u32| {
        i32::try_from(raw)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad pid"))
    };
    let old = read_pid_file(pid_file)?;
    kill_process(pid_of(old)?, Signal::USR2).map_err(|e| {
        io::Error::other(format!(
            "cannot signal process {old} (from {}): {e}",
            pid_file.display()
        ))
    })?;
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(new) = read_pid_file(pid_file)
            && new != old
            && test_kill_process(pid_of(new)?).is_ok()
        {
            return Ok((old, new));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{} still names process {old} after {timeout:?}: the upgrade failed, see that process's log (it keeps serving)",
            pid_file.display()
        ),
    ))
}

/// Tells whoever waits that this process now serves: writes the pid file
/// and notifies systemd (`Type=notify`: `READY=1` and `MAINPID`, so after
/// an upgrade systemd follows the new process).
pub fn announce(config: &Config) {
    if let Some(path) = &config.global.pid_file
        && let Err(e) = write_pid_file(path)
    {
        warn!(path = %path.display(), error = %e, "cannot write the pid file");
    }
    notify_systemd(&format!("MAINPID={}\nREADY=1\n", std::process::id()));
}

/// Removes the pid file at the end of a plain shutdown, unless it already
/// names another process (the one that took over).
pub fn remove_pid_file(config: &Config) {
    if let Some(path) = &config.global.pid_file
        && read_pid_file(path).ok() == Some(std::process::id())
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Sends `state` to systemd's notification socket, if systemd gave one.
fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        let sender = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = socket.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)?
            }
            #[cfg(not(target_os = "linux"))]
            Some(_) => return Err(io::ErrorKind::Unsupported.into()),
            None => std::os::unix::net::SocketAddr::from_pathname(Path::new(&socket))?,
        };
        sender.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    match sent {
        Ok(()) => debug!("systemd notified"),
        Err(e) => warn!(error = %e, "cannot notify systemd"),
    }
}

/// Runs blocking socket work (the hand-over conversation) off the event loop.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amslb.pid");
        std::fs::write(&path, "1\n").unwrap();
        write_pid_file(&path).unwrap();
        assert_eq!(read_pid_file(&path).unwrap(), std::process::id());
        // No temporary file is left next to it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(
            read_pid_file(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn executable_is_this_binary() {
        let exe = executable().unwrap();
        assert!(exe.is_file(), "{}", exe.display());
    }
}
