//! Edge policy tables: `[[rule]]` (access rules, redirects, header edits,
//! group choice) and `[[limit]]` (per-client-address limits), the matching
//! primitives they share (address blocks, host patterns, path globs), their
//! checks, and which rules can never match.

use super::Config;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

/// An address block; a bare address (`"203.0.113.7"`) is the block of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }

    /// Whether every address of `other` is in this block.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0)
    }

    /// Whether the two blocks share no address.
    fn disjoint(&self, other: &Cidr) -> bool {
        !self.0.contains(&other.0) && !other.0.contains(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        text.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not an address block (\"10.0.0.0/8\") or an address"
                ))
            })
    }
}

/// Whether `ip` is in any of `blocks`.
pub fn in_any(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

/// A host name to match, exact (`origin.example.com`) or a wildcard
/// (`*.edge.example.com`: one or more labels in front of `edge.example.com`,
/// not the bare name). Stored lower case, without a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// This name only.
    Exact(String),
    /// Names ending in this suffix, which starts with a dot.
    Suffix(String),
}

impl HostPattern {
    /// Parses a pattern; the reason when it is not one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{text:?} is not a host name or a wildcard like \"*.edge.example.com\" (no port, `*` only as the first label)"
            ));
        }
        Ok(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_string())
        })
    }

    /// Whether `host` (already lower case, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }

    /// How specific the pattern is: an exact name beats any wildcard, a longer suffix a shorter one.
    pub fn specificity(&self) -> usize {
        match self {
            HostPattern::Exact(_) => usize::MAX,
            HostPattern::Suffix(s) => s.len(),
        }
    }

    /// Whether every host this pattern matches is matched by `self`.
    fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (a, b) if a == b => true,
            (HostPattern::Suffix(_), HostPattern::Exact(name)) => self.matches(name),
            (HostPattern::Suffix(s), HostPattern::Suffix(o)) => {
                o.len() > s.len() && o.ends_with(s.as_str())
            }
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HostPattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The host a request names: the `Host` value lower case, without port or trailing dot.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.');
    // Clients send lowercase names: no copy for those, on every request.
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// A path pattern: `*` matches any run of characters (`/` too), `?` one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(pub String);

impl Glob {
    /// Whether `path` matches the whole pattern.
    pub fn matches(&self, path: &str) -> bool {
        let (p, s) = (self.0.as_bytes(), path.as_bytes());
        let (mut pi, mut si) = (0, 0);
        // Where the last `*` was, and how much of the path it had taken.
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, si));
                pi += 1;
            } else if let Some((star_p, star_s)) = star {
                pi = star_p + 1;
                si = star_s + 1;
                star = Some((star_p, star_s + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&b| b == b'*')
    }

    /// The text before the first wildcard: every matching path starts with it.
    fn literal_prefix(&self) -> &str {
        let end = self.0.find(['*', '?']).unwrap_or(self.0.len());
        &self.0[..end]
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if !text.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "{text:?} must start with `/`"
            )));
        }
        Ok(Glob(text))
    }
}

/// Traffic kinds a rule or limit can name: the router's route kinds, `panel`,
/// and the publish sessions a `per_minute` limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteName {
    /// HLS / LL-HLS playlists and segments.
    Hls,
    /// DASH manifests and segments.
    Dash,
    /// WHIP requests (a new session is a `POST /{app}/whip/{stream}`).
    Whip,
    /// WHEP requests.
    Whep,
    /// WebRTC signalling WebSocket (`/{app}/websocket`).
    Websocket,
    /// AMS REST API (`/rest/...`, `/{app}/rest/...`).
    Rest,
    /// The web panel: `/`, files at the root (`/index.html`, `/main.js`) and `/assets/...`.
    Panel,
    /// Anything else the router does not name (the panel included).
    Other,
    /// A WebSocket whose first command is `publish` (sniffed, or read as it
    /// passes on other listeners).
    WebsocketPublish,
    /// An RTMP or RTMPS session on a `tcp`/`tls` listener that sends `publish`
    /// (a listener such a limit covers inspects its sessions' RTMP start).
    RtmpPublish,
    /// An SRT session on a `udp` listener.
    SrtPublish,
}

impl RouteName {
    /// Whether a request (as opposed to a session start) can be of this kind.
    pub fn is_request(self) -> bool {
        !matches!(
            self,
            RouteName::WebsocketPublish | RouteName::RtmpPublish | RouteName::SrtPublish
        )
    }

    /// Whether this names a kind of new publish session.
    pub fn is_publish(self) -> bool {
        matches!(
            self,
            RouteName::Whip
                | RouteName::WebsocketPublish
                | RouteName::RtmpPublish
                | RouteName::SrtPublish
        )
    }

    /// Whether every request of kind `other` is of this kind (`other` ⊇ `panel`).
    fn covers(self, other: RouteName) -> bool {
        self == other || (self == RouteName::Other && other == RouteName::Panel)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleAction {
    /// Forward the request (to `group`, when set); later rules are not looked at.
    #[default]
    Allow,
    /// Answer `status` (default 403) with `body` here; later rules are not looked at.
    Deny,
    /// Answer a redirect to `location` (status default 302); later rules are not looked at.
    Redirect,
    /// Set header `header` to `value` (`on` the request or the response), then go on to the next rule.
    SetHeader,
    /// Remove header `header` (`on` the request or the response), then go on to the next rule.
    DelHeader,
}

impl RuleAction {
    /// Whether the rule ends the evaluation when it matches.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RuleAction::Allow | RuleAction::Deny | RuleAction::Redirect
        )
    }
}

/// Which message a header action edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderSide {
    /// The request sent to the node.
    #[default]
    Request,
    /// The response sent to the client.
    Response,
}

/// `[[rule]]`: conditions (all must hold; within a list any entry may) and an action.
/// Rules are evaluated in order; the first matching `allow`/`deny`/`redirect` decides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name for logs and `amslb check`.
    #[serde(default)]
    pub name: Option<String>,
    /// Listeners the rule applies to; empty: every HTTP listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// The path starts with one of these.
    #[serde(default)]
    pub path_prefix: Vec<String>,
    /// The path matches one of these globs (`*`, `?`).
    #[serde(default)]
    pub paths: Vec<Glob>,
    /// The method is one of these (`GET`, `POST`, ...).
    #[serde(default)]
    pub methods: Vec<String>,
    /// The router classified the request as one of these.
    #[serde(default)]
    pub routes: Vec<RouteName>,
    /// The client address is in one of these blocks.
    #[serde(default)]
    pub client_in: Vec<Cidr>,
    /// The client address is in none of these blocks.
    #[serde(default)]
    pub client_not_in: Vec<Cidr>,
    /// The Host matches one of these (exact or `*.` wildcard).
    #[serde(default)]
    pub hosts: Vec<HostPattern>,
    /// Every one of these request headers is present.
    #[serde(default)]
    pub headers: Vec<String>,
    /// What to do on a match.
    #[serde(default)]
    pub action: RuleAction,
    /// Status of a `deny` (default 403) or a `redirect` (default 302).
    #[serde(default)]
    pub status: Option<u16>,
    /// Body of a `deny` answer (default: the status's reason phrase).
    #[serde(default)]
    pub body: Option<String>,
    /// Target of a `redirect`.
    #[serde(default)]
    pub location: Option<String>,
    /// Group an `allow` sends the request to, instead of the router's choice.
    #[serde(default)]
    pub group: Option<String>,
    /// Header a `set-header`/`del-header` edits.
    #[serde(default)]
    pub header: Option<String>,
    /// Value a `set-header` sets.
    #[serde(default)]
    pub value: Option<String>,
    /// Whether a header action edits the request (default) or the response.
    #[serde(default)]
    pub on: HeaderSide,
}

impl RuleConfig {
    /// `name`, or `rule[i]` for an unnamed one.
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("rule[{index}]"))
    }

    /// Whether every request this rule's conditions accept is accepted by `earlier`'s.
    /// Conservative: `false` when it cannot tell.
    fn covered_by(&self, earlier: &RuleConfig) -> bool {
        let subset = |mine: &[String], theirs: &[String]| {
            theirs.is_empty() || (!mine.is_empty() && mine.iter().all(|m| theirs.contains(m)))
        };
        let paths_covered = earlier.path_prefix.is_empty()
            || ((!self.path_prefix.is_empty() || !self.paths.is_empty())
                && self
                    .path_prefix
                    .iter()
                    .map(String::as_str)
                    .chain(self.paths.iter().map(Glob::literal_prefix))
                    .all(|p| {
                        earlier
                            .path_prefix
                            .iter()
                            .any(|e| p.starts_with(e.as_str()))
                    }));
        let globs_covered = earlier.paths.is_empty()
            || (!self.paths.is_empty() && self.paths.iter().all(|g| earlier.paths.contains(g)));
        let routes_covered = earlier.routes.is_empty()
            || (!self.routes.is_empty()
                && self
                    .routes
                    .iter()
                    .all(|r| earlier.routes.iter().any(|e| e.covers(*r))));
        let client_in_covered = earlier.client_in.is_empty()
            || (!self.client_in.is_empty()
                && self
                    .client_in
                    .iter()
                    .all(|c| earlier.client_in.iter().any(|e| e.covers(c))));
        // Every address this rule accepts must be outside each block the earlier one excludes.
        let client_not_in_covered = earlier.client_not_in.iter().all(|excluded| {
            self.client_not_in.iter().any(|mine| mine.covers(excluded))
                || (!self.client_in.is_empty()
                    && self.client_in.iter().all(|mine| mine.disjoint(excluded)))
        });
        let hosts_covered = earlier.hosts.is_empty()
            || (!self.hosts.is_empty()
                && self
                    .hosts
                    .iter()
                    .all(|h| earlier.hosts.iter().any(|e| e.covers(h))));
        let headers_covered = earlier
            .headers
            .iter()
            .all(|h| self.headers.iter().any(|mine| mine.eq_ignore_ascii_case(h)));
        subset(&self.listeners, &earlier.listeners)
            && subset(&self.methods, &earlier.methods)
            && paths_covered
            && globs_covered
            && routes_covered
            && client_in_covered
            && client_not_in_covered
            && hosts_covered
            && headers_covered
    }
}

/// For each rule that can never match, (its index, the earlier final rule that
/// takes every request it would).
pub fn unreachable_rules(rules: &[RuleConfig]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(j) = (0..i).find(|&j| rules[j].action.is_final() && rule.covered_by(&rules[j]))
        {
            found.push((i, j));
        }
    }
    found
}

/// `[[limit]]`: one per-client-address limit. Exactly one of
/// `max_connections`, `requests_per_second`, `per_minute` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Unique name: the `limit` label of `amslb_limited_total`, and in logs.
    pub name: String,
    /// Listeners the limit applies to; empty: every listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Traffic the limit counts: route kinds for `requests_per_second`
    /// (empty: every request), publish kinds for `per_minute` (empty: all four).
    #[serde(default)]
    pub routes: Vec<RouteName>,
    /// Client addresses the limit does not apply to.
    #[serde(default)]
    pub exempt: Vec<Cidr>,
    /// Most connections open at once per client address.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Sustained requests per second per client address (token bucket).
    #[serde(default)]
    pub requests_per_second: Option<f64>,
    /// Requests (or publish sessions) a client may make at once above the rate;
    /// default: one second's worth of `requests_per_second`, or `per_minute`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// New publish sessions per minute per client address.
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Client addresses tracked at once; the least recently seen is forgotten
    /// when the table is full, so memory stays fixed under any flood.
    #[serde(default = "default_table_size")]
    pub table_size: usize,
}

fn default_table_size() -> usize {
    16_384
}

/// What a limit counts, with its figures resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitKind {
    /// Concurrent connections.
    Connections(u32),
    /// A token bucket: refill per second, capacity.
    Rate {
        /// Tokens added per second.
        per_second: f64,
        /// Bucket size.
        burst: u32,
    },
}

impl LimitConfig {
    /// The limit's kind and figures (valid once the config is validated).
    pub fn kind(&self) -> LimitKind {
        if let Some(max) = self.max_connections {
            return LimitKind::Connections(max);
        }
        if let Some(rps) = self.requests_per_second {
            return LimitKind::Rate {
                per_second: rps,
                burst: self.burst.unwrap_or_else(|| rps.ceil().max(1.0) as u32),
            };
        }
        let per_minute = self.per_minute.unwrap_or(1);
        LimitKind::Rate {
            per_second: f64::from(per_minute) / 60.0,
            burst: self.burst.unwrap_or(per_minute),
        }
    }

    /// Whether the limit applies on listener `name`.
    pub fn on_listener(&self, name: &str) -> bool {
        self.listeners.is_empty() || self.listeners.iter().any(|l| l == name)
    }

    /// Whether this is a `per_minute` publish limit counting sessions of `kind`.
    pub fn counts_publish(&self, kind: RouteName) -> bool {
        self.per_minute.is_some() && (self.routes.is_empty() || self.routes.contains(&kind))
    }
}

/// Checks `[[rule]]` and `[[limit]]` against the rest of the config; warns
/// about rules that can never match.
pub fn validate(config: &Config) -> Result<Vec<String>, (String, String)> {
    let fail = |key: String, reason: String| Err((key, reason));
    let listeners: HashSet<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    let known_listener = |key: &str, names: &[String]| -> Result<(), (String, String)> {
        match names.iter().position(|n| !listeners.contains(n.as_str())) {
            Some(j) => Err((
                format!("{key}.listeners[{j}]"),
                format!("unknown listener {:?}", names[j]),
            )),
            None => Ok(()),
        }
    };
    let header_name = |key: String, name: &str| -> Result<(), (String, String)> {
        http::HeaderName::from_bytes(name.as_bytes())
            .map(|_| ())
            .map_err(|_| (key, format!("{name:?} is not a header name")))
    };
    for (i, rule) in config.rules.iter().enumerate() {
        let key = format!("rule[{i}]");
        known_listener(&key, &rule.listeners)?;
        if let Some(j) = rule.path_prefix.iter().position(|p| !p.starts_with('/')) {
            return fail(
                format!("{key}.path_prefix[{j}]"),
                "must start with `/`".into(),
            );
        }
        if let Some(j) = rule
            .methods
            .iter()
            .position(|m| http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty())
        {
            return fail(format!("{key}.methods[{j}]"), "not an HTTP method".into());
        }
        if let Some(j) = rule.routes.iter().position(|r| !r.is_request()) {
            return fail(
                format!("{key}.routes[{j}]"),
                "rules see requests: hls, dash, whip, whep, websocket, rest, panel or other".into(),
            );
        }
        for (j, name) in rule.headers.iter().enumerate() {
            header_name(format!("{key}.headers[{j}]"), name)?;
        }
        let allowed = |present: bool, field: &str, actions: &str| {
            if present {
                Err((
                    format!("{key}.{field}"),
                    format!("only applies to action = {actions}"),
                ))
            } else {
                Ok(())
            }
        };
        let action = rule.action;
        allowed(
            rule.status.is_some() && !matches!(action, RuleAction::Deny | RuleAction::Redirect),
            "status",
            "\"deny\" or \"redirect\"",
        )?;
        allowed(
            rule.body.is_some() && action != RuleAction::Deny,
            "body",
            "\"deny\"",
        )?;
        allowed(
            rule.location.is_some() && action != RuleAction::Redirect,
            "location",
            "\"redirect\"",
        )?;
        allowed(
            rule.group.is_some() && action != RuleAction::Allow,
            "group",
            "\"allow\"",
        )?;
        let header_action = matches!(action, RuleAction::SetHeader | RuleAction::DelHeader);
        allowed(
            rule.header.is_some() && !header_action,
            "header",
            "\"set-header\" or \"del-header\"",
        )?;
        allowed(
            rule.value.is_some() && action != RuleAction::SetHeader,
            "value",
            "\"set-header\"",
        )?;
        allowed(
            rule.on != HeaderSide::Request && !header_action,
            "on",
            "\"set-header\" or \"del-header\"",
        )?;
        match action {
            RuleAction::Deny => {
                if let Some(status) = rule.status
                    && !(400..=599).contains(&status)
                {
                    return fail(format!("{key}.status"), "a deny answers 400 to 599".into());
                }
                if let Some(body) = &rule.body
                    && body.len() > 64 * 1024
                {
                    return fail(format!("{key}.body"), "at most 64 KiB".into());
                }
            }
            RuleAction::Redirect => {
                let Some(location) = &rule.location else {
                    return fail(
                        format!("{key}.location"),
                        "a redirect needs a location".into(),
                    );
                };
                if http::HeaderValue::from_str(location).is_err() || location.is_empty() {
                    return fail(format!("{key}.location"), "not a valid header value".into());
                }
                if let Some(status) = rule.status
                    && ![301, 302, 303, 307, 308].contains(&status)
                {
                    return fail(
                        format!("{key}.status"),
                        "a redirect answers 301, 302, 303, 307 or 308".into(),
                    );
                }
            }
            RuleAction::SetHeader | RuleAction::DelHeader => {
                let Some(name) = &rule.header else {
                    return fail(format!("{key}.header"), "names the header to edit".into());
                };
                header_name(format!("{key}.header"), name)?;
                if action == RuleAction::SetHeader {
                    let valid = rule
                        .value
                        .as_deref()
                        .is_some_and(|v| http::HeaderValue::from_str(v).is_ok());
                    if !valid {
                        return fail(
                            format!("{key}.value"),
                            "set-header needs a valid header value".into(),
                        );
                    }
                }
            }
            RuleAction::Allow => {
                if let Some(group) = &rule.group
                    && config.group(group).is_none()
                {
                    return fail(
                        format!("{key}.group"),
                        format!(
                            "unknown group {group:?}; define it with [[group]] name = {group:?}"
                        ),
                    );
                }
            }
        }
    }

    let mut names = HashSet::new();
    for (i, limit) in config.limits.iter().enumerate() {
        let key = format!("limit[{i}]");
        if limit.name.is_empty() {
            return fail(format!("{key}.name"), "must not be empty".into());
        }
        if !names.insert(limit.name.as_str()) {
            return fail(
                format!("{key}.name"),
                format!("limit {:?} is defined twice", limit.name),
            );
        }
        known_listener(&key, &limit.listeners)?;
        let set = [
            limit.max_connections.is_some(),
            limit.requests_per_second.is_some(),
            limit.per_minute.is_some(),
        ];
        if set.iter().filter(|&&s| s).count() != 1 {
            return fail(
                key,
                "set exactly one of max_connections, requests_per_second, per_minute (one [[limit]] each)".into(),
            );
        }
        if !(64..=1 << 20).contains(&limit.table_size) {
            return fail(format!("{key}.table_size"), "must be 64 to 1048576".into());
        }
        if limit.max_connections == Some(0) || limit.per_minute == Some(0) || limit.burst == Some(0)
        {
            return fail(
                key,
                "a limit of 0 refuses everything; use a [[rule]] with action = \"deny\"".into(),
            );
        }
        if limit.max_connections.is_some() {
            if !limit.routes.is_empty() {
                return fail(
                    format!("{key}.routes"),
                    "connections have no route; max_connections counts them all".into(),
                );
            }
            if limit.burst.is_some() {
                return fail(format!("{key}.burst"), "only applies to rates".into());
            }
        }
        if let Some(rps) = limit.requests_per_second {
            if !(rps.is_finite() && rps > 0.0) {
                return fail(
                    format!("{key}.requests_per_second"),
                    "must be a positive number".into(),
                );
            }
            if let Some(j) = limit.routes.iter().position(|r| !r.is_request()) {
                return fail(
                    format!("{key}.routes[{j}]"),
                    "requests_per_second counts requests: hls, dash, whip, whep, websocket, rest, panel or other".into(),
                );
            }
        }
        if limit.per_minute.is_some()
            && let Some(j) = limit.routes.iter().position(|r| !r.is_publish())
        {
            return fail(
                format!("{key}.routes[{j}]"),
                "per_minute counts publish sessions: whip, websocket-publish, rtmp-publish or srt-publish".into(),
            );
        }
    }

    validate_node_tls(config)?;
    Ok(unreachable_rules(&config.rules)
        .into_iter()
        .map(|(i, j)| {
            format!(
                "rule[{i}] ({}) can never match: {} (rule[{j}]) takes every request it would",
                config.rules[i].label(i),
                config.rules[j].label(j)
            )
        })
        .collect())
}

/// Checks a listener's `host_groups` and `trusted_proxies`.
pub fn validate_listener(config: &Config, index: usize) -> Result<(), (String, String)> {
    let listener = &config.listeners[index];
    for (host, group) in &listener.host_groups {
        let key = format!("listener[{index}].host_groups.{host}");
        HostPattern::parse(host).map_err(|reason| (key.clone(), reason))?;
        if host.to_ascii_lowercase() != *host {
            return Err((key, "write host names in lower case".into()));
        }
        if config.group(group).is_none() {
            return Err((
                key,
                format!("unknown group {group:?}; define it with [[group]] name = {group:?}"),
            ));
        }
    }
    if !listener.trusted_proxies.is_empty() && listener.protocol == super::Protocol::Udp {
        return Err((
            format!("listener[{index}].trusted_proxies"),
            "a udp listener has no X-Forwarded-For to read".into(),
        ));
    }
    // http/https go by Host, tls (RTMPS) by the TLS server name (SNI); a
    // plain tcp or udp session carries no name before a node is chosen.
    if !listener.host_groups.is_empty()
        && !matches!(
            listener.protocol,
            super::Protocol::Http | super::Protocol::Https | super::Protocol::Tls
        )
    {
        return Err((
            format!("listener[{index}].host_groups"),
            "only applies to http, https and tls listeners".into(),
        ));
    }
    Ok(())
}

/// `[cluster.node_tls]` / `[[group]] node_tls`: speak HTTPS to the nodes'
/// `https_port` (requests, WebSockets, health checks) and RTMPS to their
/// `rtmps_port` (the `tcp` and `tls` listeners' sessions, `tcp` health
/// checks), verifying their certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// PEM file of the CA(s) that sign the nodes' certificates; absent: the
    /// system's trust store (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Name the node certificates must carry; absent: the node's address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Check the certificate (chain and name). Off only for tests with throwaway certificates.
    #[serde(default = "default_verify")]
    pub verify: bool,
    /// Node port for HTTPS (AMS: 5443).
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Node port for RTMPS (AMS: 8443, `rtmps.enabled` in red5.properties).
    #[serde(default = "default_rtmps_port")]
    pub rtmps_port: u16,
}

fn default_verify() -> bool {
    true
}

fn default_https_port() -> u16 {
    5443
}

fn default_rtmps_port() -> u16 {
    8443
}

/// Checks every `node_tls` table: a usable server name.
pub fn validate_node_tls(config: &Config) -> Result<(), (String, String)> {
    let tables = std::iter::once(("cluster.node_tls".to_string(), &config.cluster.node_tls)).chain(
        config
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("group[{i}].node_tls"), &g.node_tls)),
    );
    for (key, table) in tables {
        let Some(tls) = table else { continue };
        if let Some(name) = &tls.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err((
                format!("{key}.server_name"),
                format!("{name:?} is not a DNS name or an address"),
            ));
        }
        for (name, port) in [
            ("https_port", tls.https_port),
            ("rtmps_port", tls.rtmps_port),
        ] {
            if port == 0 {
                return Err((format!("{key}.{name}"), "must not be 0".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> RuleConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn glob_matches() {
        let g = Glob("/*/rest/*".into());
        assert!(g.matches("/LiveApp/rest/v2/broadcasts"));
        assert!(!g.matches("/rest/v2"));
        assert!(Glob("/a?c".into()).matches("/abc"));
        assert!(!Glob("/a?c".into()).matches("/ac"));
        assert!(Glob("/*.html".into()).matches("/x/play.html"));
        assert!(!Glob("/*.html".into()).matches("/x/play.htm"));
        assert!(Glob("/**".into()).matches("/"));
    }

    #[test]
    fn host_patterns() {
        let wild = HostPattern::parse("*.Edge.example.test").unwrap();
        assert!(wild.matches("a.edge.example.test"));
        assert!(wild.matches("a.b.edge.example.test"));
        assert!(!wild.matches("edge.example.test"));
        assert!(!wild.matches("xedge.example.test"));
        assert!(HostPattern::parse("a.*.test").is_err());
        assert!(HostPattern::parse("a.test:80").is_err());
        assert_eq!(
            normalize_host("Origin.Example.Test:8080"),
            "origin.example.test"
        );
        assert_eq!(normalize_host("a.test."), "a.test");
        assert_eq!(normalize_host("[::1]:80"), "::1");
    }

    #[test]
    fn bare_address_is_a_block() {
        let c: Vec<Cidr> = toml::from_str::<toml::Table>("c = [\"10.1.2.3\", \"10.0.0.0/8\"]")
            .unwrap()["c"]
            .clone()
            .try_into()
            .unwrap();
        assert!(c[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!c[0].contains("10.1.2.4".parse().unwrap()));
        assert!(c[1].contains("::ffff:10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn shadowed_rules_are_found() {
        let rules = vec![
            rule("path_prefix = [\"/rest/\"]\naction = \"deny\""),
            rule("path_prefix = [\"/rest/v2/\"]\nclient_in = [\"10.0.0.0/8\"]"),
            rule("paths = [\"/rest/*\"]\naction = \"deny\""),
            rule(
                "path_prefix = [\"/LiveApp/\"]\naction = \"set-header\"\nheader = \"x\"\nvalue = \"1\"",
            ),
            rule("path_prefix = [\"/LiveApp/rest/\"]"),
            rule(
                "path_prefix = [\"/panel/\"]\nclient_not_in = [\"10.0.0.0/8\"]\naction = \"deny\"",
            ),
            rule(
                "path_prefix = [\"/panel/x\"]\nclient_not_in = [\"10.0.0.0/8\", \"192.168.0.0/16\"]",
            ),
            rule("path_prefix = [\"/panel/y\"]\nclient_in = [\"172.16.0.0/12\"]"),
            rule("path_prefix = [\"/panel/z\"]\nclient_in = [\"10.1.0.0/16\"]"),
        ];
        // A non-final rule (set-header) never hides later ones; the last one
        // matches addresses rule 5 does not take.
        assert_eq!(
            unreachable_rules(&rules),
            vec![(1, 0), (2, 0), (6, 5), (7, 5)]
        );
    }
}
