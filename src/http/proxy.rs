//! The request handler, in named phases over one per-request context
//! ([`RequestCtx`]), in the order pingora's `ProxyHttp` runs them:
//!
//! 1. [`early_answer`](RequestCtx::early_answer): what amslb answers before
//!    looking at the route (ACME http-01, the HTTPS redirect, a bad Host);
//! 2. [`classify`](RequestCtx::classify): the router's verdict (`route.rs`);
//! 3. [`api_answer`](RequestCtx::api_answer): amslb's own API (assign);
//! 4. [`request_filter`](RequestCtx::request_filter): `[[rule]]`s and
//!    `[[limit]]`s, which may answer, steer or rewrite;
//! 5. [`takeover`](RequestCtx::takeover): a WebSocket amslb routes by its
//!    first command ([`sniffs`](RequestCtx::sniffs), `http::sniffed`) leaves
//!    the request/response cycle here;
//! 6. [`plan`](RequestCtx::plan): group, affinity key and sticky node;
//! 7. [`upstream_request_filter`](RequestCtx::upstream_request_filter): the
//!    request as the node gets it (origin-form, hop-by-hop, forwarding);
//! 8. [`connect`](RequestCtx::connect): the shared failover loop ([`forward`]);
//! 9. [`response_filter`](RequestCtx::response_filter): the node's answer
//!    vetted, sticky cookie, rule headers, hop-by-hop;
//! 10. [`deliver`](RequestCtx::deliver): stream the body or start the tunnel;
//! 11. [`log`](RequestCtx::log): the access log record and metrics, also for
//!     answers amslb wrote itself.
//!
//! A new rule has one obvious place: the phase that knows what it needs.

use super::body::{RequestBody, ResponseBody, UpstreamBody, local_response, redirect};
use super::edge::{self, Admitted};
use super::guard::{self, ClientBody, ClientFault, NodeBody, Upload};
use super::headers::{ClientInfo, ForwardOptions, add_forwarding, strip_hop_by_hop};
use super::record::Exchange;
use super::sniffed;
use crate::access_log::Sticky;
use crate::cluster::{Membership, Node, NodeLease};
use crate::config::{Config, ListenerConfig};
use crate::failover::{Connected, Failover, Failure, Reporting};
use crate::metrics::ListenerMetrics;
use crate::node_tls::NodeTlsSet;
use crate::route::{self, Route};
use crate::runtime::{ListenerView, Runtime};
use crate::sticky::Affinity;
use crate::streaming::select::Wanted;
use crate::streaming::{assign, sniff};
use crate::transport::{
    self, BoxError, ConnectError, DirectBody, DirectConn, Lent, NodeIncoming, Pool, Pools,
    SendError, Sender,
};
use crate::tunnel;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// What every request of one client connection shares.
#[derive(Debug)]
pub struct ConnContext {
    /// The running balancer.
    pub runtime: Arc<Runtime>,
    /// Who the client is.
    pub client: ClientInfo,
    /// The client's address as header text ([`super::headers::ip_header`]).
    pub client_ip: HeaderValue,
    /// The listener's metric handles, resolved once per connection; they
    /// carry its name ([`ConnContext::listener`]).
    pub metrics: Arc<ListenerMetrics>,
}

impl ConnContext {
    /// Name of the listener the connection came in on.
    pub fn listener(&self) -> &Arc<str> {
        self.metrics.name()
    }
}

/// Why a request could not be forwarded; each maps to one status code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no usable node in group {0:?}{backup}", backup = .1.as_ref().map(|b| format!(" or its backup {b:?}")).unwrap_or_default())]
    NoUsableNode(String, Option<String>),
    #[error("no node answered: {0}")]
    AllNodesFailed(ConnectError),
    #[error("node {0} did not send a response head within {1:?}")]
    Timeout(String, Duration),
    #[error("node {0} failed: {1}")]
    Upstream(String, BoxError),
    #[error("{0}")]
    Client(ClientFault),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoUsableNode(..) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AllNodesFailed(_) | ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Client(fault) => fault.status(),
        }
    }
}

/// A request amslb refuses: the status and the reason for the log line.
type Refusal = (StatusCode, String);

/// Handles one client request. Never fails: every problem becomes a response
/// with the right status and a log line with the reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    mut request: Request<RequestBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let Some(view) = ListenerView::current(&ctx.runtime, ctx.listener()) else {
        // A reload removed the listener; its open connections answer until they close.
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is gone",
        ));
    };
    let conn = edge::client_context(&ctx, view.listener(), request.headers_mut());
    let mut ctx = RequestCtx {
        record: Some(Exchange::new(conn.clone())),
        conn,
        view,
        // Kept for the log line of a failure; both clones share, not copy, the text.
        method: request.method().clone(),
        uri: request.uri().clone(),
        host: None,
    };
    let response = match ctx.proxy(request).await {
        Ok(response) => response,
        Err(refusal) => ctx.refused(refusal),
    };
    Ok(ctx.log(response))
}

/// [`handle`] for a request hyper's server read (h2, and HTTP/1.1 after
/// `http::h1` handed the connection over).
pub fn handle_hyper(
    ctx: Arc<ConnContext>,
    request: Request<hyper::body::Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    handle(ctx, request.map(RequestBody::Hyper))
}

/// What the phases of one request share and fill in as it goes.
struct RequestCtx {
    /// The client connection's context, as the trusted-proxy rules see it.
    conn: Arc<ConnContext>,
    /// The config snapshot this request is handled under, start to end.
    view: ListenerView,
    /// The request's method and target, for the log line of a failure.
    method: Method,
    uri: Uri,
    /// The host the client named (`Host`, or `:authority` over h2).
    host: Option<HeaderValue>,
    /// The access log and metrics record; taken by the response body once a
    /// node answers, so it is written when the body ends.
    record: Option<Exchange>,
}

/// Where a request goes, decided before any node is contacted.
struct Plan {
    /// Group, affinity key and region the placement gets.
    wanted: Wanted,
    /// The membership the request is placed in.
    snapshot: Arc<Membership>,
    /// The client's sticky node, if it has one.
    affinity: Affinity,
    /// The client's side of an upgrade (WebSocket) it asked for.
    client_upgrade: Option<OnUpgrade>,
}

impl RequestCtx {
    /// Runs the phases in order; the first that answers ends the request.
    async fn proxy(
        &mut self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        if let Some(answer) = self.early_answer(&mut request)? {
            return Ok(answer);
        }
        let route = self.classify(&request);
        if let Some(answer) = self.api_answer(&request) {
            return Ok(answer);
        }
        let policy = match self.request_filter(&route, &mut request) {
            Ok(policy) => policy,
            Err(answer) => return Ok(*answer),
        };
        if self.sniffs(&policy, &route, &request) {
            return self.takeover(request);
        }
        let mut plan = self.plan(&policy, &route, &mut request);
        self.upstream_request_filter(&mut request, plan.client_upgrade.is_some())?;
        let (response, lease, connection) = self.connect(&plan, request).await?;
        let response = self
            .response_filter(&plan, &policy, &lease, response)
            .await?;
        Ok(self.deliver(plan.client_upgrade.take(), lease, connection, response))
    }

    /// Answers that come before the route: the Host checks, the ACME http-01
    /// challenge, and the listener's redirect to HTTPS.
    fn early_answer(
        &mut self,
        request: &mut Request<RequestBody>,
    ) -> Result<Option<Response<ResponseBody>>, Refusal> {
        self.host = guard::resolve_host(request)?;
        let path = request.uri().path();
        if let Some(answer) = super::http01::answer(&self.conn.runtime, path) {
            return Ok(Some(answer));
        }
        if self.view.listener().redirect_https && !crate::tls::is_http01_path(path) {
            let host = self
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .ok_or((StatusCode::BAD_REQUEST, "missing Host header".to_string()))?;
            let host = host.split(':').next().unwrap_or(host);
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            return Ok(Some(redirect(&format!("https://{host}{path}"))));
        }
        Ok(None)
    }

    /// The router's verdict (target, kind, stream), recorded for the log.
    fn classify(&mut self, request: &Request<RequestBody>) -> Route {
        let route = route::classify(request.uri().path(), request.uri().query());
        if let Some(record) = self.record.as_mut() {
            record.set_route(route.kind.as_str());
            record.add_bytes_in(request.body().size_hint().exact().unwrap_or(0));
        }
        route
    }

    /// amslb's own API on a proxy listener: the node assignment.
    fn api_answer(&self, request: &Request<RequestBody>) -> Option<Response<ResponseBody>> {
        let listener = self.view.listener();
        if !(listener.assign_api && assign::handles(request.uri().path())) {
            return None;
        }
        let snapshot = self.conn.runtime.cluster.snapshot();
        let (status, body) = assign::answer(
            &snapshot,
            &self.view.config,
            listener,
            request.method(),
            request.uri(),
            request.headers(),
        );
        Some(super::body::api_json(status, &body))
    }

    /// `[[rule]]`s and `[[limit]]`s: an answer of their own (deny, redirect,
    /// 429), or what they decided for the rest of the request.
    fn request_filter(
        &self,
        route: &Route,
        request: &mut Request<RequestBody>,
    ) -> Result<Admitted, Box<Response<ResponseBody>>> {
        edge::admit(&self.conn, &self.view, route, request)
    }

    /// Whether this is a signalling WebSocket amslb routes by its first
    /// command. A rule that chose the group has decided already.
    fn sniffs(&self, policy: &Admitted, route: &Route, request: &Request<RequestBody>) -> bool {
        !policy.chose_group() && sniff::applies(self.view.listener(), route, request.headers())
    }

    /// amslb answers the WebSocket upgrade itself; the session continues
    /// outside this request (`http::sniffed`).
    fn takeover(
        &mut self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, Refusal> {
        self.upstream_request_filter(&mut request, true)?;
        let config = self.view.config.clone();
        Ok(sniffed::accept(
            &self.conn,
            config,
            self.view.listener(),
            request,
        ))
    }

    /// Group (the route's, steered by rules), and the client's sticky node.
    fn plan(&self, policy: &Admitted, route: &Route, request: &mut Request<RequestBody>) -> Plan {
        let config = &self.view.config;
        let wanted = policy.steer(Wanted::for_route(
            config,
            self.view.listener(),
            route,
            request.headers(),
        ));
        let snapshot = self.conn.runtime.cluster.snapshot();
        let affinity =
            sticky_affinity(&self.conn, config, &snapshot, &wanted.group, route, request);
        let client_upgrade = is_upgrade(request).then(|| hyper::upgrade::on(&mut *request));
        Plan {
            wanted,
            snapshot,
            affinity,
            client_upgrade,
        }
    }

    /// The request as a node gets it: origin-form over HTTP/1.1, a Host,
    /// no hop-by-hop headers (but the upgrade ones when upgrading), and the
    /// forwarding headers the listener adds.
    fn upstream_request_filter(
        &mut self,
        request: &mut Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(), Refusal> {
        let target = request.uri();
        // An origin-form target (what HTTP/1.1 clients send) is already what
        // the node gets; parsing it again cost an allocation per request.
        let origin_form = target.scheme().is_none()
            && target.authority().is_none()
            && target.path_and_query().is_some();
        if !origin_form {
            let path = target.path_and_query().map_or("/", |p| p.as_str());
            let uri: Uri = path.parse().map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    "invalid request target".to_string(),
                )
            })?;
            *request.uri_mut() = uri;
        }
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        if !headers.contains_key(header::HOST)
            && let Some(value) = self.host.take()
        {
            headers.insert(header::HOST, value);
        }
        strip_hop_by_hop(headers, upgrade);
        let listener: &ListenerConfig = self.view.listener();
        let options = ForwardOptions {
            forwarded: listener.forwarded,
            via: listener.via,
        };
        add_forwarding(headers, self.conn.client, &self.conn.client_ip, options);
        Ok(())
    }

    /// Sends the request to a node of the plan, through the shared failover loop.
    async fn connect(
        &mut self,
        plan: &Plan,
        request: Request<RequestBody>,
    ) -> Result<(Response<NodeIncoming>, NodeLease, Option<Lent>), Refusal> {
        let config = &self.view.config;
        forward(
            &self.conn,
            config,
            &plan.snapshot,
            &plan.wanted,
            &plan.affinity,
            request,
        )
        .await
        .map_err(|e| {
            if let Some(record) = self.record.as_mut() {
                record.set_unserved_group(&plan.wanted.group);
            }
            (e.status(), e.to_string())
        })
    }

    /// The node's answer, vetted (bad framing, unasked upgrades), with the
    /// sticky cookie, the rules' response headers and no hop-by-hop headers.
    /// The record moves into the response body here.
    async fn response_filter(
        &mut self,
        plan: &Plan,
        policy: &Admitted,
        lease: &NodeLease,
        response: Response<NodeIncoming>,
    ) -> Result<Response<Box<NodeBody>>, Refusal> {
        let (health, timeout) = (&self.conn.runtime.health, self.view.config.timeouts.server);
        let asked_upgrade = plan.client_upgrade.is_some();
        let mut response =
            guard::vet_response(response, asked_upgrade, health, lease.node(), timeout)
                .await
                .map_err(|e| (e.status(), e.to_string()))?;
        if let Some(record) = self.record.as_mut() {
            record.set_node(lease.node().clone());
            record.set_status(response.status().as_u16());
            let affinity = &plan.affinity;
            let hit = affinity
                .node
                .as_ref()
                .is_some_and(|n| Arc::ptr_eq(n, lease.node()));
            if affinity.redispatched || (affinity.node.is_some() && !hit) {
                record.set_sticky(Sticky::Redispatch);
            } else if hit {
                record.set_sticky(Sticky::Hit);
            }
        }
        self.conn.runtime.sticky().on_response(
            &plan.affinity,
            lease.node(),
            response.headers_mut(),
            self.conn.client.tls,
        );
        policy.on_response(response.headers_mut());
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(response.headers_mut(), switching);
        Ok(response)
    }

    /// Streams the node's body to the client (its connection goes back to
    /// the pool when the body ends), or, for a granted upgrade, starts the
    /// tunnel between the two upgraded connections.
    fn deliver(
        &mut self,
        client_upgrade: Option<OnUpgrade>,
        lease: NodeLease,
        connection: Option<Lent>,
        mut response: Response<Box<NodeBody>>,
    ) -> Response<ResponseBody> {
        let mut record = self.record.take();
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
            let node_upgrade = hyper::upgrade::on(&mut response);
            if let Some(record) = record.as_mut() {
                record.start_tunnel();
            }
            // The connection is the tunnel's now: it never serves another request.
            drop(connection);
            spawn_tunnel(
                &self.conn,
                &self.view.config,
                client_upgrade,
                node_upgrade,
                lease,
                record,
            );
            return response.map(|_| ResponseBody::Local(Default::default()));
        }
        response.map(|body| ResponseBody::Node {
            body,
            lease: Some(lease),
            connection,
            record,
        })
    }

    /// An answer for a refused request, with the log line saying why.
    fn refused(&self, (status, reason): Refusal) -> Response<ResponseBody> {
        warn!(
            listener = %self.conn.listener(),
            client = %self.conn.client.addr,
            method = %self.method,
            path = self.uri.path(),
            status = status.as_u16(),
            reason,
            "request failed"
        );
        local_response(status, &reason)
    }

    /// Records an answer amslb wrote itself (a node's answer is recorded by
    /// its body, which holds the record by now).
    fn log(&mut self, response: Response<ResponseBody>) -> Response<ResponseBody> {
        if let Some(mut record) = self.record.take() {
            record.set_status(response.status().as_u16());
            record.add_bytes_out(response.body().size_hint().exact().unwrap_or(0));
        }
        response
    }
}

/// Reads (and strips from the request) the client's tie to a node of `group`
/// (or of its backup, while the backup is what serves the group): sticky
/// cookie, or the WHIP/WHEP tag in the URL.
pub(crate) fn sticky_affinity(
    ctx: &ConnContext,
    config: &Config,
    snapshot: &Membership,
    group: &str,
    route: &Route,
    request: &mut Request<RequestBody>,
) -> Affinity {
    let members: &[Arc<Node>] = snapshot.group(group).map_or(&[], |m| &m.nodes);
    // The group's own list, borrowed (no copy per request) unless its
    // backup has to join it.
    let with_backup: Vec<Arc<Node>>;
    let nodes = match config.group(group).and_then(|g| g.backup.as_deref()) {
        Some(backup) if !members.iter().any(|n| n.is_usable()) => {
            let backup = snapshot.group(backup).map_or(&[][..], |m| &m.nodes);
            with_backup = members.iter().chain(backup).cloned().collect();
            &with_backup[..]
        }
        _ => members,
    };
    let mut uri = std::mem::take(request.uri_mut());
    let affinity =
        ctx.runtime
            .sticky()
            .on_request(route.kind, &mut uri, request.headers_mut(), nodes);
    *request.uri_mut() = uri;
    affinity
}

fn is_upgrade(request: &Request<RequestBody>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::UPGRADE)
        && crate::header_list::lists(headers, header::CONNECTION, "upgrade")
}

/// Picks a node and sends the request, retrying other nodes (of the group,
/// then of its backup group) when connecting fails. Retries happen only
/// before any byte of the request left, so no request is ever sent twice.
///
/// The client's sticky node, when it has a healthy one, is tried first
/// (draining or not); every failure is reported to the health checker.
/// A request without a body that asks for no upgrade goes over a
/// [`DirectConn`] (driven in this task); the rest over hyper's client, whose
/// connection comes back as the [`Lent`].
pub(crate) async fn forward(
    ctx: &ConnContext,
    config: &Config,
    snapshot: &Membership,
    wanted: &Wanted,
    affinity: &Affinity,
    request: Request<RequestBody>,
) -> Result<(Response<NodeIncoming>, NodeLease, Option<Lent>), ProxyError> {
    let upload = Upload::new(request.body());
    let client_timeout = config.timeouts.client;
    let mut request = request.map(|body| {
        if body.is_end_stream() {
            // Nothing to stream or watch (and no box to allocate).
            return UpstreamBody::Empty;
        }
        UpstreamBody::Client(UnsyncBoxBody::new(ClientBody::new(
            body,
            upload.clone(),
            client_timeout,
        )))
    });
    let direct = is_replayable(&request) && !request.headers().contains_key(header::UPGRADE);
    let health = &ctx.runtime.health;
    let report = Reporting {
        health,
        metrics: &ctx.runtime.metrics,
        listener: &ctx.metrics,
    };
    let mut failover = Failover::new(config, snapshot, wanted, report).first(affinity.node.clone());
    let connect_timeout = config.timeouts.connect;
    let node_tls = &*ctx.runtime.node_tls;
    let pools = &ctx.runtime.pools;
    let mut redispatch_counted = false;
    loop {
        let connected = failover
            .connect(|node| async move {
                checkout(pools, &node, node_tls, connect_timeout, direct).await
            })
            .await;
        if failover.first_failed() && !std::mem::replace(&mut redispatch_counted, true) {
            ctx.runtime.sticky().count_redispatch();
            ctx.metrics.redispatch();
        }
        let Connected {
            conn: (conn, reused, pool),
            lease,
        } = connected
            .inspect_err(|_| ctx.metrics.no_node(&wanted.group))
            .map_err(|e| match e {
                Failure::NoNode => ProxyError::NoUsableNode(
                    wanted.group.clone(),
                    config.group(&wanted.group).and_then(|g| g.backup.clone()),
                ),
                Failure::AllFailed { source, .. } => ProxyError::AllNodesFailed(source),
            })?;
        let node = lease.node().clone();
        let server_timeout = config.timeouts.server;
        let sent = match conn {
            NodeConn::Direct(conn) => {
                let sent =
                    guard::await_response(&upload, server_timeout, conn.send(&request, pool));
                sent.await.map(|sent| direct_outcome(sent, reused, request))
            }
            // Boxed, as the less common path (bodies, upgrades): see `checkout`.
            NodeConn::Hyper(sender) => {
                Box::pin(hyper_outcome(
                    &upload,
                    server_timeout,
                    sender,
                    reused,
                    request,
                    pool,
                ))
                .await
            }
        };
        let outcome = match sent {
            Err(_) => {
                health.report_failure(&node, "no response head in time");
                return Err(ProxyError::Timeout(node.id().to_string(), server_timeout));
            }
            Ok(outcome) => outcome,
        };
        match outcome {
            Outcome::Answered(response, lent) => {
                health.report_status(&node, response.status().as_u16());
                return Ok((response, lease, lent));
            }
            // Not sent at all: the pooled connection was closing. Pick again
            // without counting it against the node: this is not its fault.
            Outcome::Unsent(unsent) => {
                info!(
                    node = node.id(),
                    "pooled connection was closed, reconnecting"
                );
                request = unsent;
            }
            Outcome::SendAgain(again, error) => {
                info!(node = node.id(), %error, "reused connection lost, sending again");
                request = again;
            }
            // The client broke its own request: not the node's failure.
            Outcome::Lost(error) if upload.fault().is_some() => {
                let fault = upload.fault().unwrap_or(ClientFault::BadBody);
                info!(node = node.id(), %fault, %error, "request abandoned by the client");
                return Err(ProxyError::Client(fault));
            }
            Outcome::Lost(error) => {
                health.report_failure(&node, "connection lost before the answer");
                return Err(ProxyError::Upstream(node.id().to_string(), error));
            }
        }
    }
}

/// A node connection for one request.
enum NodeConn {
    /// hyper's client: requests with a body, upgrades.
    Hyper(Sender),
    /// amslb's own, driven by this task: bodiless requests.
    Direct(DirectConn),
}

/// What became of one attempt to send a request on one connection.
enum Outcome {
    /// The node answered (the hyper connection comes back through the
    /// [`Lent`]; a direct one through its body).
    Answered(Response<NodeIncoming>, Option<Lent>),
    /// The connection was closed before the request went out: this request,
    /// to send on another.
    Unsent(Request<UpstreamBody>),
    /// A reused connection died under a replayable request: send it again.
    SendAgain(Request<UpstreamBody>, BoxError),
    /// The connection died with the request sent (or half sent).
    Lost(BoxError),
}

/// The outcome of a direct send; `request` is kept for a second attempt.
fn direct_outcome(
    sent: Result<Response<DirectBody>, SendError>,
    reused: bool,
    request: Request<UpstreamBody>,
) -> Outcome {
    match sent {
        Ok(response) => Outcome::Answered(response.map(NodeIncoming::Direct), None),
        // Only replayable requests go direct, so a reused connection the
        // node had closed can take the request again elsewhere.
        Err(failed) if reused && failed.nothing_received => {
            Outcome::SendAgain(request, failed.error.into())
        }
        Err(failed) => Outcome::Lost(failed.error.into()),
    }
}

/// Sends `request` over hyper's client connection `sender`.
async fn hyper_outcome(
    upload: &Upload,
    server_timeout: Duration,
    mut sender: Sender,
    reused: bool,
    request: Request<UpstreamBody>,
    pool: Arc<Pool>,
) -> Result<Outcome, guard::NoAnswer> {
    // A reused keep-alive connection may die under the request (the node
    // closed it, or the node itself died). A bodiless idempotent request
    // can then be sent again safely, as HAProxy and nginx do; keep what
    // rebuilding it takes.
    let replay = (reused && is_replayable(&request)).then(|| replay_copy(&request));
    let sent =
        guard::await_response(upload, server_timeout, sender.try_send_request(request)).await?;
    Ok(match sent {
        Ok(response) => {
            Outcome::Answered(response.map(NodeIncoming::Hyper), Some(pool.lend(sender)))
        }
        Err(mut failed) => match (failed.take_message(), replay) {
            (Some(unsent), _) => Outcome::Unsent(unsent),
            (None, Some(copy)) => Outcome::SendAgain(copy, failed.into_error().into()),
            (None, None) => Outcome::Lost(failed.into_error().into()),
        },
    })
}

/// Whether a request may be sent a second time: an idempotent method and no body.
fn is_replayable(request: &Request<UpstreamBody>) -> bool {
    request.method().is_idempotent() && request.body().is_end_stream()
}

/// A bodiless copy of `request`.
fn replay_copy(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(UpstreamBody::Empty);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// A connection to `node` (a direct one when `direct`), whether it is a
/// reused keep-alive one, and the pool it goes back to (looked up once per
/// request).
async fn checkout(
    pools: &Pools,
    node: &Node,
    tls: &NodeTlsSet,
    connect_timeout: Duration,
    direct: bool,
) -> Result<(NodeConn, bool, Arc<Pool>), ConnectError> {
    let pool = pools.of(node);
    let reused = if direct {
        pool.take_direct().map(NodeConn::Direct)
    } else {
        pool.take().map(NodeConn::Hyper)
    };
    if let Some(conn) = reused {
        return Ok((conn, true, pool));
    }
    let (addr, tls) = tls.http(node);
    let tls = tls.map(|t| &**t);
    // Boxed: a connect (with its TLS handshake) is a large future that a
    // pooled request never needs, and every request's future would
    // otherwise be sized, and copied, for it.
    let conn = if direct {
        NodeConn::Direct(Box::pin(DirectConn::open(addr, tls, connect_timeout)).await?)
    } else {
        NodeConn::Hyper(Box::pin(transport::connect(addr, tls, connect_timeout)).await?)
    };
    Ok((conn, false, pool))
}

fn spawn_tunnel(
    ctx: &ConnContext,
    config: &Config,
    client: hyper::upgrade::OnUpgrade,
    node: hyper::upgrade::OnUpgrade,
    lease: NodeLease,
    mut record: Option<Exchange>,
) {
    let idle = config.timeouts.tunnel;
    let hard_stop = ctx.runtime.hard_stop.clone();
    let listener = ctx.listener().clone();
    let client_addr = ctx.client.addr;
    let watch =
        super::ws_publish::PublishWatch::new(&ctx.runtime, config, &listener, client_addr.ip());
    ctx.runtime.tasks.spawn(async move {
        let (client, node_io) = match tokio::try_join!(client, node) {
            Ok(pair) => pair,
            Err(e) => {
                warn!(%listener, client = %client_addr, error = %e, "upgrade failed");
                return;
            }
        };
        let (client, node_io) = (tunnel::upgraded(client), tunnel::upgraded(node_io));
        let stop = hard_stop.cancelled_owned();
        let relayed = if watch.watching() {
            // The client's first command is read as it passes: the buffered
            // relay (boxed: its state is larger than the readiness relay's).
            Box::pin(tunnel::relay(watch.wrap(client), node_io, idle, stop)).await
        } else {
            tunnel::relay_upgraded(client, node_io, idle, stop).await
        };
        if let Some(record) = record.as_mut() {
            record.tunnel_closed(relayed.to_node, relayed.to_client);
        }
        info!(
            %listener,
            client = %client_addr,
            node = lease.node().id(),
            to_node = relayed.to_node,
            to_client = relayed.to_client,
            end = ?relayed.end,
            "tunnel closed"
        );
    });
}
