//! `[tls]` and `[tls.acme]`: where certificates live and how amslb obtains them.

use super::{ListenerConfig, Protocol, duration};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `[tls]`: certificates for `https` and `tls` listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Directory holding certificates: combined PEM files (`name.pem`, chain then
    /// key, as HAProxy wants them) and `name.crt` + `name.key` pairs. ACME state
    /// (account, lock) goes in its `.acme/` subdirectory.
    #[serde(default = "default_certs_dir")]
    pub certs_dir: PathBuf,
    /// Certificate (file name without extension) served to clients that send no
    /// SNI or a name no certificate covers. Unset: the first file by name.
    #[serde(default)]
    pub default_cert: Option<String>,
    /// How often `certs_dir` is checked for changed files, which are then
    /// reloaded without dropping connections; `"0s"` turns checking off.
    #[serde(default = "default_watch_interval", with = "duration")]
    pub watch_interval: Duration,
    /// Automatic certificates.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            certs_dir: default_certs_dir(),
            default_cert: None,
            watch_interval: default_watch_interval(),
            acme: None,
        }
    }
}

fn default_certs_dir() -> PathBuf {
    PathBuf::from("certs")
}

fn default_watch_interval() -> Duration {
    Duration::from_secs(10)
}

/// Which ACME challenge proves control of the domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ChallengeKind {
    /// Answered on the TLS listeners through the `acme-tls/1` ALPN protocol (port 443).
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// Answered on the plain HTTP listeners at `/.well-known/acme-challenge/` (port 80).
    #[serde(rename = "http-01")]
    Http01,
}

/// `[tls.acme]`: one certificate covering `domains`, obtained and renewed automatically.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// ACME directory URL (Let's Encrypt: `https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// Account contacts, e.g. `["mailto:ops@example.com"]`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Names the certificate covers; the first also names the stored file.
    pub domains: Vec<String>,
    /// Challenge type.
    #[serde(default)]
    pub challenge: ChallengeKind,
    /// PEM file with the root that signs the ACME server's own HTTPS certificate,
    /// for private ACME servers; unset uses the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Renew when this much of the certificate's lifetime has passed (Let's
    /// Encrypt recommends two thirds).
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// Up to this fraction of the lifetime is taken off the renewal time at
    /// random, so that many instances do not hit the CA in the same second.
    #[serde(default = "default_renew_jitter")]
    pub renew_jitter: f64,
    /// First wait after a failed order; doubles on each failure up to `retry_max`.
    #[serde(default = "default_retry_min", with = "duration")]
    pub retry_min: Duration,
    /// Longest wait between failed attempts.
    #[serde(default = "default_retry_max", with = "duration")]
    pub retry_max: Duration,
    /// How long an order lock in `certs_dir` holds before another instance may
    /// consider its owner dead and take it over.
    #[serde(default = "default_lock_lease", with = "duration")]
    pub lock_lease: Duration,
    /// With `[state]`: file holding the key that encrypts the private keys
    /// (certificate and account) amslb keeps in MongoDB, as 64 hex digits
    /// (`openssl rand -hex 32`). Every instance sharing the state needs the
    /// same key; it never leaves this file.
    #[serde(default)]
    pub storage_key_file: Option<PathBuf>,
}

/// Length of the storage key in bytes (AES-256).
pub const STORAGE_KEY_LEN: usize = 32;

/// Reads the storage key from `path`: 64 hex digits, surrounding whitespace
/// ignored. The error is the reason, for a config error or a log line.
pub fn read_storage_key(path: &std::path::Path) -> Result<[u8; STORAGE_KEY_LEN], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let hex = text.trim();
    let bad = || {
        format!(
            "{} must hold {STORAGE_KEY_LEN} random bytes as {} hex digits (make one with `openssl rand -hex 32`)",
            path.display(),
            STORAGE_KEY_LEN * 2
        )
    };
    if hex.len() != STORAGE_KEY_LEN * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut key = [0u8; STORAGE_KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

fn default_renew_at() -> f64 {
    2.0 / 3.0
}

fn default_renew_jitter() -> f64 {
    0.05
}

fn default_retry_min() -> Duration {
    Duration::from_secs(60)
}

fn default_retry_max() -> Duration {
    Duration::from_secs(6 * 3600)
}

fn default_lock_lease() -> Duration {
    Duration::from_secs(600)
}

impl TlsConfig {
    /// Checks what serde cannot, including that the listeners an ACME challenge
    /// needs exist; returns the dotted key and reason of the first error.
    pub fn validate(
        &self,
        listeners: &[ListenerConfig],
        shared_state: bool,
    ) -> Result<(), (String, String)> {
        if self.certs_dir.as_os_str().is_empty() {
            return Err(("tls.certs_dir".into(), "must not be empty".into()));
        }
        if let Some(name) = &self.default_cert
            && (name.is_empty() || name.contains('/'))
        {
            return Err((
                "tls.default_cert".into(),
                "must be a file name without extension, e.g. \"live\" for live.pem".into(),
            ));
        }
        let Some(acme) = &self.acme else {
            return Ok(());
        };
        let fail = |key: &str, reason: String| Err((format!("tls.acme.{key}"), reason));
        if !(acme.directory.starts_with("https://") || acme.directory.starts_with("http://")) {
            return fail("directory", "must be an http(s) URL".into());
        }
        if acme.domains.is_empty() {
            return fail("domains", "needs at least one domain".into());
        }
        for (i, domain) in acme.domains.iter().enumerate() {
            let ok = !domain.is_empty()
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*');
            if !ok {
                return Err((
                    format!("tls.acme.domains[{i}]"),
                    format!("{domain:?} is not a DNS name"),
                ));
            }
            // Neither http-01 nor tls-alpn-01 may validate wildcards (RFC 8555 §8, RFC 8737 §3).
            if domain.contains('*') {
                return Err((
                    format!("tls.acme.domains[{i}]"),
                    "wildcard names need the dns-01 challenge, which amslb does not do".into(),
                ));
            }
        }
        for (i, contact) in acme.contact.iter().enumerate() {
            if !contact.starts_with("mailto:") {
                return Err((
                    format!("tls.acme.contact[{i}]"),
                    "must be a mailto: URL, e.g. \"mailto:ops@example.com\"".into(),
                ));
            }
        }
        if !(0.1..=0.95).contains(&acme.renew_at) {
            return fail("renew_at", "must be between 0.1 and 0.95".into());
        }
        if !(0.0..=0.5).contains(&acme.renew_jitter) || acme.renew_jitter >= acme.renew_at {
            return fail(
                "renew_jitter",
                "must be between 0 and 0.5 and below renew_at".into(),
            );
        }
        if acme.retry_min.is_zero() || acme.retry_max < acme.retry_min {
            return fail(
                "retry_max",
                "retry_min must be above 0 and retry_max at least retry_min".into(),
            );
        }
        if acme.lock_lease < Duration::from_secs(1) {
            return fail("lock_lease", "must be at least 1s".into());
        }
        match (&acme.storage_key_file, shared_state) {
            (Some(path), true) => read_storage_key(path)
                .map(drop)
                .or_else(|reason| fail("storage_key_file", reason))?,
            (None, true) => {
                return fail(
                    "storage_key_file",
                    "required with [state]: the ACME keys kept in MongoDB are encrypted with it (make one with `openssl rand -hex 32`)".into(),
                );
            }
            (Some(_), false) => {
                return fail(
                    "storage_key_file",
                    "only used with [state] (ACME storage in MongoDB); without it the keys stay in certs_dir".into(),
                );
            }
            (None, false) => {}
        }
        let (needed, port) = match acme.challenge {
            ChallengeKind::TlsAlpn01 => (Protocol::Https, 443),
            ChallengeKind::Http01 => (Protocol::Http, 80),
        };
        if !listeners.iter().any(|l| l.protocol == needed) {
            return fail(
                "challenge",
                format!(
                    "{:?} needs a listener with protocol = {:?} (reachable on port {port})",
                    acme.challenge,
                    if port == 443 { "https" } else { "http" }
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        tls: TlsConfig,
    }

    /// A complete `[tls]` setup with ACME, which must be accepted exactly as written.
    pub(crate) const ISSUE_EXAMPLE: &str = r#"
[tls]
certs_dir = "/var/lib/amslb/certs"

[tls.acme]
directory = "https://127.0.0.1:14700/dir"
contact = ["mailto:ops@example.com"]
domains = ["live.amslb.test"]
challenge = "tls-alpn-01"
ca_file = "/etc/amslb/acme-ca.pem"
"#;

    fn parse(text: &str) -> TlsConfig {
        toml::from_str::<Wrapper>(text).unwrap().tls
    }

    /// One listener of each kind an ACME challenge may need.
    fn listeners() -> Vec<ListenerConfig> {
        #[derive(Deserialize)]
        struct L {
            listener: Vec<ListenerConfig>,
        }
        let text = r#"
[[listener]]
name = "http"
bind = ["127.0.0.1:80"]
protocol = "http"
[[listener]]
name = "https"
bind = ["127.0.0.1:443"]
protocol = "https"
"#;
        toml::from_str::<L>(text).unwrap().listener
    }

    #[test]
    fn accepts_the_documented_example() {
        let tls = parse(ISSUE_EXAMPLE);
        assert_eq!(tls.certs_dir, PathBuf::from("/var/lib/amslb/certs"));
        let acme = tls.acme.as_ref().unwrap();
        assert_eq!(acme.directory, "https://127.0.0.1:14700/dir");
        assert_eq!(acme.contact, ["mailto:ops@example.com"]);
        assert_eq!(acme.domains, ["live.amslb.test"]);
        assert_eq!(acme.challenge, ChallengeKind::TlsAlpn01);
        assert_eq!(
            acme.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/amslb/acme-ca.pem"))
        );
        assert!((acme.renew_at - 2.0 / 3.0).abs() < 1e-9);
        tls.validate(&listeners(), false).unwrap();
    }

    #[test]
    fn defaults_without_table() {
        let tls = TlsConfig::default();
        assert_eq!(tls.certs_dir, PathBuf::from("certs"));
        assert_eq!(tls.watch_interval, Duration::from_secs(10));
        assert!(tls.acme.is_none());
        tls.validate(&listeners(), false).unwrap();
    }

    #[test]
    fn http01_and_renew_settings_parse() {
        let text = ISSUE_EXAMPLE.replace("tls-alpn-01", "http-01")
            + "renew_at = 0.5\nrenew_jitter = 0.1\nretry_min = \"1s\"\nretry_max = \"10s\"\nlock_lease = \"30s\"\n";
        let tls = parse(&text);
        let acme = tls.acme.as_ref().unwrap();
        assert_eq!(acme.challenge, ChallengeKind::Http01);
        assert_eq!(acme.retry_min, Duration::from_secs(1));
        assert_eq!(acme.lock_lease, Duration::from_secs(30));
        tls.validate(&listeners(), false).unwrap();
    }

    #[test]
    fn unknown_key_and_challenge_are_refused() {
        let text = ISSUE_EXAMPLE.replace("ca_file", "cafile");
        assert!(toml::from_str::<Wrapper>(&text).is_err());
        let text = ISSUE_EXAMPLE.replace("tls-alpn-01", "dns-01");
        assert!(toml::from_str::<Wrapper>(&text).is_err());
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                "domains = [\"live.amslb.test\"]",
                "domains = []",
                "tls.acme.domains",
            ),
            (
                "domains = [\"live.amslb.test\"]",
                "domains = [\"*.amslb.test\"]",
                "tls.acme.domains[0]",
            ),
            (
                "\"mailto:ops@example.com\"",
                "\"ops@example.com\"",
                "tls.acme.contact[0]",
            ),
            (
                "https://127.0.0.1:14700/dir",
                "ftp://x",
                "tls.acme.directory",
            ),
        ];
        for (from, to, key) in cases {
            let tls = parse(&ISSUE_EXAMPLE.replace(from, to));
            assert_eq!(
                tls.validate(&listeners(), false).unwrap_err().0,
                key,
                "{to}"
            );
        }
        let tls = parse(&(ISSUE_EXAMPLE.to_string() + "renew_at = 1.5\n"));
        assert_eq!(
            tls.validate(&listeners(), false).unwrap_err().0,
            "tls.acme.renew_at"
        );
    }

    #[test]
    fn challenge_needs_its_listener() {
        let tls = parse(ISSUE_EXAMPLE);
        let only_http: Vec<_> = listeners()
            .into_iter()
            .filter(|l| l.name == "http")
            .collect();
        let (key, reason) = tls.validate(&only_http, false).unwrap_err();
        assert_eq!(key, "tls.acme.challenge");
        assert!(reason.contains("\"https\""), "{reason}");
        let tls = parse(&ISSUE_EXAMPLE.replace("tls-alpn-01", "http-01"));
        let only_https: Vec<_> = listeners()
            .into_iter()
            .filter(|l| l.name == "https")
            .collect();
        assert_eq!(
            tls.validate(&only_https, false).unwrap_err().0,
            "tls.acme.challenge"
        );
    }

    #[test]
    fn shared_storage_needs_a_readable_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let with_key = |path: &std::path::Path| {
            parse(&format!(
                "{ISSUE_EXAMPLE}storage_key_file = {:?}\n",
                path.display().to_string()
            ))
        };
        // [state] without a key file: refused, saying how to make one.
        let (key, reason) = parse(ISSUE_EXAMPLE)
            .validate(&listeners(), true)
            .unwrap_err();
        assert_eq!(key, "tls.acme.storage_key_file");
        assert!(reason.contains("openssl rand -hex 32"), "{reason}");
        // Missing file: the reason names it.
        let missing = tmp.path().join("missing.key");
        let (key, reason) = with_key(&missing).validate(&listeners(), true).unwrap_err();
        assert_eq!(key, "tls.acme.storage_key_file");
        assert!(
            reason.contains("missing.key") && reason.contains("cannot read"),
            "{reason}"
        );
        // Too short, or not hex.
        let bad = tmp.path().join("bad.key");
        for text in ["abcd\n", &"zz".repeat(32)] {
            std::fs::write(&bad, text).unwrap();
            let (_, reason) = with_key(&bad).validate(&listeners(), true).unwrap_err();
            assert!(reason.contains("64 hex digits"), "{reason}");
        }
        let good = tmp.path().join("good.key");
        std::fs::write(&good, format!("{}\n", "0f".repeat(32))).unwrap();
        with_key(&good).validate(&listeners(), true).unwrap();
        assert_eq!(read_storage_key(&good).unwrap(), [0x0f; STORAGE_KEY_LEN]);
        // A key file without [state] is a mistake worth naming.
        assert_eq!(
            with_key(&good).validate(&listeners(), false).unwrap_err().0,
            "tls.acme.storage_key_file"
        );
    }
}
