//! `[sticky]`: session affinity by cookie (HAProxy-compatible prefix mode, or
//! amslb's own inserted cookie) and the per-node cookie values.

use serde::Deserialize;

/// How a client is tied to the node it first landed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StickyMode {
    /// No cookie affinity (WHIP/WHEP follow-ups still reach their node).
    #[default]
    Off,
    /// amslb sets its own cookie naming the node (HAProxy `cookie X insert`).
    Insert,
    /// The node's own session cookie gets a `<node>~` prefix (HAProxy `cookie JSESSIONID prefix`).
    Prefix,
}

/// The `SameSite` attribute of the inserted cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SameSite {
    /// Sent on top-level navigation from other sites, not on their subresources.
    Lax,
    /// Never sent on cross-site requests.
    Strict,
    /// Always sent; browsers require `Secure` with it, so it only works on TLS listeners.
    None,
}

impl SameSite {
    /// The attribute value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// `[sticky]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StickyConfig {
    /// `off` (default), `insert` or `prefix`.
    pub mode: StickyMode,
    /// Cookie name; `AMSLB` in insert mode, `JSESSIONID` in prefix mode when unset.
    pub cookie: Option<String>,
    /// `SameSite` attribute of the inserted cookie; not sent when unset (browsers then use Lax).
    pub same_site: Option<SameSite>,
    /// Mark the inserted cookie `Secure` on every listener, not only on TLS
    /// ones: for amslb behind a TLS-terminating front (HAProxy `cookie ... secure`).
    pub secure: bool,
    /// Mark responses that carry an inserted cookie `Cache-Control: private`
    /// (default on in insert mode). Prefix mode never adds headers, as in HAProxy.
    pub nocache: Option<bool>,
    /// Key for deriving node cookie values from node ids. Balancers that share a
    /// DNS name must share it; without it the derivation uses a built-in key.
    pub secret: Option<Secret>,
}

/// A secret from the config: usable as bytes, never shown by `Debug`, so a
/// logged config does not leak it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl StickyConfig {
    /// The cookie name in effect.
    pub fn cookie_name(&self) -> &str {
        match (&self.cookie, self.mode) {
            (Some(name), _) => name,
            (None, StickyMode::Prefix) => "JSESSIONID",
            (None, _) => "AMSLB",
        }
    }

    /// Whether inserting the cookie also marks the response private.
    pub fn nocache(&self) -> bool {
        self.nocache.unwrap_or(self.mode == StickyMode::Insert)
    }
}

/// Whether `c` may appear in a cookie name (an RFC 6265 token).
fn is_token_char(c: char) -> bool {
    c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c)
}

/// Whether `value` is a usable per-node cookie value: cookie-octets without
/// the `~` that ends the prefix in prefix mode or the `.` that separates the
/// keys of several groups in insert mode.
pub fn is_valid_node_cookie(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && !"\",;\\~.".contains(c))
}

/// Checks `[sticky]` and the `cookie` keys of `[[cluster.node]]`; returns the
/// key and reason of the first problem. `node_cookies` are (index, value) pairs.
pub fn validate<'a>(
    sticky: &StickyConfig,
    node_cookies: impl Iterator<Item = (usize, &'a str)>,
) -> Result<(), (String, String)> {
    let name = sticky.cookie_name();
    if name.is_empty() || !name.chars().all(is_token_char) {
        return Err((
            "sticky.cookie".into(),
            format!("{name:?} is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
        ));
    }
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for (i, value) in node_cookies {
        let key = format!("cluster.node[{i}].cookie");
        if !is_valid_node_cookie(value) {
            return Err((
                key,
                format!(
                    "{value:?} is not a valid cookie value (printable ASCII without space, '\"', ',', ';', '\\', '~' or '.')"
                ),
            ));
        }
        if let Some((_, other)) = seen.iter().find(|(v, _)| *v == value) {
            return Err((
                key,
                format!("cookie {value:?} is already used by cluster.node[{other}]"),
            ));
        }
        seen.push((value, i));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Loaded, parse_str};
    use std::path::Path;
    use std::time::Duration;

    const BASE: &str = r#"
[[listener]]
name = "http"
bind = ["127.0.0.1:18080"]
protocol = "http"

[[group]]
name = "origin"

[cluster]
[[cluster.node]]
id = "origin-1"
address = "127.0.1.1"
group = "origin"
"#;

    fn parse(extra: &str) -> Result<Loaded, crate::config::ConfigError> {
        parse_str(&format!("{BASE}{extra}"), Path::new("lb.toml"))
    }

    /// The README's `[sticky]` example, which must be accepted exactly as written.
    #[test]
    fn accepts_the_documented_example() {
        let loaded = parse(
            r#"
[sticky]
mode = "insert"        # insert | prefix | off
cookie = "AMSLB"

[health]
path = "/rest/v2/liveness"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
"#,
        )
        .unwrap();
        let c = &loaded.config;
        assert_eq!(c.sticky.mode, StickyMode::Insert);
        assert_eq!(c.sticky.cookie_name(), "AMSLB");
        assert!(c.sticky.nocache());
        assert_eq!(c.health.interval, Duration::from_secs(1));
        assert_eq!(c.health.timeout, Duration::from_millis(500));
        assert_eq!((c.health.rise, c.health.fall), (2, 2));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    /// The prefix variant: `mode = "prefix"`, `cookie = "JSESSIONID"`, per-node `cookie`.
    #[test]
    fn accepts_prefix_mode_with_node_cookies() {
        let text = format!(
            "{}\n[sticky]\nmode = \"prefix\"\ncookie = \"JSESSIONID\"\n",
            BASE.replace(
                "group = \"origin\"\n",
                "group = \"origin\"\ncookie = \"ams1\"\ndrain = true\n"
            )
        );
        let c = parse_str(&text, Path::new("lb.toml")).unwrap().config;
        assert_eq!(c.sticky.mode, StickyMode::Prefix);
        assert!(!c.sticky.nocache());
        assert_eq!(c.cluster.nodes[0].cookie.as_deref(), Some("ams1"));
        assert!(c.cluster.nodes[0].drain);
        let specs = crate::cluster::static_source::specs(&c.cluster);
        assert!(specs[0].drain, "drain = true reaches the node spec");
    }

    #[test]
    fn defaults_without_tables() {
        let c = parse("").unwrap().config;
        assert_eq!(c.sticky.mode, StickyMode::Off);
        assert_eq!(c.health.path, "/rest/v2/liveness");
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert_eq!(c.health.timeout, Duration::from_secs(1));
        assert_eq!((c.health.rise, c.health.fall), (2, 3));
        assert_eq!(c.health.expect_status, 200);
        let prefix = parse("[sticky]\nmode = \"prefix\"\n").unwrap().config;
        assert_eq!(prefix.sticky.cookie_name(), "JSESSIONID");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[sticky]\ncookie = \"a b\"\n", "sticky.cookie"),
            ("[sticky]\nmode = \"rewrite\"\n", "sticky.mode"),
            (
                "[sticky]\nsame_site = \"lax\"\nsecret = \"s\"\nttl = 1\n",
                "sticky.ttl",
            ),
            ("[health]\npath = \"liveness\"\n", "health.path"),
            ("[health]\ninterval = \"0s\"\n", "health.interval"),
            ("[health]\nfall = 0\n", "health.fall"),
            ("[health]\nrise = 0\n", "health.rise"),
            ("[health]\nexpect_status = 99\n", "health.expect_status"),
            ("[health]\napp = \"a/b\"\n", "health.app"),
            ("[health]\ncheck = \"ping\"\n", "health.check"),
        ];
        for (extra, key) in cases {
            let err = parse(extra).unwrap_err();
            assert_eq!(err.key, key, "{extra}: {err}");
        }
    }

    #[test]
    fn node_cookies_must_be_valid_and_unique() {
        let two = format!(
            "{}\n[[cluster.node]]\nid = \"origin-2\"\naddress = \"127.0.1.2\"\ngroup = \"origin\"\ncookie = \"X\"\n",
            BASE.replace(
                "group = \"origin\"\n",
                "group = \"origin\"\ncookie = \"X\"\n"
            )
        );
        let err = parse_str(&two, Path::new("lb.toml")).unwrap_err();
        assert_eq!(err.key, "cluster.node[1].cookie");
        assert!(err.reason.contains("already used"), "{err}");
        let tilde = BASE.replace(
            "group = \"origin\"\n",
            "group = \"origin\"\ncookie = \"a~b\"\n",
        );
        let err = parse_str(&tilde, Path::new("lb.toml")).unwrap_err();
        assert_eq!(err.key, "cluster.node[0].cookie");
    }

    #[test]
    fn secret_is_read_but_never_shown() {
        let c = parse("[sticky]\nmode = \"insert\"\nsecret = \"hunter2\"\n")
            .unwrap()
            .config;
        assert_eq!(c.sticky.secret.as_ref().unwrap().expose(), b"hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn long_timeout_is_a_warning() {
        let loaded = parse("[health]\ninterval = \"1s\"\ntimeout = \"3s\"\n").unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    }
}
