//! The client behind trusted proxies (`trusted_proxies`), read from
//! `X-Forwarded-For` the way Tomcat's RemoteIpValve does: walk the chain from
//! the right, skip trusted addresses, the first other one is the client.

use crate::config::rules::{Cidr, in_any};
use std::net::{IpAddr, SocketAddr};

/// The client found in a trusted chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The client's address.
    pub client: IpAddr,
    /// The entries left of the client (what earlier hops claimed), to forward
    /// in front of it; empty when the client is the first entry.
    pub before: String,
}

/// The real client of a request that came from `peer` with `xff` (all
/// `X-Forwarded-For` values joined by commas). `None` when `peer` is not a
/// trusted proxy or the header names nobody: then the peer is the client and
/// any `X-Forwarded-For` is what the client claims, nothing more.
pub fn from_chain(trusted: &[Cidr], peer: IpAddr, xff: &str) -> Option<Chain> {
    if trusted.is_empty() || !in_any(trusted, peer) {
        return None;
    }
    let entries: Vec<&str> = xff
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut client = None;
    for (i, entry) in entries.iter().enumerate().rev() {
        let Some(ip) = parse_entry(entry) else {
            // Garbage: nothing left of here is believable; the hop to its
            // right (trusted, and it wrote the garbage) is the client.
            break;
        };
        client = Some((i, ip));
        if !in_any(trusted, ip) {
            break;
        }
    }
    let (index, client) = client?;
    Some(Chain {
        client,
        before: entries[..index].join(", "),
    })
}

/// An address as proxies write it: `203.0.113.7`, `2001:db8::1`, with a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:4711`) or bracketed.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .or_else(|_| entry.trim_matches(['[', ']']).parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Vec<Cidr> {
        vec![
            Cidr("127.0.9.0/24".parse().unwrap()),
            Cidr("10.0.0.0/8".parse().unwrap()),
        ]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rightmost_untrusted_is_the_client() {
        let chain = from_chain(
            &trusted(),
            ip("127.0.9.1"),
            "1.1.1.1, 198.51.100.7, 10.0.0.5",
        )
        .unwrap();
        assert_eq!(chain.client, ip("198.51.100.7"));
        assert_eq!(chain.before, "1.1.1.1");
        let chain = from_chain(&trusted(), ip("127.0.9.1"), "198.51.100.7:5555").unwrap();
        assert_eq!(chain.client, ip("198.51.100.7"));
        assert_eq!(chain.before, "");
    }

    #[test]
    fn untrusted_peer_or_empty_header_changes_nothing() {
        assert_eq!(from_chain(&trusted(), ip("203.0.113.1"), "1.2.3.4"), None);
        assert_eq!(from_chain(&[], ip("127.0.9.1"), "1.2.3.4"), None);
        assert_eq!(from_chain(&trusted(), ip("127.0.9.1"), " , "), None);
    }

    #[test]
    fn all_trusted_gives_the_leftmost_and_garbage_stops_the_walk() {
        let chain = from_chain(&trusted(), ip("127.0.9.1"), "10.1.1.1, 10.2.2.2").unwrap();
        assert_eq!(chain.client, ip("10.1.1.1"));
        let chain = from_chain(&trusted(), ip("127.0.9.1"), "1.1.1.1, unknown, 10.2.2.2").unwrap();
        assert_eq!(chain.client, ip("10.2.2.2"));
        assert_eq!(chain.before, "1.1.1.1, unknown");
        assert_eq!(from_chain(&trusted(), ip("127.0.9.1"), "garbage"), None);
    }
}
