//! `amslb import haproxy|nginx FILE`: translates the balancer configs AMS
//! users run today (the HAProxy config of the AMS cluster guide, AMS's
//! official nginx config) into a commented `lb.toml`.
//!
//! Each translator reads the foreign file into a [`Draft`] (the tables of the
//! amslb config, with comments saying where each value came from) and a list
//! of [`Note`]s: the items that have no amslb equivalent or that amslb does
//! differently, each with the reason. The caller prints the TOML to stdout and
//! the notes to stderr, then checks the TOML like `amslb check`.
//!
//! This module only produces text: it depends on nothing else in the crate.

mod haproxy;
mod nginx;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;
use toml::Value;

pub use haproxy::haproxy;
pub use nginx::nginx;

/// An item of the source file that was not translated, or not exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// 1-based line in the source file.
    pub line: usize,
    /// The directive as written (shortened).
    pub item: String,
    /// Why it was left out, or what amslb does instead.
    pub why: String,
}

/// The result of an import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The amslb config, commented.
    pub toml: String,
    /// What could not be translated, in source order.
    pub notes: Vec<Note>,
}

/// One TOML table (`[global]`) or array-of-tables entry (`[[listener]]`).
#[derive(Debug, Clone)]
struct Section {
    header: String,
    comments: Vec<String>,
    entries: Vec<(String, Value, Option<String>)>,
}

impl Section {
    fn new(header: &str) -> Self {
        Self {
            header: header.to_string(),
            comments: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Adds a comment line above the table.
    fn comment(&mut self, text: impl Into<String>) {
        self.comments.push(text.into());
    }

    /// Sets `key` (replacing an earlier value), with an end-of-line comment.
    fn set(&mut self, key: &str, value: impl Into<Value>, comment: Option<String>) {
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _, _)| k == key) {
            Some(entry) => *entry = (key.to_string(), value, comment),
            None => self.entries.push((key.to_string(), value, comment)),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, _)| v)
    }

    fn render(&self, out: &mut String) {
        for comment in &self.comments {
            let _ = writeln!(out, "# {comment}");
        }
        let _ = writeln!(out, "{}", self.header);
        for (key, value, comment) in &self.entries {
            match comment {
                Some(c) => {
                    let _ = writeln!(out, "{key} = {value}  # {c}");
                }
                None => {
                    let _ = writeln!(out, "{key} = {value}");
                }
            }
        }
        out.push('\n');
    }
}

/// A node as both translators collect it.
#[derive(Debug, Clone)]
struct DraftNode {
    id: String,
    address: IpAddr,
    group: String,
    http_port: Option<u16>,
    rtmp_port: Option<u16>,
    srt_port: Option<u16>,
    cookie: Option<String>,
    source: String,
}

/// The amslb config being built, table by table.
#[derive(Debug, Clone)]
struct Draft {
    source: String,
    global: Section,
    timeouts: Section,
    listeners: Vec<Section>,
    groups: Vec<Section>,
    stats: Option<Section>,
    sticky: Option<Section>,
    health: Option<Section>,
    tls: Option<Section>,
    nodes: Vec<DraftNode>,
    notes: Vec<Note>,
}

impl Draft {
    fn new(source: &str) -> Self {
        Self {
            source: source.to_string(),
            global: Section::new("[global]"),
            timeouts: Section::new("[timeouts]"),
            listeners: Vec::new(),
            groups: Vec::new(),
            stats: None,
            sticky: None,
            health: None,
            tls: None,
            nodes: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn note(&mut self, line: usize, item: &str, why: impl Into<String>) {
        let mut item = item.split_whitespace().collect::<Vec<_>>().join(" ");
        if item.len() > 80 {
            let cut = (0..=77)
                .rev()
                .find(|&i| item.is_char_boundary(i))
                .unwrap_or(0);
            item.truncate(cut);
            item.push_str("...");
        }
        self.notes.push(Note {
            line,
            item,
            why: why.into(),
        });
    }

    /// Adds a group unless it exists; returns its index.
    fn group(&mut self, name: &str, comment: &str) -> usize {
        if let Some(i) = self
            .groups
            .iter()
            .position(|g| g.get("name").and_then(Value::as_str) == Some(name))
        {
            return i;
        }
        let mut group = Section::new("[[group]]");
        group.comment(comment);
        group.set("name", name, None);
        self.groups.push(group);
        self.groups.len() - 1
    }

    fn group_mut(&mut self, name: &str) -> Option<&mut Section> {
        self.groups
            .iter_mut()
            .find(|g| g.get("name").and_then(Value::as_str) == Some(name))
    }

    /// A listener name not used yet, from `base`.
    fn listener_name(&self, base: &str) -> String {
        let taken = |name: &str| {
            self.listeners
                .iter()
                .any(|l| l.get("name").and_then(Value::as_str) == Some(name))
        };
        if !taken(base) {
            return base.to_string();
        }
        (2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| base.to_string())
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Imported by `amslb import` from {}.\n# Check it with `amslb check --config FILE`; \
             what could not be translated was printed on stderr.\n",
            self.source
        );
        for section in [&self.global, &self.timeouts] {
            if !section.entries.is_empty() {
                section.render(&mut out);
            }
        }
        for section in self.listeners.iter().chain(&self.groups) {
            section.render(&mut out);
        }
        for section in [&self.stats, &self.sticky, &self.health, &self.tls]
            .into_iter()
            .flatten()
        {
            section.render(&mut out);
        }
        self.render_cluster(&mut out);
        out
    }

    /// `[cluster]` with the ports most nodes share, and the nodes with their exceptions.
    fn render_cluster(&self, out: &mut String) {
        let common = |port: fn(&DraftNode) -> Option<u16>| -> Option<u16> {
            let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
            for node in &self.nodes {
                if let Some(p) = port(node) {
                    *counts.entry(p).or_default() += 1;
                }
            }
            counts
                .into_iter()
                .max_by_key(|&(p, n)| (n, std::cmp::Reverse(p)))
                .map(|(p, _)| p)
        };
        let http = common(|n| n.http_port);
        let rtmp = common(|n| n.rtmp_port);
        let srt = common(|n| n.srt_port);
        let mut cluster = Section::new("[cluster]");
        cluster.comment("The nodes as listed in the source; `source = \"mongodb\"` follows AMS's own registry instead (see README).");
        cluster.set("source", "static", None);
        for (key, port) in [("http_port", http), ("rtmp_port", rtmp), ("srt_port", srt)] {
            if let Some(port) = port {
                cluster.set(key, i64::from(port), None);
            }
        }
        cluster.render(out);
        for node in &self.nodes {
            let mut section = Section::new("[[cluster.node]]");
            section.set("id", node.id.as_str(), Some(node.source.clone()));
            section.set("address", node.address.to_string(), None);
            section.set("group", node.group.as_str(), None);
            for (key, port, common) in [
                ("http_port", node.http_port, http),
                ("rtmp_port", node.rtmp_port, rtmp),
                ("srt_port", node.srt_port, srt),
            ] {
                if let Some(port) = port.filter(|p| Some(*p) != common) {
                    section.set(key, i64::from(port), None);
                }
            }
            if let Some(cookie) = &node.cookie {
                section.set("cookie", cookie.as_str(), None);
            }
            section.render(out);
        }
    }

    fn finish(mut self) -> Imported {
        self.notes.sort_by_key(|n| n.line);
        Imported {
            toml: self.render(),
            notes: self.notes,
        }
    }
}

/// The group name for a backend or upstream called `name`: `origin` and
/// `edge` are the names amslb's router targets.
fn group_name(name: &str, taken: &[String]) -> String {
    let lower = name.to_ascii_lowercase();
    let wanted = if lower.contains("edge") {
        "edge"
    } else if lower.contains("origin") || !taken.iter().any(|t| t == "origin") {
        "origin"
    } else {
        name
    };
    wanted.to_string()
}

/// `host:port`, `*:port`, `:port`, `[v6]:port` or a bare `port` as an amslb
/// bind address (wildcards become `0.0.0.0`).
fn bind_address(text: &str) -> Option<String> {
    if let Ok(port) = text.parse::<u16>() {
        return Some(format!("0.0.0.0:{port}"));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    match host {
        "" | "*" | "0.0.0.0" => Some(format!("0.0.0.0:{port}")),
        "[::]" => Some(format!("[::]:{port}")),
        _ => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = bare.parse().ok()?;
            Some(match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            })
        }
    }
}

/// `ip:port` of a server line; None for names that need DNS.
fn server_address(text: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some((ip, None));
    }
    let (host, port) = text.rsplit_once(':')?;
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some((ip, Some(port.parse().ok()?)))
}

/// A foreign duration (`5000`, `10s`, `7d`; a bare number is in `bare` units)
/// as amslb writes it, and its length in seconds.
fn duration(text: &str, bare: &str) -> Option<(String, f64)> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    let unit = match &text[digits.len()..] {
        "" => bare,
        unit => unit,
    };
    let factor = match unit {
        "us" => 0.000_001,
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 604_800.0,
        _ => return None,
    };
    Some((format!("{n}{unit}"), n as f64 * factor))
}

/// Listener port of an amslb bind address.
fn bind_port(bind: &str) -> Option<u16> {
    bind.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses_in_both_dialects() {
        assert_eq!(bind_address("*:80").as_deref(), Some("0.0.0.0:80"));
        assert_eq!(bind_address(":6080").as_deref(), Some("0.0.0.0:6080"));
        assert_eq!(bind_address("5080").as_deref(), Some("0.0.0.0:5080"));
        assert_eq!(
            bind_address("10.0.0.1:443").as_deref(),
            Some("10.0.0.1:443")
        );
        assert_eq!(bind_address("[::1]:80").as_deref(), Some("[::1]:80"));
        assert_eq!(bind_address("unix:/run/x"), None);
        assert_eq!(
            server_address("172.30.0.42:5080"),
            Some(("172.30.0.42".parse().unwrap(), Some(5080)))
        );
        assert_eq!(server_address("ams.example.com:5080"), None);
    }

    #[test]
    fn durations_keep_their_unit_and_bare_numbers_get_the_dialects() {
        assert_eq!(duration("5000", "ms"), Some(("5000ms".into(), 5.0)));
        assert_eq!(duration("60", "s"), Some(("60s".into(), 60.0)));
        assert_eq!(duration("7d", "s"), Some(("7d".into(), 604_800.0)));
        assert_eq!(duration("2h", "ms"), Some(("2h".into(), 7200.0)));
        assert_eq!(duration("soon", "s"), None);
    }

    #[test]
    fn group_names_follow_the_router() {
        assert_eq!(group_name("antmedia_edge", &[]), "edge");
        assert_eq!(group_name("backend_http", &[]), "origin");
        assert_eq!(group_name("antmedia_origin", &["origin".into()]), "origin");
        assert_eq!(group_name("spare", &["origin".into()]), "spare");
    }
}
