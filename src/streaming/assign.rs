//! `GET /amslb/v1/assign?app=..&stream=..&role=play|publish`: which node the
//! balancer would give this stream, for players and publishers that connect
//! to a node directly. Answers from the same picker as the proxy, so a client
//! that asks and then connects through the balancer lands on the same node.

use super::select::{self, Wanted};
use crate::config::{Config, ListenerConfig};
use crate::http::body::ResponseBody;
use crate::route::Target;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

/// The path the API answers on.
pub const PATH: &str = "/amslb/v1/assign";

/// Answers one assignment request.
pub fn answer(
    snapshot: &crate::cluster::Membership,
    config: &Config,
    listener: &ListenerConfig,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<ResponseBody> {
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use GET"}));
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
    let (Some(app), Some(stream)) = (
        app.filter(|a| !a.is_empty()),
        stream.filter(|s| !s.is_empty()),
    ) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "app and stream are required"}),
        );
    };
    let (target, publish) = match role.as_str() {
        "play" => (Target::Edge, false),
        "publish" => (Target::Origin, true),
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "role must be play or publish"}),
            );
        }
    };
    let key = format!("{app}/{stream}");
    let wanted = Wanted::for_target(config, listener, target, Some(key), publish, headers);
    match select::pick(config, snapshot, &wanted, &[]) {
        Some(node) => reply(
            StatusCode::OK,
            json!({
                "node": node.id(),
                "address": node.spec().addr.to_string(),
                "http_port": node.spec().http_port,
                "group": node.group(),
                "region": node.region(),
            }),
        ),
        None => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "no usable node", "group": wanted.group}),
        ),
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Local(Full::new(Bytes::from(
        body.to_string(),
    ))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The answer changes with load and health: never cache it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, NodeSpec};
    use crate::config::parse_str;
    use http_body_util::BodyExt;
    use std::path::Path;

    async fn call(cluster: &Cluster, query: &str) -> (u16, serde_json::Value) {
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
        let response = answer(
            &cluster.snapshot(),
            &config,
            &config.listeners[0],
            &Method::GET,
            Some(query),
            &HeaderMap::new(),
        );
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn spec(id: &str, group: &str, octet: u8) -> NodeSpec {
        NodeSpec {
            region: Some("eu".into()),
            ..NodeSpec::on_default_ports(id, group, [127, 0, 5, octet].into())
        }
    }

    #[tokio::test]
    async fn answers_node_for_role_and_errors_as_json() {
        let cluster = Cluster::new();
        cluster.update(vec![spec("o1", "origin", 1), spec("e1", "edge", 2)]);
        let (status, body) = call(&cluster, "app=LiveApp&stream=s%201&role=play").await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"node": "e1", "address": "127.0.5.2", "http_port": 5080, "group": "edge", "region": "eu"})
        );
        let (_, body) = call(&cluster, "app=LiveApp&stream=s1&role=publish").await;
        assert_eq!(body["node"], "o1");
        assert_eq!(call(&cluster, "app=LiveApp").await.0, 400);
        assert_eq!(call(&cluster, "app=a&stream=b&role=watch").await.0, 400);
        cluster.update(vec![spec("o1", "origin", 1)]);
        let (status, body) = call(&cluster, "app=a&stream=b").await;
        assert_eq!(status, 503);
        assert_eq!(body["group"], "edge");
    }
}
