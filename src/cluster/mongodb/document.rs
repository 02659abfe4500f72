//! Reading one AMS `clusternode` document. AMS (Morphia) writes `_id` (string),
//! `ip` (string), `lastUpdateTime` (epoch milliseconds, a long) and `cpu`,
//! `memory` (percentages as strings), plus fields we ignore. Other writers and
//! hand edits happen, so every field is read leniently: a bad figure means
//! "unknown", never a crash; only a missing id or address skips the document.

use crate::cluster::ReportedLoad;
use mongodb::bson::{Bson, Document};
use std::net::{IpAddr, SocketAddr};

/// The `ip` field of a registry document: AMS writes its host address, which is
/// `AMS_HOST_ADDRESS` when set (often a host name, e.g. in Kubernetes), else its
/// public IP with `useGlobalIp`, else its local IP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeAddr {
    /// An IP address.
    Ip(IpAddr),
    /// A host name (lower case), resolved by [`super::resolve`].
    Host(String),
}

/// What the balancer needs from one registry document.
#[derive(Debug, Clone, PartialEq)]
pub struct AmsNode {
    /// The document's `_id`, as text.
    pub id: String,
    /// The node's address as registered.
    pub addr: NodeAddr,
    /// Heartbeat, epoch milliseconds by the node's clock; `None` if missing or unreadable.
    pub last_update_ms: Option<i64>,
    /// Reported cpu and memory use.
    pub load: ReportedLoad,
}

/// Why a document cannot become a node; shown once per document in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The `ip` field is absent or not text.
    #[error("no `ip` field")]
    NoIp,
    /// The `ip` field is neither an IP address nor a host name.
    #[error("`ip` {0:?} is neither an IP address nor a host name")]
    BadIp(String),
}

/// The text form of a document `_id`, used as node id and to match deletions.
pub fn id_text(id: &Bson) -> String {
    match id {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        other => other.to_string(),
    }
}

/// Reads an AMS node out of `doc`.
pub fn parse(doc: &Document) -> Result<AmsNode, Skip> {
    // Every stored document has an `_id`; a projection without one is our bug,
    // and an empty id still identifies the document well enough.
    let id = doc.get("_id").map(id_text).unwrap_or_default();
    let addr = match doc.get("ip") {
        Some(Bson::String(text)) => parse_ip(text)
            .map(NodeAddr::Ip)
            .or_else(|| parse_host(text).map(NodeAddr::Host))
            .ok_or_else(|| Skip::BadIp(text.clone()))?,
        _ => return Err(Skip::NoIp),
    };
    Ok(AmsNode {
        id,
        addr,
        last_update_ms: doc.get("lastUpdateTime").and_then(millis),
        load: ReportedLoad {
            cpu: doc.get("cpu").and_then(percent),
            memory: doc.get("memory").and_then(percent),
        },
    })
}

/// Accepts `10.0.0.5`, `fe80::1`, `[fe80::1]` and `10.0.0.5:5080` (the port is dropped:
/// every AMS node uses the cluster's ports).
fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| text.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// Accepts a DNS host name (`ams-1.origin.internal`, `localhost`), with an
/// optional `:port` that is dropped like for addresses; lower-cased.
fn parse_host(text: &str) -> Option<String> {
    let text = text.trim();
    let host = match text.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        Some(_) => return None,
        None => text,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    // A name is not all digits and dots (that would be a mistyped address).
    let named = host.chars().any(|c| c.is_ascii_alphabetic());
    (host.len() <= 253 && named && host.split('.').all(label_ok)).then(|| host.to_ascii_lowercase())
}

/// Epoch milliseconds from a long (AMS), an int, a double or a BSON date.
fn millis(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.is_finite() => Some(*v as i64),
        Bson::DateTime(d) => Some(d.timestamp_millis()),
        Bson::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A usage percentage from text (`"42"`, `"42.5"`, `" 42 %"`) or a number;
/// negative or non-finite values are unknown.
fn percent(value: &Bson) -> Option<f32> {
    let v = match value {
        Bson::String(s) => s.trim().trim_end_matches('%').trim().parse::<f64>().ok()?,
        Bson::Double(v) => *v,
        Bson::Int32(v) => f64::from(*v),
        Bson::Int64(v) => *v as f64,
        _ => return None,
    };
    (v.is_finite() && v >= 0.0).then_some(v as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId};

    #[test]
    fn reads_an_ams_document() {
        let d = doc! {
            "_id": "node-1", "className": "io.antmedia.cluster.ClusterNode",
            "ip": "172.31.1.5", "lastUpdateTime": 1_700_000_000_123_i64,
            "memory": "41", "cpu": "12.5",
        };
        assert_eq!(
            parse(&d).unwrap(),
            AmsNode {
                id: "node-1".into(),
                addr: NodeAddr::Ip("172.31.1.5".parse().unwrap()),
                last_update_ms: Some(1_700_000_000_123),
                load: ReportedLoad {
                    cpu: Some(12.5),
                    memory: Some(41.0)
                },
            }
        );
    }

    #[test]
    fn lenient_figures_are_unknown_not_errors() {
        let d = doc! {
            "_id": 7, "ip": " 10.0.0.9:5080 ", "lastUpdateTime": "soon",
            "cpu": "n/a", "memory": -3.0,
        };
        let n = parse(&d).unwrap();
        assert_eq!(n.id, "7");
        assert_eq!(n.addr, NodeAddr::Ip("10.0.0.9".parse().unwrap()));
        assert_eq!(n.last_update_ms, None);
        assert_eq!(n.load, ReportedLoad::default());

        let d = doc! { "_id": "x", "ip": "[::1]", "lastUpdateTime": 5_i32, "cpu": " 80 %", "memory": 30 };
        let n = parse(&d).unwrap();
        assert_eq!(n.addr, NodeAddr::Ip("::1".parse().unwrap()));
        assert_eq!(n.last_update_ms, Some(5));
        assert_eq!(n.load.cpu, Some(80.0));
        assert_eq!(n.load.memory, Some(30.0));
        let d = doc! { "_id": "x", "ip": "::1", "lastUpdateTime": mongodb::bson::DateTime::from_millis(9), "cpu": f64::NAN };
        let n = parse(&d).unwrap();
        assert_eq!(n.last_update_ms, Some(9));
        assert_eq!(n.load.cpu, None);
    }

    #[test]
    fn documents_without_usable_ip_are_skipped() {
        assert_eq!(parse(&doc! { "_id": "a" }), Err(Skip::NoIp));
        assert_eq!(parse(&doc! { "_id": "a", "ip": 5 }), Err(Skip::NoIp));
        for bad in [
            "",
            "10.0.0.300",
            "a b",
            "-x.internal",
            "x..y",
            "host:port",
            "1.2.3",
        ] {
            assert_eq!(
                parse(&doc! { "_id": "a", "ip": bad }),
                Err(Skip::BadIp(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn host_names_are_kept_for_resolving() {
        for (ip, host) in [
            ("ams-1.Origin.internal", "ams-1.origin.internal"),
            (" localhost:5080 ", "localhost"),
            ("node_7.svc.cluster.local.", "node_7.svc.cluster.local"),
        ] {
            let n = parse(&doc! { "_id": "a", "ip": ip }).unwrap();
            assert_eq!(n.addr, NodeAddr::Host(host.into()), "{ip}");
        }
    }

    #[test]
    fn object_ids_become_hex() {
        let oid = ObjectId::new();
        assert_eq!(id_text(&Bson::ObjectId(oid)), oid.to_hex());
    }
}
