//! Stickiness end to end: the real amslb binary (and the real HAProxy for the
//! prefix-mode comparison) in front of simulated AMS nodes on loopback.

mod support;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::Empty;
use std::net::SocketAddr;
use std::time::Duration;
use support::haproxy::Haproxy;
use support::*;

/// GET `path` with the given `Cookie` headers, and `x-set-cookie` headers
/// that the simulated node turns into its own `Set-Cookie`s.
async fn get_with(addr: SocketAddr, path: &str, cookies: &[&str], node_sets: &[&str]) -> Fetched {
    let mut request = Request::get(path).header("host", "live.test");
    for cookie in cookies {
        request = request.header("cookie", *cookie);
    }
    for set in node_sets {
        request = request.header("x-set-cookie", *set);
    }
    send(addr, request.body(Empty::<Bytes>::new()).unwrap()).await
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// What a test compares between HAProxy and amslb for one exchange.
#[derive(Debug, PartialEq, Eq)]
struct Exchange {
    node: String,
    set_cookie: Vec<String>,
    forwarded_cookie: Vec<String>,
    cache_control: Vec<String>,
}

async fn exchange(addr: SocketAddr, cookies: &[&str], node_sets: &[&str]) -> Exchange {
    let answer = get_with(addr, "/app/rest/v2/x", cookies, node_sets).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    Exchange {
        node: answer.node(),
        set_cookie: values(&answer.headers, "set-cookie"),
        forwarded_cookie: values(&answer.headers, "x-got-cookie"),
        cache_control: values(&answer.headers, "cache-control"),
    }
}

#[tokio::test]
async fn prefix_cookies_round_trip_exactly_as_haproxys() {
    let nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = listener_addr(18080);
    let reference = listener_addr(18081);
    // The AMS cluster guide's HAProxy backend, minus TLS (`redirect scheme https`), on loopback.
    let haproxy_config = format!(
        r#"
global
    maxconn 200
defaults
    mode http
    option forwardfor
    option http-server-close
    timeout connect 5000
    timeout client  5000
    timeout server  5000
frontend http_lb
    bind {reference}
    default_backend backend_http
backend backend_http
    cookie JSESSIONID prefix nocache
    server ams1 {} check cookie ams1
    server ams2 {} check cookie ams2
"#,
        nodes[0].addr, nodes[1].addr
    );
    let _haproxy = Haproxy::start(&haproxy_config, reference);
    let _amslb = Amslb::start(
        &one_listener_config(
            lb,
            &[
                (&nodes[0], "origin", "cookie = \"ams1\""),
                (&nodes[1], "origin", "cookie = \"ams2\""),
            ],
            "[sticky]\nmode = \"prefix\"\ncookie = \"JSESSIONID\"\n",
        ),
        &[lb],
    );

    // Requests pinned to a node by their cookie: everything must be identical.
    let pinned: &[(&[&str], &[&str])] = &[
        (
            &["JSESSIONID=ams2~abc"],
            &["JSESSIONID=new; Path=/; HttpOnly"],
        ),
        (
            &["a = 1; JSESSIONID=ams1~x;b=2"],
            &["JSESSIONID=v;Path=/", "other=1"],
        ),
        (&["x=1", "JSESSIONID=ams2~q"], &["JSESSIONID = v ; path=/"]),
        (
            &["JSESSIONID=ams1~a~b; JSESSIONID=ams2~c"],
            &["JSESSIONID=", "JSESSIONID", "jsessionid=lower"],
        ),
        (
            &["JSESSIONID=zzz~a; JSESSIONID=ams2~b"],
            &["JSESSIONID=x, JSESSIONID=y"],
        ),
        (&["JSESSIONID=ams1"], &["a=1; JSESSIONID=y"]),
        (
            &["a=1, JSESSIONID=ams2~x"],
            &["JSESSIONID=\"quoted\"; Secure"],
        ),
    ];
    for (cookies, sets) in pinned {
        let theirs = exchange(reference, cookies, sets).await;
        let ours = exchange(lb, cookies, sets).await;
        assert_eq!(ours, theirs, "cookies {cookies:?}, node sets {sets:?}");
    }

    // Requests balanced freely: the node may differ, what each did to the
    // cookies given that node must not.
    let cookie_of = |node: &str| if node == "node-a" { "ams1" } else { "ams2" };
    let free: &[(&[&str], &[&str])] = &[
        (&[], &["JSESSIONID=abc; Path=/"]),
        (&["JSESSIONID=zzz~abc"], &[]),
        (&["JSESSIONID=~abc; other=1"], &["other=2"]),
        (&["JSESSIONID=plain"], &["JSESSIONID=plain2"]),
    ];
    for (cookies, sets) in free {
        let theirs = exchange(reference, cookies, sets).await;
        let ours = exchange(lb, cookies, sets).await;
        let normalise = |e: &Exchange| -> Vec<String> {
            e.set_cookie
                .iter()
                .map(|c| c.replace(&format!("{}~", cookie_of(&e.node)), "<node>~"))
                .collect()
        };
        assert_eq!(normalise(&ours), normalise(&theirs), "{cookies:?} {sets:?}");
        assert_eq!(
            ours.forwarded_cookie, theirs.forwarded_cookie,
            "{cookies:?}"
        );
        assert_eq!(ours.cache_control, theirs.cache_control, "{cookies:?}");
    }

    // And the round trip: the cookie amslb handed out brings the client back
    // to its node, which sees its own value again.
    let first = exchange(lb, &[], &["JSESSIONID=s3ss10n; Path=/"]).await;
    let cookie = first.set_cookie[0].split(';').next().unwrap().to_string();
    assert_eq!(
        cookie,
        format!("JSESSIONID={}~s3ss10n", cookie_of(&first.node))
    );
    for _ in 0..10 {
        let again = exchange(lb, &[&cookie], &[]).await;
        assert_eq!(again.node, first.node);
        assert_eq!(again.forwarded_cookie, ["JSESSIONID=s3ss10n"]);
    }
}

#[tokio::test]
async fn insert_mode_stickiness_holds_over_100_requests_and_two_instances() {
    let nodes = sim_nodes(&["node-a", "node-b", "node-c"]).await;
    let sticky = "[sticky]\nmode = \"insert\"\n";
    let (first, second) = (listener_addr(18080), listener_addr(18080));
    let _a = Amslb::start(&origin_config(first, &nodes, sticky), &[first]);
    let _b = Amslb::start(&origin_config(second, &nodes, sticky), &[second]);

    let fresh = get_with(first, "/", &[], &[]).await;
    let set = values(&fresh.headers, "set-cookie");
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(set[0].starts_with("AMSLB="), "{set:?}");
    assert!(
        set[0].ends_with("; Path=/; HttpOnly"),
        "plain HTTP listener: no Secure; {set:?}"
    );
    assert_eq!(
        values(&fresh.headers, "cache-control"),
        ["private"],
        "nocache is on by default"
    );
    let cookie = set[0].split(';').next().unwrap().to_string();
    let value = cookie.trim_start_matches("AMSLB=");
    assert_eq!(value.len(), 16, "opaque key: {value}");
    for node in &nodes {
        assert!(!value.contains(node.id()) && !value.contains(&node.addr.ip().to_string()));
    }

    for i in 0..100 {
        let instance = if i % 2 == 0 { first } else { second };
        let path = if i % 3 == 0 {
            "/LiveApp/streams/s1.m3u8"
        } else {
            "/"
        };
        let answer = get_with(instance, path, &[&cookie], &[]).await;
        assert_eq!(answer.node(), fresh.node(), "request {i} to {instance}");
        assert!(
            answer.headers.get("set-cookie").is_none(),
            "request {i}: cookie kept"
        );
    }
}

#[tokio::test]
async fn sticky_clients_of_a_dead_node_are_redispatched_with_a_new_cookie() {
    let nodes = sim_nodes(&["node-a", "node-b", "node-c"]).await;
    let lb = listener_addr(18080);
    let extra = "[sticky]\nmode = \"insert\"\n\n[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";
    let amslb = Amslb::start(&origin_config(lb, &nodes, extra), &[lb]);

    let cookie_from = |f: &Fetched| -> String {
        values(&f.headers, "set-cookie")[0]
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    let node = |id: String| nodes.iter().find(|n| n.id() == id).unwrap();

    // 1. The node is marked down by its liveness check.
    let first = get_with(lb, "/", &[], &[]).await;
    let (old_node, old_cookie) = (first.node(), cookie_from(&first));
    node(old_node.clone()).set_liveness(503);
    tokio::time::sleep(Duration::from_millis(2 * 200 + 200 + 150)).await;
    let moved = get_with(lb, "/", &[&old_cookie], &[]).await;
    assert_eq!(moved.status, 200);
    assert_ne!(moved.node(), old_node, "redispatched off the down node");
    let new_cookie = cookie_from(&moved);
    assert_ne!(new_cookie, old_cookie, "with a new cookie");
    for _ in 0..5 {
        let again = get_with(lb, "/", &[&new_cookie], &[]).await;
        assert_eq!(again.node(), moved.node(), "the new cookie sticks");
        assert!(again.headers.get("set-cookie").is_none());
    }

    // 2. The node dies outright (connection refused), before any check notices.
    let (victim, victim_cookie) = (moved.node(), new_cookie);
    node(victim.clone()).stop();
    let rescued = get_with(lb, "/", &[&victim_cookie], &[]).await;
    assert_eq!(rescued.status, 200);
    assert_ne!(rescued.node(), victim);
    assert_ne!(
        rescued.node(),
        old_node,
        "the other dead node is not used either"
    );
    assert_ne!(cookie_from(&rescued), victim_cookie);
    assert!(amslb.log().contains("node down"), "{}", amslb.log());
}

#[tokio::test]
async fn whip_follow_ups_reach_the_session_node_without_cookies() {
    let nodes = sim_nodes(&["node-a", "node-b", "node-c"]).await;
    let lb = listener_addr(18080);
    // No [sticky] at all: WHIP/WHEP affinity does not depend on cookies.
    let _amslb = Amslb::start(&origin_config(lb, &nodes, ""), &[lb]);

    for kind in ["whip", "whep"] {
        let request = |method: Method, uri: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .header("host", "live.test")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let created = send(
            lb,
            request(Method::POST, &format!("/WebRTCAppEE/{kind}/s1")),
        )
        .await;
        assert_eq!(created.status, 201);
        let location = created.headers["location"].to_str().unwrap().to_string();
        assert!(
            location.starts_with(&format!("/WebRTCAppEE/{kind}/s1/")),
            "{location}"
        );
        assert!(location.contains("?amslb_node="), "{location}");
        assert!(created.headers.get("set-cookie").is_none());
        let session_node = created.node();
        // AMS's WHIP has no PATCH (the simulated node answers it 405, as AMS);
        // WHEP is not in AMS yet and is checked with both.
        let methods: &[Method] = if kind == "whip" {
            &[Method::DELETE]
        } else {
            &[Method::PATCH, Method::PATCH, Method::PATCH, Method::DELETE]
        };
        for method in methods {
            let follow = send(lb, request(method.clone(), &location)).await;
            assert_eq!(follow.node(), session_node, "{method} {location}");
            if kind == "whip" {
                assert_eq!(follow.status, 200, "the session node knows the session");
            }
        }
        let seen = nodes
            .iter()
            .find(|n| n.id() == session_node)
            .unwrap()
            .seen();
        let last = seen.last().unwrap();
        assert_eq!(last.method, "DELETE");
        let (untagged, _) = location.split_once("?amslb_node=").unwrap();
        assert_eq!(last.uri, untagged, "the tag never reaches the node");
    }
}

/// AMS answers a WHIP POST with `Location` = the absolute request URI, query
/// included, + `/{eTag}`: `http://live.test/LiveApp/whip/s1?video=true/{uuid}`.
/// amslb hands out `/LiveApp/whip/s1/{uuid}?video=true&amslb_node=…`, and the
/// DELETE on it, sent through a second amslb instance with the same config,
/// reaches the node that holds the session on the path AMS deletes sessions at.
#[tokio::test]
async fn whip_delete_on_ams_location_reaches_the_session_through_another_instance() {
    let nodes = sim_nodes(&["node-a", "node-b", "node-c"]).await;
    let (lb1, lb2) = (listener_addr(18080), listener_addr(18080));
    let _first = Amslb::start(&origin_config(lb1, &nodes, ""), &[lb1]);
    let _second = Amslb::start(&origin_config(lb2, &nodes, ""), &[lb2]);
    let request = |method: Method, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "live.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let mut session_nodes = std::collections::HashSet::new();
    for stream in ["s1", "s2", "s3", "s4"] {
        let created = send(
            lb1,
            request(Method::POST, &format!("/LiveApp/whip/{stream}?video=true")),
        )
        .await;
        assert_eq!(created.status, 201);
        let etag = created.headers["etag"].to_str().unwrap().to_string();
        let location = created.headers["location"].to_str().unwrap().to_string();
        let key = location
            .split_once("amslb_node=")
            .map(|(_, k)| k)
            .unwrap_or("");
        assert_eq!(
            location,
            format!("/LiveApp/whip/{stream}/{etag}?video=true&amslb_node={key}"),
            "the session tag in the path, relative to the client's own URL"
        );
        let session_node = created.node();
        session_nodes.insert(session_node.clone());
        let deleted = send(lb2, request(Method::DELETE, &location)).await;
        assert_eq!(
            (deleted.status, deleted.node()),
            (200, session_node.clone()),
            "DELETE {location}: {}",
            deleted.text()
        );
        let node = nodes.iter().find(|n| n.id() == session_node).unwrap();
        let last = node.seen().last().cloned().unwrap();
        assert_eq!(
            (last.method.as_str(), last.uri.as_str()),
            (
                "DELETE",
                format!("/LiveApp/whip/{stream}/{etag}?video=true").as_str()
            )
        );
    }
    assert!(session_nodes.len() > 1, "round robin spread the sessions");
}

#[tokio::test]
async fn one_insert_cookie_keeps_a_client_on_one_origin_and_one_edge() {
    let nodes = sim_nodes(&["origin-1", "origin-2", "edge-1", "edge-2"]).await;
    let groups = ["origin", "origin", "edge", "edge"];
    let specs: Vec<_> = nodes.iter().zip(groups).map(|(n, g)| (n, g, "")).collect();
    let lb = listener_addr(18080);
    let _amslb = Amslb::start(
        &one_listener_config(lb, &specs, "[sticky]\nmode = \"insert\"\n"),
        &[lb],
    );

    // A player page: REST on origin and HLS on edge, interleaved, with a
    // browser's cookie jar (the last Set-Cookie wins).
    let mut jar: Option<String> = None;
    let mut landed = std::collections::HashSet::new();
    for i in 0..20 {
        let path = if i % 2 == 0 {
            "/LiveApp/rest/v2/broadcasts/s1"
        } else {
            "/LiveApp/streams/s1.m3u8"
        };
        let cookies: Vec<&str> = jar.iter().map(String::as_str).collect();
        let answer = get_with(lb, path, &cookies, &[]).await;
        if let Some(set) = answer.headers.get("set-cookie") {
            jar = Some(set.to_str().unwrap().split(';').next().unwrap().to_string());
        }
        landed.insert(answer.node());
    }
    assert_eq!(landed.len(), 2, "one origin and one edge: {landed:?}");
    assert_eq!(jar.unwrap().matches('.').count(), 1, "one key per group");
}
