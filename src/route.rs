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
        Some(dir @ ("streams" | "chunked")) => match stream_of_media_path(dir, &rest) {
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

/// For a path under `/{app}/streams/` or `/{app}/chunked/`, the media kind
/// and the stream id, if it is a playback file. The id is read the way AMS
/// reads it (`TokenFilterManager.getStreamId` in ant-media/Ant-Media-Server,
/// which its token, statistics and viewer-count filters use), so amslb's
/// stream key is the stream AMS serves:
///
/// - `drm/{id}/…` and `chunked/{id}/…` (CMAF): the directory after them;
/// - DASH (`.mpd`, `.m4s`) in a directory: the innermost directory
///   (`{id}/{id}.mpd`, `{subFolder}/{id}/chunk_0_00001.m4s`, `ll-hls/{id}/…`);
/// - otherwise the file name: `{id}_adaptive.m3u8`; `{id}__{anything}` (LL-HLS
///   `__lowlatency`, `__master`; AMS keeps one `_` of `{id}___720p…kbps`);
///   `{id}_720p2500kbps`, `{id}_300kbps`, `{id}_720p` renditions of
///   `.m3u8`; segments `{id}[_rendition]` + nine (or, from older AMS, four)
///   digits + `.ts`/`.fmp4`; VOD `.mp4`/`.webm`/`.mp3` with the recording's
///   date, rendition and `_N` counter cut off.
///
/// A subfolder (`/{app}/streams/{subFolder}/{id}.m3u8`) is not part of the id:
/// two streams in one subfolder are two streams.
fn stream_of_media_path(dir: &str, rest: &[&str]) -> Option<(RouteKind, String)> {
    let (&file, dirs) = rest.split_last()?;
    let (stem, ext) = file.rsplit_once('.')?;
    let kind = match ext {
        "m3u8" | "ts" | "fmp4" | "aac" | "vtt" | "mp4" | "webm" | "mp3" => RouteKind::Hls,
        "mpd" => RouteKind::Dash,
        // LL-HLS writes its parts as `.m4s` too, under `ll-hls/`.
        "m4s" if !dirs.is_empty() && !dirs.contains(&"ll-hls") => RouteKind::Dash,
        "m4s" => RouteKind::Hls,
        _ => return None,
    };
    let named_dir = |id: &str| (!id.is_empty()).then(|| (kind, id.to_string()));
    if dir == "chunked" {
        return dirs.last().and_then(|id| named_dir(id));
    }
    if let ["drm", id, _, ..] = rest {
        return named_dir(id);
    }
    if matches!(ext, "mpd" | "m4s")
        && let Some(id) = dirs.last()
    {
        return named_dir(id);
    }
    let id = stream_id_from_file(file, stem, ext)?;
    named_dir(&id)
}

/// Width of the segment counter AMS appends to segment names
/// (`Muxer.SEGMENT_INDEX_LENGTH`, written as `%09d`).
const SEGMENT_DIGITS: usize = 9;
/// Width of the segment counter older AMS versions wrote; AMS still reads it.
const OLD_SEGMENT_DIGITS: usize = 4;

/// The stream id in a file name under `streams/` (see [`stream_of_media_path`]).
fn stream_id_from_file(file: &str, stem: &str, ext: &str) -> Option<String> {
    if ext == "m3u8"
        && let Some(id) = stem.strip_suffix("_adaptive")
    {
        return Some(id.to_string());
    }
    // AMS forbids `__` in stream ids, so `{id}__{anything}` splits there.
    if let Some((id, tail)) = file.rsplit_once("__") {
        let kept = if tail.contains("kbps") { "_" } else { "" };
        return Some(format!("{id}{kept}"));
    }
    match ext {
        "m3u8" => Some(strip_renditions(stem).to_string()),
        "ts" | "fmp4" => Some(segment_stream(stem).to_string()),
        "mp4" | "webm" | "mp3" => Some(recording_stream(stem).to_string()),
        _ => Some(stem.to_string()),
    }
}

/// `{id}_{renditions}` → `{id}`, where renditions are one or more of
/// `{height}p` and `{rate}kbps` (`_720p2500kbps`, `_300kbps`, `_720p`).
fn strip_renditions(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((id, tail)) if !id.is_empty() && is_renditions(tail) => id,
        _ => name,
    }
}

/// Whether `s` is one or more `{digits}p` / `{digits}kbps` tokens.
fn is_renditions(mut s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    while !s.is_empty() {
        let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        let after = &s[digits..];
        s = if let Some(next) = after.strip_prefix("kbps") {
            next
        } else if let Some(next) = after.strip_prefix('p') {
            next
        } else {
            return false;
        };
    }
    true
}

/// A segment stem `{id}[_{renditions}]{counter}` → `{id}`; the counter has
/// nine digits (four in older AMS). The id itself may end in digits, so
/// exactly the counter's width is cut.
fn segment_stream(stem: &str) -> &str {
    let digits = stem.len() - stem.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    [SEGMENT_DIGITS, OLD_SEGMENT_DIGITS]
        .into_iter()
        .find(|&width| digits >= width && stem.len() > width)
        .map_or(stem, |width| strip_renditions(&stem[..stem.len() - width]))
}

/// A recording stem → its stream id: AMS names recordings
/// `{id}[-{yyyy-MM-dd_HH-mm-ss.SSS}][_{renditions}][_{n}]`; HLS fMP4 init
/// segments are `{name}_{millis}_init.mp4`.
fn recording_stream(stem: &str) -> &str {
    let mut name = stem.strip_suffix("_init").unwrap_or(stem);
    if let Some(pos) = recording_date(name) {
        return &name[..pos];
    }
    if let Some((id, counter)) = name.rsplit_once('_')
        && !id.is_empty()
        && !counter.is_empty()
        && counter.bytes().all(|b| b.is_ascii_digit())
    {
        name = id;
    }
    strip_renditions(name)
}

/// Where `-yyyy-MM-dd_HH-mm-ss` (a recording's start time) begins in `name`.
fn recording_date(name: &str) -> Option<usize> {
    const SHAPE: &[u8] = b"-2ddd-dd-dd_dd-dd-dd";
    let bytes = name.as_bytes();
    (1..=bytes.len().saturating_sub(SHAPE.len())).find(|&at| {
        bytes[at..at + SHAPE.len()]
            .iter()
            .zip(SHAPE)
            .all(|(&b, &want)| match want {
                b'd' => b.is_ascii_digit(),
                want => b == want,
            })
    })
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

    /// Every path shape AMS serves under `/{app}/streams/` and `/{app}/chunked/`,
    /// with the stream AMS's own `TokenFilterManager.getStreamId` reads from it
    /// (cases from its tests), as (path, kind, affinity). All are play → edge.
    const AMS_PATHS: &[(&str, RouteKind, &str)] = &[
        // playlists: plain, adaptive, renditions, in a subfolder
        ("/LiveApp/streams/s1.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/sub/s1.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/sub/s2.m3u8", Hls, "LiveApp/s2"),
        ("/LiveApp/streams/a/b/s1.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_adaptive.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/sub/s1_adaptive.m3u8", Hls, "LiveApp/s1"),
        (
            "/LiveApp/streams/my_cam_x_adaptive.m3u8",
            Hls,
            "LiveApp/my_cam_x",
        ),
        ("/LiveApp/streams/s1_720p2500kbps.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_300kbps.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_720p.m3u8", Hls, "LiveApp/s1"),
        (
            "/LiveApp/streams/sub/s1_240p300kbps.m3u8",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/my_cam_test.m3u8",
            Hls,
            "LiveApp/my_cam_test",
        ),
        (
            "/LiveApp/streams/my_cam_test_500kbps.m3u8",
            Hls,
            "LiveApp/my_cam_test",
        ),
        // `{id}__{suffix}`: LL-HLS playlists; AMS keeps one `_` before `kbps`
        (
            "/LiveApp/streams/sub/ll-hls/s1__lowlatency.m3u8",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/ll-hls/s1/s1__master.m3u8",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/ll-hls/s1/s1__anything.ts",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/cam_x__720p2000kbps.m3u8",
            Hls,
            "LiveApp/cam_x_",
        ),
        (
            "/LiveApp/streams/cam_x__720p2000kbps000000266.ts",
            Hls,
            "LiveApp/cam_x_",
        ),
        // segments: nine-digit counter, renditions, four digits (older AMS), fMP4
        ("/LiveApp/streams/s1000000012.ts", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/sub/s1000000012.ts", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/cam12000000007.ts", Hls, "LiveApp/cam12"),
        (
            "/LiveApp/streams/monstercat060218000.ts",
            Hls,
            "LiveApp/monstercat",
        ),
        ("/LiveApp/streams/s1_480p000000003.ts", Hls, "LiveApp/s1"),
        (
            "/LiveApp/streams/s1_240p300kbps000000003.ts",
            Hls,
            "LiveApp/s1",
        ),
        ("/LiveApp/streams/s1_300kbps000000003.ts", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_240p300kbps0000.ts", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s10000.ts", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1000000004.fmp4", Hls, "LiveApp/s1"),
        (
            "/LiveApp/streams/s1_720p2500kbps000000004.fmp4",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/s1_1712345678901_init.mp4",
            Hls,
            "LiveApp/s1",
        ),
        (
            "/LiveApp/streams/s1_720p2500kbps_1712345678901_init.mp4",
            Hls,
            "LiveApp/s1",
        ),
        ("/LiveApp/streams/s1.aac", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1.vtt", Hls, "LiveApp/s1"),
        // DASH: the stream's directory, also under a subfolder
        ("/LiveApp/streams/s1/s1.mpd", Dash, "LiveApp/s1"),
        ("/LiveApp/streams/s1/chunk_0_00012.m4s", Dash, "LiveApp/s1"),
        (
            "/LiveApp/streams/my_s1/my_s1_0segment00139.m4s",
            Dash,
            "LiveApp/my_s1",
        ),
        ("/LiveApp/streams/sub/s1/s1.mpd", Dash, "LiveApp/s1"),
        (
            "/LiveApp/streams/ll-hls/s1/s1_0segment00139.m4s",
            Hls,
            "LiveApp/s1",
        ),
        // DRM and CMAF chunked: the directory after `drm/` / `chunked/`
        ("/LiveApp/streams/drm/s1/master.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/drm/s1/manifest.mpd", Dash, "LiveApp/s1"),
        ("/LiveApp/chunked/s1/master.m3u8", Hls, "LiveApp/s1"),
        ("/LiveApp/chunked/s1/media_1.m3u8", Hls, "LiveApp/s1"),
        // recordings (VOD): date, rendition, `_N` counter
        ("/LiveApp/streams/s1.mp4", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/sub/s1.mp4", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_1.mp4", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_240p500kbps.mp4", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1_480p300kbps_1.mp4", Hls, "LiveApp/s1"),
        (
            "/LiveApp/streams/my_s1-2021-05-18_11-26-26.842.mp4",
            Hls,
            "LiveApp/my_s1",
        ),
        (
            "/LiveApp/streams/my_s1-2021-05-18_11-26-26.842_240p500kbps.mp4",
            Hls,
            "LiveApp/my_s1",
        ),
        (
            "/LiveApp/streams/s1_x_adaptive_123_480p600kbps_1.mp4",
            Hls,
            "LiveApp/s1_x_adaptive_123",
        ),
        (
            "/LiveApp/streams/s1-2021-12-26_19-13-12.371.webm",
            Hls,
            "LiveApp/s1",
        ),
        ("/LiveApp/streams/s1_240p500kbps_2.webm", Hls, "LiveApp/s1"),
        ("/LiveApp/streams/s1.mp3", Hls, "LiveApp/s1"),
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
        for &(path, kind, affinity) in AMS_PATHS {
            let expected = Route {
                target: Edge,
                kind,
                affinity: Some(affinity.to_string()),
            };
            assert_eq!(classify(path, None), expected, "{path}");
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
            "/a/streams/drm/x",
            "/a/streams/drm/.m3u8",
            "/a/chunked/x.m3u8",
            "/a/streams/__.m3u8",
            "/a/streams/_1.mp4",
            "/a/streams/-2021-05-18_11-26-26.mp4",
        ] {
            let _ = classify(path, Some("&&=&target"));
        }
    }
}
