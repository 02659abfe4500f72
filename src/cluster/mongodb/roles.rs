//! Which group a node found in MongoDB serves. AMS does not store the role, so
//! deployments separate origins and edges by subnet, by host name (nodes that
//! register `AMS_HOST_ADDRESS`) or by document id; `[[cluster.node]]` entries
//! pin single addresses. A pure function of the config and the node.

use crate::cluster::NodeSpec;
use crate::config::ClusterConfig;
use crate::config::mongo::RoleConfig;
use std::net::IpAddr;

/// The address → group rules of one config.
#[derive(Debug, Clone)]
pub struct RoleMap {
    /// `[[cluster.node]]` entries as specs: they win over the CIDR rules.
    pinned: Vec<NodeSpec>,
    roles: Vec<RoleConfig>,
    default_group: Option<String>,
    http_port: u16,
    rtmp_port: u16,
    srt_port: u16,
}

impl RoleMap {
    /// Builds the rules from `[cluster]`.
    pub fn new(cluster: &ClusterConfig) -> Self {
        Self {
            pinned: crate::cluster::static_source::specs(cluster),
            roles: cluster.roles.clone(),
            default_group: cluster.default_group.clone(),
            http_port: cluster.http_port,
            rtmp_port: cluster.rtmp_port,
            srt_port: cluster.srt_port,
        }
    }

    /// The spec of the node with document id `id` at `addr`, or `None` when no
    /// rule covers the address (the caller warns once). A pinned entry keeps its
    /// own id, so a node seeded from the config keeps its state when MongoDB
    /// reports it.
    /// `host` is the name the node registered, when it registered one (`addr`
    /// is then what the name resolved to).
    pub fn spec_for(&self, id: &str, host: Option<&str>, addr: IpAddr) -> Option<NodeSpec> {
        if let Some(pinned) = self.pinned.iter().find(|p| p.addr == addr) {
            return Some(pinned.clone());
        }
        let role = self.roles.iter().find(|r| matches(r, id, host, addr));
        let group = role.map(|r| &r.group).or(self.default_group.as_ref())?;
        Some(NodeSpec {
            id: id.to_string(),
            group: group.clone(),
            addr,
            http_port: self.http_port,
            rtmp_port: self.rtmp_port,
            srt_port: self.srt_port,
            drain: false,
            region: role.and_then(|r| r.region.clone()),
        })
    }
}

/// Whether `role` maps the node: every key the rule gives must match.
fn matches(role: &RoleConfig, id: &str, host: Option<&str>, addr: IpAddr) -> bool {
    role.cidr.is_none_or(|net| net.contains(&addr))
        && role.host.as_deref().is_none_or(|p| {
            host.is_some_and(|h| glob(&p.to_ascii_lowercase(), &h.to_ascii_lowercase()))
        })
        && role.id.as_deref().is_none_or(|p| glob(p, id))
}

/// Shell-style match of `text` against `pattern`: `*` is any run of
/// characters (also none), `?` exactly one. Linear in practice: on a mismatch
/// it goes back only to the last `*`.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::mongo::fixtures;

    /// The documented roles, then a wider edge block, IPv6, and one pinned address.
    fn cluster(keys: &str) -> ClusterConfig {
        fixtures::cluster(
            &format!("http_port = 5081\n{keys}"),
            r#"
[[cluster.role]]
cidr = "127.0.0.0/16"
group = "edge"
region = "eu"
[[cluster.role]]
cidr = "fd00::/8"
group = "edge"
[[cluster.node]]
id = "pinned"
address = "127.0.5.9"
group = "edge"
rtmp_port = 1936
"#,
        )
    }

    fn group(map: &RoleMap, ip: &str) -> Option<String> {
        map.spec_for("doc", None, ip.parse().unwrap())
            .map(|s| s.group)
    }

    #[test]
    fn globs() {
        for (pattern, text, expected) in [
            ("*.origin.internal", "ams-1.origin.internal", true),
            ("*.origin.internal", "origin.internal", false),
            ("*.origin.internal", "ams-1.edge.internal", false),
            ("origin-*", "origin-", true),
            ("origin-?", "origin-12", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**x", "yx", true),
            ("exact", "exact", true),
        ] {
            assert_eq!(glob(pattern, text), expected, "{pattern} {text}");
        }
    }

    #[test]
    fn host_and_id_rules_match_with_or_without_a_cidr() {
        let map = RoleMap::new(&fixtures::cluster(
            "",
            r#"
[[cluster.role]]
host = "*.EDGE.internal"
group = "edge"
[[cluster.role]]
id = "origin-*"
cidr = "203.0.113.0/24"
group = "origin"
[[cluster.role]]
id = "edge-*"
group = "edge"
"#,
        ));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let g = |id, host, addr| map.spec_for(id, host, ip(addr)).map(|s| s.group);
        // the CIDR roles of the example config come first
        assert_eq!(
            g("x", Some("a.edge.internal"), "127.0.5.1").as_deref(),
            Some("origin")
        );
        assert_eq!(
            g("x", Some("a.edge.internal"), "10.9.9.9").as_deref(),
            Some("edge")
        );
        assert_eq!(
            g("x", None, "10.9.9.9"),
            None,
            "a host rule needs a host name"
        );
        assert_eq!(
            g("origin-3", None, "203.0.113.7").as_deref(),
            Some("origin")
        );
        assert_eq!(
            g("origin-3", None, "198.51.100.7"),
            None,
            "id and cidr both must match"
        );
        assert_eq!(g("edge-9", None, "198.51.100.7").as_deref(), Some("edge"));
    }

    #[test]
    fn first_matching_cidr_wins() {
        let map = RoleMap::new(&cluster(""));
        assert_eq!(group(&map, "127.0.5.5").as_deref(), Some("origin"));
        assert_eq!(group(&map, "127.0.7.5").as_deref(), Some("edge"));
        assert_eq!(group(&map, "fd00::5").as_deref(), Some("edge"));
        let spec = map
            .spec_for("doc-7", None, "127.0.5.5".parse().unwrap())
            .unwrap();
        assert_eq!(spec.id, "doc-7");
        assert_eq!((spec.http_port, spec.rtmp_port), (5081, 1935));
    }

    #[test]
    fn unmatched_goes_to_default_group_or_nowhere() {
        assert_eq!(group(&RoleMap::new(&cluster("")), "10.0.0.1"), None);
        let map = RoleMap::new(&cluster("default_group = \"origin\""));
        assert_eq!(group(&map, "10.0.0.1").as_deref(), Some("origin"));
    }

    #[test]
    fn pinned_address_overrides_rules() {
        let map = RoleMap::new(&cluster(""));
        let spec = map
            .spec_for("doc", None, "127.0.5.9".parse().unwrap())
            .unwrap();
        assert_eq!(spec.id, "pinned");
        assert_eq!(spec.group, "edge");
        assert_eq!((spec.http_port, spec.rtmp_port), (5081, 1936));
    }

    #[test]
    fn region_comes_from_the_matching_rule() {
        let map = RoleMap::new(&cluster("default_group = \"origin\""));
        let region = |ip: &str| {
            map.spec_for("doc", None, ip.parse().unwrap())
                .unwrap()
                .region
        };
        assert_eq!(region("127.0.7.5").as_deref(), Some("eu"));
        assert_eq!(region("fd00::5"), None);
        assert_eq!(
            region("10.0.0.1"),
            None,
            "default-group nodes have no region"
        );
    }
}
