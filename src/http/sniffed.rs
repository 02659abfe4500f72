//! The proxy side of a sniffed signalling WebSocket: amslb answers the
//! client's upgrade itself, lets [`crate::streaming::sniff::Sniffer`] read the
//! first commands, then opens the WebSocket to the node the verdict picks,
//! replays the kept bytes and relays both ways.

use super::body::{RequestBody, ResponseBody};
use super::proxy::{ConnContext, forward, sticky_affinity};
use crate::cluster::NodeLease;
use crate::config::{Config, ListenerConfig};
use crate::route::{Route, RouteKind, Target};
use crate::streaming::select::Wanted;
use crate::streaming::sniff::{Sniffer, Verdict, accept_key};
use crate::tunnel;
use http::{HeaderValue, Request, Response, StatusCode, header};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

/// Answers the client's upgrade and starts the sniffing session. `request`
/// must already be prepared for the node (origin-form URI, forwarding
/// headers); the session sends it once it knows where.
pub fn accept(
    ctx: &Arc<ConnContext>,
    config: Arc<Config>,
    listener: &ListenerConfig,
    mut request: Request<RequestBody>,
) -> Response<ResponseBody> {
    let app = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| accept_key(k.as_bytes()))
        .unwrap_or_default();
    // The node must not negotiate what the client was not granted here: no
    // extension (so frames stay readable and uncompressed), and only the
    // subprotocol answered to the client.
    let headers = request.headers_mut();
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .and_then(|p| HeaderValue::from_str(p).ok());
    match &protocol {
        Some(p) => headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone()),
        None => headers.remove(header::SEC_WEBSOCKET_PROTOCOL),
    };
    let client_upgrade = hyper::upgrade::on(&mut request);
    let session = Session {
        ctx: ctx.clone(),
        listener: listener.clone(),
        config,
        app,
    };
    ctx.runtime.tasks.spawn(async move {
        match client_upgrade.await {
            Ok(client) => session.run(tunnel::upgraded(client), request).await,
            Err(e) => {
                warn!(listener = %session.ctx.listener(), error = %e, "client upgrade failed")
            }
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, key);
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    response
        .body(ResponseBody::Local(Default::default()))
        .unwrap_or_else(|_| Response::new(ResponseBody::Local(Default::default())))
}

struct Session {
    ctx: Arc<ConnContext>,
    listener: ListenerConfig,
    config: Arc<Config>,
    app: String,
}

/// A WebSocket close frame from the server side (unmasked): 1011, internal error.
const CLOSE_INTERNAL_ERROR: [u8; 4] = [0x88, 0x02, 0x03, 0xF3];

/// A close frame with 1008, policy violation: a publish over its client's `[[limit]]`.
const CLOSE_POLICY_VIOLATION: [u8; 4] = [0x88, 0x02, 0x03, 0xF0];

impl Session {
    async fn run(self, mut client: tunnel::UpgradedIo, request: Request<RequestBody>) {
        let mut sniffer = Sniffer::new(&self.app);
        let verdict = sniff(&mut client, &mut sniffer, self.listener.sniff_timeout).await;
        let (target, key, publish) = match &verdict {
            Verdict::Publish(key) => (Target::Origin, key.clone(), true),
            Verdict::Play(key) => (Target::Edge, key.clone(), false),
            Verdict::Gone if sniffer.held().is_empty() => return,
            Verdict::Pending | Verdict::Undecidable(_) | Verdict::Gone => {
                (Target::ListenerDefault, None, false)
            }
        };
        if publish
            && !self.ctx.runtime.admit_publish(
                self.ctx.listener(),
                crate::config::rules::RouteName::WebsocketPublish,
                self.ctx.client.addr.ip(),
            )
        {
            let _ = client.write_all(&CLOSE_POLICY_VIOLATION).await;
            return;
        }
        let wanted = Wanted::for_target(
            &self.config,
            &self.listener,
            target,
            key,
            publish,
            request.headers(),
        );
        let ctx = &self.ctx;
        let node = match connect(ctx, &self.config, &wanted, request).await {
            Ok(node) => node,
            Err(reason) => {
                warn!(listener = %ctx.listener(), client = %ctx.client.addr, group = wanted.group, reason, "sniffed websocket not forwarded");
                let _ = client.write_all(&CLOSE_INTERNAL_ERROR).await;
                return;
            }
        };
        let (mut node_io, lease) = node;
        if let Err(e) = node_io.write_all(sniffer.held()).await {
            warn!(listener = %ctx.listener(), node = lease.node().id(), error = %e, "replay to node failed");
            return;
        }
        info!(
            listener = %ctx.listener(),
            client = %ctx.client.addr,
            node = lease.node().id(),
            ?verdict,
            replayed = sniffer.held().len(),
            "sniffed websocket routed"
        );
        let relayed = tunnel::relay_upgraded(
            client,
            node_io,
            self.config.timeouts.tunnel,
            ctx.runtime.hard_stop.clone().cancelled_owned(),
        )
        .await;
        info!(
            listener = %ctx.listener(),
            client = %ctx.client.addr,
            node = lease.node().id(),
            to_node = relayed.to_node,
            to_client = relayed.to_client,
            end = ?relayed.end,
            "tunnel closed"
        );
    }
}

/// Reads client bytes until the sniffer decides, the client stops sending
/// (EOF or error: what was read is still replayed) or `wait` is over; answers
/// the client's pings on the way.
async fn sniff<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    sniffer: &mut Sniffer,
    wait: Duration,
) -> Verdict {
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return Verdict::Gone,
                Ok(n) => {
                    let verdict = sniffer.push(&buf[..n]);
                    let pongs = sniffer.take_pongs();
                    if !pongs.is_empty() && client.write_all(&pongs).await.is_err() {
                        return Verdict::Gone;
                    }
                    if verdict != Verdict::Pending {
                        return verdict;
                    }
                }
            }
        }
    };
    tokio::time::timeout(wait, reading)
        .await
        .unwrap_or(Verdict::Undecidable("no command in time"))
}

type NodeSide = (tunnel::UpgradedIo, NodeLease);

/// Sends the client's upgrade request to a node picked for `wanted` (with the
/// proxy's retries, and the client's sticky node first if it has one in the
/// chosen group) and returns the upgraded connection. No sticky cookie can be
/// set: the client already has its 101.
async fn connect(
    ctx: &ConnContext,
    config: &Config,
    wanted: &Wanted,
    mut request: Request<RequestBody>,
) -> Result<NodeSide, String> {
    let snapshot = ctx.runtime.cluster.snapshot();
    let route = Route {
        target: Target::ListenerDefault,
        kind: RouteKind::WebSocket,
        affinity: wanted.key.clone(),
    };
    let affinity = sticky_affinity(ctx, config, &snapshot, &wanted.group, &route, &mut request);
    // The node connection becomes the tunnel: it is not given back.
    let (mut response, lease, _) = forward(ctx, config, &snapshot, wanted, &affinity, request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "node {} answered {} instead of switching protocols",
            lease.node().id(),
            response.status()
        ));
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| format!("node {} upgrade: {e}", lease.node().id()))?;
    Ok((tunnel::upgraded(upgraded), lease))
}
