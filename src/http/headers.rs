//! Request and response header rewriting: hop-by-hop headers, X-Forwarded-*,
//! Forwarded and Via.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::{IpAddr, SocketAddr};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1),
/// besides those named in `Connection`.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The lengths of the [`HOP_BY_HOP`] names.
const HOP_BY_HOP_LENGTHS: [usize; 5] = [2, 7, 10, 16, 17];

/// Removes hop-by-hop headers. For a protocol upgrade (WebSocket) the
/// `Connection: upgrade` and `Upgrade` pair is kept so the node sees the upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which hop-by-hop headers are there, so
    // only those are removed: a remove hashes its name, and seven of them on
    // every request and response were 7 % of the keep-alive path's
    // instructions.
    let mut present = 0u8;
    for name in headers.keys() {
        // Most names have a length no hop-by-hop name has: one compare
        // instead of seven.
        if !HOP_BY_HOP_LENGTHS.contains(&name.as_str().len()) {
            continue;
        }
        if let Some(index) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    // Headers listed in Connection are hop-by-hop too (e.g. "Connection: close, x-foo").
    // Only a listed header that is present and not already in HOP_BY_HOP
    // needs a name of its own, so the usual "keep-alive" or "close" costs
    // no allocation.
    let mut listed: Vec<HeaderName> = Vec::new();
    for token in crate::header_list::elements(headers, header::CONNECTION) {
        let known = HOP_BY_HOP
            .iter()
            .any(|h| token.eq_ignore_ascii_case(h.as_str()));
        // `Connection: host` would leave the node without a Host to route on.
        if known || token.eq_ignore_ascii_case("host") || !headers.contains_key(token) {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            listed.push(name);
        }
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    let hop_by_hop = HOP_BY_HOP
        .iter()
        .enumerate()
        .filter(|(index, _)| present & (1 << index) != 0)
        .map(|(_, name)| name);
    for name in listed.iter().chain(hop_by_hop) {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// What the proxy knows about the client side of a request.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The client's address (from the PROXY header when the listener accepts one).
    pub addr: SocketAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

/// Which optional forwarding headers a listener adds.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// Add RFC 7239 `Forwarded`.
    pub forwarded: bool,
    /// Add `Via`.
    pub via: bool,
}

/// The client's address as header text, made once per client connection so
/// that a request's X-Forwarded-For costs neither formatting nor a copy.
pub fn ip_header(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        // Written digit by digit: `Ipv4Addr`'s `Display` goes through the
        // formatting machinery, a few percent of all the work amslb does for
        // a request on a new connection (callgrind).
        IpAddr::V4(v4) => {
            let mut text = BytesMut::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.put_u8(b'.');
                }
                if octet >= 100 {
                    text.put_u8(b'0' + octet / 100);
                }
                if octet >= 10 {
                    text.put_u8(b'0' + octet / 10 % 10);
                }
                text.put_u8(b'0' + octet % 10);
            }
            text.freeze()
        }
        IpAddr::V6(_) => Bytes::from(ip.to_string()),
    };
    // An address's text is always a valid header value; the value takes the
    // buffer instead of a copy.
    HeaderValue::from_maybe_shared(text).expect("an IP address is header-safe text")
}

/// The most headers [`add_forwarding`] adds to a request.
pub const FORWARDING_HEADERS: usize = 5;

/// Adds X-Forwarded-For (appending `client_ip`, the [`ip_header`] of
/// `client`, to what a previous proxy set), X-Forwarded-Proto,
/// X-Forwarded-Host, and optionally Forwarded and Via.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: ClientInfo,
    client_ip: &HeaderValue,
    options: ForwardOptions,
) {
    let ip = client.addr.ip();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) if !previous.trim().is_empty() => {
            // A string built from header text that was valid stays valid.
            HeaderValue::from_maybe_shared(Bytes::from(format!("{previous}, {ip}"))).ok()
        }
        _ => Some(client_ip.clone()),
    };
    if let Some(value) = xff {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let proto = if client.tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
    if options.forwarded {
        let mut value = if ip.is_ipv6() {
            format!("for=\"[{ip}]\";proto={proto}")
        } else {
            format!("for={ip};proto={proto}")
        };
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            value.push_str(";host=\"");
            value.push_str(host);
            value.push('"');
        }
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.append(header::FORWARDED, value);
        }
    }
    if options.via {
        headers.append(header::VIA, HeaderValue::from_static("1.1 amslb"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_header_is_the_address_as_std_writes_it() {
        // Every digit count in every position, and IPv6 (mapped IPv4 too).
        let octets = [0u8, 7, 9, 10, 42, 99, 100, 109, 110, 199, 200, 255];
        for a in octets {
            for b in octets {
                let ip = IpAddr::from([a, b, octets[(a % 12) as usize], b.wrapping_add(a)]);
                assert_eq!(ip_header(ip), ip.to_string().as_str(), "{ip}");
            }
        }
        for text in ["::1", "2001:db8::8:800:200c:417a", "::ffff:192.0.2.1"] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(ip_header(ip), text);
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_length_filter_lets_every_hop_by_hop_name_through() {
        let mut lengths: Vec<usize> = HOP_BY_HOP.iter().map(|h| h.as_str().len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        assert_eq!(lengths, HOP_BY_HOP_LENGTHS);
        // And each one alone is stripped.
        for name in &HOP_BY_HOP {
            let mut h = map(&[("accept", "*/*"), (name.as_str(), "x")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h, map(&[("accept", "*/*")]), "{name}");
        }
    }

    #[test]
    fn a_lone_hop_by_hop_header_goes_and_end_to_end_ones_stay() {
        let mut h = map(&[("accept", "*/*"), ("host", "a.test"), ("x-id", "7")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        let mut h = map(&[("accept", "*/*"), ("proxy-connection", "keep-alive")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&[("accept", "*/*")]));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn keeps_upgrade_pair_for_websocket() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn appends_xff_and_sets_proto_host() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("host", "live.example.com"),
        ]);
        let client = ClientInfo {
            addr: "198.51.100.2:4000".parse().unwrap(),
            tls: true,
        };
        add_forwarding(
            &mut h,
            client,
            &ip_header(client.addr.ip()),
            ForwardOptions {
                forwarded: false,
                via: false,
            },
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 198.51.100.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "live.example.com");
        assert!(!h.contains_key("forwarded"));
        assert!(!h.contains_key("via"));
    }

    #[test]
    fn optional_forwarded_and_via() {
        let mut h = map(&[("host", "a.test")]);
        let client = ClientInfo {
            addr: "[2001:db8::5]:1".parse().unwrap(),
            tls: false,
        };
        add_forwarding(
            &mut h,
            client,
            &ip_header(client.addr.ip()),
            ForwardOptions {
                forwarded: true,
                via: true,
            },
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::5");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::5]\";proto=http;host=\"a.test\""
        );
        assert_eq!(h["via"], "1.1 amslb");
        // Host plus every header amslb adds: what FORWARDING_HEADERS sizes for.
        assert_eq!(h.len(), 1 + FORWARDING_HEADERS);
    }
}
