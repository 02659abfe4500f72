//! nginx configs in the shape of AMS's official load balancer: `http {}` with
//! `upstream`s, `map $arg_target`, `server`s with `location / { proxy_pass }`,
//! and `stream {}` for RTMP, RTMPS and SRT.

use super::{Draft, DraftNode, Imported, Section, bind_address, group_name, server_address};
use std::collections::BTreeMap;
use std::net::IpAddr;
use toml::Value;

/// One directive: `name args;` or `name args { children }`.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Option<Vec<Directive>>,
}

impl Directive {
    fn text(&self) -> String {
        let mut text = self.name.clone();
        for arg in &self.args {
            text.push(' ');
            text.push_str(arg);
        }
        text
    }

    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }
}

/// Words and `;{}` with their line numbers; quotes and `#` comments handled.
fn tokens(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (c, quote) {
            (q, Some(open)) if q == open => {
                quote = None;
                out.push((std::mem::take(&mut word), line));
            }
            ('\\', Some(_)) => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            (c, Some(_)) => {
                if c == '\n' {
                    line += 1;
                }
                word.push(c);
            }
            ('"' | '\'', None) => quote = Some(c),
            ('#', None) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
                if !word.is_empty() {
                    out.push((std::mem::take(&mut word), line));
                }
            }
            (';' | '{' | '}', None) => {
                if !word.is_empty() {
                    out.push((std::mem::take(&mut word), line));
                }
                out.push((c.to_string(), line));
            }
            (c, None) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push((std::mem::take(&mut word), line));
                }
                if c == '\n' {
                    line += 1;
                }
            }
            (c, None) => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push((word, line));
    }
    out
}

fn parse_block(tokens: &[(String, usize)], at: &mut usize) -> Vec<Directive> {
    let mut out = Vec::new();
    let mut current: Vec<(String, usize)> = Vec::new();
    while *at < tokens.len() {
        let (token, line) = &tokens[*at];
        *at += 1;
        match token.as_str() {
            ";" | "{" if current.is_empty() => {}
            ";" => {
                let (name, line) = current.remove(0);
                out.push(Directive {
                    name,
                    args: current.drain(..).map(|t| t.0).collect(),
                    line,
                    block: None,
                });
            }
            "{" => {
                let (name, line) = current.remove(0);
                let args = current.drain(..).map(|t| t.0).collect();
                let block = parse_block(tokens, at);
                out.push(Directive {
                    name,
                    args,
                    line,
                    block: Some(block),
                });
            }
            "}" => return out,
            _ => current.push((token.clone(), *line)),
        }
    }
    out
}

/// nginx times: a bare number is seconds.
fn duration(text: &str) -> Option<String> {
    super::duration(text, "s").map(|(text, _)| text)
}

fn seconds(text: &str) -> Option<f64> {
    super::duration(text, "s").map(|(_, seconds)| seconds)
}

/// `map $arg_target $var { ... }` by variable: (line, default, entries).
type Maps = BTreeMap<String, (usize, String, Vec<(String, String)>)>;

#[derive(Debug, Default)]
struct Upstream {
    line: usize,
    balance: Option<String>,
    primaries: Vec<(IpAddr, Option<u16>)>,
    backups: Vec<(IpAddr, Option<u16>)>,
}

fn read_upstream(draft: &mut Draft, directive: &Directive) -> Upstream {
    let mut upstream = Upstream {
        line: directive.line,
        ..Upstream::default()
    };
    for d in directive.children() {
        match d.name.as_str() {
            "least_conn" => upstream.balance = Some("least-conn".into()),
            "ip_hash" | "hash" | "random" => {
                upstream.balance = Some(d.name.clone());
            }
            "server" => match d.args.first().and_then(|a| server_address(a)) {
                Some(addr) => {
                    if d.args.iter().any(|a| a == "backup") {
                        upstream.backups.push(addr);
                    } else {
                        upstream.primaries.push(addr);
                    }
                    for option in d.args.iter().skip(1).filter(|a| *a != "backup") {
                        draft.note(
                            d.line,
                            &d.text(),
                            format!("{option}: amslb's [health] checks and passive failures decide a node's state"),
                        );
                    }
                }
                None => draft.note(
                    d.line,
                    &d.text(),
                    "server address is not ip:port (amslb nodes are addresses)",
                ),
            },
            "keepalive" => {}
            _ => draft.note(d.line, &d.text(), "no amslb equivalent in an upstream"),
        }
    }
    upstream
}

/// Why a directive that has no translation is not needed, or what replaces it.
fn not_needed(name: &str) -> Option<&'static str> {
    Some(match name {
        "user" | "pid" | "worker_rlimit_nofile" | "daemon" | "load_module" => {
            "process management is systemd's (conf/amslb.service)"
        }
        "worker_processes" => "[global] workers = 0 (the default) runs one event loop per CPU",
        "events" => "amslb uses epoll on Linux; the connection cap is [global] max_connections",
        "sendfile"
        | "tcp_nopush"
        | "tcp_nodelay"
        | "types_hash_max_size"
        | "default_type"
        | "include"
        | "server_tokens" => "amslb serves no files; not needed",
        "client_max_body_size" => "amslb streams request bodies to the node without a size limit",
        "ssl_protocols"
        | "ssl_prefer_server_ciphers"
        | "ssl_ciphers"
        | "ssl_session_cache"
        | "ssl_session_tickets" => {
            "amslb offers TLS 1.2 and 1.3 with rustls' safe defaults and session resumption"
        }
        "log_format" | "access_log" => {
            "[access_log] writes amslb's own line (text or json) to a file or stdout"
        }
        "error_log" => "amslb logs to stderr (journald under systemd)",
        "gzip" | "gzip_disable" | "gzip_http_version" | "gzip_comp_level" | "gzip_types" => {
            "amslb passes bodies through unchanged; compression stays with the nodes"
        }
        "proxy_redirect" => {
            "amslb does not rewrite Location headers (except its WHIP/WHEP session key)"
        }
        "proxy_http_version" => "amslb always reaches nodes over HTTP/1.1 with keep-alive",
        "proxy_send_timeout" => {
            "amslb has no send timeout; [timeouts] server and tunnel bound waiting"
        }
        "server_name" => "amslb does not pick listeners by Host",
        _ => return None,
    })
}

fn proxy_set_header(draft: &mut Draft, d: &Directive) {
    let header = d
        .args
        .first()
        .map(|h| h.to_ascii_lowercase())
        .unwrap_or_default();
    match header.as_str() {
        "x-forwarded-for" | "host" | "upgrade" | "connection" => {}
        "x-forwarded-proto" => draft.note(
            d.line,
            &d.text(),
            "amslb sets X-Forwarded-Proto to the scheme the client used (http here), not a fixed value",
        ),
        _ => draft.note(d.line, &d.text(), "amslb adds no custom request headers"),
    }
}

/// Translates an nginx config; `source` names it in the output's header.
pub fn nginx(text: &str, source: &str) -> Imported {
    let tokens = tokens(text);
    let mut at = 0;
    let top = parse_block(&tokens, &mut at);
    let mut draft = Draft::new(source);
    let mut nodes_of_group: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();

    for d in &top {
        match d.name.as_str() {
            "http" | "stream" => {}
            "events" => {
                for e in d.children() {
                    if e.name == "worker_connections" {
                        draft.note(
                            e.line,
                            &e.text(),
                            "per worker; amslb's cap over all connections is [global] max_connections (default 20000)",
                        );
                    }
                }
            }
            name => match not_needed(name) {
                Some(why) => draft.note(d.line, &d.text(), why),
                None => draft.note(d.line, &d.text(), "no amslb equivalent"),
            },
        }
    }

    // http {}: upstreams become groups, servers listeners.
    for http in top.iter().filter(|d| d.name == "http") {
        let mut upstreams: Vec<(String, Upstream)> = Vec::new();
        for d in http.children().iter().filter(|d| d.name == "upstream") {
            let name = d.args.first().cloned().unwrap_or_default();
            let upstream = read_upstream(&mut draft, d);
            upstreams.push((name, upstream));
        }
        // Origin first, then edge, then the rest: the names the router targets.
        let rank = |name: &str| {
            let lower = name.to_ascii_lowercase();
            if lower.contains("origin") {
                0
            } else if lower.contains("edge") {
                1
            } else {
                2
            }
        };
        let mut order: Vec<usize> = (0..upstreams.len()).collect();
        order.sort_by_key(|&i| rank(&upstreams[i].0));
        let mut group_of_upstream: BTreeMap<String, String> = BTreeMap::new();
        for i in order {
            let (name, upstream) = &upstreams[i];
            let claimed = upstream
                .primaries
                .iter()
                .all(|(ip, _)| draft.nodes.iter().any(|n| n.address == *ip));
            if claimed && !upstream.primaries.is_empty() {
                // Every server already belongs to a group (the dashboard upstream).
                let first = upstream.primaries[0].0;
                let group = draft
                    .nodes
                    .iter()
                    .find(|n| n.address == first)
                    .map(|n| n.group.clone())
                    .unwrap_or_default();
                draft.note(
                    upstream.line,
                    &format!("upstream {name}"),
                    format!(
                        "its servers are the nodes of several groups; a node is in one group in amslb, so its listeners send to {group:?}{}",
                        if upstream.balance.as_deref() == Some("ip_hash") {
                            "; ip_hash: amslb has no client-address hashing, [sticky] mode = \"insert\" keeps a browser on one node"
                        } else {
                            ""
                        }
                    ),
                );
                group_of_upstream.insert(name.clone(), group);
                continue;
            }
            let taken: Vec<String> = nodes_of_group.keys().cloned().collect();
            let group = group_name(name, &taken);
            let index = draft.group(&group, &format!("upstream {name} (line {})", upstream.line));
            match upstream.balance.as_deref() {
                Some("least-conn") => {
                    draft.groups[index].set("balance", "least-conn", Some("least_conn".into()))
                }
                Some(other) => draft.note(
                    upstream.line,
                    &format!("upstream {name}: {other}"),
                    "amslb balances round-robin, least-conn or stream-hash",
                ),
                None => {}
            }
            let mut count = 0;
            for (ip, port) in &upstream.primaries {
                if draft.nodes.iter().any(|n| n.address == *ip) {
                    continue;
                }
                count += 1;
                nodes_of_group.entry(group.clone()).or_default().push(*ip);
                draft.nodes.push(DraftNode {
                    id: format!("{group}-{count}"),
                    address: *ip,
                    group: group.clone(),
                    http_port: Some(port.unwrap_or(80)),
                    rtmp_port: None,
                    srt_port: None,
                    cookie: None,
                    source: format!("upstream {name} server {ip}"),
                });
            }
            nodes_of_group.entry(group.clone()).or_default();
            group_of_upstream.insert(name.clone(), group);
        }
        // Backups: the servers marked `backup` are exactly another group.
        for (name, upstream) in &upstreams {
            if upstream.backups.is_empty() {
                continue;
            }
            let Some(group) = group_of_upstream.get(name).cloned() else {
                continue;
            };
            let mut backups: Vec<IpAddr> = upstream.backups.iter().map(|b| b.0).collect();
            backups.sort();
            let other = nodes_of_group.iter().find(|(g, ips)| {
                let mut ips = (*ips).clone();
                ips.sort();
                **g != group && ips == backups
            });
            match other {
                Some((other, _)) => {
                    let other = other.clone();
                    if let Some(section) = draft.group_mut(&group) {
                        section.set("backup", other.as_str(), Some(format!("the backup servers of upstream {name}")));
                    }
                }
                None => draft.note(
                    upstream.line,
                    &format!("upstream {name}: backup servers"),
                    "they are not exactly the nodes of another upstream; amslb's backup is a whole group",
                ),
            }
        }

        let mut maps: Maps = BTreeMap::new();
        let mut http_read: Option<(String, usize)> = None;
        for d in http.children() {
            match d.name.as_str() {
                "upstream" | "server" => {}
                "map" => {
                    let (Some(from), Some(var)) = (d.args.first(), d.args.get(1)) else {
                        continue;
                    };
                    let mut default = String::new();
                    let mut entries = Vec::new();
                    for e in d.children() {
                        let value = e.args.first().cloned().unwrap_or_default();
                        if e.name == "default" {
                            default = value;
                        } else {
                            entries.push((e.name.clone(), value));
                        }
                    }
                    if from != "$arg_target" {
                        draft.note(d.line, &d.text(), "only a map of $arg_target (?target=) has an amslb equivalent, built in");
                    }
                    maps.insert(var.clone(), (d.line, default, entries));
                }
                "proxy_connect_timeout" => set_timeout(&mut draft, "connect", d),
                "proxy_read_timeout" => {
                    set_timeout(&mut draft, "server", d);
                    http_read = d.args.first().map(|a| (a.clone(), d.line));
                }
                "keepalive_timeout" => set_timeout(&mut draft, "client", d),
                name => match not_needed(name) {
                    Some(why) => draft.note(d.line, &d.text(), why),
                    None => draft.note(d.line, &d.text(), "no amslb equivalent"),
                },
            }
        }

        let mut longest_read: Option<(f64, String, usize)> = http_read
            .as_ref()
            .and_then(|(t, line)| Some((seconds(t)?, t.clone(), *line)));
        for server in http.children().iter().filter(|d| d.name == "server") {
            let read = http_server(&mut draft, server, &maps, &group_of_upstream);
            if let Some((s, text, line)) =
                read.and_then(|(text, line)| Some((seconds(&text)?, text, line)))
                && longest_read.as_ref().is_none_or(|(l, _, _)| s > *l)
            {
                longest_read = Some((s, text, line));
            }
        }
        if let Some((_, text, line)) = longest_read
            && let Some(d) = duration(&text)
        {
            draft.timeouts.set(
                "tunnel",
                d,
                Some(format!(
                    "the longest proxy_read_timeout, line {line}: WebSocket idle time"
                )),
            );
        }
    }

    for stream in top.iter().filter(|d| d.name == "stream") {
        stream_block(&mut draft, stream);
    }
    draft.finish()
}

fn set_timeout(draft: &mut Draft, key: &str, d: &Directive) {
    match d.args.first().and_then(|a| duration(a)) {
        Some(value) => {
            draft
                .timeouts
                .set(key, value, Some(format!("line {}: {}", d.line, d.text())))
        }
        None => draft.note(d.line, &d.text(), "unreadable time"),
    }
}

/// One `server {}` of `http {}`; returns its own proxy_read_timeout, if any.
fn http_server(
    draft: &mut Draft,
    server: &Directive,
    maps: &Maps,
    group_of_upstream: &BTreeMap<String, String>,
) -> Option<(String, usize)> {
    let mut listener = Section::new("[[listener]]");
    listener.comment(format!("server (line {})", server.line));
    let mut binds = Vec::new();
    let mut tls = false;
    let mut group = None;
    let mut redirect = false;
    let mut read = None;
    let mut visit = |draft: &mut Draft, d: &Directive, listener: &mut Section| {
        match d.name.as_str() {
        "listen" => {
            match d.args.first().and_then(|a| bind_address(a)) {
                Some(bind) => binds.push(bind),
                None => draft.note(d.line, &d.text(), "not a port or ip:port"),
            }
            tls |= d.args.iter().any(|a| a == "ssl");
        }
        "proxy_pass" => {
            let target = d.args.first().cloned().unwrap_or_default();
            let target = target.trim_start_matches("http://").trim_start_matches("https://");
            if let Some(var) = target.strip_prefix('$') {
                let var = format!("${var}");
                match maps.get(&var) {
                    Some((line, default, entries)) => {
                        group = group_of_upstream.get(default).cloned();
                        let builtin = entries.iter().all(|(key, upstream)| {
                            (key == "origin" || key == "edge")
                                && group_of_upstream.get(upstream).map(String::as_str) == Some(key.as_str())
                        });
                        if builtin {
                            listener.comment(format!(
                                "map $arg_target {var} (line {line}): ?target=origin|edge is built into amslb's router"
                            ));
                        } else {
                            draft.note(*line, &format!("map {var}"), "entries other than origin/edge → their group: amslb's ?target= knows only those two");
                        }
                    }
                    None => draft.note(d.line, &d.text(), "proxy_pass to an unknown variable"),
                }
            } else {
                group = group_of_upstream.get(target.trim_end_matches('/')).cloned();
                if group.is_none() {
                    draft.note(d.line, &d.text(), "proxy_pass to something other than an upstream of this file");
                }
            }
        }
        "return" if d.args.iter().any(|a| a.starts_with("https://")) => redirect = true,
        "proxy_read_timeout" => {
            read = d.args.first().map(|a| (a.clone(), d.line));
            draft.note(
                d.line,
                &d.text(),
                "per-server: amslb has one wait for a response head, [timeouts] server, for every listener; the longest proxy_read_timeout became [timeouts] tunnel (idle WebSocket and TCP sessions)",
            );
        }
        "proxy_connect_timeout" => draft.note(
            d.line,
            &d.text(),
            "per-server connect timeout: amslb has one, [timeouts] connect (a node that takes days to accept is down)",
        ),
        "proxy_set_header" => proxy_set_header(draft, d),
        "ssl_certificate" => {
            let dir = d.args.first().and_then(|p| p.rsplit_once('/')).map(|(dir, _)| dir.to_string());
            draft.note(
                d.line,
                &d.text(),
                format!(
                    "amslb reads certificates from [tls] certs_dir: combine the chain and key into one file there (cat fullchain.pem privkey.pem > /etc/amslb/certs/NAME.pem){}",
                    dir.map(|d| format!("; was {d}")).unwrap_or_default()
                ),
            );
            draft
                .tls
                .get_or_insert_with(|| Section::new("[tls]"))
                .set("certs_dir", "/etc/amslb/certs", Some("see the ssl_certificate notes".into()));
        }
        "ssl_certificate_key" => {}
        name => match not_needed(name) {
            Some(why) => draft.note(d.line, &d.text(), why),
            None => draft.note(d.line, &d.text(), "no amslb equivalent"),
        },
    }
    };
    for d in server.children() {
        if d.name == "location" {
            let path = d.args.join(" ");
            if path != "/" {
                draft.note(d.line, &format!("location {path}"), "amslb routes by its streaming router, not by location; only location / was translated");
                continue;
            }
            for inner in d.children() {
                visit(draft, inner, &mut listener);
            }
        } else {
            visit(draft, d, &mut listener);
        }
    }
    let Some(group) = group else {
        if redirect {
            draft.note(
                server.line,
                "server with only a redirect",
                "amslb's redirect_https is set on the listener that serves the groups",
            );
        } else {
            draft.note(
                server.line,
                "server",
                "no proxy_pass to an upstream: left out",
            );
        }
        return read;
    };
    let port = binds.first().and_then(|b| super::bind_port(b)).unwrap_or(0);
    let protocol = if tls { "https" } else { "http" };
    let name = draft.listener_name(&format!("{protocol}-{port}"));
    listener.set("name", name, None);
    listener.set(
        "bind",
        binds.into_iter().map(Value::String).collect::<Vec<_>>(),
        None,
    );
    listener.set("protocol", protocol, None);
    listener.set("default_group", group, Some("proxy_pass".into()));
    if redirect && !tls {
        listener.set(
            "redirect_https",
            true,
            Some("return 301 https://... (amslb answers 302)".into()),
        );
    }
    draft.listeners.push(listener);
    read
}

/// `stream {}`: RTMP (tcp), RTMPS (ssl) and SRT (udp) listeners to the
/// group whose nodes the upstream lists.
fn stream_block(draft: &mut Draft, stream: &Directive) {
    let mut upstreams: BTreeMap<String, Upstream> = BTreeMap::new();
    for d in stream.children().iter().filter(|d| d.name == "upstream") {
        let upstream = read_upstream(draft, d);
        upstreams.insert(d.args.first().cloned().unwrap_or_default(), upstream);
    }
    for d in stream.children() {
        if d.name == "upstream" {
            continue;
        }
        if d.name != "server" {
            draft.note(d.line, &d.text(), "no amslb equivalent in stream {}");
            continue;
        }
        let mut bind = None;
        let mut kind = "tcp";
        let mut pass = None;
        for s in d.children() {
            match s.name.as_str() {
                "listen" => {
                    bind = s.args.first().and_then(|a| bind_address(a));
                    if s.args.iter().any(|a| a == "udp") {
                        kind = "udp";
                    } else if s.args.iter().any(|a| a == "ssl") {
                        kind = "tls";
                    }
                }
                "proxy_pass" => pass = s.args.first().cloned(),
                "proxy_timeout" => draft.note(
                    s.line,
                    &s.text(),
                    "idle L4 sessions end after [timeouts] tunnel (shared with WebSocket); udp listeners have session_idle",
                ),
                "proxy_connect_timeout" => draft.note(s.line, &s.text(), "amslb has one connect timeout, [timeouts] connect"),
                "ssl_certificate" => draft.note(
                    s.line,
                    &s.text(),
                    "the tls listener serves the [tls] certs_dir store; or set its cert/key to PEM files on the balancer",
                ),
                "ssl_certificate_key" => {}
                _ => draft.note(s.line, &s.text(), "no amslb equivalent in a stream server"),
            }
        }
        let (Some(bind), Some(pass)) = (bind, pass) else {
            draft.note(
                d.line,
                "stream server",
                "needs listen and proxy_pass: left out",
            );
            continue;
        };
        let Some(upstream) = upstreams.get(&pass) else {
            draft.note(
                d.line,
                &format!("proxy_pass {pass}"),
                "not an upstream of this stream {}: left out",
            );
            continue;
        };
        // The group whose nodes are the upstream's addresses; their port
        // becomes the nodes' RTMP or SRT port.
        let ips: Vec<IpAddr> = upstream.primaries.iter().map(|p| p.0).collect();
        let group = draft
            .nodes
            .iter()
            .find(|n| ips.contains(&n.address))
            .map(|n| n.group.clone());
        let Some(group) = group else {
            draft.note(
                upstream.line,
                &format!("upstream {pass}"),
                "its servers are no node of the http {} upstreams: left out",
            );
            continue;
        };
        for (ip, port) in &upstream.primaries {
            match draft.nodes.iter_mut().find(|n| n.address == *ip) {
                Some(node) if kind == "udp" => node.srt_port = Some(port.unwrap_or(4200)),
                Some(node) => node.rtmp_port = Some(port.unwrap_or(1935)),
                None => draft.note(
                    upstream.line,
                    &format!("server {ip}"),
                    "not a node of the http {} upstreams: left out",
                ),
            }
        }
        let port = super::bind_port(&bind).unwrap_or(0);
        let label = match kind {
            "udp" => "srt",
            "tls" => "rtmps",
            _ => "rtmp",
        };
        let mut listener = Section::new("[[listener]]");
        listener.comment(format!("stream server (line {}): {label}", d.line));
        let name = draft.listener_name(&format!("{label}-{port}"));
        listener.set("name", name, None);
        listener.set("bind", vec![Value::String(bind)], None);
        listener.set("protocol", kind, None);
        listener.set("default_group", group, Some(format!("proxy_pass {pass}")));
        draft.listeners.push(listener);
    }
}
