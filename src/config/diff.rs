//! What a reload would change, setting by setting, and which of those changes
//! only a restart applies.
//!
//! The comparison runs on the files as written (TOML tables), not on the
//! parsed [`Config`](super::Config): every key a file may hold takes part
//! without a hand-kept list, and a setting is named as the operator wrote it
//! (`listener.rtmp.bind`, `group.origin.backup`). Arrays of tables whose
//! entries have a `name` (listeners, groups) or an `id` (cluster nodes) are
//! compared entry by entry under that key, so reordering them changes nothing.
//! Values are never printed: a setting may be a secret.

use std::collections::{BTreeMap, BTreeSet};
use toml::{Table, Value};

/// One setting that differs between two configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted setting name, e.g. `global.max_connections` or `listener.rtmp`
    /// (a whole listener added or removed).
    pub key: String,
    /// Why a reload cannot apply it, when it cannot; `None` means a reload applies it.
    pub restart: Option<&'static str>,
}

/// Settings that differ from `old` to `new`, sorted by name, each marked with
/// whether it needs a restart.
pub fn changes(old: &Table, new: &Table) -> Vec<Change> {
    let (old_flat, new_flat) = (flatten(old), flatten(new));
    let (old_items, new_items) = (items(&old_flat), items(&new_flat));
    let mut out: BTreeMap<String, Option<&'static str>> = BTreeMap::new();
    let keys: BTreeSet<&String> = old_flat.keys().chain(new_flat.keys()).collect();
    for key in keys {
        if old_flat.get(key) == new_flat.get(key) {
            continue;
        }
        // A keyed entry present on one side only is one change, named by its key.
        let item = item_of(key);
        let name = match item {
            Some(item) if !(old_items.contains(item) && new_items.contains(item)) => item,
            _ => key.as_str(),
        };
        let restart = restart_reason(name, &old_flat, &new_flat);
        out.entry(name.to_string()).or_insert(restart);
    }
    out.into_iter()
        .map(|(key, restart)| Change { key, restart })
        .collect()
}

/// The changes among `all` that only a restart applies.
pub fn pending_restart(all: &[Change]) -> Vec<&Change> {
    all.iter().filter(|c| c.restart.is_some()).collect()
}

/// Why a change of `key` needs a restart, if it does.
///
/// This is the one list of settings a running amslb cannot change; every
/// other setting is read per request or connection, or rebuilt on reload
/// (see `reload.rs`).
fn restart_reason(
    key: &str,
    old: &BTreeMap<String, Value>,
    new: &BTreeMap<String, Value>,
) -> Option<&'static str> {
    match key {
        "global.max_connections" => return Some("the connection slots are sized at start"),
        "global.workers" => return Some("serving threads start with the process"),
        k if k == "state" || k.starts_with("state.") => {
            return Some("the shared state ([state]) connects at start");
        }
        k if k.starts_with("cluster.node_tls")
            || (k.starts_with("group.") && k.contains(".node_tls")) =>
        {
            return Some("TLS to nodes is set up at start");
        }
        _ => {}
    }
    let rest = key.strip_prefix("listener.")?;
    let (name, field) = match rest.split_once('.') {
        Some((name, field)) => (name, Some(field)),
        None => (rest, None),
    };
    let protocol = |flat: &BTreeMap<String, Value>| {
        flat.get(&format!("listener.{name}.protocol"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (was, is) = (protocol(old), protocol(new));
    let l4 = |p: &Option<String>| matches!(p.as_deref(), Some("tcp" | "tls" | "udp"));
    if was.is_some() && is.is_some() && was != is {
        return Some("a listener's protocol is fixed while it runs");
    }
    if l4(&was) || l4(&is) {
        // Their relays read the live config per session (group, backup,
        // balance, timeouts, affinity, limits); their sockets and a `tls`
        // listener's own certificate are set up at start.
        return match field {
            None => Some("tcp/tls/udp listeners are bound at start"),
            Some("bind") => Some("tcp/tls/udp sockets are bound at start"),
            Some("cert" | "key") => Some("a tls listener's own certificate is loaded at start"),
            Some("backlog") => Some("the listen backlog is set when a socket is bound"),
            _ => None,
        };
    }
    match field {
        Some("backlog") if was.is_some() => {
            Some("the listen backlog is set when a socket is bound")
        }
        _ => None,
    }
}

/// Every leaf setting of `table` by dotted name.
fn flatten(table: &Table) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

fn walk(prefix: &str, table: &Table, out: &mut BTreeMap<String, Value>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Table(inner) => walk(&path, inner, out),
            Value::Array(entries) => match keyed(entries) {
                Some(keyed) => {
                    for (id, inner) in keyed {
                        // An entry with no other key still exists.
                        out.insert(format!("{path}.{id}"), Value::Boolean(true));
                        walk(&format!("{path}.{id}"), inner, out);
                    }
                }
                None => {
                    out.insert(path, value.clone());
                }
            },
            _ => {
                out.insert(path, value.clone());
            }
        }
    }
}

/// The entries of an array of tables by their `name` (or `id`), when every
/// entry has a distinct one.
fn keyed(entries: &[Value]) -> Option<Vec<(&str, &Table)>> {
    if entries.is_empty() {
        return None;
    }
    for field in ["name", "id"] {
        let found: Option<Vec<(&str, &Table)>> = entries
            .iter()
            .map(|e| {
                let table = e.as_table()?;
                Some((table.get(field)?.as_str()?, table))
            })
            .collect();
        if let Some(found) = found {
            let distinct: BTreeSet<&str> = found.iter().map(|(id, _)| *id).collect();
            // Ids with dots would make names ambiguous; compare such arrays whole.
            if distinct.len() == found.len() && distinct.iter().all(|id| !id.contains('.')) {
                return Some(found);
            }
        }
    }
    None
}

/// Keyed entries present in `flat` (`listener.rtmp`, `cluster.node.o1`).
fn items(flat: &BTreeMap<String, Value>) -> BTreeSet<&str> {
    flat.keys().filter_map(|k| item_of(k)).collect()
}

/// The keyed entry a setting belongs to, for the arrays of tables amslb configs have.
fn item_of(key: &str) -> Option<&str> {
    let depth = match key {
        k if k.starts_with("listener.") || k.starts_with("group.") => 2,
        k if k.starts_with("cluster.node.") => 3,
        _ => return None,
    };
    let end = key
        .match_indices('.')
        .nth(depth - 1)
        .map_or(key.len(), |(i, _)| i);
    (key[..end].matches('.').count() == depth - 1).then(|| &key[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    fn keys(old: &str, new: &str) -> Vec<(String, bool)> {
        changes(&table(old), &table(new))
            .into_iter()
            .map(|c| (c.key, c.restart.is_some()))
            .collect()
    }

    const BASE: &str = r#"
[global]
max_connections = 100
[[listener]]
name = "http"
bind = ["127.0.0.1:8080"]
protocol = "http"
[[listener]]
name = "rtmp"
bind = ["127.0.0.1:1935"]
protocol = "tcp"
[health]
interval = "2s"
[cluster]
[[cluster.node]]
id = "o1"
group = "origin"
address = "127.0.0.1"
"#;

    #[test]
    fn same_file_changes_nothing_and_order_does_not_matter() {
        assert!(keys(BASE, BASE).is_empty());
        let reordered = BASE.replace(
            "[[listener]]\nname = \"http\"\nbind = [\"127.0.0.1:8080\"]\nprotocol = \"http\"\n",
            "",
        ) + "[[listener]]\nname = \"http\"\nbind = [\"127.0.0.1:8080\"]\nprotocol = \"http\"\n";
        assert!(keys(BASE, &reordered).is_empty(), "{reordered}");
    }

    #[test]
    fn live_settings_are_named_and_need_no_restart() {
        let new = BASE
            .replace(
                "interval = \"2s\"",
                "interval = \"500ms\"\n[sticky]\nmode = \"insert\"",
            )
            .replace("address = \"127.0.0.1\"", "address = \"127.0.0.2\"");
        assert_eq!(
            keys(BASE, &new),
            [
                ("cluster.node.o1.address".to_string(), false),
                ("health.interval".to_string(), false),
                ("sticky.mode".to_string(), false),
            ]
        );
    }

    #[test]
    fn restart_settings_are_marked() {
        let new = BASE
            .replace("max_connections = 100", "max_connections = 200")
            .replace("127.0.0.1:1935", "127.0.0.1:1936")
            .replace("protocol = \"http\"", "protocol = \"http\"\nbacklog = 64")
            + "[[listener]]\nname = \"srt\"\nbind = [\"127.0.0.1:4200\"]\nprotocol = \"udp\"\n"
            + "[[listener]]\nname = \"web2\"\nbind = [\"127.0.0.1:8081\"]\nprotocol = \"http\"\n";
        assert_eq!(
            keys(BASE, &new),
            [
                ("global.max_connections".to_string(), true),
                ("listener.http.backlog".to_string(), true),
                ("listener.rtmp.bind".to_string(), true),
                ("listener.srt".to_string(), true),
                ("listener.web2".to_string(), false),
            ]
        );
    }

    #[test]
    fn l4_settings_apply_live_but_binds_and_own_certs_do_not() {
        let new = BASE.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\ndefault_group = \"edge\"\nrtmp_affinity = true",
        );
        assert_eq!(
            keys(BASE, &new),
            [
                ("listener.rtmp.default_group".to_string(), false),
                ("listener.rtmp.rtmp_affinity".to_string(), false),
            ]
        );
        let new = BASE.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ncert = \"a.pem\"");
        assert_eq!(keys(BASE, &new), [("listener.rtmp.cert".to_string(), true)]);
    }

    #[test]
    fn shared_state_and_node_tls_need_a_restart() {
        let new = BASE.to_string()
            + "[state]\ndatabase = \"lb\"\n"
            + "[cluster.node_tls]\nserver_name = \"nodes.internal\"\n";
        let changed = keys(BASE, &new);
        assert!(!changed.is_empty(), "{changed:?}");
        assert!(changed.iter().all(|(_, restart)| *restart), "{changed:?}");
        assert!(
            changed.iter().any(|(k, _)| k.starts_with("state")),
            "{changed:?}"
        );
        assert!(
            changed
                .iter()
                .any(|(k, _)| k.starts_with("cluster.node_tls")),
            "{changed:?}"
        );
    }

    #[test]
    fn protocol_change_needs_a_restart() {
        let new = BASE.replace("protocol = \"http\"", "protocol = \"https\"");
        assert_eq!(
            keys(BASE, &new),
            [("listener.http.protocol".to_string(), true)]
        );
    }
}
