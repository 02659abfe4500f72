//! Recording one proxied exchange (a request and its response, or a tunnel)
//! into the metrics and the access log.
//!
//! An [`Exchange`] travels with the request: the proxy fills in route, node
//! and status; the response body counts the bytes it streams and drops the
//! exchange when done (or when the client goes away), which records it. So
//! the duration and byte counts are those of the whole response, and a
//! recording costs a few relaxed atomic adds plus, when the access log is on,
//! one `try_send`.

use super::proxy::ConnContext;
use crate::access_log::{Entry, Sticky};
use crate::cluster::Node;
use crate::metrics::OpenGuard;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// One request (or tunnel) on its way through the balancer.
#[derive(Debug)]
pub struct Exchange {
    ctx: Arc<ConnContext>,
    started: Instant,
    route: &'static str,
    /// Group the request was meant for, kept only when no node took it (the
    /// node's own group is used otherwise, so the usual path never allocates).
    unserved_group: Option<String>,
    node: Option<Arc<Node>>,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    sticky: Sticky,
    /// Set once the request was counted as an upgrade; the exchange then lives
    /// as long as the tunnel and records its bytes and log line at the end.
    tunnel: Option<OpenGuard>,
}

impl Exchange {
    /// Starts timing a request that arrived on `ctx`'s connection.
    pub fn new(ctx: Arc<ConnContext>) -> Self {
        Self {
            ctx,
            started: Instant::now(),
            route: "other",
            unserved_group: None,
            node: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            sticky: Sticky::None,
            tunnel: None,
        }
    }

    /// The route kind (metric label).
    pub fn set_route(&mut self, route: &'static str) {
        self.route = route;
    }

    /// The group a request was meant for when no node could take it.
    pub fn set_unserved_group(&mut self, group: &str) {
        self.unserved_group = Some(group.to_string());
    }

    /// The node that answered.
    pub fn set_node(&mut self, node: Arc<Node>) {
        self.node = Some(node);
    }

    /// The status sent to the client; an exchange dropped without one was
    /// abandoned by the client and counts as an abort.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// How stickiness played (for the sticky-session code to report).
    pub fn set_sticky(&mut self, sticky: Sticky) {
        self.sticky = sticky;
    }

    /// Request body bytes (as declared; streamed uploads without a length count 0).
    pub fn add_bytes_in(&mut self, n: u64) {
        self.bytes_in += n;
    }

    /// Response bytes sent to the client.
    pub fn add_bytes_out(&mut self, n: u64) {
        self.bytes_out += n;
    }

    /// Counts the upgrade request now (status 101) and turns the exchange into
    /// an open tunnel; drop it when the tunnel closes, after [`Self::tunnel_closed`].
    pub fn start_tunnel(&mut self) {
        self.record_request(0);
        self.tunnel = Some(self.ctx.metrics.tunnel_opened(self.route));
    }

    /// Bytes a finished tunnel relayed.
    pub fn tunnel_closed(&mut self, from_client: u64, to_client: u64) {
        self.bytes_in = from_client;
        self.bytes_out = to_client;
    }

    fn record_request(&self, bytes_out: u64) {
        let elapsed = self.started.elapsed();
        let listener = &self.ctx.metrics;
        let status = self.status;
        if status == 0 {
            listener.client_aborted();
            return;
        }
        match &self.node {
            Some(node) => self.ctx.runtime.metrics.with_node(node, |m| {
                listener.request_done(
                    self.route,
                    Some(m),
                    status,
                    elapsed,
                    self.bytes_in,
                    bytes_out,
                )
            }),
            None => {
                listener.request_done(self.route, None, status, elapsed, self.bytes_in, bytes_out)
            }
        }
    }

    fn log(&mut self) {
        let log = self.ctx.runtime.access_log.load();
        let Some(log) = log.as_ref() else {
            return;
        };
        let duration = self.started.elapsed();
        let group: Arc<str> = match (&self.node, self.unserved_group.take()) {
            (Some(node), _) => node.group().into(),
            (None, Some(group)) => group.into(),
            (None, None) => "-".into(),
        };
        log.log(Entry {
            time: SystemTime::now() - duration,
            client: self.ctx.client.addr,
            listener: self.ctx.listener().clone(),
            route: self.route,
            group,
            node: self.node.take(),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration,
            sticky: self.sticky,
        });
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.tunnel.is_some() {
            let node = self.node.as_ref();
            let (from_client, to_client) = (self.bytes_in, self.bytes_out);
            match node {
                Some(node) => self.ctx.runtime.metrics.with_node(node, |m| {
                    self.ctx
                        .metrics
                        .tunnel_bytes(Some(m), from_client, to_client)
                }),
                None => self.ctx.metrics.tunnel_bytes(None, from_client, to_client),
            }
        } else {
            self.record_request(self.bytes_out);
        }
        self.log();
    }
}
