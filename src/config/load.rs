//! Reading a config file into a [`Config`] and checking it as a whole.

use super::{ClusterSource, Config, Protocol, mongo};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A config that parsed and validated, with the warnings worth logging.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Non-fatal findings, e.g. a group that has no node yet.
    pub warnings: Vec<String>,
    /// The file's settings as written, for telling what a reload changes
    /// (see [`super::diff`]).
    pub settings: toml::Table,
}

/// Why a config was refused: always names the file, and the key where one is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// Dotted path of the offending key (`listener[1].bind[0]`), empty if the file as a whole is wrong.
    pub key: String,
    /// 1-based line, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        line: None,
        reason: format!("cannot read file: {e}"),
    })?;
    parse_str(&text, path)
}

/// Parses and validates config text; `file` is only used in error messages.
pub fn parse_str(text: &str, file: &Path) -> Result<Loaded, ConfigError> {
    let config = deserialize(text, file)?;
    // It parsed as a Config, so it parses as a table.
    let settings = text.parse::<toml::Table>().unwrap_or_default();
    let warnings = config.validate().map_err(|(key, reason)| ConfigError {
        file: file.to_path_buf(),
        key,
        line: None,
        reason,
    })?;
    Ok(Loaded {
        config,
        warnings,
        settings,
    })
}

fn deserialize(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let error = |key: String, err: toml::de::Error| ConfigError {
        file: file.to_path_buf(),
        key,
        line: err.span().map(|span| line_of(text, span.start)),
        reason: err.message().trim().to_string(),
    };
    let de = toml::Deserializer::parse(text).map_err(|e| error(String::new(), e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        // serde_path_to_error prints "." for the root; an empty key reads better.
        let key = if key == "." { String::new() } else { key };
        error(key, e.into_inner())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether two binds would fight over one socket: same transport and port, and
/// either the same address or one of them a wildcard.
fn binds_clash(a: (SocketAddr, bool), b: (SocketAddr, bool)) -> bool {
    let ((a, a_udp), (b, b_udp)) = (a, b);
    a_udp == b_udp
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl Config {
    /// Checks what serde cannot: names that must refer to each other, duplicates,
    /// impossible values. Returns warnings, or the key and reason of the first error.
    pub fn validate(&self) -> Result<Vec<String>, (String, String)> {
        let mut warnings = Vec::new();
        let fail = |key: String, reason: String| Err((key, reason));

        if self.global.max_connections == 0 {
            return fail("global.max_connections".into(), "must be at least 1".into());
        }
        if self.global.max_header_bytes < 1024 {
            return fail(
                "global.max_header_bytes".into(),
                "must be at least 1024 bytes".into(),
            );
        }
        // A zero limit would cut every connection at once (or, for the
        // client limit, make the HTTP/2 stream sweep spin).
        let t = &self.timeouts;
        for (name, limit) in [
            ("connect", t.connect),
            ("client", t.client),
            ("server", t.server),
            ("tunnel", t.tunnel),
        ] {
            if limit.is_zero() {
                return fail(format!("timeouts.{name}"), "must be more than 0".into());
            }
        }

        let mut group_names = HashSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            if group.name.is_empty() {
                return fail(format!("group[{i}].name"), "must not be empty".into());
            }
            if !group_names.insert(group.name.as_str()) {
                return fail(
                    format!("group[{i}].name"),
                    format!("group {:?} is defined twice", group.name),
                );
            }
        }
        for (i, group) in self.groups.iter().enumerate() {
            if let Some(backup) = &group.backup {
                if backup == &group.name {
                    return fail(
                        format!("group[{i}].backup"),
                        "a group cannot be its own backup".into(),
                    );
                }
                if !group_names.contains(backup.as_str()) {
                    return fail(
                        format!("group[{i}].backup"),
                        format!(
                            "unknown group {backup:?}; define it with [[group]] name = {backup:?}"
                        ),
                    );
                }
            }
        }

        let mut listener_names = HashSet::new();
        let mut binds: Vec<((SocketAddr, bool), String)> = Vec::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.name.is_empty() {
                return fail(format!("listener[{i}].name"), "must not be empty".into());
            }
            if !listener_names.insert(listener.name.as_str()) {
                return fail(
                    format!("listener[{i}].name"),
                    format!("listener {:?} is defined twice", listener.name),
                );
            }
            if listener.bind.is_empty() {
                return fail(
                    format!("listener[{i}].bind"),
                    "needs at least one address".into(),
                );
            }
            if !group_names.contains(listener.default_group.as_str()) {
                return fail(
                    format!("listener[{i}].default_group"),
                    format!(
                        "unknown group {:?}; define it with [[group]] name = {:?}",
                        listener.default_group, listener.default_group
                    ),
                );
            }
            if listener.redirect_https && listener.protocol != Protocol::Http {
                return fail(
                    format!("listener[{i}].redirect_https"),
                    "only applies to protocol = \"http\" listeners".into(),
                );
            }
            super::rules::validate_listener(self, i)?;
            let udp = listener.protocol == Protocol::Udp;
            for (j, addr) in listener.bind.iter().enumerate() {
                let key = format!("listener[{i}].bind[{j}]");
                if let Some((_, other)) = binds.iter().find(|(b, _)| binds_clash(*b, (*addr, udp)))
                {
                    return fail(key, format!("{addr} is already bound by {other}"));
                }
                binds.push(((*addr, udp), key));
            }
        }
        super::l4::validate(self)?;
        self.tls.validate(&self.listeners, self.state.is_some())?;
        if let Some(stats) = &self.stats {
            super::ops::validate_stats(stats)?;
            if let Some((_, other)) = binds
                .iter()
                .find(|(b, _)| binds_clash(*b, (stats.bind, false)))
            {
                return fail(
                    "stats.bind".into(),
                    format!("{} is already bound by {other}", stats.bind),
                );
            }
        }
        if let Some(log) = &self.access_log {
            super::ops::validate_access_log(log)?;
        }
        if self.listeners.is_empty() {
            warnings.push("no [[listener]] defined: amslb will accept no traffic".into());
        }

        let mut node_ids = HashSet::new();
        let mut per_group: HashMap<&str, usize> = HashMap::new();
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            if node.id.is_empty() {
                return fail(format!("cluster.node[{i}].id"), "must not be empty".into());
            }
            if !node_ids.insert(node.id.as_str()) {
                return fail(
                    format!("cluster.node[{i}].id"),
                    format!("node id {:?} is used twice", node.id),
                );
            }
            if !group_names.contains(node.group.as_str()) {
                return fail(
                    format!("cluster.node[{i}].group"),
                    format!(
                        "unknown group {:?}; define it with [[group]] name = {:?}",
                        node.group, node.group
                    ),
                );
            }
            *per_group.entry(node.group.as_str()).or_default() += 1;
        }
        mongo::validate(&self.cluster, &group_names, &mut warnings)?;
        if let Some(state) = &self.state {
            super::state::validate(state, &self.cluster)?;
        }
        super::sticky::validate(
            &self.sticky,
            (self.cluster.nodes.iter().enumerate())
                .filter_map(|(i, n)| Some((i, n.cookie.as_deref()?))),
        )?;
        warnings.extend(super::health::validate(&self.health)?);
        for group in &self.groups {
            // MongoDB fills groups at run time; its validation warns about unfed ones.
            if self.cluster.source == ClusterSource::Static
                && !per_group.contains_key(group.name.as_str())
            {
                warnings.push(format!(
                    "group {:?} has no node yet; its traffic goes to its backup or gets 503",
                    group.name
                ));
            }
        }
        warnings.extend(super::streaming::validate(self)?);
        warnings.extend(super::rules::validate(self)?);
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete origin/edge setup, which must be accepted exactly as written.
    pub(crate) const CORE_EXAMPLE: &str = r#"
[global]
max_connections = 20000
shutdown_grace = "30s"

[timeouts]
connect = "5s"
client = "30s"
server = "30s"
tunnel = "2h"

[[listener]]
name = "publish"
bind = ["127.0.0.1:18080"]
protocol = "http"
default_group = "origin"

[[listener]]
name = "play"
bind = ["127.0.0.1:18081"]
protocol = "http"
default_group = "edge"

[[group]]
name = "origin"
balance = "least-conn"

[[group]]
name = "edge"
balance = "round-robin"
backup = "origin"

[cluster]
source = "static"
http_port = 5080

[[cluster.node]]
id = "origin-1"
address = "127.0.1.1"
group = "origin"

[[cluster.node]]
id = "edge-1"
address = "127.0.2.1"
group = "edge"

[[cluster.node]]
id = "edge-2"
address = "127.0.2.2"
group = "edge"
"#;

    fn parse(text: &str) -> Result<Loaded, ConfigError> {
        parse_str(text, Path::new("lb.toml"))
    }

    #[test]
    fn accepts_the_core_example() {
        let loaded = parse(CORE_EXAMPLE).expect("core example must parse");
        let c = &loaded.config;
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].default_group, "edge");
        assert_eq!(c.timeouts.tunnel.as_secs(), 7200);
        assert_eq!(c.cluster.nodes.len(), 3);
        assert_eq!(c.cluster.rtmp_port, 1935);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = CORE_EXAMPLE.replace("shutdown_grace", "shutdown_grase");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "global.shutdown_grase");
        assert!(err.reason.contains("unknown field"), "{err}");
        assert_eq!(err.line, Some(4), "{err}");
        let shown = err.to_string();
        assert!(
            shown.starts_with("lb.toml:4: key `global.shutdown_grase`"),
            "{shown}"
        );
    }

    #[test]
    fn bad_address_names_key() {
        let text = CORE_EXAMPLE.replace("127.0.0.1:18081", "127.0.0.1:99999");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "listener[1].bind[0]", "{err}");
        assert!(err.line.is_some());
    }

    #[test]
    fn duplicate_bind_is_refused() {
        let text = CORE_EXAMPLE.replace("127.0.0.1:18081", "127.0.0.1:18080");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "listener[1].bind[0]");
        assert!(
            err.reason.contains("already bound by listener[0].bind[0]"),
            "{err}"
        );
    }

    #[test]
    fn wildcard_bind_clashes_with_specific_address() {
        let text = CORE_EXAMPLE.replace("127.0.0.1:18081", "0.0.0.0:18080");
        assert!(parse(&text).is_err());
    }

    #[test]
    fn unknown_group_in_listener_is_refused() {
        let text = CORE_EXAMPLE.replace("default_group = \"edge\"", "default_group = \"edges\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "listener[1].default_group");
        assert!(err.reason.contains("unknown group \"edges\""));
    }

    #[test]
    fn unknown_group_in_node_or_backup_is_refused() {
        let text = CORE_EXAMPLE.replacen("\ngroup = \"edge\"\n", "\ngroup = \"egde\"\n", 1);
        assert_eq!(parse(&text).unwrap_err().key, "cluster.node[1].group");
        let text = CORE_EXAMPLE.replace("backup = \"origin\"", "backup = \"orig\"");
        assert_eq!(parse(&text).unwrap_err().key, "group[1].backup");
    }

    #[test]
    fn empty_group_is_a_warning() {
        let text = format!("{CORE_EXAMPLE}\n[[group]]\nname = \"spare\"\n");
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("spare"));
    }

    #[test]
    fn bad_duration_names_key() {
        let text = CORE_EXAMPLE.replace("tunnel = \"2h\"", "tunnel = \"2 hours-ish\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "timeouts.tunnel");
        assert!(err.reason.contains("invalid duration"));
    }

    #[test]
    fn zero_timeouts_are_refused_naming_the_key() {
        for (name, value) in [
            ("connect", "5s"),
            ("client", "30s"),
            ("server", "30s"),
            ("tunnel", "2h"),
        ] {
            let line = format!("\n{name} = \"{value}\"\n");
            assert!(CORE_EXAMPLE.contains(&line));
            let text = CORE_EXAMPLE.replace(&line, &format!("\n{name} = \"0s\"\n"));
            let err = parse(&text).unwrap_err();
            assert_eq!(err.key, format!("timeouts.{name}"), "{text}");
            assert_eq!(err.reason, "must be more than 0");
        }
    }

    #[test]
    fn ipv6_binds_are_accepted() {
        let text = CORE_EXAMPLE.replace("\"127.0.0.1:18081\"", "\"[::1]:18081\"");
        let loaded = parse(&text).unwrap();
        assert!(loaded.config.listeners[1].bind[0].is_ipv6());
    }

    /// Issue 8's example on top of the core one, which must be accepted as written.
    #[test]
    fn accepts_the_tls_example() {
        let listener = r#"
[[listener]]
name = "https"
bind = ["127.0.0.1:18743"]
protocol = "https"
default_group = "origin"
"#;
        let text = format!(
            "{CORE_EXAMPLE}{listener}{}",
            crate::config::tls::tests::ISSUE_EXAMPLE
        );
        let loaded = parse(&text).expect("the TLS example must parse");
        assert_eq!(loaded.config.listeners[2].protocol, Protocol::Https);
        let acme = loaded.config.tls.acme.as_ref().unwrap();
        assert_eq!(acme.domains, ["live.amslb.test"]);
    }

    /// Issue 17's block on top of the core example, accepted as written.
    pub(crate) const EDGE_EXAMPLE: &str = r#"
[[listener]]
name = "web"
bind = ["127.0.0.1:18480"]
protocol = "http"
default_group = "origin"
host_groups = { "origin.example.test" = "origin", "edge.example.test" = "edge", "*.edge.example.test" = "edge" }
trusted_proxies = ["127.0.9.0/24"]

[[rule]]
name = "lock-rest"
path_prefix = ["/rest/", "/LiveApp/rest/"]
client_not_in = ["127.0.5.0/24"]
action = "deny"            # deny | allow | redirect
status = 403

[[limit]]
name = "conns-per-client"
max_connections = 50       # concurrent, per client address

[[limit]]
name = "publish-rate"
routes = ["whip", "websocket-publish", "rtmp-publish", "srt-publish"]
per_minute = 60            # new publish sessions per client address

[cluster.node_tls]         # optional: TLS to every node (or per [[group]])
ca_file = "/etc/amslb/nodes-ca.pem"
"#;

    #[test]
    fn accepts_the_edge_example() {
        let text = format!("{CORE_EXAMPLE}{EDGE_EXAMPLE}");
        let loaded = parse(&text).expect("the edge-policy example must parse");
        let c = &loaded.config;
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(c.listeners[2].host_groups.len(), 3);
        assert_eq!(c.rules[0].client_not_in.len(), 1);
        assert_eq!(c.limits[1].per_minute, Some(60));
        let tls = c.cluster.node_tls.as_ref().unwrap();
        assert!(tls.verify);
        assert_eq!(tls.https_port, 5443);
        assert_eq!(tls.rtmps_port, 8443);
    }

    #[test]
    fn edge_mistakes_name_their_key() {
        let base = format!("{CORE_EXAMPLE}{EDGE_EXAMPLE}");
        let cases = [
            (
                "\"edge.example.test\" = \"edge\"",
                "\"edge.example.test\" = \"egde\"",
                "listener[2].host_groups.edge.example.test",
            ),
            ("status = 403", "status = 200", "rule[0].status"),
            (
                "per_minute = 60",
                "per_minute = 60\nmax_connections = 3",
                "limit[1]",
            ),
            (
                "\"srt-publish\"]",
                "\"srt-publish\", \"hls\"]",
                "limit[1].routes[4]",
            ),
            (
                "ca_file = \"/etc/amslb/nodes-ca.pem\"",
                "ca_file = \"/etc/amslb/nodes-ca.pem\"\nrtmps_port = 0",
                "cluster.node_tls.rtmps_port",
            ),
        ];
        for (from, to, key) in cases {
            let text = base.replace(from, to);
            assert_eq!(parse(&text).unwrap_err().key, key, "{to}");
        }
        let text = base.replace(
            "client_not_in = [\"127.0.5.0/24\"]",
            "client_not_in = [\"127.0.5.0/33\"]",
        );
        assert_eq!(parse(&text).unwrap_err().key, "rule[0].client_not_in[0]");
    }

    #[test]
    fn unreachable_rule_is_a_warning() {
        let text = format!(
            "{CORE_EXAMPLE}{EDGE_EXAMPLE}\n[[rule]]\nname = \"late\"\npath_prefix = [\"/rest/v2/\"]\nclient_in = [\"10.0.0.0/8\"]\naction = \"deny\"\n"
        );
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[0].contains("rule[1] (late) can never match: lock-rest"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn duplicate_node_id_is_refused() {
        let text = CORE_EXAMPLE.replace("id = \"edge-2\"", "id = \"edge-1\"");
        assert_eq!(parse(&text).unwrap_err().key, "cluster.node[2].id");
    }
}
