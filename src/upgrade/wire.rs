//! The hand-over conversation between the old and the new process: JSON
//! messages, each framed by its length, with file descriptors attached as
//! `SCM_RIGHTS` ancillary data (through rustix's safe `sendmsg`/`recvmsg`),
//! over a Unix stream socket. Blocking: each call runs on a blocking thread.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Most descriptors attached to one message (the kernel's limit is 253).
pub const MAX_FDS: usize = 200;

/// Largest message accepted, against a confused or hostile peer.
const MAX_MESSAGE: usize = 16 << 20;

/// What the two processes say to each other, in this order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// New → old: the new process connected.
    Hello {
        /// Its pid.
        pid: u32,
    },
    /// Old → new: listening sockets (attached); `more` says another batch follows.
    Listeners {
        /// Whether another `Listeners` message follows.
        more: bool,
        /// On the last batch: the old process's membership, so a new process
        /// that cannot reach MongoDB starts from it instead of the seeds
        /// (absent from older senders).
        #[serde(default)]
        membership: Vec<crate::cluster::NodeSpec>,
        /// On the last batch: the old process's drains by node id, for the
        /// same reason.
        #[serde(default)]
        drains: Vec<(String, crate::state::Drain)>,
    },
    /// New → old: config checked, every listener bound, TCP accepting.
    Ready,
    /// Old → new: UDP sessions (their node sockets attached, in order).
    Sessions {
        /// The sessions of this batch.
        sessions: Vec<SessionInfo>,
        /// Whether another `Sessions` message follows.
        more: bool,
    },
    /// New → old: sessions adopted, UDP receiving, pid file written.
    Done,
}

/// One UDP session handed over, without its socket (attached to the message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Local address of the listening socket the client sends to.
    pub listen: SocketAddr,
    /// The client's address.
    pub client: SocketAddr,
    /// Node id.
    pub node: String,
    /// Node group.
    pub group: String,
    /// Node address.
    pub addr: IpAddr,
    /// Node HTTP port.
    pub http_port: u16,
    /// Node RTMP port.
    pub rtmp_port: u16,
    /// Node SRT port.
    pub srt_port: u16,
    /// Node region.
    pub region: Option<String>,
    /// The node's SRT SYN cookie, for a caller placed by its handshake.
    pub node_cookie: Option<u32>,
    /// The session's idle timeout, in milliseconds.
    pub idle_ms: u64,
}

/// One end of the conversation.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// Wraps a connected stream; every receive waits at most `timeout`.
    pub fn new(stream: UnixStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self { stream })
    }

    /// The underlying socket (peer credentials).
    pub fn socket(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `message` with `fds` (at most [`MAX_FDS`]) attached.
    pub fn send(&self, message: &Message, fds: &[OwnedFd]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        let mut frame = u32::try_from(body.len())
            .map_err(io::Error::other)?
            .to_be_bytes()
            .to_vec();
        frame.extend_from_slice(&body);
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        // The descriptors travel with the first bytes; the rest follows plain.
        let mut sent = sendmsg(
            &self.stream,
            &[IoSlice::new(&frame)],
            &mut control,
            SendFlags::empty(),
        )?;
        while sent < frame.len() {
            let mut none = SendAncillaryBuffer::new(&mut []);
            sent += sendmsg(
                &self.stream,
                &[IoSlice::new(&frame[sent..])],
                &mut none,
                SendFlags::empty(),
            )?;
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it.
    pub fn recv(&self) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut head = [0u8; 4];
        self.read_exact(&mut head, &mut fds)?;
        let len = u32::from_be_bytes(head) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hand-over message too large",
            ));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, &mut fds)?;
        let message = serde_json::from_slice(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((message, fds))
    }

    /// Fills `buf`, collecting every descriptor that arrives on the way.
    fn read_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(253))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut buf[filled..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            if got.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::other("descriptors were cut off in transit"));
            }
            if got.bytes == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += got.bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (
            Channel::new(a, Duration::from_secs(5)).unwrap(),
            Channel::new(b, Duration::from_secs(5)).unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = OwnedFd::from(listener);
        a.send(
            &Message::Listeners {
                more: false,
                membership: Vec::new(),
                drains: Vec::new(),
            },
            &[fd],
        )
        .unwrap();
        a.send(&Message::Ready, &[]).unwrap();
        let (first, fds) = b.recv().unwrap();
        assert!(matches!(first, Message::Listeners { more: false, .. }));
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same listening socket.
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        let (second, fds) = b.recv().unwrap();
        assert!(matches!(second, Message::Ready) && fds.is_empty());
        drop(a);
        assert_eq!(
            b.recv().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "a closed peer is an error, not a hang"
        );
    }
}
