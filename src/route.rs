//! The streaming-aware router: which group a request belongs to, and which
//! stream it concerns. A pure function of the request line, so every rule
//! (AMS's URL layout: publish and REST to origins, play to edges) is pinned
//! down by the table of cases below.

/// The group a request is sent to, before group names are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The `origin` group: ingest (publish, WHIP).
    Origin,
    /// The `edge` group: playback (HLS, DASH, WHEP).
    Edge,
    /// The listener's `default_group` (REST, panel, anything else).
    ListenerDefault,
}

/// What kind of traffic a request is; used in logs, metrics and affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// HLS or LL-HLS playlist or segment.
    Hls,
    /// DASH manifest or segment.
    Dash,
    /// WHIP publish session.
    Whip,
    /// WHEP play session.
    Whep,
    /// WebRTC signalling WebSocket.
    WebSocket,
    /// AMS REST API.
    Rest,
    /// Web panel, static files, anything else.
    Other,
}

impl RouteKind {
    /// Stable lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Hls => "hls",
            RouteKind::Dash => "dash",
            RouteKind::Whip => "whip",
            RouteKind::Whep => "whep",
            RouteKind::WebSocket => "websocket",
            RouteKind::Rest => "rest",
            RouteKind::Other => "other",
        }
    }
}

/// The router's verdict for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where the request goes.
    pub target: Target,
    /// What kind of traffic it is.
    pub kind: RouteKind,
    /// `app/stream` when the request concerns one stream, for stream affinity.
    pub affinity: Option<String>,
}

/// Classifies a request from its path and query string. The method does not
/// matter: a WHIP/WHEP session's follow-ups (PATCH, DELETE) go where its POST went.
pub fn classify(path: &str, query: Option<&str>) -> Route {
    let mut route = classify_path(path);
    if let Some(target) = query.and_then(explicit_target) {
        route.target = target;
    }
    route
}

/// `?target=origin|edge` (AMS SDK convention) overrides every path rule.
fn explicit_target(query: &str) -> Option<Target> {
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some(("target", "origin")) => Some(Target::Origin),
            Some(("target", "edge")) => Some(Target::Edge),
            _ => None,
        })
}

fn classify_path(path: &str) -> Route {
    let other = |kind| Route {
        target: Target::ListenerDefault,
        kind,
        affinity: None,
    };
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some(first), second) = (parts.next(), parts.next()) else {
        return other(RouteKind::Other);
    };
    if first == "rest" {
        return other(RouteKind::Rest);
    }
    let app = first;
    let rest: Vec<&str> = parts.collect();
    match second {
        Some("rest") => other(RouteKind::Rest),
        Some("websocket") if rest.is_empty() => other(RouteKind::WebSocket),
        Some("streams") => match stream_of_media_path(&rest) {
            Some((kind, stream)) => Route {
                target: Target::Edge,
                kind,
                affinity: Some(format!("{app}/{stream}")),
            },
            None => other(RouteKind::Other),
        },
        Some(session @ ("whip" | "whep")) if !rest.is_empty() && !rest[0].is_empty() => {
            let (target, kind) = if session == "whip" {
                (Target::Origin, RouteKind::Whip)
            } else {
                (Target::Edge, RouteKind::Whep)
            };
            Route {
                target,
                kind,
                affinity: Some(format!("{app}/{}", rest[0])),
            }
        }
        _ => other(RouteKind::Other),
    }
}

/// For a path under `/{app}/streams/`, the media kind and the stream id, if it
/// is a playback file. AMS writes `{id}.m3u8`, `{id}_adaptive.m3u8`,
/// `{id}_720p2500kbps.m3u8`, segments `{id}000000001.ts` / `{id}_720p...001.ts`,
/// LL-HLS and DASH under `{id}/` (`{id}/{id}.mpd`, `{id}/chunk_...m4s`).
fn stream_of_media_path(rest: &[&str]) -> Option<(RouteKind, String)> {
    let file = *rest.last()?;
    let (stem, ext) = file.rsplit_once('.')?;
    let kind = match ext {
        "m3u8" | "ts" | "aac" | "vtt" => RouteKind::Hls,
        "mpd" => RouteKind::Dash,
        "m4s" | "mp4" => {
            if rest.len() > 1 {
                RouteKind::Dash
            } else {
                RouteKind::Hls
            }
        }
        _ => return None,
    };
    // In a per-stream directory the directory is the stream id.
    if rest.len() > 1 && !rest[0].is_empty() {
        return Some((kind, rest[0].to_string()));
    }
    Some((kind, stream_id_from_file_stem(stem, ext)))
}

/// Width of the segment counter AMS appends to segment names.
const SEGMENT_DIGITS: usize = 9;

fn stream_id_from_file_stem(stem: &str, ext: &str) -> String {
    let mut id = stem;
    if ext != "m3u8" {
        // AMS numbers segments with nine digits (`%09d`) right after the stream
        // id; the id itself may end in digits, so cut exactly nine.
        let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        if digits >= SEGMENT_DIGITS && id.len() > SEGMENT_DIGITS {
            id = &id[..id.len() - SEGMENT_DIGITS];
        }
    }
    if let Some(base) = id.strip_suffix("_adaptive") {
        return base.to_string();
    }
    // Rendition suffix `_720p...`: cut at the last `_` followed by digits and `p`.
    if let Some(pos) = id.rfind('_') {
        let suffix = &id[pos + 1..];
        let digits = suffix.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && suffix[digits..].starts_with('p') {
            return id[..pos].to_string();
        }
    }
    id.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use RouteKind::*;
    use Target::*;

    /// (method, path, query, target, kind, affinity); the method is there for the
    /// reader: it must not change the verdict.
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Target,
        RouteKind,
        Option<&'static str>,
    );
    const CASES: &[Case] = &[
        // HLS / LL-HLS / DASH play → edge
        (
            "GET",
            "/LiveApp/streams/s1.m3u8",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1_adaptive.m3u8",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1_720p2500kbps.m3u8",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1000000012.ts",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1_480p000000003.ts",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1/s1.mpd",
            None,
            Edge,
            Dash,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1/chunk_0_00012.m4s",
            None,
            Edge,
            Dash,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1.mp4",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/cam12000000007.ts",
            None,
            Edge,
            Hls,
            Some("LiveApp/cam12"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1.aac",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/streams/s1.vtt",
            None,
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        // a non-media file under streams/ is not play traffic
        (
            "GET",
            "/LiveApp/streams/s1.png",
            None,
            ListenerDefault,
            Other,
            None,
        ),
        // WHIP → origin, WHEP → edge, follow-ups too
        (
            "POST",
            "/LiveApp/whip/s1",
            None,
            Origin,
            Whip,
            Some("LiveApp/s1"),
        ),
        (
            "PATCH",
            "/LiveApp/whip/s1/res-42",
            None,
            Origin,
            Whip,
            Some("LiveApp/s1"),
        ),
        (
            "DELETE",
            "/LiveApp/whip/s1/res-42",
            None,
            Origin,
            Whip,
            Some("LiveApp/s1"),
        ),
        (
            "POST",
            "/WebRTCAppEE/whep/cam9",
            None,
            Edge,
            Whep,
            Some("WebRTCAppEE/cam9"),
        ),
        (
            "DELETE",
            "/WebRTCAppEE/whep/cam9/x",
            None,
            Edge,
            Whep,
            Some("WebRTCAppEE/cam9"),
        ),
        // WHIP with no stream is not a session
        ("POST", "/LiveApp/whip/", None, ListenerDefault, Other, None),
        // WebSocket signalling → listener default unless ?target=
        (
            "GET",
            "/LiveApp/websocket",
            None,
            ListenerDefault,
            WebSocket,
            None,
        ),
        (
            "GET",
            "/LiveApp/websocket",
            Some("target=origin"),
            Origin,
            WebSocket,
            None,
        ),
        (
            "GET",
            "/LiveApp/websocket",
            Some("a=1&target=edge"),
            Edge,
            WebSocket,
            None,
        ),
        // REST, panel, static → listener default
        ("GET", "/rest/v2/version", None, ListenerDefault, Rest, None),
        (
            "POST",
            "/LiveApp/rest/v2/broadcasts/create",
            None,
            ListenerDefault,
            Rest,
            None,
        ),
        ("GET", "/", None, ListenerDefault, Other, None),
        (
            "GET",
            "/LiveApp/play.html",
            None,
            ListenerDefault,
            Other,
            None,
        ),
        ("GET", "/favicon.ico", None, ListenerDefault, Other, None),
        // ?target= wins over path rules, unknown values are ignored
        (
            "GET",
            "/LiveApp/streams/s1.m3u8",
            Some("target=origin"),
            Origin,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/rest/v2/version",
            Some("target=edge"),
            Edge,
            Rest,
            None,
        ),
        (
            "GET",
            "/LiveApp/streams/s1.m3u8",
            Some("target=moon"),
            Edge,
            Hls,
            Some("LiveApp/s1"),
        ),
        (
            "GET",
            "/LiveApp/play.html",
            Some("xtarget=edge"),
            ListenerDefault,
            Other,
            None,
        ),
    ];

    #[test]
    fn routing_table() {
        for &(method, path, query, target, kind, affinity) in CASES {
            // Every method must give the same verdict.
            let route = classify(path, query);
            let expected = Route {
                target,
                kind,
                affinity: affinity.map(str::to_string),
            };
            assert_eq!(route, expected, "{method} {path}?{query:?}");
        }
    }

    #[test]
    fn odd_paths_do_not_panic() {
        for path in [
            "",
            "/",
            "//",
            "///streams/",
            "/a/streams/.m3u8",
            "/a/streams/000.ts",
            "/a/whip",
            "/%/whep/%",
        ] {
            let _ = classify(path, Some("&&=&target"));
        }
    }
}
