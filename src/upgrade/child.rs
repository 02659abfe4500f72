//! The new process's side of an upgrade: take the listening sockets before
//! binding, say when ready, adopt the UDP sessions, then take over.

use super::wire::{Channel, Message, SessionInfo};
use super::{SOCKET_ENV, blocking};
use crate::cluster::NodeSpec;
use crate::l4::udp::MovedSession;
use crate::server::Running;
use crate::state::Drain;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Longest wait for one message from the old process.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the new process receives besides the sockets: the channel, and the
/// old process's membership and drains.
type Handed = (Channel, Vec<NodeSpec>, Vec<(String, Drain)>);

/// A process started by an upgrade, connected to the one it replaces.
#[derive(Debug)]
pub struct Takeover {
    channel: Arc<Channel>,
    /// The old process's membership when it handed over.
    membership: Vec<NodeSpec>,
    /// The old process's drains when it handed over.
    drains: Vec<(String, Drain)>,
}

impl Takeover {
    /// When this process was started by an upgrade (`AMSLB_UPGRADE_SOCKET`
    /// set), connects to the old process and receives its listening
    /// sockets, which the binds that follow take (`crate::listener::inherit`).
    pub async fn connect_from_env() -> io::Result<Option<Self>> {
        let Some(path) = std::env::var_os(SOCKET_ENV) else {
            return Ok(None);
        };
        let (channel, membership, drains) = blocking(move || -> io::Result<Handed> {
            let channel = Channel::new(UnixStream::connect(&path)?, STEP_TIMEOUT)?;
            channel.send(
                &Message::Hello {
                    pid: std::process::id(),
                },
                &[],
            )?;
            let mut count = 0;
            let (membership, drains) = loop {
                match channel.recv()? {
                    (
                        Message::Listeners {
                            more,
                            membership,
                            drains,
                        },
                        fds,
                    ) => {
                        count += fds.len();
                        crate::listener::inherit(fds);
                        if !more {
                            break (membership, drains);
                        }
                    }
                    (other, _) => return Err(unexpected(&other)),
                }
            };
            info!(
                sockets = count,
                nodes = membership.len(),
                drains = drains.len(),
                "upgrade: listening sockets and membership received from the previous process"
            );
            Ok((channel, membership, drains))
        })
        .await?;
        Ok(Some(Self {
            channel: Arc::new(channel),
            membership,
            drains,
        }))
    }

    /// The old process's membership when it handed over: what a remote
    /// membership source starts from until it first answers.
    pub fn membership(&self) -> &[NodeSpec] {
        &self.membership
    }

    /// The old process's drains when it handed over: what shared state
    /// starts from until MongoDB answers.
    pub fn drains(&self) -> &[(String, Drain)] {
        &self.drains
    }

    /// Tells the old process this one is ready (every listener bound, TCP
    /// accepting), adopts the UDP sessions it hands over and starts
    /// receiving UDP. When the old process fails on the way, this process
    /// simply serves on its own; the error says what was lost.
    pub async fn adopt(&self, running: &mut Running) -> io::Result<()> {
        let unclaimed = crate::listener::release_unclaimed();
        if unclaimed > 0 {
            info!(
                sockets = unclaimed,
                "upgrade: closed the inherited sockets this config has no listener for"
            );
        }
        let result = self.adopt_sessions(running).await;
        running.serve_udp();
        result
    }

    async fn adopt_sessions(&self, running: &mut Running) -> io::Result<()> {
        self.send(Message::Ready).await?;
        let mut adopted = 0;
        loop {
            let receiver = self.channel.clone();
            let (message, fds) = blocking(move || receiver.recv()).await?;
            let Message::Sessions { sessions, more } = message else {
                return Err(unexpected(&message));
            };
            if sessions.len() != fds.len() {
                return Err(io::Error::other(
                    "udp sessions and their sockets do not match",
                ));
            }
            for (info, socket) in sessions.into_iter().zip(fds) {
                if adopt_one(running, info, socket) {
                    adopted += 1;
                }
            }
            if !more {
                break;
            }
        }
        info!(
            sessions = adopted,
            "upgrade: udp sessions taken over from the previous process"
        );
        Ok(())
    }

    /// Tells the old process that this one has taken over (after the pid
    /// file is written): it stops accepting and finishes its sessions.
    pub async fn done(self) -> io::Result<()> {
        self.send(Message::Done).await
    }

    async fn send(&self, message: Message) -> io::Result<()> {
        let sender = self.channel.clone();
        blocking(move || sender.send(&message, &[])).await
    }
}

/// Adopts one UDP session into the listener bound to its address.
fn adopt_one(running: &Running, info: SessionInfo, socket: OwnedFd) -> bool {
    let Some(udp) = running
        .udp
        .iter()
        .find(|u| u.socket.local_addr().ok() == Some(info.listen))
    else {
        warn!(listen = %info.listen, client = %info.client, "upgrade: no udp listener here for a handed-over session; it ends");
        return false;
    };
    let moved = MovedSession {
        client: info.client,
        node: NodeSpec {
            id: info.node,
            group: info.group,
            addr: info.addr,
            http_port: info.http_port,
            rtmp_port: info.rtmp_port,
            srt_port: info.srt_port,
            drain: false,
            region: info.region,
        },
        node_cookie: info.node_cookie,
        idle: Duration::from_millis(info.idle_ms),
        socket,
    };
    match udp
        .proxy
        .adopt(moved, &udp.socket, &running.runtime.shutdown)
    {
        Ok(()) => true,
        Err(e) => {
            warn!(client = %info.client, error = %e, "upgrade: cannot adopt a udp session");
            false
        }
    }
}

fn unexpected(message: &Message) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected hand-over message {message:?}"),
    )
}
