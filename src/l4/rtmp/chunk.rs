//! RTMP chunk stream: reading chunks back into messages (with the header
//! compression state each chunk stream carries) and writing messages as
//! chunks. Input is untrusted: sizes are bounded and nothing panics.

use std::collections::HashMap;

/// Message type of "set chunk size".
pub const TYPE_SET_CHUNK_SIZE: u8 = 1;
/// Message type of an AMF3 command (a 0 byte, then AMF0).
pub const TYPE_AMF3_COMMAND: u8 = 17;
/// Message type of an AMF0 command.
pub const TYPE_AMF0_COMMAND: u8 = 20;
/// RTMP's initial chunk size.
pub const DEFAULT_CHUNK_SIZE: usize = 128;
/// Largest chunk size the protocol allows.
const MAX_CHUNK_SIZE: usize = 0x00ff_ffff;
/// Most chunk streams tracked; real peers use a handful.
const MAX_CHUNK_STREAMS: usize = 64;

/// One complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Chunk stream it came on.
    pub csid: u32,
    /// Absolute timestamp.
    pub timestamp: u32,
    /// Message type id.
    pub type_id: u8,
    /// Message stream id.
    pub msid: u32,
    /// The body, when the reader keeps this type (else empty).
    pub body: Vec<u8>,
}

/// Header state of one chunk stream.
#[derive(Debug, Default)]
struct Stream {
    timestamp: u32,
    /// The raw timestamp field of the last header (absolute for type 0, delta otherwise).
    ts_field: u32,
    len: usize,
    type_id: u8,
    msid: u32,
    extended: bool,
    /// Bytes of the current message received so far (0: between messages).
    received: usize,
    body: Vec<u8>,
}

/// Reassembles messages from a peer's chunk stream.
#[derive(Debug)]
pub struct ChunkReader {
    chunk_size: usize,
    streams: HashMap<u32, Stream>,
    /// Keeps bodies of messages of these types (all when `None`).
    keep: Option<&'static [u8]>,
    /// Largest message body kept; a larger kept message is an error.
    max_body: usize,
}

impl ChunkReader {
    /// A reader that keeps the bodies of `keep` types (`None`: every type),
    /// refusing kept messages over `max_body` bytes. Set-chunk-size messages
    /// are always read, since the stream cannot be parsed without them.
    pub fn new(keep: Option<&'static [u8]>, max_body: usize) -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            streams: HashMap::new(),
            keep,
            max_body,
        }
    }

    /// Parses one chunk at the start of `buf`. `Ok(None)`: more bytes needed;
    /// `Ok(Some((used, message)))`: `used` bytes consumed, and the message if
    /// this chunk completed one.
    pub fn chunk(&mut self, buf: &[u8]) -> Result<Option<(usize, Option<Message>)>, &'static str> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let fmt = b0 >> 6;
        let (csid, mut at) = match b0 & 0x3f {
            0 => match buf.get(1) {
                Some(&b) => (64 + u32::from(b), 2),
                None => return Ok(None),
            },
            1 => match (buf.get(1), buf.get(2)) {
                (Some(&lo), Some(&hi)) => (64 + u32::from(lo) + 256 * u32::from(hi), 3),
                _ => return Ok(None),
            },
            id => (u32::from(id), 1),
        };
        let header_len = [11, 7, 3, 0][usize::from(fmt)];
        let Some(header) = buf.get(at..at + header_len) else {
            return Ok(None);
        };
        at += header_len;
        let known = self.streams.contains_key(&csid);
        if !known && self.streams.len() >= MAX_CHUNK_STREAMS {
            return Err("too many chunk streams");
        }
        if fmt != 0 && !known {
            return Err("compressed header on a new chunk stream");
        }
        let keep_types = self.keep;
        let (chunk_size, max_body) = (self.chunk_size, self.max_body);
        let stream = self.streams.entry(csid).or_default();
        if fmt != 3 && stream.received != 0 {
            return Err("new header inside a message");
        }
        // Work on a copy so that a chunk that turns out incomplete leaves the
        // state untouched and can be parsed again when more bytes arrive.
        let (mut ts_field, mut extended) = (stream.ts_field, stream.extended);
        let (mut len, mut type_id, mut msid) = (stream.len, stream.type_id, stream.msid);
        if fmt < 3 {
            ts_field = be24(&header[0..3]);
            extended = ts_field == 0x00ff_ffff;
        }
        if fmt < 2 {
            len = be24(&header[3..6]) as usize;
            type_id = header[6];
        }
        if fmt == 0 {
            msid = u32::from_le_bytes([header[7], header[8], header[9], header[10]]);
        }
        if extended {
            let Some(ext) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            if fmt < 3 {
                ts_field = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]);
            }
            at += 4;
        }
        let part = (len - stream.received).min(chunk_size);
        let Some(payload) = buf.get(at..at + part) else {
            return Ok(None);
        };
        let keep =
            keep_types.is_none_or(|k| k.contains(&type_id)) || type_id == TYPE_SET_CHUNK_SIZE;
        if keep && len > max_body {
            return Err("message too large");
        }
        if stream.received == 0 {
            // A new message: its timestamp from the header (type 0 absolute,
            // others a delta on the previous message of this chunk stream).
            stream.timestamp = if fmt == 0 {
                ts_field
            } else {
                stream.timestamp.wrapping_add(ts_field)
            };
        }
        (stream.ts_field, stream.extended) = (ts_field, extended);
        (stream.len, stream.type_id, stream.msid) = (len, type_id, msid);
        if keep {
            stream.body.extend_from_slice(payload);
        }
        stream.received += part;
        if stream.received < len {
            return Ok(Some((at + part, None)));
        }
        stream.received = 0;
        let message = Message {
            csid,
            timestamp: stream.timestamp,
            type_id,
            msid,
            body: std::mem::take(&mut stream.body),
        };
        if type_id == TYPE_SET_CHUNK_SIZE {
            let raw = message.body.get(..4).ok_or("short set-chunk-size")?;
            let size = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) & 0x7fff_ffff;
            if size == 0 {
                return Err("chunk size 0");
            }
            self.chunk_size = (size as usize).min(MAX_CHUNK_SIZE);
        }
        Ok(Some((at + part, Some(message))))
    }
}

fn be24(b: &[u8]) -> u32 {
    (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2])
}

/// Writes `message` as chunks of at most `chunk_size` bytes: a full (type 0)
/// header, then type 3 continuation chunks. A full header makes the receiver's
/// state for the chunk stream independent of anything sent on it before.
pub fn write(out: &mut Vec<u8>, message: &Message, chunk_size: usize) {
    let basic = |out: &mut Vec<u8>, fmt: u8| match message.csid {
        id @ 2..=63 => out.push((fmt << 6) | id as u8),
        id @ 64..=319 => out.extend_from_slice(&[fmt << 6, (id - 64) as u8]),
        id => {
            let rest = id.saturating_sub(64).min(0xffff) as u16;
            out.push((fmt << 6) | 1);
            out.extend_from_slice(&rest.to_le_bytes());
        }
    };
    let extended = message.timestamp >= 0x00ff_ffff;
    basic(out, 0);
    let ts = if extended {
        0x00ff_ffff
    } else {
        message.timestamp
    };
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.extend_from_slice(&(message.body.len() as u32).to_be_bytes()[1..]);
    out.push(message.type_id);
    out.extend_from_slice(&message.msid.to_le_bytes());
    if extended {
        out.extend_from_slice(&message.timestamp.to_be_bytes());
    }
    for (i, part) in message.body.chunks(chunk_size.max(1)).enumerate() {
        if i > 0 {
            basic(out, 3);
            if extended {
                out.extend_from_slice(&message.timestamp.to_be_bytes());
            }
        }
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(reader: &mut ChunkReader, mut data: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some((used, msg)) = reader.chunk(data).unwrap() {
            data = &data[used..];
            out.extend(msg);
        }
        assert!(data.is_empty(), "{} bytes left", data.len());
        out
    }

    fn msg(csid: u32, timestamp: u32, type_id: u8, len: usize) -> Message {
        Message {
            csid,
            timestamp,
            type_id,
            msid: 1,
            body: (0..len).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn written_messages_read_back_identically() {
        let messages = vec![
            msg(3, 0, TYPE_AMF0_COMMAND, 300),
            msg(2, 0, TYPE_SET_CHUNK_SIZE, 0),
            msg(70, 1000, 9, 5000),
            msg(400, 0x0100_0000, 8, 200),
            msg(4, 7, 9, 0),
        ];
        let mut bytes = Vec::new();
        let mut size = DEFAULT_CHUNK_SIZE;
        for m in &messages {
            if m.type_id == TYPE_SET_CHUNK_SIZE {
                let mut m = m.clone();
                m.body = 4096u32.to_be_bytes().to_vec();
                write(&mut bytes, &m, size);
                size = 4096;
            } else {
                write(&mut bytes, m, size);
            }
        }
        let mut reader = ChunkReader::new(None, 1 << 20);
        let got = read_all(&mut reader, &bytes);
        assert_eq!(got.len(), messages.len());
        assert_eq!(got[0], messages[0]);
        assert_eq!(got[2], messages[2]);
        assert_eq!(got[3], messages[3]);
        assert_eq!(got[4], messages[4]);
    }

    #[test]
    fn compressed_headers_carry_state() {
        // Type 0 at ts 100, then a type 2 header adding a delta of 40, then type 3 reusing it.
        let mut b = vec![0x04, 0, 0, 100, 0, 0, 2, 9, 1, 0, 0, 0, 0xaa, 0xbb];
        b.extend_from_slice(&[0x84, 0, 0, 40, 0xcc, 0xdd]);
        b.extend_from_slice(&[0xc4, 0xee, 0xff]);
        let mut reader = ChunkReader::new(None, 1024);
        let got = read_all(&mut reader, &b);
        let ts: Vec<u32> = got.iter().map(|m| m.timestamp).collect();
        assert_eq!(ts, [100, 140, 180]);
        assert_eq!(got[2].body, [0xee, 0xff]);
    }

    #[test]
    fn incomplete_chunk_leaves_state_untouched() {
        let mut bytes = Vec::new();
        write(&mut bytes, &msg(3, 5, TYPE_AMF0_COMMAND, 200), 128);
        let mut reader = ChunkReader::new(None, 1024);
        for cut in 0..bytes.len() {
            let mut r = ChunkReader::new(None, 1024);
            if let Some((used, _)) = r.chunk(&bytes[..cut]).unwrap() {
                assert!(used <= cut);
            }
        }
        assert_eq!(read_all(&mut reader, &bytes)[0].body.len(), 200);
    }

    #[test]
    fn oversized_kept_message_is_refused() {
        let mut bytes = Vec::new();
        write(&mut bytes, &msg(3, 0, TYPE_AMF0_COMMAND, 600), 4096);
        let mut reader = ChunkReader::new(Some(&[TYPE_AMF0_COMMAND]), 500);
        assert_eq!(reader.chunk(&bytes), Err("message too large"));
        // A type the reader does not keep may be any size.
        let mut reader = ChunkReader::new(Some(&[TYPE_AMF0_COMMAND]), 500);
        let mut video = Vec::new();
        write(&mut video, &msg(4, 0, 9, 600), 4096);
        reader.chunk_size = 4096;
        let (_, message) = reader.chunk(&video).unwrap().unwrap();
        assert!(message.unwrap().body.is_empty());
    }
}
