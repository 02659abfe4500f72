//! `websocket-publish` limits on WebSocket tunnels amslb does not sniff (a
//! listener without `sniff_websocket`, or a `?target=` session): the client's
//! first messages are read as they pass, with the same reader that sniffing
//! uses ([`Sniffer`]), and a `publish` command is counted against the client's
//! `per_minute` limits. Over the limit the tunnel ends before the command
//! reaches the node. Players and sessions whose first command is not
//! `publish` are not counted; once the first command is known nothing more is
//! read or kept.

use crate::config::Config;
use crate::config::rules::RouteName;
use crate::policy::limits::Limits;
use crate::runtime::Runtime;
use crate::streaming::sniff::{Sniffer, Verdict};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, ReadBuf};

/// What a tunnel's client side is watched with: nothing when no limit
/// counts `websocket-publish` on the listener. Boxed: every tunnel's task
/// holds a `PublishWatch` for its whole life, most of them empty.
pub struct PublishWatch(Option<Box<Watch>>);

struct Watch {
    sniffer: Sniffer,
    runtime: Arc<Runtime>,
    listener: String,
    client: IpAddr,
}

impl PublishWatch {
    /// The watch for a tunnel of `client` on `listener`.
    pub fn new(runtime: &Arc<Runtime>, config: &Config, listener: &str, client: IpAddr) -> Self {
        let counted = Limits::counts_publishes(config, listener, RouteName::WebsocketPublish);
        Self(counted.then(|| {
            Box::new(Watch {
                sniffer: Sniffer::new(""),
                runtime: runtime.clone(),
                listener: listener.to_string(),
                client,
            })
        }))
    }

    /// Whether a limit counts this tunnel's publish, so its client side must be read along.
    pub fn watching(&self) -> bool {
        self.0.is_some()
    }

    /// The tunnel's client side `client`, read along by this watch.
    pub fn wrap<S>(self, client: S) -> Watched<S> {
        Watched {
            inner: client,
            watch: self.0,
        }
    }
}

/// The client side of a WebSocket tunnel, watched for its `publish`.
pub struct Watched<S> {
    inner: S,
    /// Present until the first command is known.
    watch: Option<Box<Watch>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let Some(watch) = this.watch.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match watch.sniffer.push(new) {
            Verdict::Pending => {}
            Verdict::Publish(_) => {
                let admitted = watch.runtime.admit_publish(
                    &watch.listener,
                    RouteName::WebsocketPublish,
                    watch.client,
                );
                this.watch = None;
                if !admitted {
                    // The bytes carrying the publish never reach the node.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "websocket publish over the client's limit",
                    )));
                }
            }
            _ => this.watch = None,
        }
        Poll::Ready(Ok(()))
    }
}

crate::tunnel::write_through!(Watched, inner);
