//! Evaluating `[[rule]]` tables for one request: the first matching final rule
//! (`allow`, `deny`, `redirect`) decides; header edits of the matching rules
//! before it are collected in order.

use crate::config::rules::{RouteName, RuleAction, RuleConfig, in_any};
use crate::route::RouteKind;
use http::HeaderMap;
use std::net::IpAddr;

/// What a rule looks at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Listener name.
    pub listener: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request path (no query).
    pub path: &'a str,
    /// The router's verdict.
    pub route: RouteKind,
    /// The client's address (behind trusted proxies: from the chain).
    pub client: IpAddr,
    /// The Host, normalized (lower case, no port), if the request has one.
    pub host: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// The deciding outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Forward; to this group when a rule names one.
    Forward(Option<&'a str>),
    /// Answer `status` with `body` (the reason phrase when `None`).
    Deny {
        /// Status code.
        status: u16,
        /// Body text.
        body: Option<&'a str>,
    },
    /// Answer a redirect.
    Redirect {
        /// Status code.
        status: u16,
        /// `Location`.
        location: &'a str,
    },
}

/// The rules' verdict on one request.
#[derive(Debug, Clone)]
pub struct Verdict<'a> {
    /// What happens to the request.
    pub outcome: Outcome<'a>,
    /// Index of the deciding rule, `None` when no final rule matched.
    pub rule: Option<usize>,
    /// Matching `set-header`/`del-header` rules before the deciding one, in order.
    pub edits: Vec<&'a RuleConfig>,
}

/// The web panel's requests, which the router counts as "other": the root,
/// files at the root (`/index.html`, `/main.js`, `/favicon.ico`) and `/assets/`.
pub fn is_panel(route: RouteKind, path: &str) -> bool {
    if route != RouteKind::Other {
        return false;
    }
    let rest = path.trim_start_matches('/');
    rest.is_empty() || path.starts_with("/assets/") || (!rest.contains('/') && rest.contains('.'))
}

/// Whether a route name a rule or limit lists takes this request.
pub fn route_matches(name: RouteName, route: RouteKind, path: &str) -> bool {
    match name {
        RouteName::Hls => route == RouteKind::Hls,
        RouteName::Dash => route == RouteKind::Dash,
        RouteName::Whip => route == RouteKind::Whip,
        RouteName::Whep => route == RouteKind::Whep,
        RouteName::Websocket => route == RouteKind::WebSocket,
        RouteName::Rest => route == RouteKind::Rest,
        RouteName::Panel => is_panel(route, path),
        RouteName::Other => route == RouteKind::Other,
        RouteName::WebsocketPublish | RouteName::RtmpPublish | RouteName::SrtPublish => false,
    }
}

fn matches(rule: &RuleConfig, facts: &Facts) -> bool {
    (rule.listeners.is_empty() || rule.listeners.iter().any(|l| l == facts.listener))
        && (rule.methods.is_empty() || rule.methods.iter().any(|m| m == facts.method))
        && (rule.path_prefix.is_empty()
            || rule
                .path_prefix
                .iter()
                .any(|p| facts.path.starts_with(p.as_str())))
        && (rule.paths.is_empty() || rule.paths.iter().any(|g| g.matches(facts.path)))
        && (rule.routes.is_empty()
            || rule
                .routes
                .iter()
                .any(|r| route_matches(*r, facts.route, facts.path)))
        && (rule.client_in.is_empty() || in_any(&rule.client_in, facts.client))
        && !in_any(&rule.client_not_in, facts.client)
        && (rule.hosts.is_empty()
            || facts
                .host
                .is_some_and(|h| rule.hosts.iter().any(|p| p.matches(h))))
        && rule
            .headers
            .iter()
            .all(|h| facts.headers.contains_key(h.as_str()))
}

/// Runs `rules` over a request.
pub fn evaluate<'a>(rules: &'a [RuleConfig], facts: &Facts) -> Verdict<'a> {
    let mut edits = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if !matches(rule, facts) {
            continue;
        }
        let outcome = match rule.action {
            RuleAction::SetHeader | RuleAction::DelHeader => {
                edits.push(rule);
                continue;
            }
            RuleAction::Allow => Outcome::Forward(rule.group.as_deref()),
            RuleAction::Deny => Outcome::Deny {
                status: rule.status.unwrap_or(403),
                body: rule.body.as_deref(),
            },
            RuleAction::Redirect => Outcome::Redirect {
                status: rule.status.unwrap_or(302),
                location: rule.location.as_deref().unwrap_or("/"),
            },
        };
        return Verdict {
            outcome,
            rule: Some(i),
            edits,
        };
    }
    Verdict {
        outcome: Outcome::Forward(None),
        rule: None,
        edits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<RuleConfig> {
        #[derive(serde::Deserialize)]
        struct File {
            rule: Vec<RuleConfig>,
        }
        toml::from_str::<File>(text).unwrap().rule
    }

    fn facts<'a>(path: &'a str, client: &str, headers: &'a HeaderMap) -> Facts<'a> {
        Facts {
            listener: "web",
            method: "GET",
            path,
            route: crate::route::classify(path, None).kind,
            client: client.parse().unwrap(),
            host: Some("live.example.test"),
            headers,
        }
    }

    const LOCKDOWN: &str = r#"
[[rule]]
action = "set-header"
header = "x-edge"
value = "1"

[[rule]]
name = "office"
routes = ["rest", "panel"]
client_in = ["10.0.0.0/8"]
action = "allow"

[[rule]]
name = "lock"
routes = ["rest", "panel"]
action = "deny"
body = "not from here"

[[rule]]
name = "old"
path_prefix = ["/old/"]
action = "redirect"
location = "https://live.example.test/new/"
status = 301

[[rule]]
hosts = ["*.example.test"]
headers = ["x-canary"]
group = "canary"
"#;

    #[test]
    fn first_final_match_decides_and_edits_before_it_apply() {
        let rules = rules(LOCKDOWN);
        let none = HeaderMap::new();
        let v = evaluate(&rules, &facts("/rest/v2/version", "203.0.113.9", &none));
        assert_eq!(
            v.outcome,
            Outcome::Deny {
                status: 403,
                body: Some("not from here")
            }
        );
        assert_eq!(v.rule, Some(2));
        assert_eq!(v.edits.len(), 1);
        let v = evaluate(
            &rules,
            &facts("/LiveApp/rest/v2/broadcasts/list/0/10", "10.1.2.3", &none),
        );
        assert_eq!(v.outcome, Outcome::Forward(None));
        assert_eq!(v.rule, Some(1));
        // The panel is locked, playback is not.
        let v = evaluate(&rules, &facts("/index.html", "203.0.113.9", &none));
        assert_eq!(v.rule, Some(2));
        let v = evaluate(
            &rules,
            &facts("/LiveApp/streams/s1.m3u8", "203.0.113.9", &none),
        );
        assert_eq!((v.outcome, v.rule), (Outcome::Forward(None), None));
        let v = evaluate(&rules, &facts("/old/x", "203.0.113.9", &none));
        assert_eq!(
            v.outcome,
            Outcome::Redirect {
                status: 301,
                location: "https://live.example.test/new/"
            }
        );
        let mut canary = HeaderMap::new();
        canary.insert("X-Canary", "1".parse().unwrap());
        let v = evaluate(&rules, &facts("/LiveApp/play.html", "203.0.113.9", &canary));
        assert_eq!(v.outcome, Outcome::Forward(Some("canary")));
    }

    #[test]
    fn panel_is_root_files_and_assets() {
        assert!(is_panel(RouteKind::Other, "/"));
        assert!(is_panel(RouteKind::Other, "/main.js"));
        assert!(is_panel(RouteKind::Other, "/assets/i18n/en.json"));
        assert!(!is_panel(RouteKind::Other, "/LiveApp/play.html"));
        assert!(!is_panel(RouteKind::Rest, "/rest/v2/version"));
    }
}
