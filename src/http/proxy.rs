//! The request handler: classify, pick a node, forward, stream the answer back.

use super::body::{ResponseBody, local_response, redirect};
use super::headers::{ClientInfo, ForwardOptions, add_forwarding, strip_hop_by_hop};
use super::pool::{self, ConnectError, Sender};
use super::record::Exchange;
use crate::balance;
use crate::cluster::{Membership, Node, NodeLease};
use crate::config::{Config, ListenerConfig};
use crate::metrics::ListenerMetrics;
use crate::route::{self, Route, Target};
use crate::runtime::{ListenerView, Runtime};
use crate::tunnel;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body as _, Incoming};
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
    /// The listener's metric handles, resolved once per listener.
    pub metrics: Arc<ListenerMetrics>,
}

/// Why a request could not be forwarded; each maps to one status code.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("no usable node in group {0:?}{backup}", backup = .1.as_ref().map(|b| format!(" or its backup {b:?}")).unwrap_or_default())]
    NoUsableNode(String, Option<String>),
    #[error("no node answered: {0}")]
    AllNodesFailed(ConnectError),
    #[error("node {0} did not send a response head within {1:?}")]
    Timeout(String, Duration),
    #[error("node {0} failed: {1}")]
    Upstream(String, hyper::Error),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoUsableNode(..) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AllNodesFailed(_) | ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// Handles one client request. Never fails: every problem becomes a response
/// with the right status and a log line with the reason.
pub async fn handle(
    ctx: Arc<ConnContext>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let Some(view) = ListenerView::current(&ctx.runtime, &ctx.listener) else {
        // A reload removed the listener; its open connections answer until they close.
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is gone",
        ));
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let mut record = Some(Exchange::new(ctx.clone()));
    let response = proxy(&ctx, &view, request, &mut record)
        .await
        .unwrap_or_else(|(status, reason)| {
            warn!(
                listener = %ctx.listener,
                client = %ctx.client.addr,
                %method,
                path,
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
    ctx: &ConnContext,
    view: &ListenerView,
    mut request: Request<Incoming>,
    record: &mut Option<Exchange>,
) -> Result<Response<ResponseBody>, Refusal> {
    let listener = view.listener();
    let host = request_host(&request);
    if listener.redirect_https {
        let host = host.ok_or((StatusCode::BAD_REQUEST, "missing Host header".to_string()))?;
        let host = host.split(':').next().unwrap_or(&host);
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        return Ok(redirect(&format!("https://{host}{path}")));
    }

    let route = route::classify(request.uri().path(), request.uri().query());
    let group = group_for(&view.config, listener, &route);
    if let Some(record) = record.as_mut() {
        record.set_route(route.kind.as_str());
        record.add_bytes_in(request.body().size_hint().exact().unwrap_or(0));
    }
    let upgrade = is_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

    prepare_upstream_request(&mut request, host, ctx.client, listener, upgrade)?;
    let (mut response, lease) = match forward(ctx, &view.config, group, request).await {
        Ok(answer) => answer,
        Err(e) => {
            if let Some(record) = record.as_mut() {
                record.set_unserved_group(group);
            }
            return Err((e.status(), e.to_string()));
        }
    };
    let mut record = record.take().map(|mut record| {
        record.set_node(lease.node().clone());
        record.set_status(response.status().as_u16());
        record
    });

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
        body,
        lease: Some(lease),
        record,
    }))
}

fn request_host(request: &Request<Incoming>) -> Option<String> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
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

/// The group the router's verdict names. `origin` and `edge` are the group
/// names the router targets; a config without such a group sends that traffic
/// to the listener's default group instead, so a single-group setup still works.
fn group_for<'a>(config: &'a Config, listener: &'a ListenerConfig, route: &Route) -> &'a str {
    let wanted = match route.target {
        Target::Origin => "origin",
        Target::Edge => "edge",
        Target::ListenerDefault => return &listener.default_group,
    };
    config
        .group(wanted)
        .map_or(&listener.default_group, |g| &g.name)
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
async fn forward(
    ctx: &ConnContext,
    config: &Config,
    group: &str,
    mut request: Request<Incoming>,
) -> Result<(Response<Incoming>, NodeLease), ProxyError> {
    let snapshot = ctx.runtime.cluster.snapshot();
    let backup = config.group(group).and_then(|g| g.backup.clone());
    let mut tried: Vec<Arc<Node>> = Vec::new();
    let mut attempts_left = config.global.retries + 1;
    let mut last_error = None;
    loop {
        let Some(node) = pick(config, &snapshot, group, backup.as_deref(), &tried) else {
            return Err(match last_error {
                Some(e) => ProxyError::AllNodesFailed(e),
                None => ProxyError::NoUsableNode(group.to_string(), backup),
            });
        };
        let lease = node.lease();
        let mut sender = match checkout(&node, config.timeouts.connect).await {
            Ok(sender) => sender,
            Err(e) => {
                warn!(node = node.id(), error = %e, "connect failed, trying another node");
                ctx.runtime.metrics.with_node(&node, |m| m.connect_failed());
                tried.push(node);
                attempts_left -= 1;
                if attempts_left == 0 {
                    return Err(ProxyError::AllNodesFailed(e));
                }
                ctx.metrics.retry();
                last_error = Some(e);
                continue;
            }
        };
        let server_timeout = config.timeouts.server;
        match tokio::time::timeout(server_timeout, sender.try_send_request(request)).await {
            Err(_) => return Err(ProxyError::Timeout(node.id().to_string(), server_timeout)),
            Ok(Ok(response)) => {
                node.pool().give_back_when_idle(sender);
                return Ok((response, lease));
            }
            Ok(Err(mut failed)) => match failed.take_message() {
                // Not sent at all: the pooled connection was closing. Pick again
                // without counting it against the node: this is not its fault.
                Some(unsent) => {
                    info!(
                        node = node.id(),
                        "pooled connection was closed, reconnecting"
                    );
                    request = unsent;
                }
                None => {
                    return Err(ProxyError::Upstream(
                        node.id().to_string(),
                        failed.into_error(),
                    ));
                }
            },
        }
    }
}

fn pick(
    config: &Config,
    snapshot: &Membership,
    group: &str,
    backup: Option<&str>,
    tried: &[Arc<Node>],
) -> Option<Arc<Node>> {
    [Some(group), backup]
        .into_iter()
        .flatten()
        .find_map(|name| {
            let members = snapshot.group(name)?;
            let mode = config.group(name).map(|g| g.balance).unwrap_or_default();
            balance::pick(mode, members, tried)
        })
}

async fn checkout(node: &Node, connect_timeout: Duration) -> Result<Sender, ConnectError> {
    match node.pool().take() {
        Some(sender) => Ok(sender),
        None => pool::connect(node.http_addr(), connect_timeout).await,
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
            hyper_util::rt::TokioIo::new(client),
            hyper_util::rt::TokioIo::new(node_io),
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
