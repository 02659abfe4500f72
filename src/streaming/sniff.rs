//! Routing a signalling WebSocket by its first command: one URL
//! (`/{app}/websocket`) for publishers (→ origin) and players (→ edge).
//!
//! amslb answers the client's upgrade itself, reads (and keeps) the client's
//! first frames until a text message carries `"command": "publish"` or
//! `"play"`, then opens the WebSocket to the chosen node with the client's
//! request, replays the kept bytes exactly as received, and relays both ways.
//! Commands that come before publish/play (`getIceServerConfig`, `ping`, ...)
//! are kept and replayed in order. Anything this cannot read (binary, bad
//! frames, other commands, too many bytes, no command within `sniff_timeout`)
//! goes to the listener's default group with what was kept, so the client is
//! never broken, only routed as without sniffing.

use super::frame::{self, Parsed};
use super::select::Wanted;
use crate::cluster::NodeLease;
use crate::config::{Config, ListenerConfig};
use crate::http::body::ResponseBody;
use crate::http::proxy::{ConnContext, forward, sticky_affinity};
use crate::route::{Route, RouteKind, Target};
use crate::tunnel;
use base64::Engine;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

/// Most client bytes kept while waiting for the deciding command.
pub const MAX_HELD: usize = 64 * 1024;

/// Commands a client may send before publish/play; anything else is not
/// worth waiting on and goes to the default group at once.
const PREAMBLE: [&str; 4] = ["getIceServerConfig", "ping", "getStreamInfo", "getVersion"];

/// Where the first messages send the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    Pending,
    /// `publish`: the origin group, keyed on `app/streamId`.
    Publish(Option<String>),
    /// `play`: the edge group, keyed on `app/streamId`.
    Play(Option<String>),
    /// Nothing to learn from this client: the listener's default group.
    Undecidable(&'static str),
    /// The client closed or failed before a verdict: what it sent still goes
    /// to the default group, and if it sent nothing no node is bothered.
    Gone,
}

/// Reads client frames as they arrive, keeping every byte for the replay.
#[derive(Debug)]
pub struct Sniffer {
    app: String,
    held: Vec<u8>,
    parsed: usize,
    /// Text message being assembled from fragments.
    message: Option<Vec<u8>>,
}

impl Sniffer {
    /// A sniffer for a WebSocket on `/{app}/websocket`.
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_string(),
            held: Vec::new(),
            parsed: 0,
            message: None,
        }
    }

    /// Every byte the client sent so far, to replay to the node.
    pub fn held(&self) -> &[u8] {
        &self.held
    }

    /// Adds bytes from the client and says whether they decide the route.
    pub fn push(&mut self, bytes: &[u8]) -> Verdict {
        self.held.extend_from_slice(bytes);
        loop {
            let room = MAX_HELD.saturating_sub(self.parsed);
            match frame::parse(&self.held[self.parsed..], room) {
                Parsed::Incomplete if self.held.len() >= MAX_HELD => {
                    return Verdict::Undecidable("too many bytes before a command");
                }
                Parsed::Incomplete => return Verdict::Pending,
                Parsed::Invalid(why) => return Verdict::Undecidable(why),
                Parsed::Frame(f, used) => {
                    self.parsed += used;
                    if let Some(verdict) = self.on_frame(f) {
                        return verdict;
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, f: frame::Frame) -> Option<Verdict> {
        let text = match (f.opcode, self.message.as_mut()) {
            (frame::PING | frame::PONG, _) => return None,
            (frame::CLOSE, _) => return Some(Verdict::Undecidable("closed before a command")),
            (frame::BINARY, _) => return Some(Verdict::Undecidable("binary message")),
            (frame::TEXT, None) => self.message.insert(f.payload),
            (frame::CONTINUATION, Some(message)) => {
                message.extend_from_slice(&f.payload);
                message
            }
            _ => return Some(Verdict::Undecidable("bad fragment sequence")),
        };
        if !f.fin {
            return None;
        }
        let text = std::mem::take(text);
        self.message = None;
        self.on_message(&text)
    }

    fn on_message(&self, text: &[u8]) -> Option<Verdict> {
        let Ok(serde_json::Value::Object(message)) = serde_json::from_slice(text) else {
            return Some(Verdict::Undecidable("text message is not a JSON object"));
        };
        let key = message
            .get("streamId")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(|stream| format!("{}/{stream}", self.app));
        match message.get("command").and_then(|c| c.as_str()) {
            Some("publish") => Some(Verdict::Publish(key)),
            Some("play") => Some(Verdict::Play(key)),
            Some(c) if PREAMBLE.contains(&c) => None,
            _ => Some(Verdict::Undecidable("message is not publish or play")),
        }
    }
}

/// Whether `request` is a WebSocket upgrade this listener should sniff: a
/// sniffing listener, `/{app}/websocket` without `?target=`, and a valid
/// version-13 handshake (anything else is proxied as usual).
pub fn applies(listener: &ListenerConfig, route: &Route, headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, value: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(value))
    };
    listener.sniff_websocket
        && route.kind == RouteKind::WebSocket
        && route.target == Target::ListenerDefault
        && has(header::UPGRADE, "websocket")
        && has(header::CONNECTION, "upgrade")
        && has(header::SEC_WEBSOCKET_VERSION, "13")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Answers the client's upgrade and starts the sniffing session. `request`
/// must already be prepared for the node (origin-form URI, forwarding
/// headers); the session sends it once it knows where.
pub fn accept(
    ctx: &Arc<ConnContext>,
    config: Arc<Config>,
    listener: &ListenerConfig,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    let app = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| accept_key(k.as_bytes()))
        .unwrap_or_default();
    // The node must not negotiate what the client was not granted here: no
    // extension (so frames stay readable and uncompressed), and only the
    // subprotocol answered to the client.
    let headers = request.headers_mut();
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .and_then(|p| HeaderValue::from_str(p).ok());
    match &protocol {
        Some(p) => headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone()),
        None => headers.remove(header::SEC_WEBSOCKET_PROTOCOL),
    };
    let client_upgrade = hyper::upgrade::on(&mut request);
    let session = Session {
        ctx: ctx.clone(),
        listener: listener.clone(),
        config,
        app,
    };
    ctx.runtime.tasks.spawn(async move {
        match client_upgrade.await {
            Ok(client) => session.run(TokioIo::new(client), request).await,
            Err(e) => warn!(listener = %session.ctx.listener, error = %e, "client upgrade failed"),
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, key);
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    response
        .body(ResponseBody::Local(Default::default()))
        .unwrap_or_else(|_| Response::new(ResponseBody::Local(Default::default())))
}

struct Session {
    ctx: Arc<ConnContext>,
    listener: ListenerConfig,
    config: Arc<Config>,
    app: String,
}

/// A WebSocket close frame from the server side (unmasked): 1011, internal error.
const CLOSE_INTERNAL_ERROR: [u8; 4] = [0x88, 0x02, 0x03, 0xF3];

/// A close frame with 1008, policy violation: a publish over its client's `[[limit]]`.
const CLOSE_POLICY_VIOLATION: [u8; 4] = [0x88, 0x02, 0x03, 0xF0];

impl Session {
    async fn run<C>(self, mut client: C, request: Request<Incoming>)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut sniffer = Sniffer::new(&self.app);
        let verdict = sniff(&mut client, &mut sniffer, self.listener.sniff_timeout).await;
        let (target, key, publish) = match &verdict {
            Verdict::Publish(key) => (Target::Origin, key.clone(), true),
            Verdict::Play(key) => (Target::Edge, key.clone(), false),
            Verdict::Gone if sniffer.held().is_empty() => return,
            Verdict::Pending | Verdict::Undecidable(_) | Verdict::Gone => {
                (Target::ListenerDefault, None, false)
            }
        };
        if publish
            && !self.ctx.runtime.admit_publish(
                &self.ctx.listener,
                crate::config::rules::RouteName::WebsocketPublish,
                self.ctx.client.addr.ip(),
            )
        {
            let _ = client.write_all(&CLOSE_POLICY_VIOLATION).await;
            return;
        }
        let wanted = Wanted::for_target(
            &self.config,
            &self.listener,
            target,
            key,
            publish,
            request.headers(),
        );
        let ctx = &self.ctx;
        let node = match connect(ctx, &self.config, &wanted, request).await {
            Ok(node) => node,
            Err(reason) => {
                warn!(listener = %ctx.listener, client = %ctx.client.addr, group = wanted.group, reason, "sniffed websocket not forwarded");
                let _ = client.write_all(&CLOSE_INTERNAL_ERROR).await;
                return;
            }
        };
        let (mut node_io, lease) = node;
        if let Err(e) = node_io.write_all(sniffer.held()).await {
            warn!(listener = %ctx.listener, node = lease.node().id(), error = %e, "replay to node failed");
            return;
        }
        info!(
            listener = %ctx.listener,
            client = %ctx.client.addr,
            node = lease.node().id(),
            ?verdict,
            replayed = sniffer.held().len(),
            "sniffed websocket routed"
        );
        let relayed = tunnel::relay(
            client,
            node_io,
            self.config.timeouts.tunnel,
            ctx.runtime.hard_stop.clone().cancelled_owned(),
        )
        .await;
        info!(
            listener = %ctx.listener,
            client = %ctx.client.addr,
            node = lease.node().id(),
            to_node = relayed.to_node,
            to_client = relayed.to_client,
            end = ?relayed.end,
            "tunnel closed"
        );
    }
}

/// Reads client bytes until the sniffer decides, the client stops sending
/// (EOF or error: what was read is still replayed) or `wait` is over.
async fn sniff<C: AsyncRead + Unpin>(
    client: &mut C,
    sniffer: &mut Sniffer,
    wait: Duration,
) -> Verdict {
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return Verdict::Gone,
                Ok(n) => match sniffer.push(&buf[..n]) {
                    Verdict::Pending => {}
                    decided => return decided,
                },
            }
        }
    };
    tokio::time::timeout(wait, reading)
        .await
        .unwrap_or(Verdict::Undecidable("no command in time"))
}

type NodeSide = (TokioIo<hyper::upgrade::Upgraded>, NodeLease);

/// Sends the client's upgrade request to a node picked for `wanted` (with the
/// proxy's retries, and the client's sticky node first if it has one in the
/// chosen group) and returns the upgraded connection. No sticky cookie can be
/// set: the client already has its 101.
async fn connect(
    ctx: &ConnContext,
    config: &Config,
    wanted: &Wanted,
    mut request: Request<Incoming>,
) -> Result<NodeSide, String> {
    let snapshot = ctx.runtime.cluster.snapshot();
    let route = Route {
        target: Target::ListenerDefault,
        kind: RouteKind::WebSocket,
        affinity: wanted.key.clone(),
    };
    let affinity = sticky_affinity(ctx, config, &snapshot, &wanted.group, &route, &mut request);
    let (mut response, lease) = forward(ctx, config, &snapshot, wanted, &affinity, request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "node {} answered {} instead of switching protocols",
            lease.node().id(),
            response.status()
        ));
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| format!("node {} upgrade: {e}", lease.node().id()))?;
    Ok((TokioIo::new(upgraded), lease))
}

#[cfg(test)]
mod tests {
    use super::*;
    use frame::{CONTINUATION, PING, TEXT, encode_client};

    const M: [u8; 4] = [1, 2, 3, 4];

    fn text(s: &str) -> Vec<u8> {
        encode_client(true, TEXT, s.as_bytes(), M)
    }

    #[test]
    fn rfc_accept_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn play_after_preamble_decides_edge_and_keeps_everything() {
        let mut s = Sniffer::new("LiveApp");
        let first = text(r#"{"command":"getIceServerConfig"}"#);
        let ping = encode_client(true, PING, b"", M);
        let play = text(r#"{"command":"play","streamId":"s1","token":""}"#);
        assert_eq!(s.push(&first), Verdict::Pending);
        assert_eq!(s.push(&ping), Verdict::Pending);
        // Byte by byte: the verdict comes with the last byte of the play frame.
        for (i, b) in play.iter().enumerate() {
            let v = s.push(&[*b]);
            if i + 1 < play.len() {
                assert_eq!(v, Verdict::Pending);
            } else {
                assert_eq!(v, Verdict::Play(Some("LiveApp/s1".into())));
            }
        }
        assert_eq!(s.held(), [first, ping, play].concat());
    }

    #[test]
    fn fragmented_publish_with_a_ping_between_fragments() {
        let mut s = Sniffer::new("App");
        let msg = br#"{"command":"publish","streamId":"cam 7"}"#;
        let mut bytes = encode_client(false, TEXT, &msg[..10], M);
        bytes.extend(encode_client(true, PING, b"p", M));
        bytes.extend(encode_client(false, CONTINUATION, &msg[10..20], M));
        bytes.extend(encode_client(true, CONTINUATION, &msg[20..], M));
        assert_eq!(s.push(&bytes), Verdict::Publish(Some("App/cam 7".into())));
    }

    #[test]
    fn odd_input_is_undecidable_not_an_error() {
        let cases: Vec<Vec<u8>> = vec![
            encode_client(true, frame::BINARY, b"\x00\x01", M),
            text("not json"),
            text(r#"{"command":"joinRoom","room":"r"}"#),
            text(r#"["play"]"#),
            encode_client(true, CONTINUATION, b"x", M),
            encode_client(true, frame::CLOSE, b"", M),
            vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
            encode_client(true, TEXT, &vec![b' '; MAX_HELD + 10], M),
        ];
        for bytes in cases {
            let mut s = Sniffer::new("a");
            assert!(
                matches!(s.push(&bytes), Verdict::Undecidable(_)),
                "{bytes:?}"
            );
        }
        // Many small preamble messages still stop at the cap.
        let mut s = Sniffer::new("a");
        let ping = text(r#"{"command":"ping"}"#);
        let verdict = (0..MAX_HELD / ping.len() + 2)
            .map(|_| s.push(&ping))
            .find(|v| *v != Verdict::Pending);
        assert!(
            matches!(verdict, Some(Verdict::Undecidable(_))),
            "{verdict:?}"
        );
    }

    #[test]
    fn play_without_stream_id_still_goes_to_edge() {
        let mut s = Sniffer::new("a");
        assert_eq!(s.push(&text(r#"{"command":"play"}"#)), Verdict::Play(None));
    }
}
