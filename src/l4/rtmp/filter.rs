//! The node→client side of a session whose `connect` amslb answered itself
//! ([`super::front`]): the node answers the replayed `connect` too, and the
//! client must not see that second answer.
//!
//! Dropping a message from a chunk stream changes the header-compression
//! state the next chunks on that chunk stream rely on, so the filter parses
//! the node's messages and writes each one anew with a full header; the
//! client's state then always matches what it was sent. The node's
//! set-chunk-size messages are forwarded and followed. Publishers get only
//! small control and status messages from the node, so the cost is small;
//! players on such a listener get their media re-framed too.

use super::amf0::{self, Value};
use super::chunk::{self, ChunkReader, TYPE_AMF0_COMMAND, TYPE_SET_CHUNK_SIZE};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, ReadBuf};

/// Largest node message re-framed (a video key frame of a played stream can be
/// large; a publisher never gets anything near this).
const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Parser and re-framer of the node's chunk stream.
#[derive(Debug)]
pub struct NodeFilter {
    reader: ChunkReader,
    /// Chunk size the client reads with (follows forwarded set-chunk-size).
    out_chunk_size: usize,
    pending: Vec<u8>,
    /// Transaction id of the `connect` whose answer is dropped, until dropped.
    connect_txn: Option<f64>,
}

impl NodeFilter {
    /// A filter dropping the node's answer to the `connect` with `connect_txn`.
    pub fn new(connect_txn: f64) -> Self {
        Self {
            reader: ChunkReader::new(None, MAX_MESSAGE),
            out_chunk_size: chunk::DEFAULT_CHUNK_SIZE,
            pending: Vec::new(),
            connect_txn: Some(connect_txn),
        }
    }

    /// Takes bytes from the node and appends what the client gets to `out`.
    /// An error ends the session: a malformed stream, or the node refusing
    /// the `connect` the client was already told succeeded.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        self.pending.extend_from_slice(data);
        let mut pos = 0;
        while let Some((used, message)) = self.reader.chunk(&self.pending[pos..])? {
            pos += used;
            let Some(message) = message else { continue };
            if let Some(txn) = self.connect_txn
                && message.type_id == TYPE_AMF0_COMMAND
            {
                let (values, _) = amf0::decode_all(&message.body);
                let is_answer = values.get(1) == Some(&Value::Number(txn));
                match values.first().and_then(Value::as_str) {
                    Some("_result") if is_answer => {
                        self.connect_txn = None;
                        continue;
                    }
                    Some("_error") if is_answer => return Err("node refused connect"),
                    _ => {}
                }
            }
            chunk::write(out, &message, self.out_chunk_size);
            if message.type_id == TYPE_SET_CHUNK_SIZE
                && let Some(raw) = message.body.get(..4)
            {
                let size = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) & 0x7fff_ffff;
                self.out_chunk_size = (size as usize).max(1);
            }
        }
        self.pending.drain(..pos);
        Ok(())
    }
}

/// The node connection as the client should see it: reads go through a
/// [`NodeFilter`], writes pass straight on. Wrapping the whole connection
/// (rather than a split read half) keeps one type for plain and TLS nodes and
/// lets a reset reach the node's socket ([`crate::tunnel::Reset`]).
#[derive(Debug)]
pub struct Filtered<S> {
    inner: S,
    filter: NodeFilter,
    out: Vec<u8>,
    out_pos: usize,
    buf: Box<[u8]>,
}

impl<S> Filtered<S> {
    /// Wraps the node connection `inner`.
    pub fn new(inner: S, filter: NodeFilter) -> Self {
        Self {
            inner,
            filter,
            out: Vec::new(),
            out_pos: 0,
            buf: vec![0u8; 32 * 1024].into_boxed_slice(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Filtered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dest: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.out_pos == this.out.len() {
            this.out.clear();
            this.out_pos = 0;
            let mut raw = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(())); // EOF
            }
            this.filter
                .feed(raw.filled(), &mut this.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let n = dest.remaining().min(this.out.len() - this.out_pos);
        dest.put_slice(&this.out[this.out_pos..this.out_pos + n]);
        this.out_pos += n;
        Poll::Ready(Ok(()))
    }
}

crate::tunnel::write_through!(Filtered, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l4::rtmp::chunk::Message;

    fn command(csid: u32, values: &[Value]) -> Message {
        let mut body = Vec::new();
        values.iter().for_each(|v| amf0::encode(&mut body, v));
        Message {
            csid,
            timestamp: 0,
            type_id: TYPE_AMF0_COMMAND,
            msid: 0,
            body,
        }
    }

    fn read_messages(bytes: &[u8]) -> Vec<Message> {
        let mut reader = ChunkReader::new(None, 1 << 20);
        let mut data = bytes;
        let mut out = Vec::new();
        while let Some((used, m)) = reader.chunk(data).unwrap() {
            data = &data[used..];
            out.extend(m);
        }
        assert!(data.is_empty());
        out
    }

    #[test]
    fn drops_the_connect_answer_and_keeps_the_rest_readable() {
        let s = |t: &str| Value::String(t.into());
        let set_chunk = Message {
            csid: 2,
            timestamp: 0,
            type_id: 1,
            msid: 0,
            body: 4096u32.to_be_bytes().to_vec(),
        };
        let connect_result = command(3, &[s("_result"), Value::Number(1.0), Value::Null]);
        let bw_done = command(3, &[s("onBWDone"), Value::Number(0.0), Value::Null]);
        let big = Message {
            csid: 3,
            timestamp: 10,
            type_id: TYPE_AMF0_COMMAND,
            msid: 0,
            body: vec![0x05; 5000],
        };
        let create_result = command(
            3,
            &[
                s("_result"),
                Value::Number(4.0),
                Value::Null,
                Value::Number(1.0),
            ],
        );
        let mut node = Vec::new();
        chunk::write(&mut node, &set_chunk, 128);
        for m in [&connect_result, &bw_done, &big, &create_result] {
            chunk::write(&mut node, m, 4096);
        }
        // Fed in awkward pieces, as TCP delivers.
        let mut filter = NodeFilter::new(1.0);
        let mut out = Vec::new();
        for piece in node.chunks(7) {
            filter.feed(piece, &mut out).unwrap();
        }
        let got = read_messages(&out);
        assert_eq!(got, vec![set_chunk, bw_done, big, create_result]);
    }

    #[test]
    fn node_refusing_connect_ends_the_session() {
        let s = |t: &str| Value::String(t.into());
        let mut node = Vec::new();
        chunk::write(
            &mut node,
            &command(3, &[s("_error"), Value::Number(1.0)]),
            128,
        );
        let mut out = Vec::new();
        assert_eq!(
            NodeFilter::new(1.0).feed(&node, &mut out),
            Err("node refused connect")
        );
    }
}
