//! Session affinity: which node a client is tied to, and the header rewrites
//! that carry that tie (pure functions; the proxy applies them).
//!
//! Two cookie modes, both HAProxy's:
//! - **prefix** (`cookie JSESSIONID prefix nocache`, as the AMS cluster
//!   guide's HAProxy config has it): the node's own
//!   session cookie `JSESSIONID=v` leaves as `JSESSIONID=<node>~v`; on the way
//!   back the prefix picks the node and is cut off, so AMS never sees it. The
//!   byte-level details (whitespace around `=` dropped, `;` and `,` both
//!   separating request cookies, the first cookie naming a known node wins, every
//!   prefix stripped even when unknown) were taken from HAProxy 2.6 and are pinned
//!   by the tests below and by the side-by-side test in tests/.
//! - **insert**: amslb sets its own cookie (`AMSLB=<node key>`).
//!
//! Node keys are opaque: a keyed hash of the node id (or the node's configured
//! `cookie`), so they are the same on every balancer with the same config and
//! across restarts, and they do not reveal the node's id, which in AMS is often
//! its private address.
//!
//! WHIP/WHEP follow-ups (`PATCH`/`DELETE` on the resource URL) carry no cookie
//! from most clients, so the node rides in the `Location` URL instead: see
//! [`tag_location`].

use crate::cluster::Node;
use crate::config::sticky::{SameSite, StickyConfig, StickyMode};
use crate::config::{Config, NodeConfig};
use crate::route::RouteKind;
use aws_lc_rs::hmac;
use foldhash::HashMap;
use http::header::{CACHE_CONTROL, COOKIE, ETAG, Entry, HOST, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Uri};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// Separates the node key from the node's own value in prefix mode (HAProxy's `~`).
pub const PREFIX_DELIM: char = '~';

/// Separates the keys of several groups in the inserted cookie.
///
/// One browser often talks to two groups through one host name: the player
/// page and REST go to `origin`, the HLS segments to `edge`. With one key per
/// cookie each group's answer would replace the other's key and the viewer
/// would bounce between edges; so the inserted cookie carries one key per
/// group (`AMSLB=<edge key>.<origin key>`), each request uses the key that
/// names a node of its group, and a new key replaces only its own group's.
pub const KEY_SEP: char = '.';

/// Most keys kept in the inserted cookie (the groups one client uses at once).
const MAX_KEYS: usize = 4;

/// Query parameter that carries the node key in a rewritten WHIP/WHEP `Location`.
pub const LOCATION_PARAM: &str = "amslb_node";

/// HMAC key used when `[sticky] secret` is unset: keys stay stable and opaque to
/// a casual reader, but anyone with this source can test guesses of node ids, so
/// deployments that care set a secret.
const DEFAULT_SECRET: &[u8] = b"amslb sticky node key v1";

/// Bytes of the HMAC kept in a node key: 64 bits, 16 hex digits.
const KEY_BYTES: usize = 8;

/// Derived keys cached at most (a cluster has far fewer nodes).
const KEY_CACHE_MAX: usize = 4096;

/// The affinity settings in effect, with the per-node keys resolved.
#[derive(Debug)]
pub struct Sticky {
    mode: StickyMode,
    name: String,
    same_site: Option<SameSite>,
    always_secure: bool,
    nocache: bool,
    hmac_key: hmac::Key,
    /// Node id → configured `cookie` value.
    configured: HashMap<String, Arc<str>>,
    /// Node id → derived key, cached so the data path hashes each id once.
    derived: RwLock<HashMap<String, Arc<str>>>,
    /// Shared with the `Sticky` a reload builds, so the count spans reloads.
    redispatches: Arc<AtomicU64>,
}

/// What the request's cookies say about affinity.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestCookies {
    /// The first node key in the request that names a known node.
    pub key: Option<String>,
    /// In prefix mode, the `Cookie` headers to forward instead of the client's
    /// (prefixes removed); `None` when they go unchanged.
    pub rewritten: Option<Vec<String>>,
    /// In insert mode, the cookie's keys that name no node of this request's
    /// group (ties to other groups), kept when the cookie is replaced.
    pub others: Vec<String>,
}

impl Sticky {
    /// Builds the affinity settings from `[sticky]` and the configured nodes' `cookie` keys.
    pub fn new(config: &StickyConfig, nodes: &[NodeConfig]) -> Self {
        let secret = config
            .secret
            .as_ref()
            .map_or(DEFAULT_SECRET, |s| s.expose());
        Self {
            configured: nodes
                .iter()
                .filter_map(|n| Some((n.id.clone(), n.cookie.as_deref()?.into())))
                .collect(),
            derived: RwLock::default(),
            mode: config.mode,
            name: config.cookie_name().to_string(),
            same_site: config.same_site,
            always_secure: config.secure,
            nocache: config.nocache(),
            hmac_key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            redispatches: Arc::default(),
        }
    }

    /// The settings of a reloaded config, counting on where `old` left off.
    pub fn reloaded(config: &Config, old: &Sticky) -> Self {
        Self {
            redispatches: old.redispatches.clone(),
            ..Self::from_config(config)
        }
    }

    /// Shorthand for [`Sticky::new`] over a whole config.
    pub fn from_config(config: &Config) -> Self {
        Self::new(&config.sticky, &config.cluster.nodes)
    }

    /// The cookie mode.
    pub fn mode(&self) -> StickyMode {
        self.mode
    }

    /// The cookie name.
    pub fn cookie_name(&self) -> &str {
        &self.name
    }

    /// The key that names `node_id` in cookies and tagged URLs: the configured
    /// `cookie`, else 16 hex digits of HMAC-SHA256(secret, id).
    ///
    /// Derived keys are cached: a request with a cookie compares it with the
    /// key of every node of its group. The cache is bounded because node ids
    /// come and go with autoscaling; when full, the derived keys are dropped
    /// and recomputed as needed.
    pub fn node_key(&self, node_id: &str) -> Arc<str> {
        if let Some(key) = self.configured.get(node_id) {
            return key.clone();
        }
        let cached = self.derived.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = cached.get(node_id) {
            return key.clone();
        }
        drop(cached);
        let tag = hmac::sign(&self.hmac_key, node_id.as_bytes());
        let key: Arc<str> = tag.as_ref()[..KEY_BYTES]
            .iter()
            .fold(String::with_capacity(2 * KEY_BYTES), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
            .into();
        let mut cache = self.derived.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(node_id.to_string(), key.clone());
        key
    }

    /// The node among `nodes` whose key is `key`.
    pub fn find<'a>(&self, nodes: &'a [Arc<Node>], key: &str) -> Option<&'a Arc<Node>> {
        nodes.iter().find(|n| *self.node_key(n.id()) == *key)
    }

    /// Reads the request's `Cookie` header values. `known` says whether a key
    /// names a node the request may go to.
    pub fn read_request(&self, headers: &[&str], known: impl Fn(&str) -> bool) -> RequestCookies {
        match self.mode {
            StickyMode::Off => RequestCookies::default(),
            StickyMode::Insert => {
                let mut read = RequestCookies::default();
                let keys = headers
                    .iter()
                    .flat_map(|h| CookiePairs::new(h))
                    .filter(|p| p.name == self.name)
                    .filter_map(|p| p.value)
                    .flat_map(|v| v.split(KEY_SEP))
                    .filter(|k| !k.is_empty());
                for key in keys {
                    if known(key) {
                        read.key.get_or_insert_with(|| key.to_string());
                    } else if !read.others.iter().any(|o| o == key) {
                        read.others.push(key.to_string());
                    }
                }
                read
            }
            StickyMode::Prefix => {
                let mut key = None;
                let mut changed = false;
                let rewritten = headers
                    .iter()
                    .map(|h| {
                        let mut out = String::with_capacity(h.len());
                        for pair in CookiePairs::new(h) {
                            changed |= pair.is_padded();
                            let mut pair = pair;
                            if pair.name == self.name
                                && let Some(value) = pair.value
                            {
                                let (prefix, rest) = match value.split_once(PREFIX_DELIM) {
                                    Some((prefix, rest)) => (prefix, Some(rest)),
                                    None => (value, None),
                                };
                                if key.is_none() && known(prefix) {
                                    key = Some(prefix.to_string());
                                }
                                if let Some(rest) = rest {
                                    pair.value = Some(rest);
                                    changed = true;
                                }
                            }
                            pair.write(&mut out);
                        }
                        out
                    })
                    .collect();
                RequestCookies {
                    key,
                    rewritten: changed.then_some(rewritten),
                    others: Vec::new(),
                }
            }
        }
    }

    /// Prefix mode: the node's `Set-Cookie` value rewritten to carry `key`, or
    /// `None` when the header is not the sticky cookie (or the mode is not prefix).
    pub fn prefix_set_cookie(&self, set_cookie: &str, key: &str) -> Option<String> {
        if self.mode != StickyMode::Prefix {
            return None;
        }
        let (name, value) = set_cookie.split_once('=')?;
        if name.trim_matches(is_blank) != self.name {
            return None;
        }
        Some(format!(
            "{}={key}{PREFIX_DELIM}{}",
            self.name,
            value.trim_start_matches(is_blank)
        ))
    }

    /// Insert mode: the `Set-Cookie` value that ties the client to the node
    /// with `key`, keeping its ties to other groups (`others`, see [`KEY_SEP`]).
    /// `secure` is set on TLS listeners (on all with `[sticky] secure`). No expiry: the tie ends with the
    /// browser session, as HAProxy's inserted cookie does.
    pub fn insert_set_cookie(&self, key: &str, others: &[String], secure: bool) -> Option<String> {
        if self.mode != StickyMode::Insert {
            return None;
        }
        let mut cookie = format!("{}={key}", self.name);
        for other in others.iter().take(MAX_KEYS - 1) {
            cookie.push(KEY_SEP);
            cookie.push_str(other);
        }
        cookie.push_str("; Path=/; HttpOnly");
        if secure || self.always_secure {
            cookie.push_str("; Secure");
        }
        if let Some(same_site) = self.same_site {
            cookie.push_str("; SameSite=");
            cookie.push_str(same_site.as_str());
        }
        Some(cookie)
    }

    /// Whether a response that gets an inserted cookie must also get
    /// `Cache-Control: private`, given its own `Cache-Control` values: only when
    /// `nocache` is on and the response is not already kept out of shared caches
    /// (HAProxy adds the header only to cacheable responses, too).
    pub fn needs_private(&self, cache_control: &[&str]) -> bool {
        self.nocache
            && !cache_control
                .iter()
                .flat_map(|v| v.split(','))
                .map(|d| d.trim().split(['=', ' ']).next().unwrap_or(""))
                .any(|d| {
                    ["private", "no-cache", "no-store"]
                        .iter()
                        .any(|x| d.eq_ignore_ascii_case(x))
                })
    }

    /// Counts one client moved off its sticky node because that node was down.
    pub fn count_redispatch(&self) {
        self.redispatches.fetch_add(1, Ordering::Relaxed);
    }

    /// Clients moved off their sticky node since start.
    pub fn redispatches(&self) -> u64 {
        self.redispatches.load(Ordering::Relaxed)
    }
}

/// The affinity of one request, from [`Sticky::on_request`] to [`Sticky::on_response`].
#[derive(Debug, Default)]
pub struct Affinity {
    /// The node the client is tied to, when it is healthy (draining or not:
    /// a draining node keeps its sticky clients until its drain is complete).
    pub node: Option<Arc<Node>>,
    /// The client named a node that is down: it gets another node and, in
    /// insert mode, a new cookie.
    pub redispatched: bool,
    /// The key of the client's cookie, if it named a node of the group.
    cookie_key: Option<String>,
    /// The client's keys for other groups.
    other_keys: Vec<String>,
    /// WHIP/WHEP: tag the `Location` of the answer.
    tag_location: bool,
    /// WHIP/WHEP: the request's `Host`, which AMS writes into its absolute
    /// `Location` (it builds it from the request URI).
    request_host: Option<String>,
}

impl Sticky {
    /// Reads the client's tie to a node of `nodes` (the group the request is
    /// routed to) from its cookies, or for WHIP/WHEP from the tag in the URL,
    /// and rewrites the request for the node: prefix removed from the cookie,
    /// tag removed from the query. Counts a redispatch when the named node is down.
    pub fn on_request(
        &self,
        kind: RouteKind,
        uri: &mut Uri,
        headers: &mut HeaderMap,
        nodes: &[Arc<Node>],
    ) -> Affinity {
        let session = matches!(kind, RouteKind::Whip | RouteKind::Whep);
        // HTTP/2 carries the host as `:authority`, which hyper keeps in the URI.
        let request_host = session
            .then(|| {
                headers
                    .get(HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| uri.authority().map(|a| a.to_string()))
            })
            .flatten();
        let mut named: Option<&Arc<Node>> = None;
        if session && let Some((key, query)) = uri.query().and_then(take_location_tag) {
            named = self.find(nodes, &key);
            set_query(uri, query.as_deref());
        }
        let values: Vec<&str> = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let mut cookie_key = None;
        let mut other_keys = Vec::new();
        // A header that is not text is left alone, and then so are the others,
        // so that rewriting never drops one.
        if values.len() == headers.get_all(COOKIE).iter().count() {
            let read = self.read_request(&values, |k| self.find(nodes, k).is_some());
            if let Some(rewritten) = read.rewritten {
                headers.remove(COOKIE);
                for value in rewritten {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        headers.append(COOKIE, value);
                    }
                }
            }
            cookie_key = read.key;
            other_keys = read.others;
        }
        if named.is_none() {
            named = cookie_key.as_deref().and_then(|k| self.find(nodes, k));
        }
        // A finished drain (`is_out`) lets its sticky clients go, like a down node.
        let keeps = |n: &&Arc<Node>| n.is_healthy() && !n.is_out();
        let redispatched = named.is_some_and(|n| !keeps(&n));
        if redispatched {
            self.count_redispatch();
        }
        Affinity {
            node: named.filter(keeps).cloned(),
            redispatched,
            cookie_key,
            other_keys,
            tag_location: session,
            request_host,
        }
    }

    /// Rewrites the answer of `node` to a request with `affinity`: prefixes the
    /// node's session cookie (prefix mode), or sets amslb's cookie when the
    /// client does not already carry this node's (insert mode, `Secure` when
    /// `tls`), and tags a WHIP/WHEP `Location`.
    pub fn on_response(
        &self,
        affinity: &Affinity,
        node: &Node,
        headers: &mut HeaderMap,
        tls: bool,
    ) {
        let key = self.node_key(node.id());
        match self.mode {
            StickyMode::Off => {}
            StickyMode::Prefix => {
                if let Entry::Occupied(entry) = headers.entry(SET_COOKIE) {
                    let (_, values) = entry.remove_entry_mult();
                    let values: Vec<HeaderValue> = values
                        .map(|v| {
                            v.to_str()
                                .ok()
                                .and_then(|text| self.prefix_set_cookie(text, &key))
                                .and_then(|text| HeaderValue::from_str(&text).ok())
                                .unwrap_or(v)
                        })
                        .collect();
                    for value in values {
                        headers.append(SET_COOKIE, value);
                    }
                }
            }
            StickyMode::Insert => {
                if affinity.cookie_key.as_deref() != Some(&*key)
                    && let Some(cookie) = self.insert_set_cookie(&key, &affinity.other_keys, tls)
                    && let Ok(cookie) = HeaderValue::from_str(&cookie)
                {
                    let cache: Vec<&str> = headers
                        .get_all(CACHE_CONTROL)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    if self.needs_private(&cache) {
                        headers.append(CACHE_CONTROL, HeaderValue::from_static("private"));
                    }
                    headers.append(SET_COOKIE, cookie);
                }
            }
        }
        if affinity.tag_location
            && let Some(location) = headers.get(LOCATION).and_then(|v| v.to_str().ok())
        {
            let node_authority = node.http_addr().to_string();
            let authorities: Vec<&str> = [
                Some(node_authority.as_str()),
                affinity.request_host.as_deref(),
            ]
            .into_iter()
            .flatten()
            .collect();
            let etag = headers.get(ETAG).and_then(|v| v.to_str().ok());
            let resource = whip_resource(location, etag);
            if let Ok(tagged) = HeaderValue::from_str(&tag_location(&resource, &key, &authorities))
            {
                headers.insert(LOCATION, tagged);
            }
        }
    }
}

/// Replaces the query of `uri`, keeping everything else.
fn set_query(uri: &mut Uri, query: Option<&str>) {
    let path_and_query = match query {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new) = Uri::from_parts(parts) {
            *uri = new;
        }
    }
}

/// Spaces and tabs, the only blanks HAProxy skips inside cookie headers.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// One `name=value` element of a `Cookie` header, with the bytes around it kept
/// so an untouched pair is written back as it came (less the blanks around `=`,
/// which HAProxy drops too).
#[derive(Debug, Clone, Copy)]
struct CookiePair<'a> {
    /// Blanks before the name.
    lead: &'a str,
    name: &'a str,
    /// Text after `=` (blanks before it skipped), up to the separator; `None` without `=`.
    value: Option<&'a str>,
    /// Whether blanks surrounded `=`.
    padded: bool,
    /// The separator that ended the pair (`;` or `,`), if any.
    sep: Option<char>,
}

impl CookiePair<'_> {
    fn is_padded(&self) -> bool {
        self.padded
    }

    fn write(&self, out: &mut String) {
        out.push_str(self.lead);
        out.push_str(self.name);
        if let Some(value) = self.value {
            out.push('=');
            out.push_str(value);
        }
        if let Some(sep) = self.sep {
            out.push(sep);
        }
    }
}

/// Iterates the pairs of a `Cookie` header, split at `;` and `,` as HAProxy does.
struct CookiePairs<'a> {
    rest: Option<&'a str>,
}

impl<'a> CookiePairs<'a> {
    fn new(header: &'a str) -> Self {
        Self { rest: Some(header) }
    }
}

impl<'a> Iterator for CookiePairs<'a> {
    type Item = CookiePair<'a>;

    fn next(&mut self) -> Option<CookiePair<'a>> {
        let text = self.rest?;
        let (segment, sep) = match text.find([';', ',']) {
            Some(i) => {
                self.rest = Some(&text[i + 1..]);
                (&text[..i], text[i..].chars().next())
            }
            None => {
                self.rest = None;
                (text, None)
            }
        };
        let body = segment.trim_start_matches(is_blank);
        let lead = &segment[..segment.len() - body.len()];
        let (name, value, padded) = match body.split_once('=') {
            Some((name, value)) => {
                let trimmed_name = name.trim_end_matches(is_blank);
                let trimmed_value = value.trim_start_matches(is_blank);
                let padded = trimmed_name.len() != name.len() || trimmed_value.len() != value.len();
                (trimmed_name, Some(trimmed_value), padded)
            }
            None => (body, None, false),
        };
        Some(CookiePair {
            lead,
            name,
            value,
            padded,
            sep,
        })
    }
}

/// WHIP/WHEP: the `Location` a node returned, rewritten so that follow-ups come
/// back through the balancer to the same node.
///
/// Why a tag in the URL and not a table of sessions: the URL is the one thing
/// every WHIP/WHEP client is required to send back, cookie or not; a tag needs
/// no memory, no expiry and no bound (a table fed by POSTs is a memory lever for
/// anyone), and it works when several amslb instances share a DNS name or one
/// restarts, because node keys are the same everywhere. A query parameter
/// rather than a path segment keeps the path, which the router classifies and
/// AMS routes on, exactly as the node wrote it; [`take_location_tag`] removes
/// it before forwarding, so AMS never sees it.
///
/// An absolute `Location` pointing at one of `authorities` (the node itself,
/// e.g. `10.0.0.5:5080`, or the `Host` the client sent, which AMS echoes) is
/// cut down to its path: the client must not bypass the balancer, the internal
/// address must not leak, and AMS writes `http://` even when the client came
/// over TLS, which a path relative to the client's own URL gets right.
pub fn tag_location(location: &str, key: &str, authorities: &[&str]) -> String {
    let mut url = location;
    for scheme in ["http://", "https://"] {
        for authority in authorities {
            if let Some(rest) = location.strip_prefix(scheme)
                && let Some(path) = rest.strip_prefix(authority)
                && (path.is_empty() || path.starts_with(['/', '?']))
            {
                url = path;
            }
        }
    }
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len() + LOCATION_PARAM.len() + key.len() + 3);
    out.push_str(if before_fragment.is_empty() {
        "/"
    } else {
        before_fragment
    });
    out.push(if before_fragment.contains('?') {
        '&'
    } else {
        '?'
    });
    out.push_str(LOCATION_PARAM);
    out.push('=');
    out.push_str(key);
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// WHIP: the session resource AMS means by its `Location`. AMS writes the
/// request URI plus `/{eTag}` (`WhipEndpoint` in AMS's source), so a POST with a
/// query (`/LiveApp/whip/s1?video=true`) gets `…/whip/s1?video=true/{eTag}`:
/// the tag lands in the query, and a `DELETE` on that URL reaches AMS's
/// `/{streamId}` resource, which has no DELETE, instead of its
/// `/{streamId}/{eTag}`. When the query ends in `/{eTag}` (the answer's `ETag`
/// header), the tag moves back into the path, the query after it:
/// `…/whip/s1/{eTag}?video=true`. Anything else is returned unchanged.
pub fn whip_resource(location: &str, etag: Option<&str>) -> String {
    let Some(etag) = etag.map(|e| e.trim_matches('"')).filter(|e| !e.is_empty()) else {
        return location.to_string();
    };
    let Some((path, query)) = location.split_once('?') else {
        return location.to_string();
    };
    let Some(query) = query.strip_suffix(etag).and_then(|q| q.strip_suffix('/')) else {
        return location.to_string();
    };
    if query.is_empty() {
        format!("{path}/{etag}")
    } else {
        format!("{path}/{etag}?{query}")
    }
}

/// Finds the node tag [`tag_location`] added in a request's query; returns the
/// key and the query to forward without it (`None` when nothing remains).
pub fn take_location_tag(query: &str) -> Option<(String, Option<String>)> {
    let mut key = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((LOCATION_PARAM, value)) if key.is_none() => key = Some(value.to_string()),
            _ => kept.push(pair),
        }
    }
    let key = key?;
    Some((key, (!kept.is_empty()).then(|| kept.join("&"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeSpec;
    use std::net::IpAddr;

    fn sticky(mode: StickyMode, cookie: Option<&str>) -> Sticky {
        let config = StickyConfig {
            mode,
            cookie: cookie.map(str::to_string),
            ..Default::default()
        };
        let nodes: Vec<NodeConfig> = [("n1", Some("ams1")), ("n2", Some("ams2")), ("n3", None)]
            .iter()
            .map(|(id, cookie)| NodeConfig {
                id: id.to_string(),
                address: IpAddr::from([127, 0, 0, 1]),
                group: "origin".into(),
                http_port: None,
                rtmp_port: None,
                srt_port: None,
                cookie: cookie.map(str::to_string),
                drain: false,
                region: None,
            })
            .collect();
        Sticky::new(&config, &nodes)
    }

    fn prefix() -> Sticky {
        sticky(StickyMode::Prefix, None)
    }

    fn known(key: &str) -> bool {
        key == "ams1" || key == "ams2"
    }

    fn read(s: &Sticky, headers: &[&str]) -> (Option<String>, Option<Vec<String>>) {
        let r = s.read_request(headers, known);
        (r.key, r.rewritten)
    }

    /// Request cases observed on HAProxy 2.6 with `cookie JSESSIONID prefix
    /// nocache` and servers `ams1`, `ams2`: (Cookie headers in, node, headers the
    /// server received).
    #[test]
    fn prefix_request_matches_haproxy() {
        let cases: &[(&[&str], Option<&str>, &[&str])] = &[
            (
                &["a=1; JSESSIONID=ams2~abc; b=2"],
                Some("ams2"),
                &["a=1; JSESSIONID=abc; b=2"],
            ),
            // Unknown prefix: stripped anyway, the node is chosen by balancing.
            (&["JSESSIONID=zzz~abc"], None, &["JSESSIONID=abc"]),
            (&["JSESSIONID=~abc"], None, &["JSESSIONID=abc"]),
            // Without `~` the whole value is the key and nothing is cut.
            (&["JSESSIONID=abc"], None, &["JSESSIONID=abc"]),
            (&["JSESSIONID=ams1"], Some("ams1"), &["JSESSIONID=ams1"]),
            // Only the first `~` separates; every matching cookie is stripped;
            // the first that names a node wins.
            (
                &["JSESSIONID=ams2~a~b;JSESSIONID=ams1~c"],
                Some("ams2"),
                &["JSESSIONID=a~b;JSESSIONID=c"],
            ),
            (
                &["JSESSIONID=zzz~a; JSESSIONID=ams2~b"],
                Some("ams2"),
                &["JSESSIONID=a; JSESSIONID=b"],
            ),
            (
                &["JSESSIONID=abc; JSESSIONID=ams1~b"],
                Some("ams1"),
                &["JSESSIONID=abc; JSESSIONID=b"],
            ),
            (
                &["JSESSIONID=ams2~a", "JSESSIONID=ams1~b"],
                Some("ams2"),
                &["JSESSIONID=a", "JSESSIONID=b"],
            ),
            (
                &["a=1", "JSESSIONID=ams1~q"],
                Some("ams1"),
                &["a=1", "JSESSIONID=q"],
            ),
            // Blanks around `=` go, blanks around separators stay; `,` separates too.
            (
                &["JSESSIONID = ams1~q ; x=y"],
                Some("ams1"),
                &["JSESSIONID=q ; x=y"],
            ),
            (&["a = 1;  b=2"], None, &["a=1;  b=2"]),
            (&["a\t=\t1"], None, &["a=1"]),
            (&["a=1;b;c =  2"], None, &["a=1;b;c=2"]),
            (
                &["a=1, JSESSIONID=ams1~x"],
                Some("ams1"),
                &["a=1, JSESSIONID=x"],
            ),
            (
                &["a=1 ;  JSESSIONID=ams1~x;b=2"],
                Some("ams1"),
                &["a=1 ;  JSESSIONID=x;b=2"],
            ),
            (&["JSESSIONID=ams1~x;"], Some("ams1"), &["JSESSIONID=x;"]),
            (&["JSESSIONID=ams2~"], Some("ams2"), &["JSESSIONID="]),
            (
                &["JSESSIONID=ams1~\"q\""],
                Some("ams1"),
                &["JSESSIONID=\"q\""],
            ),
            (&["JSESSIONID=\"ams1~q\""], None, &["JSESSIONID=q\""]),
            (&["JSESSIONID"], None, &["JSESSIONID"]),
            // Names are case-sensitive.
            (&["jsessionid=ams1~q"], None, &["jsessionid=ams1~q"]),
        ];
        let s = prefix();
        for (headers, node, forwarded) in cases {
            let (key, rewritten) = read(&s, headers);
            assert_eq!(key.as_deref(), *node, "{headers:?}");
            let rewritten =
                rewritten.unwrap_or_else(|| headers.iter().map(|h| h.to_string()).collect());
            assert_eq!(rewritten, *forwarded, "{headers:?}");
        }
    }

    #[test]
    fn prefix_request_without_changes_is_not_rewritten() {
        assert_eq!(read(&prefix(), &["a=1; b=2", "JSESSIONID=ams1"]).1, None);
        assert_eq!(read(&prefix(), &[]), (None, None));
    }

    /// Response cases observed on HAProxy 2.6 (server `ams1`).
    #[test]
    fn prefix_set_cookie_matches_haproxy() {
        let s = prefix();
        let cases = [
            (
                "JSESSIONID=abc; Path=/; HttpOnly",
                Some("JSESSIONID=ams1~abc; Path=/; HttpOnly"),
            ),
            ("JSESSIONID=v;Path=/", Some("JSESSIONID=ams1~v;Path=/")),
            ("JSESSIONID=", Some("JSESSIONID=ams1~")),
            ("JSESSIONID=\"quoted\"", Some("JSESSIONID=ams1~\"quoted\"")),
            (
                " JSESSIONID = v ; path=/",
                Some("JSESSIONID=ams1~v ; path=/"),
            ),
            (
                "JSESSIONID=x, JSESSIONID=y",
                Some("JSESSIONID=ams1~x, JSESSIONID=y"),
            ),
            ("JSESSIONID", None),
            ("jsessionid=abc", None),
            ("a=1; JSESSIONID=y", None),
            ("other=1", None),
        ];
        for (input, output) in cases {
            assert_eq!(
                s.prefix_set_cookie(input, "ams1").as_deref(),
                output,
                "{input}"
            );
        }
        assert_eq!(
            sticky(StickyMode::Insert, None).prefix_set_cookie("AMSLB=x", "k"),
            None
        );
    }

    #[test]
    fn node_keys_are_configured_or_opaque_and_stable() {
        let s = prefix();
        assert_eq!(&*s.node_key("n1"), "ams1");
        let derived = s.node_key("10.0.0.7");
        assert_eq!(derived.len(), 16);
        assert!(derived.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!derived.contains("10.0.0.7"));
        // Another instance with the same config agrees; another secret does not.
        assert_eq!(prefix().node_key("10.0.0.7"), derived);
        assert_ne!(s.node_key("10.0.0.8"), derived);
        let other = Sticky::new(&toml::from_str("secret = \"s3cret\"").unwrap(), &[]);
        assert_ne!(other.node_key("10.0.0.7"), derived);
    }

    #[test]
    fn key_cache_is_bounded_and_keys_survive_eviction() {
        let s = prefix();
        let first = s.node_key("node-0");
        for i in 1..=KEY_CACHE_MAX + 10 {
            s.node_key(&format!("node-{i}"));
        }
        assert!(s.derived.read().unwrap().len() <= KEY_CACHE_MAX);
        assert_eq!(s.node_key("node-0"), first);
        assert_eq!(
            &*s.node_key("n2"),
            "ams2",
            "configured keys are never evicted"
        );
    }

    #[test]
    fn find_uses_node_keys() {
        let s = sticky(StickyMode::Insert, None);
        let nodes: Vec<Arc<Node>> = ["n1", "n3"]
            .iter()
            .map(|id| {
                Arc::new(Node::new(NodeSpec::on_default_ports(
                    id,
                    "origin",
                    IpAddr::from([127, 0, 0, 1]),
                )))
            })
            .collect();
        assert_eq!(s.find(&nodes, "ams1").unwrap().id(), "n1");
        assert_eq!(s.find(&nodes, &s.node_key("n3")).unwrap().id(), "n3");
        assert!(s.find(&nodes, "ams2").is_none());
    }

    #[test]
    fn insert_mode_reads_first_known_cookie_and_forwards_unchanged() {
        let s = sticky(StickyMode::Insert, None);
        assert_eq!(
            read(&s, &["x=1; AMSLB=stale; AMSLB=ams2", "AMSLB=ams1"]),
            (Some("ams2".into()), None)
        );
        let r = s.read_request(&["AMSLB=e1.ams1.o1..e1"], known);
        assert_eq!(r.key.as_deref(), Some("ams1"));
        assert_eq!(r.others, ["e1", "o1"]);
        assert_eq!(read(&s, &["JSESSIONID=ams1~x"]), (None, None));
        let named = sticky(StickyMode::Insert, Some("LB"));
        assert_eq!(read(&named, &["LB=ams1"]).0.as_deref(), Some("ams1"));
        assert_eq!(
            read(&sticky(StickyMode::Off, None), &["AMSLB=ams1"]),
            (None, None)
        );
    }

    #[test]
    fn inserted_cookie_attributes() {
        let s = sticky(StickyMode::Insert, None);
        assert_eq!(
            s.insert_set_cookie("k1", &[], false).unwrap(),
            "AMSLB=k1; Path=/; HttpOnly"
        );
        let strict = Sticky::new(
            &StickyConfig {
                mode: StickyMode::Insert,
                same_site: Some(SameSite::None),
                ..Default::default()
            },
            &[],
        );
        let behind_tls = Sticky::new(
            &StickyConfig {
                mode: StickyMode::Insert,
                secure: true,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(
            behind_tls.insert_set_cookie("k1", &[], false).unwrap(),
            "AMSLB=k1; Path=/; HttpOnly; Secure"
        );
        assert_eq!(
            strict.insert_set_cookie("k1", &[], true).unwrap(),
            "AMSLB=k1; Path=/; HttpOnly; Secure; SameSite=None"
        );
        assert_eq!(prefix().insert_set_cookie("k1", &[], true), None);
        let others: Vec<String> = ["a", "b", "c", "d"].map(String::from).into();
        assert_eq!(
            s.insert_set_cookie("k1", &others, false).unwrap(),
            "AMSLB=k1.a.b.c; Path=/; HttpOnly",
            "at most four keys"
        );
    }

    #[test]
    fn nocache_marks_only_cacheable_responses() {
        let s = sticky(StickyMode::Insert, None);
        assert!(s.needs_private(&[]));
        assert!(s.needs_private(&["max-age=60, public"]));
        assert!(!s.needs_private(&["max-age=60", "Private"]));
        assert!(!s.needs_private(&["no-cache=\"set-cookie\""]));
        assert!(!s.needs_private(&["no-store"]));
        let off = Sticky::new(
            &StickyConfig {
                mode: StickyMode::Insert,
                nocache: Some(false),
                ..Default::default()
            },
            &[],
        );
        assert!(!off.needs_private(&[]));
        assert!(
            !prefix().needs_private(&[]),
            "prefix mode adds nothing, as HAProxy"
        );
    }

    #[test]
    fn location_tag_round_trips() {
        let node = "127.0.1.1:5080";
        let cases = [
            (
                "/WebRTCAppEE/whip/s1/abc",
                "/WebRTCAppEE/whip/s1/abc?amslb_node=k",
            ),
            (
                "/app/whep/s1/x?token=t",
                "/app/whep/s1/x?token=t&amslb_node=k",
            ),
            (
                "http://127.0.1.1:5080/app/whip/s1/x",
                "/app/whip/s1/x?amslb_node=k",
            ),
            (
                "https://127.0.1.1:5080/app/whip/s1/x#f",
                "/app/whip/s1/x?amslb_node=k#f",
            ),
            // Another host is left pointing there; a longer port is not the node.
            (
                "https://cdn.example/app/x",
                "https://cdn.example/app/x?amslb_node=k",
            ),
            (
                "http://127.0.1.1:50801/a",
                "http://127.0.1.1:50801/a?amslb_node=k",
            ),
            ("http://127.0.1.1:5080", "/?amslb_node=k"),
        ];
        for (location, tagged) in cases {
            assert_eq!(tag_location(location, "k", &[node]), tagged, "{location}");
        }
        // AMS's own shape: absolute on the client's Host, plain http.
        assert_eq!(
            tag_location(
                "http://live.test/LiveApp/whip/s1/e1?video=true",
                "k",
                &[node, "live.test"]
            ),
            "/LiveApp/whip/s1/e1?video=true&amslb_node=k"
        );
        assert_eq!(take_location_tag("amslb_node=k"), Some(("k".into(), None)));
        assert_eq!(
            take_location_tag("token=t&amslb_node=k&x=1"),
            Some(("k".into(), Some("token=t&x=1".into())))
        );
        assert_eq!(take_location_tag("token=t"), None);
        assert_eq!(take_location_tag(""), None);
    }

    #[test]
    fn whip_resource_moves_the_etag_out_of_the_query() {
        let cases = [
            // AMS: request URI + "/" + eTag, query included
            (
                "http://live.test/LiveApp/whip/s1?video=true/e-1",
                Some("e-1"),
                "http://live.test/LiveApp/whip/s1/e-1?video=true",
            ),
            (
                "/LiveApp/whip/s1?a=1&b=2/e-1",
                Some("\"e-1\""),
                "/LiveApp/whip/s1/e-1?a=1&b=2",
            ),
            ("/LiveApp/whip/s1?/e-1", Some("e-1"), "/LiveApp/whip/s1/e-1"),
            // without a query AMS's Location is right already
            ("/LiveApp/whip/s1/e-1", Some("e-1"), "/LiveApp/whip/s1/e-1"),
            // a query that does not end in the tag, or no tag: unchanged
            (
                "/LiveApp/whip/s1?x=e-1",
                Some("e-1"),
                "/LiveApp/whip/s1?x=e-1",
            ),
            ("/LiveApp/whip/s1?v=1/e-1", None, "/LiveApp/whip/s1?v=1/e-1"),
            (
                "/LiveApp/whip/s1?v=1/e-1",
                Some(""),
                "/LiveApp/whip/s1?v=1/e-1",
            ),
        ];
        for (location, etag, resource) in cases {
            assert_eq!(
                whip_resource(location, etag),
                resource,
                "{location} {etag:?}"
            );
        }
    }

    #[test]
    fn redispatches_are_counted() {
        let s = prefix();
        s.count_redispatch();
        s.count_redispatch();
        assert_eq!(s.redispatches(), 2);
    }

    fn group(ids: &[&str]) -> Vec<Arc<Node>> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                Arc::new(Node::new(NodeSpec::on_default_ports(
                    id,
                    "origin",
                    IpAddr::from([127, 0, 1, i as u8 + 1]),
                )))
            })
            .collect()
    }

    fn request(uri: &str, cookies: &[&str]) -> (Uri, HeaderMap) {
        let mut headers = HeaderMap::new();
        for c in cookies {
            headers.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        (uri.parse().unwrap(), headers)
    }

    fn all(headers: &HeaderMap, name: http::header::HeaderName) -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn prefix_round_trip_through_headers() {
        let s = prefix();
        let nodes = group(&["n1", "n2"]);
        let (mut uri, mut headers) = request("/app/rest/x", &["a=1; JSESSIONID=ams2~abc"]);
        let aff = s.on_request(RouteKind::Rest, &mut uri, &mut headers, &nodes);
        assert_eq!(aff.node.as_ref().unwrap().id(), "n2");
        assert!(!aff.redispatched);
        assert_eq!(all(&headers, COOKIE), ["a=1; JSESSIONID=abc"]);

        let mut response = HeaderMap::new();
        response.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=new; Path=/"),
        );
        response.append(SET_COOKIE, HeaderValue::from_static("other=1"));
        s.on_response(&aff, &nodes[1], &mut response, false);
        assert_eq!(
            all(&response, SET_COOKIE),
            ["JSESSIONID=ams2~new; Path=/", "other=1"]
        );
        assert!(
            response.get(CACHE_CONTROL).is_none(),
            "prefix mode adds nothing"
        );
    }

    #[test]
    fn insert_cookie_only_when_missing_or_for_another_node() {
        let s = sticky(StickyMode::Insert, None);
        let nodes = group(&["n1", "n2"]);
        let (mut uri, mut headers) = request("/", &[]);
        let fresh = s.on_request(RouteKind::Other, &mut uri, &mut headers, &nodes);
        assert!(fresh.node.is_none());
        let mut response = HeaderMap::new();
        s.on_response(&fresh, &nodes[0], &mut response, true);
        assert_eq!(
            all(&response, SET_COOKIE),
            ["AMSLB=ams1; Path=/; HttpOnly; Secure"]
        );
        assert_eq!(all(&response, CACHE_CONTROL), ["private"]);

        let (mut uri, mut headers) = request("/", &["AMSLB=ams1"]);
        let sticky_aff = s.on_request(RouteKind::Other, &mut uri, &mut headers, &nodes);
        assert_eq!(sticky_aff.node.as_ref().unwrap().id(), "n1");
        let mut response = HeaderMap::new();
        s.on_response(&sticky_aff, &nodes[0], &mut response, false);
        assert!(response.is_empty(), "{response:?}");
    }

    #[test]
    fn insert_cookie_keeps_the_ties_to_other_groups() {
        let s = sticky(StickyMode::Insert, None);
        let origin = group(&["n1", "n2"]);
        let edge = group(&["n3"]);
        // The client is tied to n3 (edge) and now talks to origin.
        let edge_key = s.node_key("n3");
        let cookie = format!("AMSLB={edge_key}");
        let (mut uri, mut headers) = request("/", &[&cookie]);
        let aff = s.on_request(RouteKind::Rest, &mut uri, &mut headers, &origin);
        assert!(aff.node.is_none());
        let mut response = HeaderMap::new();
        s.on_response(&aff, &origin[1], &mut response, false);
        let both = format!("AMSLB=ams2.{edge_key}");
        assert_eq!(
            all(&response, SET_COOKIE),
            [format!("{both}; Path=/; HttpOnly")]
        );
        // Both groups now find their node in the one cookie, and keep it.
        for (nodes, id) in [(&origin, "n2"), (&edge, "n3")] {
            let (mut uri, mut headers) = request("/", &[&both]);
            let aff = s.on_request(RouteKind::Hls, &mut uri, &mut headers, nodes);
            assert_eq!(aff.node.as_ref().unwrap().id(), id);
            let mut response = HeaderMap::new();
            s.on_response(&aff, aff.node.as_ref().unwrap(), &mut response, false);
            assert!(response.is_empty());
        }
    }

    #[test]
    fn down_node_is_redispatched_draining_node_is_kept() {
        let s = sticky(StickyMode::Insert, None);
        let nodes = group(&["n1", "n2"]);
        nodes[0].set_draining(true);
        let (mut uri, mut headers) = request("/", &["AMSLB=ams1"]);
        let kept = s.on_request(RouteKind::Hls, &mut uri, &mut headers, &nodes);
        assert_eq!(kept.node.as_ref().unwrap().id(), "n1");
        assert_eq!(s.redispatches(), 0);

        nodes[0].set_healthy(false);
        let moved = s.on_request(RouteKind::Hls, &mut uri, &mut headers, &nodes);
        assert!(moved.node.is_none() && moved.redispatched);
        assert_eq!(s.redispatches(), 1);
        let mut response = HeaderMap::new();
        s.on_response(&moved, &nodes[1], &mut response, false);
        assert_eq!(all(&response, SET_COOKIE), ["AMSLB=ams2; Path=/; HttpOnly"]);
    }

    #[test]
    fn whip_location_is_tagged_and_followed_without_cookies() {
        let s = sticky(StickyMode::Off, None);
        let nodes = group(&["n1", "n2", "n3"]);
        let (mut uri, mut headers) = request("/app/whip/s1", &[]);
        let post = s.on_request(RouteKind::Whip, &mut uri, &mut headers, &nodes);
        let mut response = HeaderMap::new();
        response.insert(
            LOCATION,
            HeaderValue::from_static("http://127.0.1.3:5080/app/whip/s1/sess"),
        );
        s.on_response(&post, &nodes[2], &mut response, false);
        let location = response
            .get(LOCATION)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let key = s.node_key("n3");
        assert_eq!(location, format!("/app/whip/s1/sess?amslb_node={key}"));
        assert!(response.get(SET_COOKIE).is_none());

        let (mut uri, mut headers) = request(&location, &[]);
        let patch = s.on_request(RouteKind::Whip, &mut uri, &mut headers, &nodes);
        assert_eq!(patch.node.as_ref().unwrap().id(), "n3");
        assert_eq!(uri.to_string(), "/app/whip/s1/sess");
        // Other kinds of request ignore (and keep) the parameter.
        let (mut uri, mut headers) = request(&location, &[]);
        let other = s.on_request(RouteKind::Rest, &mut uri, &mut headers, &nodes);
        assert!(other.node.is_none());
        assert_eq!(uri.to_string(), location);
    }
}
