//! Host → group (`host_groups` of a listener).

use crate::config::rules::HostPattern;
use std::collections::BTreeMap;

/// The group `host` (normalized: lower case, no port) is mapped to: an exact
/// entry first, else the wildcard with the longest suffix.
pub fn group_for_host<'a>(map: &'a BTreeMap<String, String>, host: &str) -> Option<&'a str> {
    if map.is_empty() {
        return None;
    }
    if let Some(group) = map.get(host) {
        return Some(group);
    }
    map.iter()
        .filter_map(|(pattern, group)| {
            let pattern = HostPattern::parse(pattern).ok()?;
            (matches!(pattern, HostPattern::Suffix(_)) && pattern.matches(host))
                .then(|| (pattern.specificity(), group.as_str()))
        })
        .max_by_key(|(specificity, _)| *specificity)
        .map(|(_, group)| group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_wildcard_and_longest_wildcard_wins() {
        let map: BTreeMap<String, String> = [
            ("origin.example.test", "origin"),
            ("*.example.test", "wide"),
            ("*.edge.example.test", "edge"),
            ("special.edge.example.test", "special"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(group_for_host(&map, "origin.example.test"), Some("origin"));
        assert_eq!(group_for_host(&map, "a.edge.example.test"), Some("edge"));
        assert_eq!(
            group_for_host(&map, "special.edge.example.test"),
            Some("special")
        );
        assert_eq!(group_for_host(&map, "edge.example.test"), Some("wide"));
        assert_eq!(group_for_host(&map, "example.test"), None);
        assert_eq!(group_for_host(&map, "other.test"), None);
    }
}
