//! Comma-separated header lists (RFC 9110 §5.6.1) such as `Connection`,
//! `Upgrade` and `Transfer-Encoding`: the elements of every line of one
//! header, read the same way wherever amslb looks at them.

use http::HeaderMap;
use http::header::AsHeaderName;

/// The trimmed elements of every `name` line, in order (empty elements
/// included; lines that are not visible ASCII are skipped).
pub fn elements<K: AsHeaderName>(headers: &HeaderMap, name: K) -> impl Iterator<Item = &str> {
    // Split and trimmed as bytes: a line that passed `to_str` holds only
    // visible ASCII, spaces and tabs, so byte-wise is the same as `str`'s
    // `split` and `trim`, whose searcher and Unicode checks were a few
    // percent of a keep-alive request's instructions (callgrind).
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|element| std::str::from_utf8(element.trim_ascii()).ok())
}

/// Whether a `name` line lists `token` (compared without regard to case).
pub fn lists<K: AsHeaderName>(headers: &HeaderMap, name: K, token: &str) -> bool {
    elements(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::CONNECTION;

    #[test]
    fn elements_of_every_line_are_read_trimmed_and_case_blind() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, HeaderValue::from_static("keep-alive, x-a"));
        headers.append(CONNECTION, HeaderValue::from_static(" Upgrade ,"));
        let all: Vec<&str> = elements(&headers, CONNECTION).collect();
        assert_eq!(all, ["keep-alive", "x-a", "Upgrade", ""]);
        assert!(lists(&headers, CONNECTION, "upgrade"));
        assert!(!lists(&headers, CONNECTION, "close"));
        assert!(!lists(&headers, "upgrade", "websocket"));
    }
}
