//! `GET /amslb/v1/assign?app=..&stream=..&role=play|publish`: which node the
//! balancer would give this stream, for players and publishers that connect
//! to a node directly. Answers from the same picker as the proxy, so a client
//! that asks and then connects through the balancer lands on the same node.
//!
//! `GET /amslb/v1/endpoint?app=..[&stream=..][&role=..]` answers the same
//! choice in the schema of the AMS JavaScript SDK's `httpEndpointUrl`
//! (`{fqdn, websocket_url, http_url}`): the SDK fetches it (adding
//! `source=sdk`), checks `http_url` with a HEAD, then opens `websocket_url`.

use super::select::{self, Wanted};
use crate::config::{Config, ListenerConfig};
use crate::route::Target;
use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

/// The path the API answers on.
pub const PATH: &str = "/amslb/v1/assign";

/// The path answering in the AMS SDK's `httpEndpointUrl` schema.
pub const SDK_PATH: &str = "/amslb/v1/endpoint";

/// Whether `path` is one of the API's paths.
pub fn handles(path: &str) -> bool {
    path == PATH || path == SDK_PATH
}

/// An answer of the API: its status and JSON body (the HTTP layer adds the
/// headers: JSON, never cached, readable by pages of any origin).
pub type Answer = (StatusCode, serde_json::Value);

/// Answers one assignment request on [`PATH`] or [`SDK_PATH`].
pub fn answer(
    snapshot: &crate::cluster::Membership,
    config: &Config,
    listener: &ListenerConfig,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Answer {
    let sdk = uri.path() == SDK_PATH;
    let query = uri.query();
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use GET"}));
    }
    let mut app = None;
    let mut stream = None;
    let mut role = "play".to_string();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "app" => app = Some(value.into_owned()),
            "stream" => stream = Some(value.into_owned()),
            "role" => role = value.into_owned(),
            _ => {}
        }
    }
    let app = app.filter(|a| !a.is_empty());
    let stream = stream.filter(|s| !s.is_empty());
    // The SDK asks before it knows a stream: the app alone picks like a
    // request without a stream (least-conn).
    let Some(app) = app.filter(|_| sdk || stream.is_some()) else {
        let error = if sdk {
            "app is required"
        } else {
            "app and stream are required"
        };
        return (StatusCode::BAD_REQUEST, json!({ "error": error }));
    };
    let (target, publish) = match role.as_str() {
        "play" => (Target::Edge, false),
        "publish" => (Target::Origin, true),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": "role must be play or publish"}),
            );
        }
    };
    let key = stream.map(|stream| format!("{app}/{stream}"));
    let wanted = Wanted::for_target(config, listener, target, key, publish, headers);
    match select::pick(config, snapshot, &wanted, &[]) {
        Some(node) if sdk => {
            // Nodes are reached over plain HTTP, as amslb itself reaches them.
            let at = std::net::SocketAddr::new(node.spec().addr, node.spec().http_port);
            (
                StatusCode::OK,
                json!({
                    "fqdn": node.spec().addr.to_string(),
                    "websocket_url": format!("ws://{at}/{app}/websocket"),
                    "http_url": format!("http://{at}/{app}"),
                    "node": node.id(),
                    "group": node.group(),
                }),
            )
        }
        Some(node) => (
            StatusCode::OK,
            json!({
                "node": node.id(),
                "address": node.spec().addr.to_string(),
                "http_port": node.spec().http_port,
                "group": node.group(),
                "region": node.region(),
            }),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "no usable node", "group": wanted.group}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, NodeSpec};
    use crate::config::parse_str;
    use std::path::Path;

    fn call(cluster: &Cluster, query: &str) -> (u16, serde_json::Value) {
        let config = parse_str(
            r#"
[[listener]]
name = "web"
bind = ["127.0.0.1:18702"]
protocol = "http"
assign_api = true
[[group]]
name = "origin"
[[group]]
name = "edge"
balance = "stream-hash"
[cluster]
"#,
            Path::new("t.toml"),
        )
        .unwrap()
        .config;
        let (status, body) = answer(
            &cluster.snapshot(),
            &config,
            &config.listeners[0],
            &Method::GET,
            &query.parse().unwrap(),
            &HeaderMap::new(),
        );
        (status.as_u16(), body)
    }

    fn spec(id: &str, group: &str, octet: u8) -> NodeSpec {
        NodeSpec {
            region: Some("eu".into()),
            ..NodeSpec::on_default_ports(id, group, [127, 0, 5, octet].into())
        }
    }

    #[test]
    fn answers_node_for_role_and_errors_as_json() {
        let cluster = Cluster::new();
        cluster.update(vec![spec("o1", "origin", 1), spec("e1", "edge", 2)]);
        let (status, body) = call(
            &cluster,
            "/amslb/v1/assign?app=LiveApp&stream=s%201&role=play",
        );
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"node": "e1", "address": "127.0.5.2", "http_port": 5080, "group": "edge", "region": "eu"})
        );
        let (_, body) = call(
            &cluster,
            "/amslb/v1/assign?app=LiveApp&stream=s1&role=publish",
        );
        assert_eq!(body["node"], "o1");
        assert_eq!(call(&cluster, "/amslb/v1/assign?app=LiveApp").0, 400);
        assert_eq!(
            call(&cluster, "/amslb/v1/assign?app=a&stream=b&role=watch").0,
            400
        );
        cluster.update(vec![spec("o1", "origin", 1)]);
        let (status, body) = call(&cluster, "/amslb/v1/assign?app=a&stream=b");
        assert_eq!(status, 503);
        assert_eq!(body["group"], "edge");
    }

    #[test]
    fn sdk_endpoint_answers_the_sdk_schema_without_a_stream() {
        let cluster = Cluster::new();
        cluster.update(vec![spec("o1", "origin", 1), spec("e1", "edge", 2)]);
        // As the SDK calls it: the configured URL plus source=sdk.
        let (status, body) = call(&cluster, "/amslb/v1/endpoint?app=LiveApp&source=sdk");
        assert_eq!(status, 200);
        assert_eq!(body["fqdn"], "127.0.5.2");
        assert_eq!(
            body["websocket_url"],
            "ws://127.0.5.2:5080/LiveApp/websocket"
        );
        assert_eq!(body["http_url"], "http://127.0.5.2:5080/LiveApp");
        let (_, body) = call(
            &cluster,
            "/amslb/v1/endpoint?app=LiveApp&role=publish&stream=s1",
        );
        assert_eq!(body["node"], "o1");
        assert_eq!(call(&cluster, "/amslb/v1/endpoint?source=sdk").0, 400);
    }
}
