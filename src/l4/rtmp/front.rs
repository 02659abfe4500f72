//! Choosing the node by stream key: amslb answers the client's handshake and
//! `connect` itself, reads on until the stream key shows up, and only then
//! picks the node, shakes hands with it and replays the client's bytes.
//!
//! Why: an RTMP client sends the stream key (`releaseStream`, `FCPublish`,
//! `publish`) only after the server answered `connect`, so the key cannot be
//! known before a node is chosen unless `connect` is answered here. What it
//! costs: the node answers the replayed `connect` too; [`super::filter`]
//! drops that answer and re-frames the node's messages so the client's chunk
//! stream stays consistent. What it needs from clients: the key before
//! `createStream`'s answer is awaited, which is what ffmpeg, OBS (librtmp) and
//! Wirecast do (`releaseStream`/`FCPublish` come right after `connect`). A
//! client that sends `createStream` first gets a node without affinity.

use super::amf0::{self, Value};
use super::chunk::{self, ChunkReader, Message, TYPE_AMF0_COMMAND, TYPE_AMF3_COMMAND};
use super::handshake::{self, PACKET};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest command message read while waiting for the key.
const MAX_COMMAND: usize = 16 * 1024;
/// Window and peer bandwidth announced in the local `connect` answer (what
/// common servers announce).
const WINDOW: u32 = 2_500_000;

/// What the client said before the node was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Opening {
    /// Every chunk-stream byte the client sent after C2, to replay to the node.
    pub replay: Vec<u8>,
    /// `app` of `connect`.
    pub app: String,
    /// The stream key, without query string, when the client sent it in time.
    pub stream: Option<String>,
    /// Transaction id of `connect`, whose answer from the node is dropped.
    pub connect_txn: f64,
}

/// Why the opening failed; the client is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Reading from or writing to the client failed, or it closed.
    #[error("client: {0}")]
    Io(#[from] io::Error),
    /// The chunk stream is malformed.
    #[error("malformed RTMP: {0}")]
    Malformed(&'static str),
    /// More than the inspection cap went by without the key or `createStream`.
    #[error("no stream key within {0} bytes")]
    TooLong(usize),
}

/// Answers the handshake (the client's C0+C1 are in `c0_c1`) and `connect`,
/// and reads until the stream key or a command that needs a real server.
/// Bounded by `cap` bytes; the caller bounds the time.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    c0_c1: &[u8],
    cap: usize,
) -> Result<Opening, FrontError> {
    client
        .write_all(&handshake::server_reply(c0_c1.get(1..).unwrap_or_default()))
        .await?;
    let mut c2 = vec![0u8; PACKET];
    client.read_exact(&mut c2).await?;
    let mut reader = ChunkReader::new(Some(&[TYPE_AMF0_COMMAND, TYPE_AMF3_COMMAND]), MAX_COMMAND);
    let mut opening = Opening {
        replay: Vec::new(),
        app: String::new(),
        stream: None,
        connect_txn: 1.0,
    };
    let mut parsed = 0;
    let mut connected = false;
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some((used, message)) = reader
            .chunk(&opening.replay[parsed..])
            .map_err(FrontError::Malformed)?
        {
            parsed += used;
            let Some(message) = message else { continue };
            let body = match message.type_id {
                TYPE_AMF0_COMMAND => &message.body[..],
                TYPE_AMF3_COMMAND => message.body.get(1..).unwrap_or_default(),
                _ => continue,
            };
            let (values, _) = amf0::decode_all(body);
            let name = values.first().and_then(Value::as_str).unwrap_or_default();
            let txn = match values.get(1) {
                Some(Value::Number(n)) => *n,
                _ => 0.0,
            };
            match name {
                "connect" if !connected => {
                    connected = true;
                    opening.connect_txn = txn;
                    opening.app = values
                        .get(2)
                        .and_then(|o| o.get("app"))
                        .and_then(Value::as_str)
                        .map(super::without_query)
                        .unwrap_or_default();
                    client.write_all(&connect_answer(txn)).await?;
                }
                "releaseStream" | "FCPublish" | "publish" => {
                    opening.stream = values
                        .get(3)
                        .and_then(Value::as_str)
                        .map(super::without_query);
                    return Ok(opening);
                }
                // The client waits for a real answer now: choose without a key.
                "createStream" | "play" => return Ok(opening),
                _ => {}
            }
        }
        if opening.replay.len() >= cap {
            return Err(FrontError::TooLong(cap));
        }
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        opening.replay.extend_from_slice(&buf[..n]);
    }
}

/// The server's side of `connect`: window acknowledgement size, peer
/// bandwidth, and `_result` with NetConnection.Connect.Success.
fn connect_answer(txn: f64) -> Vec<u8> {
    let control = |type_id, body: Vec<u8>| Message {
        csid: 2,
        timestamp: 0,
        type_id,
        msid: 0,
        body,
    };
    let mut peer_bw = WINDOW.to_be_bytes().to_vec();
    peer_bw.push(2); // dynamic limit
    let text = |s: &str| Value::String(s.into());
    let values = [
        text("_result"),
        Value::Number(txn),
        Value::Object(vec![
            ("fmsVer".into(), text("FMS/3,0,1,123")),
            ("capabilities".into(), Value::Number(31.0)),
        ]),
        Value::Object(vec![
            ("level".into(), text("status")),
            ("code".into(), text("NetConnection.Connect.Success")),
            ("description".into(), text("Connection succeeded.")),
            ("objectEncoding".into(), Value::Number(0.0)),
        ]),
    ];
    let mut result = Vec::new();
    values.iter().for_each(|v| amf0::encode(&mut result, v));
    let mut out = Vec::new();
    chunk::write(
        &mut out,
        &control(5, WINDOW.to_be_bytes().to_vec()),
        chunk::DEFAULT_CHUNK_SIZE,
    );
    chunk::write(&mut out, &control(6, peer_bw), chunk::DEFAULT_CHUNK_SIZE);
    let result = Message {
        csid: 3,
        type_id: TYPE_AMF0_COMMAND,
        body: result,
        ..control(0, Vec::new())
    };
    chunk::write(&mut out, &result, chunk::DEFAULT_CHUNK_SIZE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l4::rtmp::tests::publisher_bytes;
    use tokio::io::duplex;

    #[tokio::test]
    async fn answers_connect_and_learns_the_key_before_any_node() {
        let bytes = publisher_bytes();
        let (mut lb_side, mut client) = duplex(1 << 16);
        let c1 = bytes[1..1 + PACKET].to_vec();
        let rest = bytes[1 + PACKET..].to_vec();
        let client_task = tokio::spawn(async move {
            // The client reads S0+S1+S2 and the connect answer before going on.
            let mut s = vec![0u8; 1 + 2 * PACKET];
            client.read_exact(&mut s).await.unwrap();
            assert_eq!(&s[1 + PACKET..], &c1[..], "S2 echoes C1");
            client.write_all(&rest).await.unwrap();
            let mut answer = vec![0u8; 512];
            let n = client.read(&mut answer).await.unwrap();
            answer.truncate(n);
            answer
        });
        let opening = open(&mut lb_side, &bytes[..1 + PACKET], 1 << 16)
            .await
            .unwrap();
        let answer = client_task.await.unwrap();
        assert_eq!(opening.app, "live");
        assert_eq!(opening.stream.as_deref(), Some("s1"));
        assert_eq!(opening.replay, bytes[1 + 2 * PACKET..]);
        // The answer parses as WAS, SPB and a successful _result for txn 1.
        let mut reader = ChunkReader::new(None, 4096);
        let mut data = &answer[..];
        let mut messages = Vec::new();
        while let Some((used, m)) = reader.chunk(data).unwrap() {
            data = &data[used..];
            messages.extend(m);
        }
        let types: Vec<u8> = messages.iter().map(|m| m.type_id).collect();
        assert_eq!(types, [5, 6, TYPE_AMF0_COMMAND]);
        let (values, _) = amf0::decode_all(&messages[2].body);
        assert_eq!(values[0].as_str(), Some("_result"));
        assert_eq!(values[1], Value::Number(1.0));
        let code = values[3].get("code").and_then(Value::as_str);
        assert_eq!(code, Some("NetConnection.Connect.Success"));
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_an_error_not_a_panic() {
        let (mut lb_side, mut client) = duplex(1 << 16);
        let c0_c1 = publisher_bytes()[..1 + PACKET].to_vec();
        let feeder = tokio::spawn(async move {
            let mut s = vec![0u8; 1 + 2 * PACKET];
            client.read_exact(&mut s).await.unwrap();
            client.write_all(&[0u8; PACKET]).await.unwrap();
            // A compressed header on a chunk stream never opened.
            client.write_all(&[0xc7; 64]).await.unwrap();
            client
        });
        let err = open(&mut lb_side, &c0_c1, 4096).await.unwrap_err();
        assert!(matches!(err, FrontError::Malformed(_)), "{err}");
        drop(feeder.await.unwrap());
    }
}
