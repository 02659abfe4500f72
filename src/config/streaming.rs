//! Defaults and checks for the streaming keys: `load_factor` on groups,
//! `sniff_websocket`/`sniff_timeout`/`assign_api` on listeners, regions in
//! `[global]` and on nodes.

use super::{Config, Protocol};
use std::collections::HashSet;
use std::time::Duration;

/// Default stream-hash load bound: 25 % over the mean, the paper's usual choice
/// between few moved streams and even load.
pub fn default_load_factor() -> f64 {
    1.25
}

/// Default wait for a sniffed WebSocket's deciding command. AMS clients send
/// their first command right after the socket opens, so 5 s is generous.
pub fn default_sniff_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Checks the streaming keys; returns warnings, or the key and reason of the first error.
pub fn validate(config: &Config) -> Result<Vec<String>, (String, String)> {
    let mut warnings = Vec::new();
    for (i, group) in config.groups.iter().enumerate() {
        if !group.load_factor.is_finite() || group.load_factor < 1.0 {
            return Err((
                format!("group[{i}].load_factor"),
                "must be a number of at least 1.0 (1.25 allows 25 % over the mean load)".into(),
            ));
        }
    }
    for (i, listener) in config.listeners.iter().enumerate() {
        let http = listener.protocol == Protocol::Http || listener.protocol == Protocol::Https;
        if (listener.sniff_websocket || listener.assign_api) && !http {
            return Err((
                format!("listener[{i}]"),
                "sniff_websocket and assign_api only apply to http and https listeners".into(),
            ));
        }
        if listener.sniff_websocket && listener.sniff_timeout.is_zero() {
            return Err((
                format!("listener[{i}].sniff_timeout"),
                "must be more than 0".into(),
            ));
        }
    }
    let global = &config.global;
    let named = global.region.iter().chain(global.region_preference.iter());
    let mut seen = HashSet::new();
    for (j, region) in global.region_preference.iter().enumerate() {
        if !seen.insert(region) {
            return Err((
                format!("global.region_preference[{j}]"),
                format!("region {region:?} is listed twice"),
            ));
        }
    }
    if named.clone().any(String::is_empty) {
        return Err((
            "global.region".into(),
            "region names must not be empty".into(),
        ));
    }
    if let Some(name) = &global.region_header
        && http::HeaderName::from_bytes(name.as_bytes()).is_err()
    {
        return Err((
            "global.region_header".into(),
            format!("{name:?} is not a valid header name"),
        ));
    }
    let node_regions: HashSet<&str> = config
        .cluster
        .nodes
        .iter()
        .filter_map(|n| n.region.as_deref())
        .collect();
    for (i, node) in config.cluster.nodes.iter().enumerate() {
        if node.region.as_deref() == Some("") {
            return Err((
                format!("cluster.node[{i}].region"),
                "must not be empty".into(),
            ));
        }
    }
    if !config.cluster.nodes.is_empty() {
        for region in named {
            if !node_regions.contains(region.as_str()) {
                warnings.push(format!(
                    "region {region:?} has no [[cluster.node]] yet; its traffic goes to the next region"
                ));
            }
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use crate::config::{BalanceMode, parse_str};
    use std::path::Path;

    /// A complete `[streaming]` setup as an operator writes it, on top of the basic clusters.
    const STREAMING_EXAMPLE: &str = r#"
[[listener]]
name = "one-url"
bind = ["127.0.0.1:18701"]
protocol = "http"
default_group = "edge"
sniff_websocket = true

[[group]]
name = "edge"
balance = "stream-hash"

[cluster]
source = "static"

[[cluster.node]]
id = "edge-1"
address = "127.0.2.1"
group = "edge"
"#;

    #[test]
    fn accepts_the_streaming_example() {
        let loaded = parse_str(STREAMING_EXAMPLE, Path::new("lb.toml")).expect("must parse");
        let c = &loaded.config;
        assert!(c.listeners[0].sniff_websocket);
        assert_eq!(c.listeners[0].sniff_timeout.as_secs(), 5);
        assert!(!c.listeners[0].assign_api);
        assert_eq!(c.groups[0].balance, BalanceMode::StreamHash);
        assert_eq!(c.groups[0].load_factor, 1.25);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn accepts_regions_and_assign_api() {
        let text = STREAMING_EXAMPLE
            .replace(
                "sniff_websocket = true",
                "sniff_websocket = true\nsniff_timeout = \"2s\"\nassign_api = true",
            )
            .replace(
                "balance = \"stream-hash\"",
                "balance = \"stream-hash\"\nload_factor = 1.5",
            )
            .replace(
                "address = \"127.0.2.1\"\n",
                "address = \"127.0.2.1\"\nregion = \"eu\"\n",
            );
        let text = format!(
            "[global]\nregion = \"eu\"\nregion_preference = [\"eu\", \"us\"]\nregion_header = \"X-Region\"\n{text}"
        );
        let loaded = parse_str(&text, Path::new("lb.toml")).unwrap();
        let c = &loaded.config;
        assert_eq!(c.global.region.as_deref(), Some("eu"));
        assert_eq!(c.global.region_preference, ["eu", "us"]);
        assert_eq!(c.cluster.nodes[0].region.as_deref(), Some("eu"));
        assert_eq!(c.groups[0].load_factor, 1.5);
        assert_eq!(c.listeners[0].sniff_timeout.as_secs(), 2);
        assert!(c.listeners[0].assign_api);
        // "us" has no node: worth a warning, not an error.
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("\"us\""));
    }

    #[test]
    fn refuses_bad_streaming_values() {
        let cases = [
            (
                STREAMING_EXAMPLE.replace(
                    "balance = \"stream-hash\"",
                    "balance = \"stream-hash\"\nload_factor = 0.9",
                ),
                "group[0].load_factor",
            ),
            (
                STREAMING_EXAMPLE.replace(
                    "sniff_websocket = true",
                    "sniff_websocket = true\nsniff_timeout = \"0s\"",
                ),
                "listener[0].sniff_timeout",
            ),
            (
                format!("[global]\nregion_preference = [\"eu\", \"eu\"]\n{STREAMING_EXAMPLE}"),
                "global.region_preference[1]",
            ),
            (
                format!("[global]\nregion_header = \"bad header\"\n{STREAMING_EXAMPLE}"),
                "global.region_header",
            ),
        ];
        for (text, key) in cases {
            let err = parse_str(&text, Path::new("lb.toml")).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }
}
