//! The request handler: classify, pick a node, forward, stream the answer back.

use super::body::{ResponseBody, UpstreamBody, local_response, redirect};
use super::edge;
use super::guard::{self, ClientBody, ClientFault, Upload};
use super::headers::{ClientInfo, ForwardOptions, add_forwarding, strip_hop_by_hop};
use super::record::Exchange;
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
use crate::transport::{self, ConnectError, Pools, Sender};
use crate::tunnel;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Body;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// What every request of one client connection shares.
#[derive(Debug)]
pub struct ConnContext {
    /// The running balancer.
    pub runtime: Arc<Runtime>,
    /// Name of the listener the connection came in on.
    pub listener: Arc<str>,
    /// Who the client is.
    pub client: ClientInfo,
    /// The listener's metric handles, resolved once per connection.
    pub metrics: Arc<ListenerMetrics>,
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
    Upstream(String, hyper::Error),
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

/// Handles one client request. Never fails: every problem becomes a response
/// with the right status and a log line with the reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    mut request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let Some(view) = ListenerView::current(&ctx.runtime, &ctx.listener) else {
        // A reload removed the listener; its open connections answer until they close.
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is gone",
        ));
    };
    let ctx = edge::client_context(&ctx, view.listener(), request.headers_mut());
    // Kept for the log line of a failure; both clones share, not copy, the text.
    let method = request.method().clone();
    let uri = request.uri().clone();
    let mut record = Some(Exchange::new(ctx.clone()));
    let response = proxy(&ctx, &view, request, &mut record)
        .await
        .unwrap_or_else(|(status, reason)| {
            warn!(
                listener = %ctx.listener,
                client = %ctx.client.addr,
                %method,
                path = uri.path(),
                status = status.as_u16(),
                reason,
                "request failed"
            );
            local_response(status, &reason)
        });
    // Still here: amslb answered itself (error, redirect); record it now.
    if let Some(mut record) = record {
        record.set_status(response.status().as_u16());
        record.add_bytes_out(response.body().size_hint().exact().unwrap_or(0));
    }
    Ok(response)
}

type Refusal = (StatusCode, String);

async fn proxy(
    ctx: &Arc<ConnContext>,
    view: &ListenerView,
    mut request: Request<Incoming>,
    record: &mut Option<Exchange>,
) -> Result<Response<ResponseBody>, Refusal> {
    let listener = view.listener();
    let host = guard::resolve_host(&mut request)?;
    if let Some(answer) = super::http01::answer(&ctx.runtime, request.uri().path()) {
        return Ok(answer);
    }
    if listener.redirect_https && !crate::tls::is_http01_path(request.uri().path()) {
        let host = host.ok_or((StatusCode::BAD_REQUEST, "missing Host header".to_string()))?;
        let host = host.split(':').next().unwrap_or(&host);
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        return Ok(redirect(&format!("https://{host}{path}")));
    }

    let route = route::classify(request.uri().path(), request.uri().query());
    if let Some(record) = record.as_mut() {
        record.set_route(route.kind.as_str());
        record.add_bytes_in(request.body().size_hint().exact().unwrap_or(0));
    }
    if listener.assign_api && assign::handles(request.uri().path()) {
        let snapshot = ctx.runtime.cluster.snapshot();
        let (method, query) = (request.method(), request.uri());
        let headers = request.headers();
        return Ok(assign::answer(
            &snapshot,
            &view.config,
            listener,
            method,
            query,
            headers,
        ));
    }
    let policy = match edge::admit(ctx, view, &route, &mut request) {
        Ok(admitted) => admitted,
        Err(answer) => return Ok(*answer),
    };
    if !policy.chose_group() && sniff::applies(listener, &route, request.headers()) {
        prepare_upstream_request(&mut request, host, ctx.client, listener, true)?;
        return Ok(sniff::accept(ctx, view.config.clone(), listener, request));
    }
    let wanted = policy.steer(Wanted::for_route(
        &view.config,
        listener,
        &route,
        request.headers(),
    ));
    let snapshot = ctx.runtime.cluster.snapshot();
    let affinity = sticky_affinity(
        ctx,
        &view.config,
        &snapshot,
        &wanted.group,
        &route,
        &mut request,
    );
    let upgrade = is_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

    prepare_upstream_request(&mut request, host, ctx.client, listener, upgrade)?;
    let (response, lease) =
        match forward(ctx, &view.config, &snapshot, &wanted, &affinity, request).await {
            Ok(answer) => answer,
            Err(e) => {
                if let Some(record) = record.as_mut() {
                    record.set_unserved_group(&wanted.group);
                }
                return Err((e.status(), e.to_string()));
            }
        };
    let (health, timeout) = (&ctx.runtime.health, view.config.timeouts.server);
    let mut response = guard::vet_response(response, upgrade, health, lease.node(), timeout)
        .await
        .map_err(|e| (e.status(), e.to_string()))?;
    let mut record = record.take().map(|mut record| {
        record.set_node(lease.node().clone());
        record.set_status(response.status().as_u16());
        let hit = affinity
            .node
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, lease.node()));
        if affinity.redispatched || (affinity.node.is_some() && !hit) {
            record.set_sticky(Sticky::Redispatch);
        } else if hit {
            record.set_sticky(Sticky::Hit);
        }
        record
    });
    ctx.runtime.sticky().on_response(
        &affinity,
        lease.node(),
        response.headers_mut(),
        ctx.client.tls,
    );

    policy.on_response(response.headers_mut());
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switching);
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        let node_upgrade = hyper::upgrade::on(&mut response);
        if let Some(record) = record.as_mut() {
            record.start_tunnel();
        }
        spawn_tunnel(
            ctx,
            &view.config,
            client_upgrade,
            node_upgrade,
            lease,
            record,
        );
        return Ok(response.map(|_| ResponseBody::Local(Default::default())));
    }
    Ok(response.map(|body| ResponseBody::Node {
        body: Box::new(body),
        lease: Some(lease),
        record,
    }))
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
    request: &mut Request<Incoming>,
) -> Affinity {
    let mut nodes: Vec<Arc<Node>> = snapshot
        .group(group)
        .map(|members| members.nodes.clone())
        .unwrap_or_default();
    if !nodes.iter().any(|n| n.is_usable())
        && let Some(backup) = config.group(group).and_then(|g| g.backup.as_deref())
        && let Some(members) = snapshot.group(backup)
    {
        nodes.extend(members.nodes.iter().cloned());
    }
    let mut uri = std::mem::take(request.uri_mut());
    let affinity =
        ctx.runtime
            .sticky()
            .on_request(route.kind, &mut uri, request.headers_mut(), &nodes);
    *request.uri_mut() = uri;
    affinity
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn prepare_upstream_request(
    request: &mut Request<Incoming>,
    host: Option<String>,
    client: ClientInfo,
    listener: &ListenerConfig,
    upgrade: bool,
) -> Result<(), Refusal> {
    // Nodes get origin-form URIs ("/app/x?y") over HTTP/1.1 whatever the client spoke.
    let origin_form = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = origin_form.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "invalid request target".to_string(),
        )
    })?;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    if !headers.contains_key(header::HOST)
        && let Some(value) = host.and_then(|h| HeaderValue::from_str(&h).ok())
    {
        headers.insert(header::HOST, value);
    }
    strip_hop_by_hop(headers, upgrade);
    let options = ForwardOptions {
        forwarded: listener.forwarded,
        via: listener.via,
    };
    add_forwarding(headers, client, options);
    Ok(())
}

/// Picks a node and sends the request, retrying other nodes (of the group,
/// then of its backup group) when connecting fails. Retries happen only
/// before any byte of the request left, so no request is ever sent twice.
///
/// The client's sticky node, when it has a healthy one, is tried first
/// (draining or not); every failure is reported to the health checker.
pub(crate) async fn forward(
    ctx: &ConnContext,
    config: &Config,
    snapshot: &Membership,
    wanted: &Wanted,
    affinity: &Affinity,
    request: Request<Incoming>,
) -> Result<(Response<Incoming>, NodeLease), ProxyError> {
    let upload = Upload::new(request.body());
    let client_timeout = config.timeouts.client;
    let mut request = request.map(|body| {
        UpstreamBody::Client(UnsyncBoxBody::new(ClientBody::new(
            body,
            upload.clone(),
            client_timeout,
        )))
    });
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
            .connect(|node| async move { checkout(pools, &node, node_tls, connect_timeout).await })
            .await;
        if failover.first_failed() && !std::mem::replace(&mut redispatch_counted, true) {
            ctx.runtime.sticky().count_redispatch();
            ctx.metrics.redispatch();
        }
        let Connected {
            conn: (mut sender, reused),
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
        // A reused keep-alive connection may die under the request (the node
        // closed it, or the node itself died). A bodiless idempotent request
        // can then be sent again safely, as HAProxy and nginx do; keep what
        // rebuilding it takes.
        let replay = (reused && is_replayable(&request)).then(|| replay_copy(&request));
        let server_timeout = config.timeouts.server;
        match guard::await_response(&upload, server_timeout, sender.try_send_request(request)).await
        {
            Err(_) => {
                health.report_failure(&node, "no response head in time");
                return Err(ProxyError::Timeout(node.id().to_string(), server_timeout));
            }
            Ok(Ok(response)) => {
                health.report_status(&node, response.status().as_u16());
                ctx.runtime.pools.of(&node).give_back_when_idle(sender);
                return Ok((response, lease));
            }
            Ok(Err(mut failed)) => match (failed.take_message(), replay) {
                // Not sent at all: the pooled connection was closing. Pick again
                // without counting it against the node: this is not its fault.
                (Some(unsent), _) => {
                    info!(
                        node = node.id(),
                        "pooled connection was closed, reconnecting"
                    );
                    request = unsent;
                }
                (None, Some(copy)) => {
                    info!(node = node.id(), error = %failed.into_error(), "reused connection lost, sending again");
                    request = copy;
                }
                // The client broke its own request: not the node's failure.
                (None, None) if upload.fault().is_some() => {
                    let fault = upload.fault().unwrap_or(ClientFault::BadBody);
                    info!(node = node.id(), %fault, error = %failed.into_error(), "request abandoned by the client");
                    return Err(ProxyError::Client(fault));
                }
                (None, None) => {
                    health.report_failure(&node, "connection lost before the answer");
                    return Err(ProxyError::Upstream(
                        node.id().to_string(),
                        failed.into_error(),
                    ));
                }
            },
        }
    }
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

/// A connection to `node`, and whether it is a reused keep-alive one.
async fn checkout(
    pools: &Pools,
    node: &Node,
    tls: &NodeTlsSet,
    connect_timeout: Duration,
) -> Result<(Sender, bool), ConnectError> {
    match pools.of(node).take() {
        Some(sender) => Ok((sender, true)),
        None => {
            let (addr, tls) = tls.http(node);
            Ok((
                transport::connect(addr, tls.map(|t| &**t), connect_timeout).await?,
                false,
            ))
        }
    }
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
    let listener = ctx.listener.clone();
    let client_addr = ctx.client.addr;
    ctx.runtime.tasks.spawn(async move {
        let (client, node_io) = match tokio::try_join!(client, node) {
            Ok(pair) => pair,
            Err(e) => {
                warn!(%listener, client = %client_addr, error = %e, "upgrade failed");
                return;
            }
        };
        let relayed = tunnel::relay(
            tunnel::upgraded(client),
            tunnel::upgraded(node_io),
            idle,
            hard_stop.cancelled_owned(),
        )
        .await;
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
