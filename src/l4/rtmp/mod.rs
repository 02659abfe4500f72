//! RTMP awareness for the `tcp`/`tls` listeners, in two strengths:
//!
//! - **Inspection** ([`Inspector`], `rtmp_inspect`): reads the bytes a client
//!   sends to its node, without changing or delaying them, to learn the app
//!   (`connect`) and the stream name (`publish`/`play`) for logs and counters.
//!   The handshake passes through untouched; only C0 is checked (version 3,
//!   plain RTMP) and C0+C1 must arrive before a node is contacted, so a silent
//!   or non-RTMP client never reaches one. Inspection stops at the first
//!   `publish`/`play`, at [`INSPECT_CAP`] bytes after the handshake, or at the
//!   first malformed chunk; the bytes still flow and the node judges them.
//! - **Affinity** ([`front`], [`filter`], `rtmp_affinity`): the stream key
//!   travels in `releaseStream`/`FCPublish`/`publish`, which a client sends
//!   only after the *server* answered `connect`. To choose the node by key,
//!   amslb answers the handshake and `connect` itself, reads the key, then
//!   shakes hands with the chosen node ([`handshake`]), replays the client's
//!   bytes, and drops the node's second `connect` answer while re-framing the
//!   node's messages so the client's chunk-stream state stays consistent.
//!   Limits: clients must name the key before awaiting `createStream`'s
//!   answer (ffmpeg, OBS/librtmp and Wirecast do; others get plain
//!   balancing); RTMPE and digest-only handshakes are not supported.
//!
//! Nothing here panics on any input (see the fuzz-style tests); every buffer
//! is bounded.

pub mod amf0;
pub mod chunk;
pub mod filter;
pub mod front;
pub mod handshake;

use amf0::Value;
use chunk::{ChunkReader, TYPE_AMF0_COMMAND, TYPE_AMF3_COMMAND};
use std::fmt;

/// Length of C0 + C1, read before a node is chosen so a silent or non-RTMP
/// client never reaches a node.
pub const C0_C1_LEN: usize = 1 + 1536;
/// C0 + C1 + C2: bytes before the chunk stream begins.
const HANDSHAKE_LEN: usize = 1 + 1536 + 1536;
/// Chunk-stream bytes inspected at most after the handshake. `connect` to
/// `publish` takes a few hundred bytes from real encoders.
pub const INSPECT_CAP: usize = 64 * 1024;
/// Largest command message read; a bigger one ends inspection.
const MAX_COMMAND: usize = 16 * 1024;
/// The message types the inspector reads.
const COMMANDS: &[u8] = &[TYPE_AMF0_COMMAND, TYPE_AMF3_COMMAND];

/// Why a client's first byte shows it is not plain RTMP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// C0 = 6: RTMPE (encrypted), which AMS does not speak.
    #[error("RTMPE (encrypted RTMP) is not supported")]
    Encrypted,
    /// Any other version byte.
    #[error("not RTMP: version byte {0:#04x}")]
    NotRtmp(u8),
}

/// Checks C0, the client's version byte.
pub fn check_c0(c0: u8) -> Result<(), HandshakeError> {
    match c0 {
        3 => Ok(()),
        6 => Err(HandshakeError::Encrypted),
        other => Err(HandshakeError::NotRtmp(other)),
    }
}

/// What the inspector learned, in the order the client said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `connect`: the application and the URL the client used.
    Connect {
        /// `app` of the command object.
        app: String,
        /// `tcUrl`, without its query string (it may carry credentials).
        tc_url: String,
    },
    /// `publish`: the stream name (key) being published.
    Publish {
        /// App from `connect`, empty if not seen.
        app: String,
        /// Stream name without its query string (tokens stay out of logs).
        stream: String,
    },
    /// `play`: the stream name being played.
    Play {
        /// App from `connect`, empty if not seen.
        app: String,
        /// Stream name without its query string.
        stream: String,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connect { app, tc_url } => write!(f, "connect app={app:?} tcUrl={tc_url:?}"),
            Event::Publish { app, stream } => write!(f, "publish app={app:?} stream={stream:?}"),
            Event::Play { app, stream } => write!(f, "play app={app:?} stream={stream:?}"),
        }
    }
}

/// Why inspection stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `publish` or `play` was seen: everything worth knowing is known.
    Done,
    /// [`INSPECT_CAP`] bytes went by without it.
    CapReached,
    /// The data is not a valid chunk stream (the node will judge it).
    Malformed(&'static str),
}

/// Incremental, bounded reader of a client's RTMP start.
#[derive(Debug)]
pub struct Inspector {
    /// Bytes observed so far, handshake included.
    seen: usize,
    /// Chunk-stream bytes not parsed yet (an incomplete chunk).
    pending: Vec<u8>,
    reader: ChunkReader,
    app: String,
    events: Vec<Event>,
    stop: Option<Stop>,
    cap: usize,
}

impl Inspector {
    /// An inspector that reads at most `cap` bytes after the handshake.
    pub fn new(cap: usize) -> Self {
        Self {
            seen: 0,
            pending: Vec::new(),
            reader: ChunkReader::new(Some(COMMANDS), MAX_COMMAND),
            app: String::new(),
            events: Vec::new(),
            stop: None,
            cap,
        }
    }

    /// An inspector for a session whose handshake amslb answered itself: the
    /// bytes it is fed start with the chunk stream.
    pub fn after_handshake(cap: usize) -> Self {
        Self {
            seen: HANDSHAKE_LEN,
            ..Self::new(cap)
        }
    }

    /// Why inspection stopped, or `None` while it goes on.
    pub fn stopped(&self) -> Option<Stop> {
        self.stop
    }

    /// Takes the events found since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Observes the next client→node bytes.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.stop.is_some() || data.is_empty() {
            return;
        }
        if self.seen == 0
            && let Err(e) = check_c0(data[0])
        {
            self.stop = Some(Stop::Malformed(match e {
                HandshakeError::Encrypted => "RTMPE",
                HandshakeError::NotRtmp(_) => "bad version byte",
            }));
            return;
        }
        if self.seen < HANDSHAKE_LEN {
            let skip = (HANDSHAKE_LEN - self.seen).min(data.len());
            self.seen += skip;
            data = &data[skip..];
        }
        if data.is_empty() {
            return;
        }
        let room = self.cap.saturating_sub(self.seen - HANDSHAKE_LEN);
        let take = data.len().min(room);
        self.seen += data.len();
        // Taken out of `self` so chunks can be parsed while `self` changes.
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(&data[..take]);
        let mut pos = 0;
        while self.stop.is_none() {
            match self.reader.chunk(&pending[pos..]) {
                Ok(Some((used, message))) => {
                    pos += used;
                    match message {
                        Some(m) if m.type_id == TYPE_AMF0_COMMAND => self.command(&m.body),
                        // AMF3 commands start with a format byte, then AMF0.
                        Some(m) if m.type_id == TYPE_AMF3_COMMAND => {
                            self.command(m.body.get(1..).unwrap_or_default())
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(reason) => self.stop = Some(Stop::Malformed(reason)),
            }
        }
        pending.drain(..pos);
        self.pending = pending;
        if self.stop.is_none() && take < data.len() {
            self.stop = Some(Stop::CapReached);
        }
        if self.stop.is_some() {
            // Done: free the buffers, the inspector is now a no-op.
            self.pending = Vec::new();
            self.reader = ChunkReader::new(Some(COMMANDS), 0);
        }
    }

    fn command(&mut self, body: &[u8]) {
        // Command messages whose AMF is broken are ignored: the node decides.
        let (values, _) = amf0::decode_all(body);
        let arg = |i: usize| values.get(i).and_then(Value::as_str).map(without_query);
        match values.first().and_then(Value::as_str) {
            Some("connect") => {
                let object = values.get(2);
                let field = |k| object.and_then(|o| o.get(k)).and_then(Value::as_str);
                self.app = field("app").map(without_query).unwrap_or_default();
                self.events.push(Event::Connect {
                    app: self.app.clone(),
                    tc_url: field("tcUrl").map(without_query).unwrap_or_default(),
                });
            }
            Some("publish") => {
                if let Some(stream) = arg(3) {
                    let app = self.app.clone();
                    self.events.push(Event::Publish { app, stream });
                    self.stop = Some(Stop::Done);
                }
            }
            Some("play") => {
                if let Some(stream) = arg(3) {
                    let app = self.app.clone();
                    self.events.push(Event::Play { app, stream });
                    self.stop = Some(Stop::Done);
                }
            }
            _ => {}
        }
    }
}

fn without_query(s: &str) -> String {
    s.split('?').next().unwrap_or_default().to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::amf0::{Value as V, encode, test_values};
    use super::chunk::TYPE_SET_CHUNK_SIZE;
    use super::*;

    /// A message as encoders send it: a full header, then continuation chunks.
    pub fn chunks(csid: u8, type_id: u8, body: &[u8], chunk_size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let message = chunk::Message {
            csid: u32::from(csid),
            timestamp: 0,
            type_id,
            msid: 0,
            body: body.to_vec(),
        };
        chunk::write(&mut out, &message, chunk_size);
        out
    }

    fn command(
        name: &str,
        txn: f64,
        object: Option<&[(&str, &str)]>,
        arg: Option<&str>,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        encode(&mut m, &test_values::s(name));
        encode(&mut m, &V::Number(txn));
        encode(&mut m, &object.map_or(V::Null, test_values::object));
        if let Some(a) = arg {
            encode(&mut m, &test_values::s(a));
        }
        m
    }

    /// What ffmpeg sends when publishing rtmp://host/live/s1?token=secret.
    pub fn publisher_bytes() -> Vec<u8> {
        let mut out = vec![3u8];
        out.extend(std::iter::repeat_n(7u8, 1536 * 2));
        let connect = command(
            "connect",
            1.0,
            Some(&[
                ("app", "live"),
                ("type", "nonprivate"),
                ("tcUrl", "rtmp://127.0.0.1:1935/live"),
            ]),
            None,
        );
        out.extend(chunks(3, TYPE_AMF0_COMMAND, &connect, 128));
        out.extend(chunks(2, TYPE_SET_CHUNK_SIZE, &4096u32.to_be_bytes(), 128));
        out.extend(chunks(
            3,
            TYPE_AMF0_COMMAND,
            &command("releaseStream", 2.0, None, Some("s1")),
            4096,
        ));
        out.extend(chunks(
            3,
            TYPE_AMF0_COMMAND,
            &command("FCPublish", 3.0, None, Some("s1")),
            4096,
        ));
        out.extend(chunks(
            3,
            TYPE_AMF0_COMMAND,
            &command("createStream", 4.0, None, None),
            4096,
        ));
        let mut publish = command("publish", 5.0, None, Some("s1?token=secret"));
        encode(&mut publish, &test_values::s("live"));
        out.extend(chunks(8, TYPE_AMF0_COMMAND, &publish, 4096));
        // Media follows; the inspector must not care.
        out.extend(chunks(4, 9, &[0x17; 3000], 4096));
        out
    }

    fn expected() -> Vec<Event> {
        vec![
            Event::Connect {
                app: "live".into(),
                tc_url: "rtmp://127.0.0.1:1935/live".into(),
            },
            Event::Publish {
                app: "live".into(),
                stream: "s1".into(),
            },
        ]
    }

    #[test]
    fn learns_app_and_stream_key_from_a_publisher() {
        let mut i = Inspector::new(INSPECT_CAP);
        i.feed(&publisher_bytes());
        assert_eq!(i.take_events(), expected());
        assert_eq!(i.stopped(), Some(Stop::Done));
    }

    #[test]
    fn byte_by_byte_feeding_gives_the_same_result() {
        let mut i = Inspector::new(INSPECT_CAP);
        let mut events = Vec::new();
        for b in publisher_bytes() {
            i.feed(&[b]);
            events.extend(i.take_events());
        }
        assert_eq!(events, expected());
    }

    #[test]
    fn cap_stops_inspection() {
        let mut i = Inspector::new(50);
        i.feed(&publisher_bytes());
        assert_eq!(i.stopped(), Some(Stop::CapReached));
        assert!(i.take_events().is_empty());
    }

    #[test]
    fn bad_version_and_rtmpe_are_refused() {
        assert_eq!(check_c0(3), Ok(()));
        assert_eq!(check_c0(6), Err(HandshakeError::Encrypted));
        assert_eq!(check_c0(b'G'), Err(HandshakeError::NotRtmp(b'G')));
        let mut i = Inspector::new(INSPECT_CAP);
        i.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(i.stopped(), Some(Stop::Malformed(_))));
    }

    #[test]
    fn play_is_recognised() {
        let mut bytes = vec![3u8];
        bytes.extend(std::iter::repeat_n(0u8, 3072));
        bytes.extend(chunks(
            3,
            TYPE_AMF0_COMMAND,
            &command("connect", 1.0, Some(&[("app", "vod")]), None),
            128,
        ));
        bytes.extend(chunks(
            8,
            TYPE_AMF0_COMMAND,
            &command("play", 4.0, None, Some("movie")),
            128,
        ));
        let mut i = Inspector::new(INSPECT_CAP);
        i.feed(&bytes);
        let events = i.take_events();
        assert_eq!(
            events[1],
            Event::Play {
                app: "vod".into(),
                stream: "movie".into()
            }
        );
    }

    fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_and_mutated_input_never_panics_and_stays_bounded() {
        let good = publisher_bytes();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..3000 {
            let mut data = if round % 2 == 0 {
                // Pure noise after a valid C0.
                let len = (xorshift(&mut seed) % 9000) as usize;
                let mut d: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
                if let Some(first) = d.first_mut() {
                    *first = 3;
                }
                d
            } else {
                // The real sequence with a few bytes flipped after the handshake.
                let mut d = good.clone();
                for _ in 0..4 {
                    let at =
                        HANDSHAKE_LEN + (xorshift(&mut seed) as usize % (d.len() - HANDSHAKE_LEN));
                    d[at] = xorshift(&mut seed) as u8;
                }
                d
            };
            let cut = (xorshift(&mut seed) as usize) % (data.len() + 1);
            data.truncate(cut);
            let mut i = Inspector::new(4096);
            for piece in data.chunks(1 + (xorshift(&mut seed) % 700) as usize) {
                i.feed(piece);
                assert!(i.pending.len() <= 4096);
            }
            let _ = i.take_events();
        }
    }
}
