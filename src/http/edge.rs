//! Edge policy on the HTTP path: the client behind trusted proxies, `[[rule]]`
//! verdicts, request limits and host routing, applied to one request by the
//! few calls `proxy` makes (the decisions themselves are in `crate::policy`).

use super::body::{ResponseBody, local_response};
use super::proxy::ConnContext;
use crate::config::ListenerConfig;
use crate::config::rules::{HeaderSide, RouteName, RuleAction, RuleConfig, normalize_host};
use crate::policy::rules::{Facts, Outcome, evaluate};
use crate::policy::{clients, hosts};
use crate::route::{Route, RouteKind};
use crate::runtime::ListenerView;
use crate::streaming::select::Wanted;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

/// The connection context a request runs under: `ctx` itself, or, when the
/// peer is a trusted proxy naming a client in `X-Forwarded-For`, a copy with
/// that client. The header is cut to what stood left of the client, so the
/// forwarding code appends the client itself and nodes see the real chain.
pub(crate) fn client_context(
    ctx: &Arc<ConnContext>,
    listener: &ListenerConfig,
    headers: &mut HeaderMap,
) -> Arc<ConnContext> {
    if listener.trusted_proxies.is_empty() {
        return ctx.clone();
    }
    let xff = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let Some(chain) = clients::from_chain(&listener.trusted_proxies, ctx.client.addr.ip(), &xff)
    else {
        return ctx.clone();
    };
    match HeaderValue::from_str(&chain.before) {
        Ok(before) if !chain.before.is_empty() => {
            headers.insert("x-forwarded-for", before);
        }
        _ => {
            headers.remove("x-forwarded-for");
        }
    }
    let mut client = ctx.client;
    client.addr = SocketAddr::new(chain.client, 0);
    Arc::new(ConnContext {
        runtime: ctx.runtime.clone(),
        client,
        client_ip: super::headers::ip_header(chain.client),
        metrics: ctx.metrics.clone(),
    })
}

/// What the policy decided for a request it lets through.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// Group a rule or `host_groups` chose, over the router's.
    group: Option<String>,
    /// Response header edits, in rule order.
    response: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl Admitted {
    /// Whether the policy chose the group (the WebSocket sniffer then stays out).
    pub(crate) fn chose_group(&self) -> bool {
        self.group.is_some()
    }

    /// Sends `wanted` to the chosen group, if one was chosen.
    pub(crate) fn steer(&self, mut wanted: Wanted) -> Wanted {
        if let Some(group) = &self.group {
            wanted.group.clone_from(group);
        }
        wanted
    }

    /// Applies the rules' response header edits.
    pub(crate) fn on_response(&self, headers: &mut HeaderMap) {
        edit(headers, &self.response);
    }
}

fn edit(headers: &mut HeaderMap, edits: &[(HeaderName, Option<HeaderValue>)]) {
    for (name, value) in edits {
        match value {
            Some(value) => {
                headers.insert(name.clone(), value.clone());
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

/// Runs the rules, the request and publish limits and the host routing over
/// `request`; applies request header edits. `Err` is the answer to send
/// instead of forwarding (deny, redirect, 429).
pub(crate) fn admit<B>(
    ctx: &ConnContext,
    view: &ListenerView,
    route: &Route,
    request: &mut Request<B>,
) -> Result<Admitted, Box<Response<ResponseBody>>> {
    let config = &view.config;
    let listener = view.listener();
    let client = ctx.client.addr.ip();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())
        .map(normalize_host);
    // Looked up now: `host` borrows the request, which rule edits change below.
    let host_group = host
        .as_deref()
        .and_then(|host| hosts::group_for_host(&listener.host_groups, host));
    let mut admitted = Admitted::default();
    if !config.rules.is_empty() {
        let facts = Facts {
            listener: &listener.name,
            method: request.method().as_str(),
            path: request.uri().path(),
            route: route.kind,
            client,
            host: host.as_deref(),
            headers: request.headers(),
        };
        let verdict = evaluate(&config.rules, &facts);
        let label = |i: Option<usize>| i.map(|i| config.rules[i].label(i)).unwrap_or_default();
        match verdict.outcome {
            Outcome::Deny { status, body } => {
                info!(listener = %listener.name, %client, path = request.uri().path(), rule = label(verdict.rule), status, "request denied by rule");
                return Err(Box::new(answer(status, body)));
            }
            Outcome::Redirect { status, location } => {
                let mut response = answer(status, Some(location));
                if let Ok(value) = HeaderValue::from_str(location) {
                    response.headers_mut().insert(header::LOCATION, value);
                }
                return Err(Box::new(response));
            }
            Outcome::Forward(group) => admitted.group = group.map(str::to_string),
        }
        let (on_request, on_response): (Vec<&RuleConfig>, Vec<&RuleConfig>) = verdict
            .edits
            .into_iter()
            .partition(|r| r.on == HeaderSide::Request);
        edit(request.headers_mut(), &header_edits(&on_request));
        admitted.response = header_edits(&on_response);
    }
    let limits = &ctx.runtime.limits;
    let path = request.uri().path();
    let mut checked = limits.request(config, &listener.name, client, route.kind, path);
    if checked.is_ok() && is_new_whip_session(request.method(), route, path) {
        checked = limits.publish(config, &listener.name, client, RouteName::Whip);
    }
    if let Err(over) = checked {
        limits.refused(
            &ctx.runtime.metrics,
            &listener.name,
            &over,
            client,
            "request",
        );
        return Err(Box::new(local_response(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests",
        )));
    }
    if admitted.group.is_none() {
        admitted.group = host_group.map(str::to_string);
    }
    Ok(admitted)
}

/// A WHIP session starts with `POST /{app}/whip/{stream}`; its PATCH and
/// DELETE (on `/{app}/whip/{stream}/{id}`) belong to it.
fn is_new_whip_session(method: &Method, route: &Route, path: &str) -> bool {
    route.kind == RouteKind::Whip
        && method == Method::POST
        && path.trim_matches('/').split('/').count() == 3
}

/// Edits of header rules, parsed (validation made sure they parse).
fn header_edits(rules: &[&RuleConfig]) -> Vec<(HeaderName, Option<HeaderValue>)> {
    rules
        .iter()
        .filter_map(|r| {
            let name = HeaderName::from_bytes(r.header.as_deref()?.as_bytes()).ok()?;
            let value = match r.action {
                RuleAction::SetHeader => Some(HeaderValue::from_str(r.value.as_deref()?).ok()?),
                _ => None,
            };
            Some((name, value))
        })
        .collect()
}

/// A deny or redirect answer: the configured body, or the status line.
fn answer(status: u16, body: Option<&str>) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    let text = match body {
        Some(body) => body.to_string(),
        None => format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
    };
    super::body::plain_text(status, text)
}
