//! The `[cluster]` keys of the MongoDB membership source (`source = "mongodb"`):
//! types, defaults and the validation that serde cannot do.
//!
//! The keys themselves live in [`ClusterConfig`] because the documented config puts
//! them straight under `[cluster]`, and `deny_unknown_fields` rules out
//! flattening a sub-struct into it.

use super::{ClusterConfig, ClusterSource};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// A MongoDB connection string. It usually carries a password, so `Debug`
/// hides it: a config dumped into a log must not leak the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct MongoUri(String);

impl MongoUri {
    /// The connection string, for the driver only; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MongoUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MongoUri(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for MongoUri {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let text = String::deserialize(de)?;
        if !(text.starts_with("mongodb://") || text.starts_with("mongodb+srv://")) {
            // No echo of the value: it may hold a password.
            return Err(serde::de::Error::custom(
                "must be a MongoDB connection string starting with mongodb:// or mongodb+srv://",
            ));
        }
        Ok(Self(text))
    }
}

/// `[[cluster.role]]`: nodes that match every key given (`cidr`, `host`, `id`;
/// at least one) belong to `group`. Rules are tried in order and the first
/// match wins, like firewall rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Address block, e.g. `"172.31.1.0/24"` (AMS deployments put origins and
    /// edges in separate subnets). A node registered by host name matches by
    /// the address the name resolves to.
    #[serde(default)]
    pub cidr: Option<IpNet>,
    /// Host-name pattern (`*` any run of characters, `?` one; no case), for
    /// nodes that register a name (`AMS_HOST_ADDRESS`), e.g. `"*.origin.internal"`.
    #[serde(default)]
    pub host: Option<String>,
    /// Pattern of the registry document's `_id`, e.g. `"origin-*"`, for
    /// deployments whose addresses say nothing (public IPs with `useGlobalIp`).
    #[serde(default)]
    pub id: Option<String>,
    /// Group of the nodes in that block.
    pub group: String,
    /// Region of the nodes in that block (global clusters: one subnet per region).
    #[serde(default)]
    pub region: Option<String>,
}

/// Default `[cluster] database`: where AMS keeps its node registry.
pub fn default_database() -> String {
    "clusterdb".into()
}

/// Default `[cluster] collection`: AMS's node registry.
pub fn default_collection() -> String {
    "clusternode".into()
}

/// Default `[cluster] stale_after`: AMS itself calls a node dead after 20 s.
pub fn default_stale_after() -> Duration {
    Duration::from_secs(20)
}

/// Default `[cluster] poll_interval` when change streams are unavailable.
pub fn default_poll_interval() -> Duration {
    Duration::from_secs(2)
}

/// Default `[cluster] load_threshold`: AMS refuses new work from 75 % cpu or memory.
pub fn default_load_threshold() -> f32 {
    75.0
}

/// Checks the MongoDB keys of `[cluster]`. `groups` are the names defined by
/// `[[group]]`. Returns the key and reason of the first error; adds warnings
/// for settings that have no effect.
pub fn validate(
    cluster: &ClusterConfig,
    groups: &HashSet<&str>,
    warnings: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let unknown = |key: String, group: &str| {
        Err((
            key,
            format!("unknown group {group:?}; define it with [[group]] name = {group:?}"),
        ))
    };
    if cluster.source != ClusterSource::Mongodb {
        if cluster.uri.is_some() || !cluster.roles.is_empty() || cluster.default_group.is_some() {
            warnings.push(
                "[cluster] uri, role and default_group are only used with source = \"mongodb\""
                    .into(),
            );
        }
        return Ok(());
    }
    if cluster.uri.is_none() {
        return Err((
            "cluster.uri".into(),
            "required with source = \"mongodb\", e.g. uri = \"mongodb://10.0.0.5:27017\"".into(),
        ));
    }
    for (key, value) in [
        ("cluster.database", &cluster.database),
        ("cluster.collection", &cluster.collection),
    ] {
        if value.is_empty() {
            return Err((key.into(), "must not be empty".into()));
        }
    }
    for (key, value) in [
        ("cluster.stale_after", cluster.stale_after),
        ("cluster.poll_interval", cluster.poll_interval),
    ] {
        if value.is_zero() {
            return Err((key.into(), "must be longer than zero".into()));
        }
    }
    if !(cluster.load_threshold.is_finite() && cluster.load_threshold > 0.0) {
        return Err((
            "cluster.load_threshold".into(),
            "must be a percentage above 0 (AMS refuses work from 75)".into(),
        ));
    }
    for (i, role) in cluster.roles.iter().enumerate() {
        if !groups.contains(role.group.as_str()) {
            return unknown(format!("cluster.role[{i}].group"), &role.group);
        }
        if role.cidr.is_none() && role.host.is_none() && role.id.is_none() {
            return Err((
                format!("cluster.role[{i}]"),
                "needs `cidr`, `host` or `id` to say which nodes it maps".into(),
            ));
        }
        for (key, pattern) in [("host", &role.host), ("id", &role.id)] {
            if pattern.as_deref().is_some_and(str::is_empty) {
                return Err((
                    format!("cluster.role[{i}].{key}"),
                    "must not be empty (use \"*\" to match everything)".into(),
                ));
            }
        }
    }
    if let Some(group) = &cluster.default_group
        && !groups.contains(group.as_str())
    {
        return unknown("cluster.default_group".into(), group);
    }
    if cluster.roles.is_empty() && cluster.default_group.is_none() && cluster.nodes.is_empty() {
        warnings.push(
            "[cluster] source = \"mongodb\" has no [[cluster.role]], [[cluster.node]] or default_group: every node will be ignored"
                .into(),
        );
    }
    for group in groups {
        let fed = cluster.roles.iter().any(|r| r.group == *group)
            || cluster.nodes.iter().any(|n| n.group == *group)
            || cluster.default_group.as_deref() == Some(*group);
        if !fed {
            warnings.push(format!(
                "group {group:?} gets no node: no [[cluster.role]], [[cluster.node]] or default_group names it"
            ));
        }
    }
    Ok(())
}

/// Config texts shared by the MongoDB source's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::config::{ClusterConfig, ConfigError, Loaded, parse_str};
    use std::path::Path;

    /// Listeners and groups; the `[cluster]` part comes from [`ISSUE_CLUSTER`].
    pub const BASE: &str = r#"
[[listener]]
name = "http"
bind = ["127.0.0.1:18080"]
protocol = "http"
default_group = "origin"

[[group]]
name = "origin"

[[group]]
name = "edge"
backup = "origin"
"#;

    /// The README's `[cluster]` example, which must be accepted exactly as written.
    pub const ISSUE_CLUSTER: &str = r#"
[cluster]
source = "mongodb"
uri = "mongodb://127.0.0.1:27217/?directConnection=true"
stale_after = "20s"
poll_interval = "2s"

[[cluster.role]]
cidr = "127.0.5.0/24"
group = "origin"

[[cluster.role]]
cidr = "127.0.6.0/24"
group = "edge"
"#;

    /// Parses [`BASE`] followed by `cluster`.
    pub fn parse(cluster: &str) -> Result<Loaded, ConfigError> {
        parse_str(&format!("{BASE}{cluster}"), Path::new("lb.toml"))
    }

    /// That `[cluster]` with `keys` added to the table and `tables`
    /// (more `[[cluster.role]]`, `[[cluster.node]]`) after its two roles.
    pub fn cluster(keys: &str, tables: &str) -> ClusterConfig {
        let text = ISSUE_CLUSTER.replace(
            "poll_interval = \"2s\"",
            &format!("poll_interval = \"2s\"\n{keys}"),
        );
        parse(&format!("{text}{tables}")).unwrap().config.cluster
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{ISSUE_CLUSTER, parse};
    use crate::config::ClusterSource;
    use std::time::Duration;

    #[test]
    fn accepts_the_documented_example() {
        let loaded = parse(ISSUE_CLUSTER).expect("documented example must parse");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = &loaded.config.cluster;
        assert_eq!(c.source, ClusterSource::Mongodb);
        assert_eq!(
            c.uri.as_ref().unwrap().expose(),
            "mongodb://127.0.0.1:27217/?directConnection=true"
        );
        assert_eq!(c.database, "clusterdb");
        assert_eq!(c.collection, "clusternode");
        assert_eq!(c.stale_after, Duration::from_secs(20));
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.load_threshold, 75.0);
        assert_eq!(c.default_group, None);
        assert_eq!(c.roles.len(), 2);
        assert_eq!(c.roles[1].cidr.unwrap().to_string(), "127.0.6.0/24");
        assert_eq!(c.roles[1].group, "edge");
    }

    #[test]
    fn shipped_mongodb_config_is_valid() {
        let text = include_str!("../../conf/lb-mongodb.toml");
        let loaded = crate::config::parse_str(text, std::path::Path::new("lb-mongodb.toml"))
            .expect("conf/lb-mongodb.toml must be valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = &loaded.config.cluster;
        assert_eq!(c.source, ClusterSource::Mongodb);
        assert_eq!((c.roles.len(), c.nodes.len()), (2, 1));
    }

    #[test]
    fn uri_is_required_with_mongodb() {
        let text = ISSUE_CLUSTER.replace(
            "uri = \"mongodb://127.0.0.1:27217/?directConnection=true\"",
            "",
        );
        assert_eq!(parse(&text).unwrap_err().key, "cluster.uri");
    }

    #[test]
    fn uri_is_never_echoed() {
        let text = ISSUE_CLUSTER.replace(
            "mongodb://127.0.0.1:27217",
            "http://admin:s3cret@127.0.0.1:27217",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "cluster.uri");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let loaded = parse(&ISSUE_CLUSTER.replace("127.0.0.1:27217", "u:s3cret@h:1")).unwrap();
        assert!(!format!("{:?}", loaded.config).contains("s3cret"));
    }

    #[test]
    fn bad_cidr_names_key_and_line() {
        let text = ISSUE_CLUSTER.replace("127.0.6.0/24", "127.0.6.0/33");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "cluster.role[1].cidr", "{err}");
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn a_role_says_which_nodes_it_maps() {
        let text = ISSUE_CLUSTER.replace("cidr = \"127.0.6.0/24\"\n", "");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "cluster.role[1]", "{err}");
        assert!(err.reason.contains("`cidr`, `host` or `id`"), "{err}");
        let text = ISSUE_CLUSTER.replace("cidr = \"127.0.6.0/24\"", "host = \"\"");
        assert_eq!(parse(&text).unwrap_err().key, "cluster.role[1].host");
        let text = ISSUE_CLUSTER.replace("cidr = \"127.0.6.0/24\"", "id = \"edge-*\"");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn role_and_default_group_must_exist() {
        let text = ISSUE_CLUSTER.replace("group = \"edge\"", "group = \"edges\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "cluster.role[1].group");
        assert!(err.reason.contains("unknown group \"edges\""), "{err}");
        let text = ISSUE_CLUSTER.replace(
            "poll_interval = \"2s\"",
            "poll_interval = \"2s\"\ndefault_group = \"spare\"",
        );
        assert_eq!(parse(&text).unwrap_err().key, "cluster.default_group");
    }

    #[test]
    fn durations_and_threshold_are_checked() {
        let text = ISSUE_CLUSTER.replace("stale_after = \"20s\"", "stale_after = \"0s\"");
        assert_eq!(parse(&text).unwrap_err().key, "cluster.stale_after");
        let text = ISSUE_CLUSTER.replace(
            "poll_interval = \"2s\"",
            "poll_interval = \"2s\"\nload_threshold = 0",
        );
        assert_eq!(parse(&text).unwrap_err().key, "cluster.load_threshold");
    }

    #[test]
    fn unfed_group_and_unused_keys_warn() {
        let text = ISSUE_CLUSTER.replace("group = \"edge\"", "group = \"origin\"");
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("\"edge\""));

        let text = ISSUE_CLUSTER.replace("source = \"mongodb\"", "source = \"static\"");
        let loaded = parse(&text).unwrap();
        assert!(
            loaded.warnings.iter().any(|w| w.contains("only used with")),
            "{:?}",
            loaded.warnings
        );
    }
}
