//! amslb's own HTTP/1.1 server loop, for the requests a streaming cluster
//! mostly gets: HTTP/1.1 without a body and without an upgrade (playlists,
//! segments, REST reads).
//!
//! hyper's server sets up a dispatcher, its buffers and a boxed timer per
//! connection and moves every request through its state machine. This loop
//! reads request heads with `httparse` into one buffer the connection keeps,
//! runs the request handler in the connection's own task, writes the
//! response head together with the first body bytes, and reads the next
//! head: per request it allocates only the header map.
//!
//! Any other request hands the connection to hyper's server for the rest of
//! its life, with the bytes read so far put back in front of the socket
//! ([`Prefixed`]), so hyper reads that request exactly as the client sent it.
//! That keeps every framing rule hyper enforces: a request with
//! `Content-Length` or `Transfer-Encoding`, with `Expect` or `TE`, an
//! upgrade, `CONNECT`, HTTP/1.0, a malformed or oversized head: hyper
//! answers or refuses each as before. What this loop accepts it answers as
//! hyper does: `Date` added when missing, `Content-Length` from the body
//! when it is known and chunked framing when not, no body for `HEAD`, 204
//! and 304, `Connection: close` honoured and sent when the connection ends,
//! and a client that closes while its request waits for the node ends the
//! request there.

use super::body::{RequestBody, ResponseBody};
use super::headers::FORWARDING_HEADERS;
use super::proxy::{self, ConnContext};
use super::serve::{HttpLimits, Versions, serve_http};
use crate::http1::{self, Span};
use crate::transport::BoxError;
use crate::tunnel::Prefixed;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, DATE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body;
use hyper::service::service_fn;
use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Most header lines in a request head (hyper's limit too: a head with more
/// goes to hyper, which answers 431).
const MAX_HEADERS: usize = 100;
/// Free space asked of the read buffer before each read: a typical request
/// head, several when a client pipelines.
const READ_SPACE: usize = 4096;
/// Body bytes copied behind the head (or behind earlier bytes) to go out in
/// one write; larger pieces are written from where they are.
const COALESCE: usize = 16 * 1024;
/// Largest write buffer an idle connection keeps; one that grew past it for
/// a response is let go, so idle keep-alive connections stay small.
const KEEP_WRITE: usize = 4096;

/// Why the loop ended a connection with an error.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Part of a request head came, but not all of it within
    /// `timeouts.client` (a slow or stuck client).
    #[error("read header from client timeout")]
    HeadTimeout,
    /// The response body failed part-way: the client cannot be told but by
    /// the connection closing.
    #[error("response body failed: {0}")]
    Body(BoxError),
    /// The response body ended before the length its head announced.
    #[error("response body ended {0} bytes short of its Content-Length")]
    ShortBody(u64),
    /// Reading from or writing to the client failed.
    #[error("client connection: {0}")]
    Io(#[from] io::Error),
}

/// Whether `error` says amslb refused the client (as opposed to the
/// connection merely ending): logged louder by the caller.
pub fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(error.downcast_ref::<H1Error>(), Some(H1Error::HeadTimeout))
}

/// Serves HTTP/1.1 on `io` until the client closes, a request asks to
/// close, or `stop` (then an idle connection closes at once and a busy one
/// after its response).
pub async fn serve<I>(
    io: I,
    ctx: Arc<ConnContext>,
    limits: HttpLimits,
    stop: CancellationToken,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn {
        io,
        read: BytesMut::with_capacity(READ_SPACE),
        write: Vec::with_capacity(1024),
        spans: Vec::new(),
    };
    let mut stopped = pin!(stop.clone().cancelled_owned());
    // One timer for the connection, moved on for every head.
    let mut head_timer = pin!(tokio::time::sleep(limits.header_read_timeout));
    loop {
        head_timer
            .as_mut()
            .reset(Instant::now() + limits.header_read_timeout);
        let next = conn
            .read_head(
                limits.max_header_bytes,
                head_timer.as_mut(),
                stopped.as_mut(),
            )
            .await?;
        let (request, client_closes) = match next {
            Next::Request(request, client_closes) => (request, client_closes),
            Next::Closed => return Ok(()),
            Next::Hyper(prefix) => {
                // The rest of the connection is hyper's HTTP/1.1 server's.
                let io = Prefixed::new(prefix, conn.io);
                let handle = move |request| proxy::handle_hyper(ctx.clone(), request);
                let service = service_fn(handle);
                return serve_http(io, Versions::Http1, service, limits, stop).await;
            }
        };
        let head_request = request.method() == Method::HEAD;
        // Raced in place: moved into a helper, the handler's future
        // (~4 KB) would be stored twice in this one, and the whole
        // connection future is copied when it is boxed.
        let response = tokio::select! {
            biased;
            handled = proxy::handle(ctx.clone(), request) => match handled {
                Ok(response) => response,
                Err(never) => match never {},
            },
            // Gone before its answer: the node's side ends with the handler.
            () = conn.client_leaves() => return Ok(()),
        };
        let keep_alive = !client_closes && !stop.is_cancelled();
        let keep_alive = conn
            .write_response(response, head_request, keep_alive)
            .await?;
        if !keep_alive || stop.is_cancelled() {
            let _ = conn.io.shutdown().await;
            return Ok(());
        }
    }
}

/// What waiting for the next request head gave.
// Returned once per request and never stored: boxing the request would cost
// an allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A request this loop serves, and whether the client asked to close
    /// after it.
    Request(Request<RequestBody>, bool),
    /// The client closed (or `stop` came, or `timeouts.client` passed)
    /// between requests.
    Closed,
    /// A request for hyper: these bytes, and what follows on the socket.
    Hyper(Bytes),
}

/// One client connection and the buffers it keeps across requests.
struct Conn<I> {
    io: I,
    /// Bytes read from the client and not yet used.
    read: BytesMut,
    /// Response bytes waiting to be written.
    write: Vec<u8>,
    /// Where each header line sits in the head being parsed.
    spans: Vec<Span>,
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    /// Reads until a whole request head is in the buffer, for at most as
    /// long as `timer` runs.
    async fn read_head(
        &mut self,
        max_head: usize,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopped: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Result<Next, H1Error> {
        loop {
            if !self.read.is_empty() {
                if let Some(next) = self.parse() {
                    return Ok(next);
                }
                if self.read.len() >= max_head {
                    // hyper answers an oversized head (431).
                    return Ok(Next::Hyper(self.read.split().freeze()));
                }
            }
            let idle = self.read.is_empty();
            self.make_room();
            let waited = poll_fn(|cx| {
                if let Poll::Ready(read) = poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
                {
                    return Poll::Ready(Some(read));
                }
                if (idle && stopped.as_mut().poll(cx).is_ready())
                    || timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match waited {
                // Closed between requests, or with a head cut short:
                // nothing to answer.
                Some(Ok(0)) => return Ok(Next::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                // Stopped or timed out while idle: a quiet close.
                None if idle => return Ok(Next::Closed),
                None => return Err(H1Error::HeadTimeout),
            }
        }
    }

    /// Makes room in the read buffer for the next read.
    fn make_room(&mut self) {
        if self.read.capacity() - self.read.len() < READ_SPACE {
            self.read.reserve(READ_SPACE);
        }
    }

    /// Resolves if the client closes (or its connection fails) while its
    /// request is with the handler, which is then dropped, as hyper's
    /// server does: with it go the node connection and the session. Bytes
    /// that come meanwhile (a pipelined request) are kept for the next head
    /// and the watch stops; with such bytes already buffered there is
    /// nothing to watch.
    async fn client_leaves(&mut self) {
        if self.read.is_empty() {
            self.make_room();
            let read = poll_fn(|cx| poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read));
            if let Ok(0) | Err(_) = read.await {
                return;
            }
        }
        std::future::pending().await
    }

    /// Parses the head at the start of the read buffer: `None` while it is
    /// incomplete; a request this loop serves (the head taken out of the
    /// buffer); or the buffer for hyper.
    fn parse(&mut self) -> Option<Next> {
        // Uninitialised slots: zeroing 100 of them costs more than the parse.
        let mut lines = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut head = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut head, &self.read, &mut lines);
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return None,
            // hyper answers malformed heads (400) and too many lines (431).
            Err(_) => return Some(Next::Hyper(self.read.split().freeze())),
        };
        let method = head.method.unwrap_or_default();
        let mut client_closes = false;
        let mut simple = head.version == Some(1) && method != "CONNECT";
        for line in head.headers.iter() {
            let name = line.name.as_bytes();
            if name.eq_ignore_ascii_case(b"connection") {
                if line.value.eq_ignore_ascii_case(b"close") {
                    client_closes = true;
                } else if !line.value.eq_ignore_ascii_case(b"keep-alive") {
                    simple = false;
                }
            } else if [
                &b"content-length"[..],
                b"transfer-encoding",
                b"upgrade",
                b"expect",
                b"te",
            ]
            .iter()
            .any(|framing| name.eq_ignore_ascii_case(framing))
            {
                simple = false;
            }
        }
        if !simple {
            return Some(Next::Hyper(self.read.split().freeze()));
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Some(Next::Hyper(self.read.split().freeze()));
        };
        let target = head.path.unwrap_or_default().as_bytes();
        let base = self.read.as_ptr() as usize;
        let target_at = target.as_ptr() as usize - base;
        let target_end = target_at + target.len();
        http1::record_spans(&self.read, head.headers, &mut self.spans);
        let bytes = self.read.split_to(length).freeze();
        let uri = Uri::from_maybe_shared(bytes.slice(target_at..target_end));
        // Sized for the forwarding headers the proxy adds: growing the map
        // for them was a thirtieth of a keep-alive request's instructions.
        let headers = http1::header_map(&bytes, &self.spans, FORWARDING_HEADERS);
        let (Ok(uri), Ok(headers)) = (uri, headers) else {
            // Put the head back in front of what follows, for hyper.
            let mut all = BytesMut::with_capacity(bytes.len() + self.read.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(&self.read.split());
            return Some(Next::Hyper(all.freeze()));
        };
        let mut request = Request::new(RequestBody::Empty);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some(Next::Request(request, client_closes))
    }

    /// Writes `response` (no body for a `HEAD` request); `keep_alive`: the
    /// connection may serve another request. Returns whether it still may
    /// (the response did not ask to close).
    async fn write_response(
        &mut self,
        response: Response<ResponseBody>,
        head_request: bool,
        keep_alive: bool,
    ) -> Result<bool, H1Error> {
        let (parts, body) = response.into_parts();
        let keep_alive = keep_alive
            && !(parts.headers.contains_key(CONNECTION)
                && crate::header_list::lists(&parts.headers, CONNECTION, "close"));
        let mut body = pin!(body);
        let status = parts.status;
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes())
            .or_else(|| status.canonical_reason().map(str::as_bytes))
            .unwrap_or_default();
        let mut framing = self.write_head(
            status,
            reason,
            &parts.headers,
            body.size_hint().exact(),
            head_request,
            keep_alive,
        );
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing more yet: what is buffered goes out meanwhile.
                    self.flush_write().await?;
                    poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(H1Error::Body(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: HTTP/1.1 clients get them only when they ask
                    // (`TE: trailers`), and those requests are hyper's.
                    Err(_) => continue,
                },
            };
            match framing {
                Framing::None => continue,
                Framing::Length(left) => {
                    let Some(left) = left.checked_sub(data.len() as u64) else {
                        return Err(H1Error::Body("body longer than its Content-Length".into()));
                    };
                    framing = Framing::Length(left);
                    self.send(&data).await?;
                }
                Framing::Chunked => {
                    if data.is_empty() {
                        continue;
                    }
                    write_chunk_size(&mut self.write, data.len());
                    self.send(&data).await?;
                    self.write.extend_from_slice(b"\r\n");
                }
            }
        }
        if framing == Framing::Chunked {
            self.write.extend_from_slice(b"0\r\n\r\n");
        }
        self.flush_write().await?;
        if self.write.capacity() > KEEP_WRITE {
            self.write = Vec::with_capacity(1024);
        }
        match framing {
            Framing::Length(short @ 1..) => Err(H1Error::ShortBody(short)),
            _ => Ok(keep_alive),
        }
    }

    /// Writes the status line and headers into the write buffer, adding the
    /// framing, `Date` and `Connection: close` lines hyper would; returns
    /// how the body is framed.
    fn write_head(
        &mut self,
        status: StatusCode,
        reason: &[u8],
        headers: &HeaderMap,
        exact_length: Option<u64>,
        head_request: bool,
        keep_alive: bool,
    ) -> Framing {
        let out = &mut self.write;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
        http1::write_header_lines(out, headers);
        // Node lengths were checked as the node's head was read; a length
        // that still does not parse is ignored and the body framed anew.
        let declared = http1::content_length(headers).ok().flatten();
        let framing = if http1::bodiless(status, head_request) {
            Framing::None
        } else if let Some(length) = declared {
            Framing::Length(length)
        } else if let Some(length) = exact_length {
            let mut digits = itoa::Buffer::new();
            http1::write_header_line(out, b"content-length", digits.format(length).as_bytes());
            Framing::Length(length)
        } else {
            http1::write_header_line(out, b"transfer-encoding", b"chunked");
            Framing::Chunked
        };
        if !headers.contains_key(DATE) {
            write_date(out);
        }
        if !keep_alive {
            http1::write_header_line(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        framing
    }

    /// Sends `data` after what the write buffer holds: copied behind it when
    /// both are small, else written with it in one vectored write.
    async fn send(&mut self, data: &Bytes) -> io::Result<()> {
        if self.write.len() + data.len() <= COALESCE {
            self.write.extend_from_slice(data);
            return Ok(());
        }
        let (mut first, mut second) = (&self.write[..], &data[..]);
        while !first.is_empty() || !second.is_empty() {
            let written = if first.is_empty() {
                self.io.write(second).await?
            } else {
                let parts = [IoSlice::new(first), IoSlice::new(second)];
                self.io.write_vectored(&parts).await?
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_first = written.min(first.len());
            first = &first[from_first..];
            second = &second[written - from_first..];
        }
        self.write.clear();
        Ok(())
    }

    /// Writes out the write buffer and flushes (TLS holds what it encrypts).
    async fn flush_write(&mut self) -> io::Result<()> {
        if !self.write.is_empty() {
            self.io.write_all(&self.write).await?;
            self.write.clear();
        }
        self.io.flush().await
    }
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body may follow the head (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes (while the body is written: this many left).
    Length(u64),
    /// Chunked, ended by a zero-size chunk.
    Chunked,
}

/// Writes a chunk-size line for `size` bytes.
fn write_chunk_size(out: &mut Vec<u8>, size: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (usize::BITS - size.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(HEX[(size >> (shift * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a `Date` line for now; the text is made once a second per thread.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(made_at, text)| {
        if *made_at != second {
            *made_at = second;
            *text = httpdate::fmt_http_date(now);
        }
        http1::write_header_line(out, b"date", text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_upper_case_hex() {
        for (size, text) in [(0, "0"), (1, "1"), (15, "F"), (16, "10"), (65536, "10000")] {
            let mut out = Vec::new();
            write_chunk_size(&mut out, size);
            assert_eq!(out, format!("{text}\r\n").into_bytes(), "{size}");
        }
    }
}
