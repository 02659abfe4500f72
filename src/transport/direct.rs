//! amslb's own HTTP/1.1 client connection to a node, driven by the task of
//! the client request that uses it: no task of its own, no channel, no lock.
//!
//! hyper's client gives every node connection a task and reaches it over a
//! channel, so each request crosses three tasks (client connection, dispatch,
//! node connection) and a fourth hands the connection back. Most requests a
//! streaming cluster serves carry no body and ask for no upgrade (playlists,
//! segments, REST reads): for those, amslb writes the request head itself,
//! reads the response head with `httparse`, and reads the body from the node
//! socket only as the client side polls for it, so a slow client holds at
//! most one read buffer and the node waits (backpressure). The connection
//! goes back to this thread's pool the moment its body has been read to the
//! end. Requests with a body, and upgrades, keep hyper's client
//! ([`super::pool::connect`]).
//!
//! The response is read as strictly as hyper reads it (RFC 9112 §6): a
//! `Transfer-Encoding` ending in chunked wins over `Content-Length`; other
//! codings, or neither header, mean the body runs to the connection's close;
//! conflicting or malformed lengths, bad chunk lines, heads over
//! [`MAX_HEAD`] and too many header lines are errors. A connection is reused
//! only after a body whose end was framed, from a node that did not ask to
//! close, with no byte left over.

use super::pool::{NODE_READ_BUFFER, Pool};
use crate::header_list;
use crate::http1::{self, Span};
use crate::node_tls::{DialError, NodeStream, NodeTls, dial};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Largest response head accepted (status line and headers).
pub const MAX_HEAD: usize = NODE_READ_BUFFER;
/// Most header lines in a response head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read, which bounds what is read ahead of a
/// client: as much as hyper's client reads at most (a 100 MB body read in
/// 16 KiB pieces cost a quarter more CPU per GB).
const READ_CHUNK: usize = NODE_READ_BUFFER;
/// Read buffer a new connection starts with (it grows to [`READ_CHUNK`]).
const FIRST_BUFFER: usize = 8 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 * 1024;

/// An idle-or-busy HTTP/1.1 connection to a node, with its buffers.
#[derive(Debug)]
pub struct DirectConn {
    io: NodeStream,
    /// Bytes read from the node and not yet used; kept across requests, so
    /// a request allocates no read buffer.
    read: BytesMut,
    /// The request head being written; kept for the same reason.
    head: Vec<u8>,
    /// Where each response header sits in the head ([`parse_head`]); kept
    /// so that parsing clears no array of [`MAX_HEADERS`] entries.
    spans: Vec<Span>,
}

/// Why a direct request failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// Reading from or writing to the node failed.
    #[error("node connection: {0}")]
    Io(#[from] io::Error),
    /// The node closed the connection before the response was complete.
    #[error("node closed the connection {0}")]
    Closed(&'static str),
    /// The response head is not valid HTTP/1.x.
    #[error("malformed response head: {0}")]
    BadHead(String),
    /// The response head is larger than [`MAX_HEAD`].
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// `Content-Length` is malformed, or given twice with different values.
    #[error("invalid Content-Length")]
    BadLength,
    /// A chunk-size line, chunk end or trailer is malformed.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
}

/// A failed [`DirectConn::send`]: the error, and whether the node sent
/// nothing at all, which on a reused connection means the node had closed it
/// already (the request can go again on another connection).
#[derive(Debug)]
pub struct SendError {
    /// What went wrong.
    pub error: DirectError,
    /// No byte of a response came back.
    pub nothing_received: bool,
}

impl DirectConn {
    /// Opens a connection to `addr` within `timeout`, over TLS with `tls`.
    pub async fn open(
        addr: SocketAddr,
        tls: Option<&NodeTls>,
        timeout: Duration,
    ) -> Result<Self, DialError> {
        Ok(Self {
            io: dial(addr, tls, timeout).await?,
            read: BytesMut::with_capacity(FIRST_BUFFER),
            head: Vec::with_capacity(1024),
            spans: Vec::new(),
        })
    }

    /// Whether the node has neither closed the idle connection nor sent
    /// anything on it: one read that never blocks (TLS records that carry no
    /// data, such as session tickets, are taken in; any byte of data, an end
    /// of stream or an error means the connection is not reusable).
    pub fn looks_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Reads what the node sent next into the read buffer (at most
    /// [`READ_CHUNK`] more): the byte count, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    /// Sends `request` (which has no body) and reads the response head; the
    /// body streams from the returned response, and at its end this
    /// connection goes back to `pool` when it can serve another request.
    /// The head is written out before the future starts, so the future
    /// does not borrow the request.
    pub fn send<B>(
        mut self,
        request: &Request<B>,
        pool: Arc<Pool>,
    ) -> impl Future<Output = Result<Response<DirectBody>, SendError>> + Send + use<B> {
        write_head(&mut self.head, request);
        self.exchange(*request.method() == Method::HEAD, pool)
    }

    /// Writes the head in `self.head` and reads the response head.
    async fn exchange(
        mut self,
        head_request: bool,
        pool: Arc<Pool>,
    ) -> Result<Response<DirectBody>, SendError> {
        let written = async {
            self.io.write_all(&self.head).await?;
            // TLS buffers what it encrypts; plain TCP flushes as a no-op.
            self.io.flush().await
        };
        written.await.map_err(|e| SendError {
            error: e.into(),
            nothing_received: true,
        })?;
        let (response, framing, keep_alive) = loop {
            if !self.read.is_empty()
                && let Some(parsed) = parse_head(&mut self.read, &mut self.spans, head_request)?
            {
                break parsed;
            }
            if self.read.len() >= MAX_HEAD {
                return Err(SendError {
                    error: DirectError::HeadTooLarge,
                    nothing_received: false,
                });
            }
            let received_some = !self.read.is_empty();
            let failed = match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => DirectError::Closed("before the response head"),
                Ok(_) => continue,
                Err(e) => e.into(),
            };
            return Err(SendError {
                error: failed,
                nothing_received: !received_some,
            });
        };
        // A body that runs to the close never ends framed, so `finish`
        // never sees it: `keep_alive` alone decides reuse.
        let mut body = DirectBody {
            conn: Some(self),
            framing,
            reusable: keep_alive,
            pool,
        };
        if matches!(body.framing, Framing::Length(0)) {
            body.finish();
        }
        Ok(response.map(|()| body))
    }
}

/// Writes the head of `request` (origin-form target, HTTP/1.1) into `out`.
fn write_head<B>(out: &mut Vec<u8>, request: &Request<B>) {
    out.clear();
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    http1::write_header_lines(out, request.headers());
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left (0: the body is over).
    Length(u64),
    /// Chunked, at this point of the chunk grammar.
    Chunked(Chunk),
    /// Runs until the node closes the connection.
    ToClose,
    /// Read to its end (or failed): the connection is gone from the body.
    Done,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk are left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty line.
    Trailers,
}

type Parsed = (Response<()>, Framing, bool);

/// Parses a complete response head at the start of `read` (removing it), or
/// `None` when more bytes are needed; `spans` is scratch space. Informational
/// answers (1xx but 101) are skipped, as hyper's client does.
fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<Span>,
    head_request: bool,
) -> Result<Option<Parsed>, SendError> {
    let bad = |error| SendError {
        error,
        nothing_received: false,
    };
    loop {
        // Uninitialised slots: zeroing 100 of them cost more than the parse.
        let mut lines = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut head, read, &mut lines);
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(bad(DirectError::BadHead(e.to_string()))),
        };
        let code = head.code.unwrap_or_default();
        let status =
            StatusCode::from_u16(code).map_err(|e| bad(DirectError::BadHead(e.to_string())))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            read.advance(length);
            continue;
        }
        let version = match head.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let reason = head
            .reason
            .filter(|r| Some(*r) != status.canonical_reason());
        let reason = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        http1::record_spans(read, head.headers, spans);
        let head = read.split_to(length).freeze();
        let headers =
            http1::header_map(&head, spans, 0).map_err(|e| bad(DirectError::BadHead(e)))?;
        let framing = framing(status, head_request, &headers).map_err(bad)?;
        // After a 101 the connection speaks another protocol: never reused.
        let keep_alive = status != StatusCode::SWITCHING_PROTOCOLS && keep_alive(version, &headers);
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        return Ok(Some((response, framing, keep_alive)));
    }
}

/// How the body of a response with `status` is framed (RFC 9112 §6.3);
/// `head_request`: the request was a HEAD.
fn framing(
    status: StatusCode,
    head_request: bool,
    headers: &HeaderMap,
) -> Result<Framing, DirectError> {
    if http1::bodiless(status, head_request) {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = header_list::elements(headers, TRANSFER_ENCODING)
            .filter(|coding| !coding.is_empty())
            .last();
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::ToClose,
        });
    }
    let length = http1::content_length(headers).map_err(|_| DirectError::BadLength)?;
    Ok(length.map_or(Framing::ToClose, Framing::Length))
}

/// Whether the node keeps the connection open after this response.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| header_list::lists(headers, CONNECTION, token);
    if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        !has("close")
    }
}

/// A response body read straight from the node connection as it is polled.
#[derive(Debug)]
pub struct DirectBody {
    /// The connection, until the body has ended.
    conn: Option<DirectConn>,
    framing: Framing,
    /// The node keeps the connection open after a framed body.
    reusable: bool,
    pool: Arc<Pool>,
}

impl DirectBody {
    /// The body is over: the connection goes back to the pool when it can
    /// serve another request, else it closes.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.read.is_empty()
        {
            self.pool.put_direct(conn);
        }
    }

    /// The body failed: the connection closes.
    fn fail(&mut self, error: DirectError) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// The next frame, reading from the node when the buffer has too little.
    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut conn.read, &mut self.framing) {
                Err(e) => return self.fail(e),
                Ok(Decoded::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::Data(data)) => {
                    if self.framing == Framing::Length(0) {
                        // The last bytes: hand the connection back now, as
                        // hyper does not poll a body that says it has ended.
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::NeedMore) => {}
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if self.framing == Framing::ToClose => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return self.fail(DirectError::Closed("mid-body")),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(e.into()),
            }
        }
    }
}

/// What the bytes read so far give.
enum Decoded {
    /// Body bytes for the client.
    Data(Bytes),
    /// The body has ended.
    End,
    /// More bytes must be read from the node first.
    NeedMore,
}

/// Takes the next piece of the body from `read`, moving `framing` on.
fn decode(read: &mut BytesMut, framing: &mut Framing) -> Result<Decoded, DirectError> {
    loop {
        match *framing {
            Framing::Done | Framing::Length(0) => return Ok(Decoded::End),
            Framing::Length(left) => {
                return Ok(match take_data(read, left) {
                    Some((data, left)) => {
                        *framing = Framing::Length(left);
                        Decoded::Data(data)
                    }
                    None => Decoded::NeedMore,
                });
            }
            Framing::ToClose if read.is_empty() => return Ok(Decoded::NeedMore),
            Framing::ToClose => return Ok(Decoded::Data(read.split().freeze())),
            Framing::Chunked(Chunk::Size) => {
                let Some(line) = next_line(read, "chunk-size line too long")? else {
                    return Ok(Decoded::NeedMore);
                };
                let size = chunk_size(&line)?;
                *framing = Framing::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
            }
            Framing::Chunked(Chunk::Data(left)) => {
                let Some((data, left)) = take_data(read, left) else {
                    return Ok(Decoded::NeedMore);
                };
                *framing = Framing::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                return Ok(Decoded::Data(data));
            }
            Framing::Chunked(Chunk::DataEnd) => {
                if read.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &read[..2] != b"\r\n" {
                    return Err(DirectError::BadChunk("no CRLF after chunk data"));
                }
                read.advance(2);
                *framing = Framing::Chunked(Chunk::Size);
            }
            Framing::Chunked(Chunk::Trailers) => {
                // Trailer fields are not passed on (a client over HTTP/1.1
                // gets them only if it asked, and nodes do not send them).
                let Some(line) = next_line(read, "trailer line too long")? else {
                    return Ok(Decoded::NeedMore);
                };
                if line.is_empty() {
                    *framing = Framing::Done;
                    return Ok(Decoded::End);
                }
            }
        }
    }
}

/// Up to `left` body bytes from `read`, and how many are left after them.
fn take_data(read: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if read.is_empty() {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
    Some((read.split_to(n).freeze(), left - n as u64))
}

/// The first CRLF-ended line of `read` (taken out, without its CRLF), or
/// `None` when it is not all there yet; a line over [`MAX_LINE`] is an error.
fn next_line(read: &mut BytesMut, too_long: &'static str) -> Result<Option<Bytes>, DirectError> {
    let window = &read[..read.len().min(MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = read.split_to(end).freeze();
            read.advance(2);
            Ok(Some(line))
        }
        None if read.len() > MAX_LINE => Err(DirectError::BadChunk(too_long)),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then optional extensions.
fn chunk_size(line: &[u8]) -> Result<u64, DirectError> {
    let bad = DirectError::BadChunk("bad chunk size");
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(bad);
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(bad);
    }
    // ASCII hex digits: valid UTF-8, and 16 of them fit a u64.
    let text = std::str::from_utf8(&line[..digits])
        .map_err(|_| DirectError::BadChunk("bad chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| DirectError::BadChunk("bad chunk size"))
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = DirectError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        self.get_mut().poll_body(cx)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Decodes `wire` fed in two parts split at `at`: the data, and whether
    /// the body ended.
    fn decode_split(
        wire: &[u8],
        at: usize,
        mut framing: Framing,
    ) -> Result<(Vec<u8>, bool), DirectError> {
        let mut read = BytesMut::new();
        let mut data = Vec::new();
        for part in [&wire[..at], &wire[at..]] {
            read.extend_from_slice(part);
            loop {
                match decode(&mut read, &mut framing)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::End => return Ok((data, true)),
                    Decoded::NeedMore => break,
                }
            }
        }
        Ok((data, false))
    }

    #[test]
    fn a_chunked_body_split_anywhere_decodes_to_the_same_bytes() {
        let wire = b"5;ext=1\r\nhello\r\n1 \r\n,\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for at in 0..=wire.len() {
            let (data, ended) = decode_split(wire, at, Framing::Chunked(Chunk::Size)).unwrap();
            assert_eq!(data, b"hello, world", "split at {at}");
            assert!(ended, "split at {at}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            let decoded = decode_split(wire, wire.len(), Framing::Chunked(Chunk::Size));
            assert!(
                matches!(decoded, Err(DirectError::BadChunk(_))),
                "{:?} gave {decoded:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let endless = vec![b'1'; MAX_LINE + 1];
        let decoded = decode_split(&endless, endless.len(), Framing::Chunked(Chunk::Size));
        assert!(
            matches!(decoded, Err(DirectError::BadChunk(_))),
            "{decoded:?}"
        );
    }

    #[test]
    fn a_length_body_ends_at_its_length() {
        let (data, ended) = decode_split(b"abcdefgh", 3, Framing::Length(5)).unwrap();
        assert_eq!(data, b"abcde");
        assert!(ended);
    }

    fn headers(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = |status: u16, head: bool, lines: &[(&'static str, &'static str)]| {
            framing(StatusCode::from_u16(status).unwrap(), head, &headers(lines)).unwrap()
        };
        assert_eq!(
            ok(200, true, &[("content-length", "9")]),
            Framing::Length(0)
        );
        assert_eq!(ok(204, false, &[]), Framing::Length(0));
        assert_eq!(
            ok(304, false, &[("content-length", "9")]),
            Framing::Length(0)
        );
        assert_eq!(
            ok(200, false, &[("content-length", "5, 5")]),
            Framing::Length(5)
        );
        assert_eq!(
            ok(
                200,
                false,
                &[
                    ("content-length", "5"),
                    ("transfer-encoding", "gzip, chunked")
                ]
            ),
            Framing::Chunked(Chunk::Size)
        );
        assert_eq!(
            ok(200, false, &[("transfer-encoding", "chunked, gzip")]),
            Framing::ToClose
        );
        assert_eq!(ok(200, false, &[]), Framing::ToClose);
        for bad in ["5, 6", "-1", "+5", "", "5x"] {
            let got = framing(StatusCode::OK, false, &headers(&[("content-length", bad)]));
            assert!(
                matches!(got, Err(DirectError::BadLength)),
                "{bad:?}: {got:?}"
            );
        }
        let twice = headers(&[("content-length", "5"), ("content-length", "6")]);
        assert!(framing(StatusCode::OK, false, &twice).is_err());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(keep_alive(Version::HTTP_11, &headers(&[])));
        assert!(!keep_alive(
            Version::HTTP_11,
            &headers(&[("connection", "foo, Close")])
        ));
        assert!(!keep_alive(Version::HTTP_10, &headers(&[])));
        assert!(keep_alive(
            Version::HTTP_10,
            &headers(&[("connection", "keep-alive")])
        ));
    }

    /// A node on loopback that reads one request head per answer in
    /// `answers` and writes that answer in the given pieces; the heads it
    /// read, and the connection, still open.
    async fn scripted_node(
        answers: Vec<Vec<&'static [u8]>>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<(Vec<String>, tokio::net::TcpStream)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            let mut pending = Vec::new();
            for answer in answers {
                while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed early");
                    pending.extend_from_slice(&chunk[..n]);
                }
                let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                heads.push(String::from_utf8(pending.drain(..end).collect()).unwrap());
                for piece in answer {
                    socket.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (heads, socket)
        });
        (addr, task)
    }

    async fn open(addr: SocketAddr) -> DirectConn {
        DirectConn::open(addr, None, Duration::from_secs(2))
            .await
            .unwrap()
    }

    fn get(path: &str) -> Request<()> {
        Request::builder()
            .uri(path)
            .header("host", "node")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_serves_requests_in_turn_and_goes_back_to_its_pool() {
        let (addr, node) = scripted_node(vec![
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Fine Thanks\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n0\r\n",
                b"\r\n",
            ],
            vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\n", b"gone"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"],
        ])
        .await;
        let pool = Arc::new(Pool::default());
        let conn = open(addr).await;

        let response = conn.send(&get("/a?x=1"), pool.clone()).await.unwrap();
        assert_eq!(response.status(), 200);
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine Thanks"[..]));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");

        let conn = pool.take_direct().expect("back in the pool after its body");
        let response = conn.send(&get("/b"), pool.clone()).await.unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(response.body().size_hint().exact(), Some(4));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"gone");

        let conn = pool.take_direct().expect("back in the pool again");
        let response = conn.send(&get("/c"), pool.clone()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        assert!(
            pool.take_direct().is_none(),
            "a connection the node closes is not kept"
        );

        let (heads, _open) = node.await.unwrap();
        assert_eq!(heads[0], "GET /a?x=1 HTTP/1.1\r\nhost: node\r\n\r\n");
        assert!(heads[2].starts_with("GET /c HTTP/1.1\r\n"), "{heads:?}");
    }

    #[tokio::test]
    async fn a_connection_with_bytes_after_its_answer_is_not_reused() {
        let (addr, node) = scripted_node(vec![vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nbogus",
        ]])
        .await;
        let pool = Arc::new(Pool::default());
        let conn = open(addr).await;
        let response = conn.send(&get("/"), pool.clone()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        // The second answer comes after the first one's body was complete;
        // the node keeps the connection open.
        let (_, _open) = node.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            pool.take_direct().is_none(),
            "a connection with a stray answer was kept"
        );
    }

    #[tokio::test]
    async fn a_connection_that_switched_protocols_is_not_reused() {
        let (addr, node) = scripted_node(vec![vec![
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        ]])
        .await;
        let pool = Arc::new(Pool::default());
        let response = open(addr)
            .await
            .send(&get("/"), pool.clone())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert!(response.body().is_end_stream());
        let (_, _open) = node.await.unwrap();
        assert!(
            pool.take_direct().is_none(),
            "a switched connection was pooled"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
        let (addr, node) = scripted_node(vec![vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ]])
        .await;
        let pool = Arc::new(Pool::default());
        let conn = open(addr).await;
        let response = conn.send(&get("/"), pool.clone()).await.unwrap();
        drop(node.await.unwrap());
        let collected = response.into_body().collect().await;
        assert!(
            matches!(collected, Err(DirectError::Closed(_))),
            "{collected:?}"
        );
        assert!(pool.take_direct().is_none());
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_fails_with_nothing_received() {
        let (addr, node) = scripted_node(vec![]).await;
        let conn = open(addr).await;
        node.await.unwrap();
        let failed = conn
            .send(&get("/"), Arc::new(Pool::default()))
            .await
            .expect_err("the node is gone");
        assert!(failed.nothing_received, "{:?}", failed.error);
    }
}
