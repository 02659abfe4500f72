//! A simulated Ant Media Server node for tests and the demo.
//!
//! It binds one address on the real AMS HTTP port (5080) so several nodes share
//! the port on distinct loopback addresses, exactly like a real cluster, and
//! answers like AMS where the balancer cares:
//! - `GET /rest/v2/liveness` → 200 `{"status":"ok"}` (status switchable),
//! - every other request → 200 with its node id in `x-node-id` and the body,
//! - `GET /big?bytes=N` → N bytes streamed in 64 KiB chunks,
//! - `GET /slow?ms=N` → answers after N ms,
//! - WHIP as AMS's `WhipEndpoint` answers it: `POST /{app}/whip/{id}` → 201
//!   with `ETag: {uuid}` and the absolute `Location` = `http://` + the request's
//!   `Host` + the request URI, query included, + `/{uuid}` (so
//!   `…/whip/s1?video=true/{uuid}`); `DELETE /{app}/whip/{id}/{uuid}` → 200 for
//!   a session this node made, 404 otherwise; any other method on a WHIP path
//!   (PATCH too) → 405,
//! - `POST /{app}/whep/{id}` (not in AMS yet) → 201 with an absolute `Location`
//!   on the node itself (`http://addr/{app}/whep/{id}/{node}-session`),
//! - `HEAD /{app}` → 302 to `/{app}/` like AMS's servlet container once the
//!   application is deployed, 404 while it is not (switchable),
//! - a WebSocket upgrade on any path → echoes every message (text messages
//!   are recorded, see [`SimNode::messages`]),
//! - every answer carries `Access-Control-Allow-Origin: *`, as AMS's CORS
//!   filter sends, so browser pages of other origins (the AMS SDK) can read it,
//! - on every normal answer: each request header `x-set-cookie` comes back as a
//!   `Set-Cookie`, each request `Cookie` header as an `x-got-cookie` (so a test
//!   sees exactly what the balancer forwarded and what it did to the answer).
//!
//! It records each request (method, path, headers) for assertions and can be
//! told to fail every request with a status, or to hang.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// How the node answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Like a healthy AMS node.
    Normal,
    /// Every request (liveness too) gets this status.
    Status(u16),
    /// Requests are read but never answered.
    Hang,
}

/// A request the node received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers as received.
    pub headers: HeaderMap,
}

#[derive(Debug)]
struct State {
    id: String,
    addr: SocketAddr,
    mode: Mutex<Mode>,
    liveness: Mutex<u16>,
    apps_ready: Mutex<bool>,
    whip_sessions: Mutex<std::collections::HashSet<String>>,
    /// TCP connections accepted so far.
    connections: std::sync::atomic::AtomicU64,
    seen: Mutex<Vec<Seen>>,
    messages: Mutex<Vec<String>>,
}

/// A running simulated node; stops when dropped.
#[derive(Debug)]
pub struct SimNode {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl SimNode {
    /// Starts a node called `id` listening on `addr`.
    pub async fn start(id: &str, addr: SocketAddr) -> std::io::Result<SimNode> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            id: id.to_string(),
            addr,
            mode: Mutex::new(Mode::Normal),
            liveness: Mutex::new(200),
            apps_ready: Mutex::new(true),
            whip_sessions: Mutex::new(Default::default()),
            connections: Default::default(),
            seen: Mutex::new(Vec::new()),
            messages: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(SimNode { addr, state, task })
    }

    /// The node id it answers with.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Changes how it answers every request.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Changes only the liveness endpoint's status.
    pub fn set_liveness(&self, status: u16) {
        *self.state.liveness.lock().unwrap() = status;
    }

    /// Whether its applications answer (`HEAD /{app}`); liveness stays as set,
    /// as in AMS while its applications are still starting.
    pub fn set_apps_ready(&self, ready: bool) {
        *self.state.apps_ready.lock().unwrap() = ready;
    }

    /// TCP connections the node has accepted so far (requests, probes, tunnels).
    pub fn connections(&self) -> u64 {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests received so far (liveness and `HEAD /{app}` probes excluded).
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Text messages received on WebSockets so far, in order.
    pub fn messages(&self) -> Vec<String> {
        self.state.messages.lock().unwrap().clone()
    }

    /// Stops listening and closes the listening socket (open connections end too).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        state
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let mut response = answer(state, req).await?;
                    response
                        .headers_mut()
                        .insert("access-control-allow-origin", "*".parse().unwrap());
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn text(status: u16, id: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("x-node-id", id)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

async fn answer(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mode = *state.mode.lock().unwrap();
    if mode == Mode::Hang {
        std::future::pending::<()>().await;
    }
    if let Mode::Status(code) = mode {
        return Ok(text(code, &state.id, format!("{}\n", state.id)));
    }
    if req.uri().path() == "/rest/v2/liveness" {
        let code = *state.liveness.lock().unwrap();
        let mut response = text(code, &state.id, r#"{"status":"ok"}"#);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        return Ok(response);
    }
    let path = req.uri().path();
    if req.method() == http::Method::HEAD && path.len() > 1 && !path[1..].contains('/') {
        let ready = *state.apps_ready.lock().unwrap();
        let mut answer = text(if ready { 302 } else { 404 }, &state.id, "");
        if ready {
            let to = format!("{path}/").parse().unwrap();
            answer.headers_mut().insert(header::LOCATION, to);
        }
        return Ok(answer);
    }
    state.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    if let Some(key) = req.headers().get("sec-websocket-key") {
        let accept = derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(echo_websocket(upgrade, state.clone()));
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", accept)
            .header("x-node-id", &state.id)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap());
    }
    let query = req.uri().query().unwrap_or("");
    let number = |name: &str| -> u64 {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let mut answer = match req.uri().path() {
        "/big" => big_body(&state.id, number("bytes")),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(number("ms"))).await;
            text(200, &state.id, format!("{}\n", state.id))
        }
        path if path.contains("/whip/") => whip(&state, &req),
        path if req.method() == http::Method::POST && path.contains("/whep/") => {
            let location = format!("http://{}{path}/{}-session", state.addr, state.id);
            let mut created = text(201, &state.id, format!("{}\n", state.id));
            created
                .headers_mut()
                .insert(header::LOCATION, location.parse().unwrap());
            created
        }
        _ => text(200, &state.id, format!("{}\n", state.id)),
    };
    let request_headers = req.headers().clone();
    for value in request_headers.get_all("x-set-cookie") {
        answer
            .headers_mut()
            .append(header::SET_COOKIE, value.clone());
    }
    for value in request_headers.get_all(header::COOKIE) {
        answer.headers_mut().append("x-got-cookie", value.clone());
    }
    // Read (and drop) the request body so uploads complete.
    let _ = req.into_body().collect().await;
    Ok(answer)
}

/// WHIP the way AMS's `WhipEndpoint` answers (see the module comment).
fn whip(state: &State, req: &Request<Incoming>) -> Response<Body> {
    let segments: Vec<&str> = req.uri().path().split('/').collect();
    // ["", app, "whip", stream] or ["", app, "whip", stream, etag]
    match (req.method().clone(), segments.as_slice()) {
        (http::Method::POST, [_, _, "whip", _]) => {
            let etag = uuid();
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            let location = format!("http://{host}{}/{etag}", req.uri());
            state.whip_sessions.lock().unwrap().insert(etag.clone());
            let mut created = text(201, &state.id, format!("{}\n", state.id));
            let headers = created.headers_mut();
            headers.insert(header::LOCATION, location.parse().unwrap());
            headers.insert(header::ETAG, etag.parse().unwrap());
            created
        }
        (http::Method::DELETE, [_, _, "whip", _, etag]) => {
            if state.whip_sessions.lock().unwrap().remove(*etag) {
                text(200, &state.id, r#"{"success":true}"#)
            } else {
                text(404, &state.id, r#"{"success":false}"#)
            }
        }
        _ => text(405, &state.id, ""),
    }
}

/// A random UUID in its text form, like AMS's session ids.
fn uuid() -> String {
    let n: u128 = rand::random();
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn big_body(id: &str, total: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                left - n,
            ))
        }
    });
    Response::builder()
        .header("x-node-id", id)
        .header(header::CONTENT_LENGTH, total)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

async fn echo_websocket(upgrade: hyper::upgrade::OnUpgrade, state: Arc<State>) {
    let Ok(upgraded) = upgrade.await else { return };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            break;
        }
        if let (true, Ok(text)) = (message.is_text(), message.to_text()) {
            state.messages.lock().unwrap().push(text.to_string());
        }
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}
