//! The stats listener: Prometheus `/metrics`, the live status page `/`, its
//! JSON API `/api/v1/status`, admin actions, and an unauthenticated `/healthz`
//! for load-balancer and Kubernetes probes.
//!
//! It runs on its own socket and its own hyper server, so a flood of scrapes
//! or page views never competes with the proxy listeners for a connection slot.

pub mod auth;
pub mod status;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::state::{Drain, SharedState, now_ms};
use arc_swap::ArcSwap;
use auth::{Access, Verdict};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The status page: one self-contained file (HTML, CSS, JS), no external assets.
const PAGE: &str = include_str!("page.html");

/// What a reload that went through did, as `/api/v1/reload` answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// One line for the log and the answer.
    pub summary: String,
    /// Settings of the file that differ from the previous one.
    pub changed: Vec<String>,
    /// Settings of the file the running process does not run with until a
    /// restart (never applied silently).
    pub pending_restart: Vec<String>,
}

/// What the stats listener asks of the rest of the process.
pub trait Control: Send + Sync {
    /// Re-reads and applies the config file, exactly like SIGHUP; `Ok` says
    /// what changed and what waits for a restart, `Err` why the new config
    /// was refused.
    fn reload(&self) -> BoxFuture<'static, Result<ReloadReport, String>>;
    /// Names of the configured groups, so the page shows groups with no node.
    fn groups(&self) -> Vec<String>;
    /// Recent health check results of a node, oldest first (true = passed).
    fn health_history(&self, node: &str) -> Vec<bool>;
    /// The drains (shared with the other instances under `[state]`); `None`
    /// where a caller has none, and then a drain is this node flag alone.
    fn shared(&self) -> Option<Arc<SharedState>> {
        None
    }
}

/// Everything a stats request handler reads.
pub struct StatsState {
    metrics: Arc<Metrics>,
    cluster: Arc<Cluster>,
    access: ArcSwap<Access>,
    control: Arc<dyn Control>,
}

impl std::fmt::Debug for StatsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsState")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl StatsState {
    /// Shared state for the stats listener.
    pub fn new(
        metrics: Arc<Metrics>,
        cluster: Arc<Cluster>,
        access: Access,
        control: Arc<dyn Control>,
    ) -> Self {
        Self {
            metrics,
            cluster,
            access: ArcSwap::from_pointee(access),
            control,
        }
    }

    /// Replaces the access rules (after a reload); open connections use the new
    /// rules from their next request on.
    pub fn set_access(&self, access: Access) {
        self.access.store(Arc::new(access));
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

fn error_reply(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &serde_json::json!({ "error": message }))
}

/// Decodes `%XX` escapes in a path segment (node ids may hold any character).
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A browser sends `Origin` with every cross-site POST; refusing a foreign one
/// stops another web page from driving admin actions with cached credentials.
fn same_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
    let origin = origin.as_bytes();
    let origin_host = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

/// Answers one request. Generic over the body because no route reads one.
pub async fn handle<B>(state: &StatsState, peer: IpAddr, req: Request<B>) -> Reply {
    let path = req.uri().path();
    if path == "/healthz" {
        // Unauthenticated on purpose: probes cannot do basic auth portably, and
        // the answer reveals nothing.
        return reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n");
    }
    match state
        .access
        .load()
        .check(peer, req.headers().get(header::AUTHORIZATION))
    {
        Verdict::Allowed => {}
        Verdict::Forbidden => {
            debug!(%peer, "stats request from an address not in stats.allow");
            return error_reply(StatusCode::FORBIDDEN, "address not allowed");
        }
        Verdict::Unauthorized => {
            let mut r = error_reply(StatusCode::UNAUTHORIZED, "authentication required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"amslb\", charset=\"UTF-8\""),
            );
            return r;
        }
    }
    let method = req.method();
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/" if get => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" if get => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(&state.cluster),
        ),
        "/api/v1/status" if get => json_reply(
            StatusCode::OK,
            &status::status(&state.metrics, &state.cluster, state.control.as_ref()),
        ),
        "/api/v1/reload" if method == Method::POST => {
            if !same_origin(&req) {
                return error_reply(StatusCode::FORBIDDEN, "cross-origin request refused");
            }
            info!(%peer, "config reload requested through the admin API");
            match state.control.reload().await {
                Ok(report) => json_reply(
                    StatusCode::OK,
                    &serde_json::json!({
                        "reloaded": true,
                        "summary": report.summary,
                        "changed": report.changed,
                        "pending_restart": report.pending_restart,
                    }),
                ),
                Err(reason) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({ "reloaded": false, "error": reason }),
                ),
            }
        }
        _ => match path.strip_prefix("/api/v1/nodes/") {
            Some(rest) if method == Method::POST => {
                if !same_origin(&req) {
                    return error_reply(StatusCode::FORBIDDEN, "cross-origin request refused");
                }
                let user = auth::user_of(req.headers().get(header::AUTHORIZATION));
                let by = format!("{}@{peer}", user.as_deref().unwrap_or("-"));
                node_action(state, &by, rest, req.uri().query().unwrap_or("")).await
            }
            Some(_) => method_not_allowed("POST"),
            None if matches!(path, "/" | "/metrics" | "/api/v1/status") => {
                method_not_allowed("GET, HEAD")
            }
            None if path == "/api/v1/reload" => method_not_allowed("POST"),
            None => error_reply(StatusCode::NOT_FOUND, "no such page"),
        },
    }
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = error_reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// Longest a `wait` drain request is held open without a deadline.
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(3600);

/// What a drain request asks besides the drain itself.
#[derive(Debug, Default)]
struct DrainQuery {
    /// `deadline=10m`: the node is out then, sessions or not.
    deadline: Option<Duration>,
    /// `wait=1`: answer only once the node is out (empty, or the deadline
    /// passed), for a preStop or ASG lifecycle hook.
    wait: bool,
}

fn drain_query(query: &str) -> Result<DrainQuery, String> {
    let mut parsed = DrainQuery::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "deadline" => {
                parsed.deadline = Some(
                    crate::config::duration::parse(&value).map_err(|e| format!("deadline: {e}"))?,
                );
            }
            "wait" => parsed.wait = matches!(&*value, "" | "1" | "true" | "yes"),
            other => return Err(format!("unknown parameter {other:?} (deadline, wait)")),
        }
    }
    Ok(parsed)
}

/// `POST /api/v1/nodes/{id}/drain[?deadline=10m][&wait=1]` and `.../undrain`.
async fn node_action(state: &StatsState, by: &str, rest: &str, query: &str) -> Reply {
    let Some((id, action)) = rest.rsplit_once('/') else {
        return error_reply(
            StatusCode::NOT_FOUND,
            "use /api/v1/nodes/{id}/drain or /undrain",
        );
    };
    let drain = match action {
        "drain" => true,
        "undrain" => false,
        _ => return error_reply(StatusCode::NOT_FOUND, "unknown node action"),
    };
    let Some(id) = percent_decode(id) else {
        return error_reply(StatusCode::BAD_REQUEST, "bad node id encoding");
    };
    let query = match drain_query(query) {
        Ok(q) => q,
        Err(e) => return error_reply(StatusCode::BAD_REQUEST, &e),
    };
    let snapshot = state.cluster.snapshot();
    let Some(node) = snapshot.node(&id).cloned() else {
        return error_reply(StatusCode::NOT_FOUND, "no such node");
    };
    let Some(drains) = state.control.shared() else {
        let was = node.set_draining(drain);
        return json_reply(
            StatusCode::OK,
            &serde_json::json!({ "node": id, "draining": drain, "changed": was != drain }),
        );
    };
    let was = drains.get(&id);
    let now = now_ms();
    let record = drain.then(|| Drain {
        by: by.to_string(),
        instance: drains.instance().to_string(),
        at_ms: now,
        deadline_ms: query
            .deadline
            .map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
    });
    if let Err(e) = drains.set(&state.cluster, &id, record.clone()).await {
        warn!(node = %id, by, error = %e, "drain change refused");
        return error_reply(StatusCode::SERVICE_UNAVAILABLE, &e);
    }
    info!(node = %id, group = node.group(), by, draining = drain, deadline = ?query.deadline, "node drain state changed through the admin API");
    if drain && query.wait {
        let limit = query.deadline.unwrap_or(MAX_DRAIN_WAIT) + Duration::from_secs(1);
        let started = tokio::time::Instant::now();
        while !node.is_out() && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "node": id,
            "draining": drain,
            "changed": was.is_some() != drain,
            "out": node.is_out(),
            "sessions": node.active_sessions(),
            "drain": record.as_ref().map(Drain::to_json),
        }),
    )
}

/// Serves the stats listener until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<StatsState>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "stats listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, state, shutdown).await;
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<StatsState>,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&state, peer.ip(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "stats connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ops::StatsConfig;
    use crate::metrics::fixtures::spec;
    use base64::Engine;
    use http_body_util::BodyExt;

    pub(super) struct Fixed;

    impl Control for Fixed {
        fn reload(&self) -> BoxFuture<'static, Result<ReloadReport, String>> {
            Box::pin(async { Err("config.toml:3: bad".to_string()) })
        }
        fn groups(&self) -> Vec<String> {
            vec!["origin".into(), "edge".into()]
        }
        fn health_history(&self, _node: &str) -> Vec<bool> {
            vec![true, false]
        }
    }

    fn state(stats: &str) -> StatsState {
        let cluster = Arc::new(Cluster::new());
        cluster.update(vec![spec("edge 1", "edge", 1)]);
        let metrics = Arc::new(Metrics::new(cluster.clone()).unwrap());
        let config: StatsConfig = toml::from_str(stats).unwrap();
        StatsState::new(
            metrics,
            cluster,
            Access::from_config(&config).unwrap(),
            Arc::new(Fixed),
        )
    }

    fn request(method: &str, path: &str, auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "lb:6080");
        if let Some(creds) = auth {
            let token = base64::engine::general_purpose::STANDARD.encode(creds);
            b = b.header("authorization", format!("Basic {token}"));
        }
        b.body(()).unwrap()
    }

    async fn body(r: Reply) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const AUTH: &str = "user = \"admin\"\npassword = \"pw\"\nallow = [\"127.0.0.0/8\"]";

    #[tokio::test]
    async fn auth_gives_401_403_200() {
        let s = state(AUTH);
        let r = handle(&s, LOCAL, request("GET", "/metrics", None)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Basic realm=")
        );
        let r = handle(&s, LOCAL, request("GET", "/metrics", Some("admin:nope"))).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let outside: IpAddr = "192.0.2.7".parse().unwrap();
        let r = handle(&s, outside, request("GET", "/metrics", Some("admin:pw"))).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = handle(&s, LOCAL, request("GET", "/metrics", Some("admin:pw"))).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(body(r).await.contains("amslb_build_info"));
        // Probes need neither.
        let r = handle(&s, outside, request("GET", "/healthz", None)).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn page_and_status_json_are_served() {
        let s = state(AUTH);
        let r = handle(&s, LOCAL, request("GET", "/", Some("admin:pw"))).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let page = body(r).await;
        assert!(page.contains("/api/v1/status"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external assets"
        );
        let r = handle(
            &s,
            LOCAL,
            request("GET", "/api/v1/status", Some("admin:pw")),
        )
        .await;
        let doc: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(doc["groups"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn drain_and_undrain_a_node() {
        let s = state(AUTH);
        let r = handle(
            &s,
            LOCAL,
            request("POST", "/api/v1/nodes/edge%201/drain", None),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let node = s.cluster.snapshot().node("edge 1").unwrap().clone();
        assert!(!node.is_draining());
        let r = handle(
            &s,
            LOCAL,
            request("POST", "/api/v1/nodes/edge%201/drain", Some("admin:pw")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(node.is_draining());
        let r = handle(
            &s,
            LOCAL,
            request("POST", "/api/v1/nodes/edge%201/undrain", Some("admin:pw")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(!node.is_draining());
        let r = handle(
            &s,
            LOCAL,
            request("POST", "/api/v1/nodes/nope/drain", Some("admin:pw")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = handle(
            &s,
            LOCAL,
            request("GET", "/api/v1/nodes/edge%201/drain", Some("admin:pw")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn cross_origin_admin_post_is_refused() {
        let s = state(AUTH);
        let mut req = request("POST", "/api/v1/nodes/edge%201/drain", Some("admin:pw"));
        req.headers_mut()
            .insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        let r = handle(&s, LOCAL, req).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let mut req = request("POST", "/api/v1/nodes/edge%201/drain", Some("admin:pw"));
        req.headers_mut()
            .insert(header::ORIGIN, "http://lb:6080".parse().unwrap());
        assert_eq!(handle(&s, LOCAL, req).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn refused_reload_is_reported() {
        let s = state(AUTH);
        let r = handle(
            &s,
            LOCAL,
            request("POST", "/api/v1/reload", Some("admin:pw")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(body(r).await.contains("config.toml:3: bad"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }
}
