//! Deciding where a signalling WebSocket goes by its first command: one URL
//! (`/{app}/websocket`) for publishers (→ origin) and players (→ edge).
//!
//! This module is the pure decision: [`Sniffer`] reads (and keeps) the
//! client's first frames until a text message carries `"command": "publish"`
//! or `"play"`. The proxy side (`http::sniffed`) answers the upgrade, feeds
//! the sniffer, opens the WebSocket to the chosen node with the client's
//! request, replays the kept bytes exactly as received, and relays both ways.
//! Commands that come before publish/play (`getIceServerConfig`, `ping`, ...)
//! are kept and replayed in order. WebSocket pings that come before the
//! decision are answered here with a pong at once and not replayed: the client
//! would otherwise wait up to `sniff_timeout` for its pong (no node is there
//! yet), and the node would answer a ping the client no longer waits for. Anything this cannot read (binary, bad
//! frames, other commands, too many bytes, no command within `sniff_timeout`)
//! goes to the listener's default group with what was kept, so the client is
//! never broken, only routed as without sniffing.

use super::frame::{self, Parsed};
use crate::config::ListenerConfig;
use crate::header_list;
use crate::route::{Route, RouteKind, Target};
use base64::Engine;
use http::{HeaderMap, header};
use sha1::{Digest, Sha1};

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
    /// Pong frames owed to the client, to be written before reading on.
    pongs: Vec<u8>,
}

impl Sniffer {
    /// A sniffer for a WebSocket on `/{app}/websocket`.
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_string(),
            held: Vec::new(),
            parsed: 0,
            message: None,
            pongs: Vec::new(),
        }
    }

    /// The pongs owed for the pings read so far (server frames, ready to
    /// write to the client); empties the queue.
    pub fn take_pongs(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pongs)
    }

    /// Every byte the client sent so far, less the pings answered here, to
    /// replay to the node.
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
                Parsed::Frame(f, used) if f.opcode == frame::PING => {
                    // Answered now, and cut from the replay.
                    self.held.drain(self.parsed..self.parsed + used);
                    self.pongs
                        .extend(frame::encode_server_control(frame::PONG, &f.payload));
                }
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
            (frame::PONG, _) => return None,
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
    let has = |name: header::HeaderName, token: &str| header_list::lists(headers, name, token);
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
    fn play_after_preamble_decides_edge_and_keeps_everything_but_pings() {
        let mut s = Sniffer::new("LiveApp");
        let first = text(r#"{"command":"getIceServerConfig"}"#);
        let ping = encode_client(true, PING, b"are you there", M);
        let play = text(r#"{"command":"play","streamId":"s1","token":""}"#);
        assert_eq!(s.push(&first), Verdict::Pending);
        assert!(s.take_pongs().is_empty());
        assert_eq!(s.push(&ping), Verdict::Pending);
        // The pong carries the ping's payload (RFC 6455 5.5.3), unmasked.
        let mut pong = vec![0x8A, 13];
        pong.extend_from_slice(b"are you there");
        assert_eq!(s.take_pongs(), pong);
        assert!(s.take_pongs().is_empty(), "each ping answered once");
        // Byte by byte: the verdict comes with the last byte of the play frame.
        for (i, b) in play.iter().enumerate() {
            let v = s.push(&[*b]);
            if i + 1 < play.len() {
                assert_eq!(v, Verdict::Pending);
            } else {
                assert_eq!(v, Verdict::Play(Some("LiveApp/s1".into())));
            }
        }
        assert_eq!(s.held(), [first, play].concat(), "the ping is not replayed");
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
        assert_eq!(s.take_pongs(), [0x8A, 1, b'p']);
        let replay = [
            encode_client(false, TEXT, &msg[..10], M),
            encode_client(false, CONTINUATION, &msg[10..20], M),
            encode_client(true, CONTINUATION, &msg[20..], M),
        ];
        assert_eq!(s.held(), replay.concat());
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
