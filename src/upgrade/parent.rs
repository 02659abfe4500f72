//! The old process's side of an upgrade: start the new binary, hand it the
//! listening sockets, then the UDP sessions, and learn whether it made it.

use super::wire::{Channel, MAX_FDS, Message, SessionInfo};
use super::{SOCKET_ENV, blocking, executable};
use crate::server::Running;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long the new process may take to connect, and then to get ready
/// (config check, certificates, binds).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an upgrade did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The new process could not be started at all.
    #[error("cannot start {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The new process ended before taking over.
    #[error(
        "the new process exited ({status}) before taking over: its config check or start failed, see its error above"
    )]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The conversation failed.
    #[error("{step}: {source}")]
    Handover {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        source: io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> UpgradeError {
    move |source| UpgradeError::Handover { step, source }
}

/// Runs one upgrade. `Ok` carries the new process's pid: it serves now,
/// and this process must stop accepting and finish its sessions. On `Err`
/// this process serves as before (UDP receiving resumed if it was paused).
pub async fn upgrade(running: &mut Running) -> Result<u32, UpgradeError> {
    let dir = private_dir().map_err(step("creating the hand-over directory"))?;
    let path = dir.join("handover.sock");
    let result = start_and_hand_over(running, &path).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn start_and_hand_over(running: &mut Running, path: &Path) -> Result<u32, UpgradeError> {
    let listener = UnixListener::bind(path).map_err(step("binding the hand-over socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(step("binding the hand-over socket"))?;
    let exe = executable().map_err(step("finding this binary"))?;
    let child = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(SOCKET_ENV, path)
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let pid = child.id();
    info!(pid, exe = %exe.display(), "upgrade: new process started");
    let (mut child, accepted) = blocking(move || {
        let mut child = child;
        let accepted = accept(&listener, &mut child);
        (child, accepted)
    })
    .await;
    let result = match accepted {
        Ok(channel) => converse(running, Arc::new(channel), pid).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(pid),
        Err(e) => Err(end_child(&mut child, e).await),
    }
}

/// Waits for the new process to connect (it must be `child`, by its
/// credentials), or to exit, or for the timeout.
fn accept(listener: &UnixListener, child: &mut Child) -> Result<Channel, UpgradeError> {
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let channel = Channel::new(stream, START_TIMEOUT)
                    .map_err(step("accepting the new process"))?;
                check_peer(&channel, child.id())?;
                return Ok(channel);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(step("accepting the new process")(e)),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::Exited { status });
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(step("waiting for the new process")(
                io::ErrorKind::TimedOut.into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Only the process just started may take the sockets.
fn check_peer(channel: &Channel, pid: u32) -> Result<(), UpgradeError> {
    #[cfg(target_os = "linux")]
    {
        let cred = rustix::net::sockopt::socket_peercred(channel.socket())
            .map_err(|e| step("reading the peer's credentials")(e.into()))?;
        if u32::try_from(cred.pid.as_raw_nonzero().get()).ok() != Some(pid) {
            return Err(step("checking the peer")(io::Error::other(format!(
                "connection from pid {}, not the new process {pid}",
                cred.pid.as_raw_nonzero()
            ))));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (channel, pid);
    Ok(())
}

async fn converse(
    running: &mut Running,
    channel: Arc<Channel>,
    pid: u32,
) -> Result<(), UpgradeError> {
    match recv(&channel).await.map_err(step("waiting for hello"))? {
        (Message::Hello { pid: said }, _) if said == pid => {}
        (other, _) => {
            return Err(step("waiting for hello")(io::Error::other(format!(
                "unexpected {other:?}"
            ))));
        }
    }
    let sockets = running
        .runtime
        .listening
        .copies()
        .map_err(step("copying the listening sockets"))?;
    let count = sockets.len();
    let membership: Vec<_> = running
        .runtime
        .cluster
        .snapshot()
        .nodes()
        .map(|node| node.spec().clone())
        .collect();
    let drains = running.runtime.shared.known();
    send_batches(&channel, sockets, |_, more| Message::Listeners {
        more,
        membership: if more { Vec::new() } else { membership.clone() },
        drains: if more { Vec::new() } else { drains.clone() },
    })
    .await
    .map_err(step("sending the listening sockets"))?;
    info!(
        pid,
        sockets = count,
        "upgrade: listening sockets handed over"
    );
    match recv(&channel).await {
        Ok((Message::Ready, _)) => {}
        Ok((other, _)) => {
            return Err(step("waiting for ready")(io::Error::other(format!(
                "unexpected {other:?}"
            ))));
        }
        Err(e) => return Err(step("waiting for the new process to get ready")(e)),
    }
    // From here the new process accepts too; UDP moves as a whole.
    running.pause_udp().await;
    let handed = hand_over_udp(running, &channel).await;
    let done = match handed {
        Ok(sessions) => {
            info!(pid, sessions, "upgrade: udp sessions handed over");
            recv(&channel).await.map_err(step("waiting for done"))
        }
        Err(e) => Err(e),
    };
    match done {
        Ok((Message::Done, _)) => Ok(()),
        Ok((other, _)) => {
            running.serve_udp();
            Err(step("waiting for done")(io::Error::other(format!(
                "unexpected {other:?}"
            ))))
        }
        Err(e) => {
            // Sessions already handed over are lost; new ones open here again.
            running.serve_udp();
            Err(e)
        }
    }
}

/// Sends every UDP session with its node socket; returns how many.
async fn hand_over_udp(running: &Running, channel: &Arc<Channel>) -> Result<usize, UpgradeError> {
    let mut infos = Vec::new();
    let mut sockets = Vec::new();
    for udp in &running.udp {
        let Ok(listen) = udp.socket.local_addr() else {
            continue;
        };
        for moved in udp.proxy.hand_off() {
            let node = moved.node;
            infos.push(SessionInfo {
                listen,
                client: moved.client,
                node: node.id,
                group: node.group,
                addr: node.addr,
                http_port: node.http_port,
                rtmp_port: node.rtmp_port,
                srt_port: node.srt_port,
                region: node.region,
                node_cookie: moved.node_cookie,
                idle_ms: u64::try_from(moved.idle.as_millis()).unwrap_or(u64::MAX),
            });
            sockets.push(moved.socket);
        }
    }
    let count = infos.len();
    let mut infos = infos.into_iter();
    send_batches(channel, sockets, move |n, more| Message::Sessions {
        sessions: infos.by_ref().take(n).collect(),
        more,
    })
    .await
    .map_err(step("sending the udp sessions"))?;
    Ok(count)
}

/// Sends `fds` in batches of at most [`MAX_FDS`], each with the message
/// `make(batch size, more follow)`; at least one message even without fds.
async fn send_batches(
    channel: &Arc<Channel>,
    mut fds: Vec<OwnedFd>,
    mut make: impl FnMut(usize, bool) -> Message,
) -> io::Result<()> {
    loop {
        let rest = fds.split_off(fds.len().min(MAX_FDS));
        let batch = std::mem::replace(&mut fds, rest);
        let message = make(batch.len(), !fds.is_empty());
        let sender = channel.clone();
        blocking(move || sender.send(&message, &batch)).await?;
        if fds.is_empty() {
            return Ok(());
        }
    }
}

async fn recv(channel: &Arc<Channel>) -> io::Result<(Message, Vec<OwnedFd>)> {
    let receiver = channel.clone();
    blocking(move || receiver.recv()).await
}

/// After a failed hand-over: stop the new process if it still runs, and
/// prefer its exit status as the reason when it ended by itself.
async fn end_child(child: &mut Child, error: UpgradeError) -> UpgradeError {
    for _ in 0..50 {
        if let Ok(Some(status)) = child.try_wait() {
            return match error {
                UpgradeError::Handover { .. } if !status.success() => {
                    UpgradeError::Exited { status }
                }
                other => other,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warn!(
        pid = child.id(),
        "upgrade: stopping the new process that did not take over"
    );
    let _ = child.kill();
    let _ = child.wait();
    error
}

/// A fresh directory only this user can enter, for the hand-over socket.
fn private_dir() -> io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("amslb-upgrade-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}
