//! HTTP/1.1 head pieces shared by amslb's own connections on both sides:
//! the client connection to a node (`transport::direct`, which parses
//! response heads) and the server loop for clients (`http::h1`, which parses
//! request heads). Both turn the header lines `httparse` found into a
//! [`HeaderMap`] whose values are slices of the one buffer the head was read
//! into (as hyper does, no copy per value), both write header lines, and
//! both frame response bodies by the same rules (RFC 9112 §6.3).

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// `Content-Length` lines that are malformed or disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidLength;

/// Whether a response with `status` has no body whatever its headers say:
/// the answer to a HEAD (`head_request`), and 1xx, 204 and 304.
pub fn bodiless(status: StatusCode, head_request: bool) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The length the `Content-Length` lines of `headers` give: `None` without
/// one; a list or repeat of one value counts as that value (RFC 9110
/// §8.6); anything but digits, or two values, is [`InvalidLength`].
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, InvalidLength> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value.to_str().map_err(|_| InvalidLength)?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(InvalidLength);
            }
            let n: u64 = part.parse().map_err(|_| InvalidLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(InvalidLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Offset and length of a header's name, then of its value, in a head.
pub type Span = (usize, usize, usize, usize);

/// Records in `spans` where each of `lines` sits in `buf`, the buffer
/// `httparse` parsed them from; the spans outlive the parse's borrow of
/// `buf`, so the head can be split off and shared afterwards.
pub fn record_spans(buf: &[u8], lines: &[httparse::Header<'_>], spans: &mut Vec<Span>) {
    let base = buf.as_ptr() as usize;
    let offset = |part: &[u8]| part.as_ptr() as usize - base;
    spans.clear();
    spans.extend(lines.iter().map(|line| {
        let (name, value) = (line.name.as_bytes(), line.value);
        (offset(name), name.len(), offset(value), value.len())
    }));
}

/// The header map of `head` (the bytes `spans` point into), or why a line
/// is not a valid header. `room` is how many headers the caller will add:
/// a map sized for them does not grow (rehashing every header) when they
/// come.
pub fn header_map(head: &Bytes, spans: &[Span], room: usize) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    for &(name_at, name_len, value_at, value_len) in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|e| e.to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Writes `headers` to `out`, a `name: value` line each.
pub fn write_header_lines(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        write_header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Writes one `name: value` line to `out`.
pub fn write_header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
