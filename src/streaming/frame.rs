//! A small, bounded parser for WebSocket frames sent by a client (RFC 6455 §5),
//! enough to read the first signalling messages. It only reads: the bytes are
//! replayed to the node exactly as the client sent them.

/// Opcode of a continuation frame.
pub const CONTINUATION: u8 = 0x0;
/// Opcode of a text frame.
pub const TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const PONG: u8 = 0xA;

/// One frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Last frame of its message.
    pub fin: bool,
    /// Frame type.
    pub opcode: u8,
    /// Payload after unmasking.
    pub payload: Vec<u8>,
}

/// What the start of a buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame, and how many bytes it took.
    Frame(Frame, usize),
    /// The frame is not complete yet.
    Incomplete,
    /// Not a frame this parser accepts: bad for a client, or over `max_payload`.
    Invalid(&'static str),
}

/// Parses the frame at the start of `buf`. Refuses what a client must not send
/// when no extension was negotiated (RSV bits, unmasked frames, unknown
/// opcodes, long or fragmented control frames) and payloads over `max_payload`.
pub fn parse(buf: &[u8], max_payload: usize) -> Parsed {
    let [b0, b1, ..] = *buf else {
        return Parsed::Incomplete;
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 {
        return Parsed::Invalid("reserved bits set");
    }
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Parsed::Invalid("unknown opcode");
    }
    if b1 & 0x80 == 0 {
        return Parsed::Invalid("client frame not masked");
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Parsed::Incomplete,
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Parsed::Incomplete,
        },
        short => (u64::from(short), 2),
    };
    if opcode >= CLOSE && (!fin || len > 125) {
        return Parsed::Invalid("bad control frame");
    }
    let len = match usize::try_from(len) {
        Ok(len) if len <= max_payload => len,
        _ => return Parsed::Invalid("payload too large"),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Parsed::Incomplete;
    };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    at += 4;
    let Some(masked) = buf.get(at..at + len) else {
        return Parsed::Incomplete;
    };
    let payload = masked
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Parsed::Frame(
        Frame {
            fin,
            opcode,
            payload,
        },
        at + len,
    )
}

/// Encodes an unmasked server control frame (payload of at most 125 bytes, as
/// the parser enforces for control frames), e.g. the pong amslb answers a
/// client's ping with while it sniffs.
pub fn encode_server_control(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut out = Vec::with_capacity(2 + len);
    out.push(0x80 | (opcode & 0x0F));
    out.push(len as u8);
    out.extend_from_slice(&payload[..len]);
    out
}

/// Encodes a masked client frame; used by tests to play a client byte by byte.
pub fn encode_client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | (opcode & 0x0F)];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn parses_rfc_example_and_every_length_form() {
        // RFC 6455 §5.7: a masked "Hello".
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let Parsed::Frame(frame, used) = parse(&hello, 1024) else {
            panic!()
        };
        assert_eq!((frame.fin, frame.opcode, used), (true, TEXT, 11));
        assert_eq!(frame.payload, b"Hello");
        for len in [0usize, 125, 126, 300, 70_000] {
            let payload = vec![b'a'; len];
            let bytes = encode_client(false, BINARY, &payload, MASK);
            let Parsed::Frame(frame, used) = parse(&bytes, 100_000) else {
                panic!("{len}")
            };
            assert_eq!(
                (frame.payload.len(), used, frame.fin),
                (len, bytes.len(), false)
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let bytes = encode_client(true, TEXT, &[b'x'; 300], MASK);
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut], 1024), Parsed::Incomplete, "{cut}");
        }
    }

    #[test]
    fn refuses_what_a_client_must_not_send() {
        let mut unmasked = encode_client(true, TEXT, b"hi", MASK);
        unmasked[1] &= 0x7F;
        let mut rsv = encode_client(true, TEXT, b"hi", MASK);
        rsv[0] |= 0x40;
        let cases = [
            unmasked,
            rsv,
            encode_client(true, 0x3, b"", MASK),
            encode_client(false, PING, b"", MASK),
            encode_client(true, PING, &[0; 126], MASK),
            encode_client(true, TEXT, &[0; 2000], MASK),
        ];
        for bytes in cases {
            assert!(
                matches!(parse(&bytes, 1024), Parsed::Invalid(_)),
                "{bytes:?}"
            );
        }
        // A huge declared length is refused before its payload arrives.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(parse(&huge, 1024), Parsed::Invalid(_)));
    }
}
