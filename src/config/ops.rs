//! Operations tables of the config: `[stats]` (metrics, status page, admin API)
//! and `[access_log]`.

use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A value that must never reach a log: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// `[stats]`: the listener serving `/metrics`, the status page, its JSON API and
/// the admin actions. Absent table: no stats listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// Address of the stats listener.
    #[serde(default = "default_stats_bind")]
    pub bind: SocketAddr,
    /// Basic-auth user; with `password` or `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// Basic-auth password, inline.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the basic-auth password (trailing newline ignored), so the
    /// config itself can be world-readable.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Client networks allowed to reach the stats listener; empty: any address.
    #[serde(default)]
    pub allow: Vec<IpNet>,
}

fn default_stats_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6080))
}

/// Line format of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessLogFormat {
    /// Space-separated fields, one request per line (easy to grep).
    #[default]
    Text,
    /// One JSON object per line (easy to ship to a log store).
    Json,
}

/// `[access_log]`: one line per request or tunnel. Absent table: no access log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Line format.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// File to append to; absent: standard output.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Lines queued for the writer before new ones are dropped (and counted),
    /// so a slow disk never slows the data path.
    #[serde(default = "default_access_log_buffer")]
    pub buffer: usize,
}

fn default_access_log_buffer() -> usize {
    8192
}

/// Checks `[stats]`; returns the key and reason of the first error.
pub fn validate_stats(stats: &StatsConfig) -> Result<(), (String, String)> {
    let fail = |key: &str, reason: &str| Err((format!("stats.{key}"), reason.to_string()));
    match (&stats.user, &stats.password, &stats.password_file) {
        (Some(_), Some(_), Some(_)) => {
            return fail(
                "password_file",
                "set either password or password_file, not both",
            );
        }
        (Some(user), _, _) if user.is_empty() || user.contains(':') => {
            return fail("user", "must be non-empty and must not contain ':'");
        }
        (Some(_), None, None) => {
            return fail("user", "needs a password or a password_file");
        }
        (None, Some(_), _) | (None, _, Some(_)) => {
            return fail("password", "a password needs a user");
        }
        _ => {}
    }
    if let Some(Secret(password)) = &stats.password
        && password.is_empty()
    {
        return fail("password", "must not be empty");
    }
    if stats.user.is_none() && stats.allow.is_empty() && !stats.bind.ip().is_loopback() {
        return fail(
            "bind",
            "a stats listener on a non-loopback address needs user + password or an allow list",
        );
    }
    Ok(())
}

/// Checks `[access_log]`; returns the key and reason of the first error.
pub fn validate_access_log(log: &AccessLogConfig) -> Result<(), (String, String)> {
    if log.buffer == 0 {
        return Err(("access_log.buffer".into(), "must be at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(text: &str) -> StatsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_to_loopback_6080() {
        let s = stats("");
        assert_eq!(s.bind, "127.0.0.1:6080".parse().unwrap());
        assert!(validate_stats(&s).is_ok());
    }

    #[test]
    fn user_needs_exactly_one_password_source() {
        let s = stats("user = \"admin\"");
        assert_eq!(validate_stats(&s).unwrap_err().0, "stats.user");
        let s = stats("user = \"admin\"\npassword = \"x\"\npassword_file = \"/p\"");
        assert_eq!(validate_stats(&s).unwrap_err().0, "stats.password_file");
        let s = stats("password = \"x\"");
        assert_eq!(validate_stats(&s).unwrap_err().0, "stats.password");
        let s = stats("user = \"a:b\"\npassword = \"x\"");
        assert_eq!(validate_stats(&s).unwrap_err().0, "stats.user");
        assert!(validate_stats(&stats("user = \"admin\"\npassword = \"x\"")).is_ok());
    }

    #[test]
    fn public_bind_needs_auth_or_allow() {
        let s = stats("bind = \"0.0.0.0:6080\"");
        assert_eq!(validate_stats(&s).unwrap_err().0, "stats.bind");
        let s = stats("bind = \"0.0.0.0:6080\"\nallow = [\"10.0.0.0/8\"]");
        assert!(validate_stats(&s).is_ok());
    }

    #[test]
    fn password_never_appears_in_debug() {
        let s = stats("user = \"admin\"\npassword = \"hunter2\"");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    /// The config embedded in the Kubernetes ConfigMap must be one amslb accepts.
    #[test]
    fn kubernetes_configmap_config_is_valid() {
        let manifest = include_str!("../../deploy/k8s/amslb.yaml");
        let start = manifest.find("amslb.toml: |\n").expect("ConfigMap key") + 14;
        let toml: String = manifest[start..]
            .lines()
            .take_while(|l| !l.starts_with("---"))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let loaded = crate::config::parse_str(&toml, std::path::Path::new("amslb.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let stats = loaded.config.stats.expect("stats listener for the probes");
        assert_eq!(stats.bind.port(), 6080);
        assert!(stats.password_file.is_some());
    }

    #[test]
    fn access_log_defaults_and_formats() {
        let log: AccessLogConfig = toml::from_str("format = \"json\"").unwrap();
        assert_eq!(log.format, AccessLogFormat::Json);
        assert_eq!(log.buffer, 8192);
        assert!(toml::from_str::<AccessLogConfig>("format = \"xml\"").is_err());
        let log: AccessLogConfig = toml::from_str("buffer = 0").unwrap();
        assert!(validate_access_log(&log).is_err());
    }
}
