//! HAProxy configs (`global`, `defaults`, `frontend`, `backend`, `listen`),
//! as the AMS cluster guide writes them.

use super::{Draft, DraftNode, Imported, Section, bind_address, group_name, server_address};
use toml::Value;

/// One line: its number and its words (comments removed, `\ ` kept as a space).
#[derive(Debug, Clone)]
struct Line {
    number: usize,
    words: Vec<String>,
    text: String,
}

/// One section: `frontend http_lb` and the lines under it.
#[derive(Debug)]
struct Block {
    kind: String,
    name: String,
    line: usize,
    lines: Vec<Line>,
}

fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    let mut quote = None;
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('#', None) => break,
            (c, None) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            (c, _) => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn parse(text: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let words = words(raw);
        let Some(first) = words.first() else { continue };
        let line = Line {
            number: i + 1,
            text: words.join(" "),
            words: words.clone(),
        };
        if matches!(
            first.as_str(),
            "global"
                | "defaults"
                | "frontend"
                | "backend"
                | "listen"
                | "resolvers"
                | "peers"
                | "userlist"
                | "cache"
                | "program"
                | "http-errors"
                | "ring"
                | "mailers"
        ) {
            blocks.push(Block {
                kind: first.clone(),
                name: words.get(1).cloned().unwrap_or_default(),
                line: i + 1,
                lines: Vec::new(),
            });
        } else if let Some(block) = blocks.last_mut() {
            block.lines.push(line);
        }
    }
    blocks
}

/// HAProxy durations: a bare number is milliseconds.
fn duration(text: &str) -> Option<String> {
    super::duration(text, "ms").map(|(text, _)| text)
}

/// A backend as read: mode, servers and what applies to its clients.
#[derive(Debug, Default)]
struct Backend {
    tcp: bool,
    balance: Option<(&'static str, String)>,
    redirect_https: bool,
    group: String,
}

/// Translates an HAProxy config; `source` names it in the output's header.
pub fn haproxy(text: &str, source: &str) -> Imported {
    let blocks = parse(text);
    let mut draft = Draft::new(source);
    let mut default_mode_tcp = false;
    let mut backends: Vec<(String, Backend)> = Vec::new();

    for block in blocks
        .iter()
        .filter(|b| matches!(b.kind.as_str(), "global" | "defaults"))
    {
        for line in &block.lines {
            let w: Vec<&str> = line.words.iter().map(String::as_str).collect();
            match w.as_slice() {
                ["maxconn", n] if block.kind == "global" => draft.global.set(
                    "max_connections",
                    n.parse::<i64>().unwrap_or(20_000),
                    Some(format!("global maxconn {n}")),
                ),
                ["maxconn", ..] => draft.note(
                    line.number,
                    &line.text,
                    "per-proxy maxconn: amslb has one cap, [global] max_connections",
                ),
                ["mode", mode] => default_mode_tcp = *mode == "tcp",
                ["timeout", which @ ("connect" | "client" | "server" | "tunnel"), value] => {
                    match duration(value) {
                        Some(d) => draft.timeouts.set(
                            which,
                            d,
                            Some(format!("timeout {which} {value}")),
                        ),
                        None => draft.note(line.number, &line.text, "unreadable duration"),
                    }
                }
                ["option", "forwardfor", ..] => {
                    draft.global.comment("option forwardfor: amslb always adds X-Forwarded-For, -Proto and -Host");
                }
                ["option", "http-server-close"] => {
                    draft.global.comment("option http-server-close: not needed, amslb keeps a keep-alive pool per node");
                }
                ["option", "redispatch"] => {
                    draft.global.comment("option redispatch: always on in amslb");
                }
                ["retries", n] => draft.global.set(
                    "retries",
                    n.parse::<i64>().unwrap_or(3),
                    Some(format!("retries {n}")),
                ),
                ["log", ..] | ["option", "httplog" | "dontlognull" | "tcplog"] => draft.note(
                    line.number,
                    &line.text,
                    "amslb logs to stderr and, with [access_log], one line per request to a file or stdout (no syslog)",
                ),
                ["user" | "group" | "daemon" | "chroot" | "pidfile", ..] => draft.note(
                    line.number,
                    &line.text,
                    "process management is systemd's (conf/amslb.service runs amslb as its own user)",
                ),
                ["errorfile", code, ..] => draft.note(
                    line.number,
                    &line.text,
                    format!("amslb answers {code} itself, with the reason in the body and the log"),
                ),
                _ => draft.note(line.number, &line.text, "no amslb equivalent"),
            }
        }
    }

    // Backends first: frontends refer to them.
    for block in blocks.iter().filter(|b| b.kind == "backend") {
        let taken: Vec<String> = backends.iter().map(|(_, b)| b.group.clone()).collect();
        let backend = read_backend(&mut draft, block, default_mode_tcp, &taken);
        backends.push((block.name.clone(), backend));
    }

    for block in blocks
        .iter()
        .filter(|b| matches!(b.kind.as_str(), "frontend" | "listen"))
    {
        if block.kind == "listen"
            && block
                .lines
                .iter()
                .any(|l| l.words.first().is_some_and(|w| w == "stats"))
        {
            read_stats(&mut draft, block);
            continue;
        }
        let mut tcp = default_mode_tcp;
        let mut binds: Vec<(String, bool, bool)> = Vec::new();
        let mut default_backend = None;
        let mut comments = vec![format!(
            "{} {} (line {})",
            block.kind, block.name, block.line
        )];
        for line in &block.lines {
            let w: Vec<&str> = line.words.iter().map(String::as_str).collect();
            match w.as_slice() {
                ["bind", addr, rest @ ..] => {
                    let Some(bind) = bind_address(addr) else {
                        draft.note(line.number, &line.text, "not an ip:port address");
                        continue;
                    };
                    let ssl = rest.contains(&"ssl");
                    if let Some(crt) = rest
                        .iter()
                        .position(|w| *w == "crt")
                        .and_then(|i| rest.get(i + 1))
                    {
                        set_certs_dir(&mut draft, crt, line);
                    }
                    binds.push((bind, ssl, rest.contains(&"accept-proxy")));
                }
                ["mode", mode] => tcp = *mode == "tcp",
                ["default_backend", name] => default_backend = Some(name.to_string()),
                ["reqadd", header, ..] | ["http-request", "add-header" | "set-header", header, ..]
                    if header.to_ascii_lowercase().starts_with("x-forwarded-proto") =>
                {
                    comments.push(format!("{}: amslb sets X-Forwarded-Proto itself", line.text));
                }
                ["option", "forwardfor", ..] => {}
                ["use_backend", ..] | ["acl", ..] => draft.note(
                    line.number,
                    &line.text,
                    "ACL routing: amslb routes by its streaming router (README: traffic table) and ?target=",
                ),
                _ => draft.note(line.number, &line.text, "no amslb equivalent"),
            }
        }
        let Some(backend) = default_backend
            .as_ref()
            .and_then(|name| backends.iter().find(|(n, _)| n == name))
            .map(|(_, b)| b)
        else {
            draft.note(
                block.line,
                &format!("{} {}", block.kind, block.name),
                "no default_backend with servers: left out",
            );
            continue;
        };
        // Plain and TLS binds become separate listeners, as amslb has one protocol each.
        for ssl in [false, true] {
            let these: Vec<&(String, bool, bool)> = binds.iter().filter(|b| b.1 == ssl).collect();
            if these.is_empty() {
                continue;
            }
            let protocol = match (tcp || backend.tcp, ssl) {
                (true, false) => "tcp",
                (true, true) => "tls",
                (false, false) => "http",
                (false, true) => "https",
            };
            let mut listener = Section::new("[[listener]]");
            for c in &comments {
                listener.comment(c.clone());
            }
            let name = draft.listener_name(&block.name);
            listener.set("name", name, None);
            let addrs: Vec<Value> = these.iter().map(|b| Value::String(b.0.clone())).collect();
            listener.set("bind", addrs, None);
            listener.set("protocol", protocol, None);
            listener.set(
                "default_group",
                backend.group.as_str(),
                Some(format!(
                    "default_backend {}",
                    default_backend.clone().unwrap_or_default()
                )),
            );
            if these.iter().any(|b| b.2) {
                listener.set("accept_proxy", true, Some("bind ... accept-proxy".into()));
            }
            if backend.redirect_https && protocol == "http" {
                listener.set(
                    "redirect_https",
                    true,
                    Some("redirect scheme https if ! { ssl_fc } (amslb answers 302)".into()),
                );
            }
            draft.listeners.push(listener);
        }
    }
    draft.finish()
}

fn set_certs_dir(draft: &mut Draft, crt: &str, line: &Line) {
    // `crt` names a combined PEM file or a directory of them; amslb reads a directory.
    let dir = if crt.ends_with(".pem") || crt.ends_with(".crt") {
        crt.rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or(".")
            .to_string()
    } else {
        crt.trim_end_matches('/').to_string()
    };
    let tls = draft.tls.get_or_insert_with(|| Section::new("[tls]"));
    tls.set(
        "certs_dir",
        dir,
        Some(format!(
            "line {}: crt {crt} (same combined PEM files)",
            line.number
        )),
    );
}

fn read_backend(draft: &mut Draft, block: &Block, default_tcp: bool, taken: &[String]) -> Backend {
    let mut backend = Backend {
        tcp: default_tcp,
        group: group_name(&block.name, taken),
        ..Backend::default()
    };
    let mut servers = Vec::new();
    for line in &block.lines {
        let w: Vec<&str> = line.words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["mode", mode] => backend.tcp = *mode == "tcp",
            ["server", name, addr, rest @ ..] => servers.push((line.clone(), name.to_string(), addr.to_string(), rest.iter().map(|s| s.to_string()).collect::<Vec<_>>())),
            ["balance", "roundrobin" | "static-rr"] => {
                backend.balance = Some(("round-robin", line.text.clone()))
            }
            ["balance", "leastconn"] => backend.balance = Some(("least-conn", line.text.clone())),
            ["balance", ..] => draft.note(
                line.number,
                &line.text,
                "amslb balances round-robin, least-conn or stream-hash (consistent hashing on the stream)",
            ),
            ["redirect", "scheme", "https", ..] => backend.redirect_https = true,
            ["cookie", name, "prefix", ..] => {
                let sticky = draft.sticky.get_or_insert_with(|| Section::new("[sticky]"));
                sticky.set("mode", "prefix", Some(format!("line {}: {}", line.number, line.text)));
                sticky.set("cookie", name.to_string(), None);
            }
            ["cookie", name, "insert", ..] => {
                let sticky = draft.sticky.get_or_insert_with(|| Section::new("[sticky]"));
                sticky.set("mode", "insert", Some(format!("line {}: {}", line.number, line.text)));
                sticky.set("cookie", name.to_string(), None);
            }
            ["option", "httpchk", rest @ ..] => {
                if let Some(path) = rest.iter().find(|w| w.starts_with('/')) {
                    let health = draft.health.get_or_insert_with(|| Section::new("[health]"));
                    health.set("path", path.to_string(), Some(line.text.clone()));
                }
            }
            _ => draft.note(line.number, &line.text, "no amslb equivalent"),
        }
    }
    // Servers already seen in another backend (RTMP and HTTP of the same
    // nodes) make this backend the same group.
    if let Some(node) = servers
        .iter()
        .find_map(|(_, name, _, _)| draft.nodes.iter().find(|n| &n.id == name))
    {
        backend.group = node.group.clone();
    }
    let index = draft.group(
        &backend.group,
        &format!("backend {} (line {})", block.name, block.line),
    );
    if let Some((mode, text)) = &backend.balance {
        draft.groups[index].set("balance", *mode, Some(text.clone()));
    }
    for (line, name, addr, options) in servers {
        add_server(draft, &backend, &line, &name, &addr, &options);
    }
    backend
}

fn add_server(
    draft: &mut Draft,
    backend: &Backend,
    line: &Line,
    name: &str,
    addr: &str,
    options: &[String],
) {
    let Some((ip, port)) = server_address(addr) else {
        draft.note(
            line.number,
            &line.text,
            "server address is not ip:port (amslb nodes are addresses)",
        );
        return;
    };
    let mut option = options.iter().map(String::as_str).peekable();
    let mut cookie = None;
    while let Some(word) = option.next() {
        match word {
            "check" => {}
            "cookie" => cookie = option.next().map(str::to_string),
            "inter" | "rise" | "fall" => {
                let value = option.next().unwrap_or("");
                let health = draft.health.get_or_insert_with(|| Section::new("[health]"));
                match word {
                    "inter" => health.set("interval", duration(value).unwrap_or_else(|| "2s".into()), Some(format!("server {name} inter {value}"))),
                    other => health.set(other, value.parse::<i64>().unwrap_or(2), Some(format!("server {name} {other} {value}"))),
                }
            }
            "slowstart" => {
                let value = option.next().unwrap_or("");
                if let Some(d) = duration(value) {
                    let health = draft.health.get_or_insert_with(|| Section::new("[health]"));
                    health.set("slow_start", d, Some(format!("server {name} slowstart {value}")));
                }
            }
            "backup" => draft.note(line.number, &line.text, "a backup server inside a group: amslb has backup groups ([[group]] backup = ...); listed as a normal node"),
            other => draft.note(line.number, &format!("server {name} ... {other}"), "server option without amslb equivalent"),
        }
    }
    let port = port.unwrap_or(if backend.tcp { 1935 } else { 5080 });
    let source = format!("line {}: server {name} {addr}", line.number);
    // The same server name in an HTTP and a TCP backend is one AMS node.
    if let Some(i) = draft.nodes.iter().position(|n| n.id == name) {
        let existing = draft.nodes[i].address;
        if existing != ip {
            // Two names on one address in one backend is what a copy-paste slip
            // looks like (the guide's ams1/ams2): keep the address no other node has.
            let clash = draft
                .nodes
                .iter()
                .any(|n| n.id != name && n.address == existing);
            draft.note(
                line.number,
                &line.text,
                format!(
                    "server {name} is {existing} elsewhere; one node has one address, kept {}",
                    if clash { ip } else { existing }
                ),
            );
            if clash {
                draft.nodes[i].address = ip;
            }
        }
        let node = &mut draft.nodes[i];
        if backend.tcp {
            node.rtmp_port = Some(port);
        } else {
            node.http_port = Some(port);
        }
        node.cookie = node.cookie.clone().or(cookie);
        node.source.push_str(&format!("; {source}"));
        return;
    }
    draft.nodes.push(DraftNode {
        id: name.to_string(),
        address: ip,
        group: backend.group.clone(),
        http_port: (!backend.tcp).then_some(port),
        rtmp_port: backend.tcp.then_some(port),
        srt_port: None,
        cookie,
        source,
    });
}

fn read_stats(draft: &mut Draft, block: &Block) {
    let mut stats = Section::new("[stats]");
    stats.comment(format!(
        "listen {} (line {}): metrics on /metrics, status page on /",
        block.name, block.line
    ));
    for line in &block.lines {
        let w: Vec<&str> = line.words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["bind", addr, ..] => match bind_address(addr) {
                Some(bind) => stats.set("bind", bind, Some(line.text.clone())),
                None => draft.note(line.number, &line.text, "not an ip:port address"),
            },
            ["stats", "auth", credentials] => {
                if let Some((user, password)) = credentials.split_once(':') {
                    stats.set("user", user, None);
                    stats.set(
                        "password",
                        password,
                        Some("better: password_file = \"/etc/amslb/stats.pass\"".into()),
                    );
                }
            }
            ["stats", "uri", uri] => draft.note(
                line.number,
                &line.text,
                format!(
                    "amslb's status page is at / and Prometheus metrics at /metrics, not {uri}"
                ),
            ),
            ["mode", _] | ["stats", "enable"] => {}
            ["stats", "hide-version" | "realm", ..] => draft.note(
                line.number,
                &line.text,
                "not needed: amslb's page is behind the login, its realm is fixed",
            ),
            _ => draft.note(line.number, &line.text, "no amslb equivalent"),
        }
    }
    draft.stats = Some(stats);
}
