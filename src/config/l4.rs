//! Listener settings of the L4 streaming listeners (`tcp` for RTMP, `tls` for
//! RTMPS, `udp` for SRT), and their validation.

use super::{Config, Protocol};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Keys of a `[[listener]]` that only L4 listeners read. They sit in the
/// listener table itself (flattened), so a config reads
/// `protocol = "tcp"` / `rtmp_inspect = true` side by side.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct L4Options {
    /// PEM certificate chain for a `tls` listener (RTMPS).
    pub cert: Option<PathBuf>,
    /// PEM private key for a `tls` listener.
    pub key: Option<PathBuf>,
    /// Read the RTMP handshake and commands passing through to learn app and
    /// stream key (logs, counters); see `crate::l4::rtmp`.
    pub rtmp_inspect: bool,
    /// Choose the node by RTMP stream key (same key → same node while it is
    /// usable): amslb answers the handshake and `connect` itself to learn the
    /// key first; see `crate::l4::rtmp::front`. Implies `rtmp_inspect`.
    pub rtmp_affinity: bool,
    /// How long an inspected RTMP client may take to send its handshake (C0+C1)
    /// before it is closed without reaching a node.
    #[serde(with = "super::duration")]
    pub handshake_timeout: Duration,
    /// Relay with zero-copy `splice(2)` on Linux (off: a buffered copy).
    pub splice: bool,
    /// `udp` listeners: most client sessions open at once; datagrams that would
    /// open one more are dropped.
    pub max_sessions: usize,
    /// `udp` listeners: a session with no datagram either way for this long ends.
    #[serde(with = "super::duration")]
    pub session_idle: Duration,
}

impl Default for L4Options {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            rtmp_inspect: false,
            rtmp_affinity: false,
            handshake_timeout: Duration::from_secs(10),
            splice: true,
            max_sessions: 10_000,
            session_idle: Duration::from_secs(30),
        }
    }
}

/// Default SRT port of a node (AMS listens for SRT on 4200/udp).
pub fn default_srt_port() -> u16 {
    4200
}

/// Checks the L4 keys of every listener: a TLS listener has both `cert` and
/// `key` or neither, the other kinds must not carry keys they would ignore. Returns the key
/// and reason of the first problem, like [`Config::validate`].
pub fn validate(config: &Config) -> Result<(), (String, String)> {
    for (i, listener) in config.listeners.iter().enumerate() {
        let l4 = &listener.l4;
        let key = |name: &str| format!("listener[{i}].{name}");
        let is_tls = listener.protocol == Protocol::Tls;
        // A tls listener takes both (its own certificate) or neither (the
        // [tls] store); other kinds take none.
        if is_tls && l4.cert.is_some() != l4.key.is_some() {
            return Err((
                key(if l4.cert.is_none() { "cert" } else { "key" }),
                "set both `cert` and `key` (PEM files), or neither to use [tls] certs_dir".into(),
            ));
        }
        if !is_tls && (l4.cert.is_some() || l4.key.is_some()) {
            return Err((
                key(if l4.cert.is_some() { "cert" } else { "key" }),
                "only applies to protocol = \"tls\" listeners".into(),
            ));
        }
        let tcp_like = matches!(listener.protocol, Protocol::Tcp | Protocol::Tls);
        if (l4.rtmp_inspect || l4.rtmp_affinity) && !tcp_like {
            return Err((
                key(if l4.rtmp_inspect {
                    "rtmp_inspect"
                } else {
                    "rtmp_affinity"
                }),
                "only applies to protocol = \"tcp\" or \"tls\" listeners".into(),
            ));
        }
        if l4.handshake_timeout.is_zero() {
            return Err((key("handshake_timeout"), "must be more than 0".into()));
        }
        if listener.protocol == Protocol::Udp {
            if l4.max_sessions == 0 {
                return Err((key("max_sessions"), "must be at least 1".into()));
            }
            if l4.session_idle.is_zero() {
                return Err((key("session_idle"), "must be more than 0".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Protocol, parse_str};
    use std::path::Path;

    /// A complete RTMP/RTMPS/SRT listener setup, which must be accepted exactly as written.
    const L4_EXAMPLE: &str = r#"
[[listener]]
name = "rtmp"
bind = ["127.0.0.1:11935"]
protocol = "tcp"
default_group = "origin"

[[group]]
name = "origin"

[cluster]
source = "static"
http_port = 5080
rtmp_port = 1935
"#;

    #[test]
    fn accepts_the_l4_example() {
        let loaded = parse_str(L4_EXAMPLE, Path::new("lb.toml")).expect("must parse");
        let c = &loaded.config;
        assert_eq!(c.listeners[0].protocol, Protocol::Tcp);
        assert_eq!(c.cluster.rtmp_port, 1935);
        assert_eq!(c.cluster.srt_port, 4200);
        assert!(!c.listeners[0].l4.rtmp_inspect);
        assert!(c.listeners[0].l4.splice);
    }

    #[test]
    fn accepts_all_three_listener_kinds() {
        let text = format!(
            "{L4_EXAMPLE}\n{}",
            r#"
[[listener]]
name = "rtmps"
bind = ["127.0.0.1:11936"]
protocol = "tls"
cert = "/etc/amslb/rtmps.pem"
key = "/etc/amslb/rtmps.key"
rtmp_inspect = true
rtmp_affinity = true
handshake_timeout = "3s"

[[listener]]
name = "srt"
bind = ["127.0.0.1:14200"]
protocol = "udp"
max_sessions = 500
session_idle = "20s"
"#
        );
        let c = parse_str(&text, Path::new("lb.toml")).unwrap().config;
        assert_eq!(c.listeners[1].protocol, Protocol::Tls);
        assert!(c.listeners[1].l4.rtmp_inspect && c.listeners[1].l4.rtmp_affinity);
        assert_eq!(c.listeners[1].l4.handshake_timeout.as_secs(), 3);
        assert_eq!(c.listeners[2].l4.max_sessions, 500);
        assert_eq!(c.listeners[2].l4.session_idle.as_secs(), 20);
    }

    #[test]
    fn tls_listener_without_key_is_refused() {
        let text = L4_EXAMPLE.replace("protocol = \"tcp\"", "protocol = \"tls\"\ncert = \"a.pem\"");
        let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
        assert_eq!(err.key, "listener[0].key", "{err}");
    }

    #[test]
    fn misplaced_keys_are_refused() {
        let text = L4_EXAMPLE.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ncert = \"a.pem\"");
        let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
        assert_eq!(err.key, "listener[0].cert", "{err}");
        let text = L4_EXAMPLE.replace(
            "protocol = \"tcp\"",
            "protocol = \"udp\"\nrtmp_inspect = true",
        );
        let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
        assert_eq!(err.key, "listener[0].rtmp_inspect", "{err}");
    }

    #[test]
    fn unknown_listener_key_is_still_refused() {
        let text = L4_EXAMPLE.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nrtmp_inspekt = true",
        );
        let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
        assert!(err.reason.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_l4_duration_is_refused() {
        let text = L4_EXAMPLE.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nhandshake_timeout = \"10\"",
        );
        let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
        assert!(err.reason.contains("invalid duration"), "{err}");
    }
}
