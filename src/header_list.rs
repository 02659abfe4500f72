//! Comma-separated header lists (RFC 9110 §5.6.1) such as `Connection`,
//! `Upgrade` and `Transfer-Encoding`: the elements of every line of one
//! header, read the same way wherever amslb looks at them.

use http::HeaderMap;
use http::header::AsHeaderName;

/// The trimmed elements of every `name` line, in order (empty elements
/// included; lines that are not visible ASCII are skipped).
pub fn elements<K: AsHeaderName>(headers: &HeaderMap, name: K) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
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
