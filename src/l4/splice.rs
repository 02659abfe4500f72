//! Zero-copy relay for plain TCP on Linux: bytes go socket → pipe → socket
//! with `splice(2)` and never enter user space. Uses rustix's safe wrappers, so
//! no `unsafe` here.
//!
//! Why it cannot stall: a pipe is filled only when it is empty and with at
//! most its capacity, so a `splice` into it never waits on the pipe, and a
//! `splice` out of it only when it holds data. An `EAGAIN` is therefore always
//! about the socket, which is what tokio's readiness tracking expects.

use super::meter::SessionMeter;
use crate::tunnel::TunnelEnd;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size asked for; the kernel may give less (per-user pipe limits), which
/// only means smaller steps.
const PIPE_SIZE: usize = 256 * 1024;

/// One pipe per direction, made before the relay starts so that a failure
/// (out of file descriptors) can fall back to the buffered relay.
#[derive(Debug)]
pub struct SplicePipes {
    up: Pipe,
    down: Pipe,
}

#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // The default (64 KiB) is kept when the larger size is refused.
        let size = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Self { read, write, size })
    }
}

impl SplicePipes {
    /// Creates both pipes.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            up: Pipe::new()?,
            down: Pipe::new()?,
        })
    }

    /// Relays between `client` and `node` like [`crate::tunnel::relay`] (half-close
    /// passed on, idle timeout, `stop`), with splice; byte counts go to `meter`.
    pub async fn relay(
        &self,
        client: &TcpStream,
        node: &TcpStream,
        meter: &SessionMeter,
        idle: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> TunnelEnd {
        let up = pump(client, node, &self.up, |n| meter.add_in(n));
        let down = pump(node, client, &self.down, |n| meter.add_out(n));
        tokio::select! {
            done = async { tokio::try_join!(up, down) } => match done {
                Ok(_) => TunnelEnd::Closed,
                Err(_) => TunnelEnd::Error,
            },
            () = meter.idle(idle) => TunnelEnd::Idle,
            () = stop => TunnelEnd::Shutdown,
        }
    }
}

async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    count: impl Fn(usize),
) -> io::Result<()> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        from.readable().await?;
        let mut filled = match from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, &pipe.write, None, pipe.size, flags)?)
        }) {
            Ok(0) => return socket2::SockRef::from(to).shutdown(Shutdown::Write),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // Top the pipe up while the socket has more, so each write moves a
        // larger batch. Called directly, not through `try_io`: an EAGAIN here
        // may mean the pipe ran out of slots rather than the socket out of
        // data, so it must not clear the socket's readiness; the next
        // `try_io` above finds out which.
        while filled < pipe.size {
            match splice(from, None, &pipe.write, None, pipe.size - filled, flags) {
                Ok(n) if n > 0 => filled += n,
                // EOF (0) is seen again, and acted on, by the next read above.
                _ => break,
            }
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, left, flags)?)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        count(filled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn splices_megabytes_both_ways_with_half_close() {
        let (mut client, client_side) = pair().await;
        let (node_side, mut node) = pair().await;
        let (meter, _, _) = crate::l4::meter::tests::meter();
        let pipes = SplicePipes::new().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let relay = pipes.relay(
            &client_side,
            &node_side,
            &meter,
            Duration::from_secs(10),
            std::future::pending(),
        );
        let peers = async {
            let (mut cr, mut cw) = client.split();
            let (mut nr, mut nw) = node.split();
            let send = async {
                cw.write_all(&data).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                nr.read_to_end(&mut got).await.unwrap();
                assert!(
                    got == data,
                    "node received {} bytes, not the same data",
                    got.len()
                );
                nw.write_all(b"bye").await.unwrap();
                nw.shutdown().await.unwrap();
            };
            tokio::join!(send, recv);
            let mut back = Vec::new();
            cr.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"bye");
        };
        let (end, ()) = tokio::join!(relay, peers);
        assert_eq!(end, TunnelEnd::Closed);
        assert_eq!(meter.totals(), (3_000_000, 3));
    }
}
