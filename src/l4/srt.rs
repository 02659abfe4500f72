//! Just enough of the SRT handshake (HSv5) to place a caller by its stream id.
//!
//! An SRT caller sends an *induction* handshake, gets the listener's SYN
//! cookie back, then sends a *conclusion* handshake carrying the cookie and,
//! in the SID extension, its stream id. The id comes only in the second
//! packet, after the listener answered, so a `udp` listener answers the
//! induction itself with a cookie of its own ([`induction_answer`]), reads the
//! stream id from the conclusion ([`Conclusion`]), picks the node, and then
//! does the induction with the node from the session's socket
//! ([`node_induction`], [`node_cookie`]) to replace its cookie in the
//! conclusion ([`set_cookie`]). After that, packets pass unchanged.
//!
//! Stream ids are read in the two forms AMS users write: the access-control
//! form `#!::r=app/stream,m=publish` (no `m` means `request`, i.e. play) and
//! the plain `app/stream` (a publish; `app/stream,play` plays).
//!
//! Every function reads a bounded slice and returns `None` on anything it does
//! not understand; a datagram that is not a handshake is never touched.

/// Bytes of the SRT packet header.
const HEADER: usize = 16;
/// Bytes of header plus the handshake's fixed part (CIF up to the peer IP).
pub const HANDSHAKE_LEN: usize = HEADER + 48;
/// Offsets of the handshake fields used here.
const VERSION: usize = 16;
const ENCRYPTION: usize = 20;
const EXTENSION: usize = 22;
const TYPE: usize = 36;
const SOCKET_ID: usize = 40;
const COOKIE: usize = 44;
/// Handshake types.
const INDUCTION: u32 = 1;
const CONCLUSION: u32 = 0xFFFF_FFFF;
/// Extension field of an HSv5 induction answer ("SRT magic").
const SRT_MAGIC: u16 = 0x4A17;
/// Extension field of a caller's induction (the UDT socket type, datagram).
const UDT_DGRAM: u16 = 2;
/// Handshake extension carrying the stream id.
const EXT_SID: u16 = 5;
/// Longest stream id SRT allows.
pub const MAX_STREAM_ID: usize = 512;

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

/// The handshake type of `d`, when it is an SRT handshake control packet.
fn handshake_type(d: &[u8]) -> Option<u32> {
    // Control bit set, control type 0 (handshake).
    if d.len() < HANDSHAKE_LEN || u16_at(d, 0)? != 0x8000 {
        return None;
    }
    u32_at(d, TYPE)
}

/// Whether `d` is an induction request from a caller.
pub fn is_induction(d: &[u8]) -> bool {
    handshake_type(d) == Some(INDUCTION) && u32_at(d, COOKIE) == Some(0)
}

/// The listener's answer to the induction request `d`, carrying `cookie`.
pub fn induction_answer(d: &[u8], cookie: u32) -> Option<Vec<u8>> {
    if !is_induction(d) {
        return None;
    }
    let mut out = d[..HANDSHAKE_LEN].to_vec();
    // Addressed to the caller's socket.
    let caller = d.get(SOCKET_ID..SOCKET_ID + 4)?.to_vec();
    out[12..16].copy_from_slice(&caller);
    out[VERSION..VERSION + 4].copy_from_slice(&5u32.to_be_bytes());
    out[ENCRYPTION..ENCRYPTION + 2].copy_from_slice(&0u16.to_be_bytes());
    out[EXTENSION..EXTENSION + 2].copy_from_slice(&SRT_MAGIC.to_be_bytes());
    out[COOKIE..COOKIE + 4].copy_from_slice(&cookie.to_be_bytes());
    Some(out)
}

/// A caller's conclusion handshake, as far as placement needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    /// The cookie the caller echoes.
    pub cookie: u32,
    /// The stream id from the SID extension, if any.
    pub stream_id: Option<String>,
}

impl Conclusion {
    /// Reads `d` when it is a conclusion request.
    pub fn parse(d: &[u8]) -> Option<Self> {
        if handshake_type(d)? != CONCLUSION {
            return None;
        }
        Some(Self {
            cookie: u32_at(d, COOKIE)?,
            stream_id: stream_id(d),
        })
    }
}

/// The SID extension's text: 32-bit words, each stored byte-reversed (libsrt
/// writes host-order words), NUL padding at the end.
fn stream_id(d: &[u8]) -> Option<String> {
    let mut at = HANDSHAKE_LEN;
    // Each extension takes at least 4 bytes, so this ends within the datagram.
    while at + 4 <= d.len() {
        let kind = u16_at(d, at)?;
        let words = usize::from(u16_at(d, at + 2)?);
        let body = d.get(at + 4..at + 4 + words * 4)?;
        if kind == EXT_SID {
            if body.len() > MAX_STREAM_ID {
                return None;
            }
            let mut text: Vec<u8> = body
                .chunks_exact(4)
                .flat_map(|w| [w[3], w[2], w[1], w[0]])
                .collect();
            while text.last() == Some(&0) {
                text.pop();
            }
            return String::from_utf8(text).ok();
        }
        at += 4 + words * 4;
    }
    None
}

/// What a stream id asks for: the stream (`app/stream`) and whether the
/// caller publishes it. `None` when it names no `app/stream`.
pub fn placement_key(stream_id: &str) -> Option<(String, bool)> {
    let (resource, publish) = match stream_id.strip_prefix("#!::") {
        Some(pairs) => {
            let mut resource = None;
            let mut publish = false;
            for pair in pairs.split(',') {
                match pair.split_once('=') {
                    Some(("r", r)) => resource = Some(r),
                    Some(("m", m)) => publish = m == "publish",
                    _ => {}
                }
            }
            (resource?, publish)
        }
        None => match stream_id.split_once(',') {
            Some((resource, "play")) => (resource, false),
            Some((resource, _)) => (resource, true),
            None => (stream_id, true),
        },
    };
    // A token in a query string is not part of the stream.
    let resource = resource.split('?').next().unwrap_or_default();
    let (app, stream) = resource.trim_start_matches('/').split_once('/')?;
    let printable = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic());
    (printable(app) && printable(stream)).then(|| (format!("{app}/{stream}"), publish))
}

/// The induction request to send to the node for the caller's conclusion
/// `d`: the caller's fields, as its own induction carried them.
pub fn node_induction(d: &[u8]) -> Option<Vec<u8>> {
    if handshake_type(d)? != CONCLUSION {
        return None;
    }
    let mut out = d[..HANDSHAKE_LEN].to_vec();
    out[12..16].fill(0);
    out[VERSION..VERSION + 4].copy_from_slice(&4u32.to_be_bytes());
    out[ENCRYPTION..ENCRYPTION + 2].fill(0);
    out[EXTENSION..EXTENSION + 2].copy_from_slice(&UDT_DGRAM.to_be_bytes());
    out[TYPE..TYPE + 4].copy_from_slice(&INDUCTION.to_be_bytes());
    out[COOKIE..COOKIE + 4].fill(0);
    Some(out)
}

/// The cookie in a node's induction answer.
pub fn node_cookie(d: &[u8]) -> Option<u32> {
    (handshake_type(d)? == INDUCTION && u32_at(d, VERSION)? == 5).then(|| u32_at(d, COOKIE))?
}

/// Replaces the cookie of a conclusion request; `false` when `d` is not one.
pub fn set_cookie(d: &mut [u8], cookie: u32) -> bool {
    if handshake_type(d) != Some(CONCLUSION) {
        return false;
    }
    d[COOKIE..COOKIE + 4].copy_from_slice(&cookie.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Recorded from Debian's ffmpeg (libsrt 1.5) calling a listener with
    // `srt://127.0.0.1:P?streamid=LiveApp/s1`: induction, the listener's
    // answer, the conclusion.
    const INDUCTION_1: &str = "8000000000000000000000eb0000000000000004000000027b508997000005dc00002000000000012ca7758b000000000100007f000000000000000000000000";
    const ANSWER_1: &str = "8000000000000000000b6bb12ca7758b0000000500004a177b508997000005dc00002000000000012ca7758ba4efb4b90100007f000000000000000000000000";
    const CONCLUSION_1: &str = "80000000000000000000023d0000000000000005000000057b508997000005dc00002000ffffffff2ca7758ba4efb4b90100007f0000000000000000000000000001000300010501000000bf00780000000500036576694c2f70704100003173";
    // The same with `streamid=#!::r=LiveApp/stream-two,m=publish`.
    const CONCLUSION_2: &str = "80000000000000000000024100000000000000050000000531f0014d000005dc00002000ffffffff2a245d6e61f8d1c70100007f0000000000000000000000000001000300010501000000bf00780000000500093a3a2123694c3d727041657674732f706d6165726f77742d703d6d2c696c627500006873";

    #[test]
    fn reads_the_stream_id_of_real_conclusions() {
        let c = Conclusion::parse(&hex(CONCLUSION_1)).unwrap();
        assert_eq!(c.cookie, 0xa4ef_b4b9);
        assert_eq!(c.stream_id.as_deref(), Some("LiveApp/s1"));
        let c = Conclusion::parse(&hex(CONCLUSION_2)).unwrap();
        assert_eq!(
            c.stream_id.as_deref(),
            Some("#!::r=LiveApp/stream-two,m=publish")
        );
        assert!(Conclusion::parse(&hex(INDUCTION_1)).is_none());
    }

    #[test]
    fn answers_an_induction_like_a_listener() {
        let answer = induction_answer(&hex(INDUCTION_1), 0xa4ef_b4b9).unwrap();
        let real = hex(ANSWER_1);
        // Same as the real listener's answer but for the timestamp.
        assert_eq!(answer[..8], real[..8]);
        assert_eq!(answer[12..], real[12..]);
        assert!(induction_answer(&hex(CONCLUSION_1), 1).is_none());
        assert_eq!(node_cookie(&real), Some(0xa4ef_b4b9));
        assert_eq!(
            node_cookie(&hex(INDUCTION_1)),
            None,
            "a request is no answer"
        );
    }

    #[test]
    fn the_node_induction_is_the_callers_induction() {
        let mut synth = node_induction(&hex(CONCLUSION_1)).unwrap();
        let mut real = hex(INDUCTION_1);
        // Timestamps differ; everything else is what the caller sent.
        synth[8..12].fill(0);
        real[8..12].fill(0);
        assert_eq!(synth, real);
        let mut c = hex(CONCLUSION_1);
        assert!(set_cookie(&mut c, 0x0102_0304));
        assert_eq!(Conclusion::parse(&c).unwrap().cookie, 0x0102_0304);
        assert!(!set_cookie(&mut hex(INDUCTION_1), 1));
    }

    #[test]
    fn stream_id_forms() {
        let k = |s: &str| placement_key(s);
        assert_eq!(k("LiveApp/s1"), Some(("LiveApp/s1".into(), true)));
        assert_eq!(k("LiveApp/s1,play"), Some(("LiveApp/s1".into(), false)));
        assert_eq!(k("LiveApp/s1?token=x"), Some(("LiveApp/s1".into(), true)));
        assert_eq!(
            k("#!::r=LiveApp/s1,m=publish"),
            Some(("LiveApp/s1".into(), true))
        );
        assert_eq!(
            k("#!::u=bob,r=LiveApp/s1,m=request"),
            Some(("LiveApp/s1".into(), false))
        );
        assert_eq!(k("#!::r=LiveApp/s1"), Some(("LiveApp/s1".into(), false)));
        for bad in ["", "s1", "#!::m=publish", "/s1", "a/", "a b/c", "#!::r="] {
            assert_eq!(k(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let good = hex(CONCLUSION_2);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5000 {
            let mut d = good.clone();
            if round % 2 == 0 {
                let len = (next() % 200) as usize;
                d = (0..len).map(|_| next() as u8).collect();
                if d.len() > 2 {
                    d[0] = 0x80;
                    d[1] = 0;
                }
            } else {
                for _ in 0..3 {
                    let at = (next() as usize) % d.len();
                    d[at] = next() as u8;
                }
                d.truncate((next() as usize) % (d.len() + 1));
            }
            let _ = Conclusion::parse(&d).map(|c| c.stream_id.map(|s| placement_key(&s)));
            let _ = induction_answer(&d, 7);
            let _ = node_induction(&d);
            let _ = node_cookie(&d);
            let _ = set_cookie(&mut d, 7);
        }
    }
}
