//! Serde helpers for human-written durations such as `"5s"`, `"500ms"` or `"2h"`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Deserializes a duration written the way operators write them in HAProxy and
/// nginx configs ("5s", "250ms", "2h", "1h 30m"). A bare integer is refused on
/// purpose: "30" could mean seconds or milliseconds, and guessing wrong by a
/// factor of 1000 is the kind of error that only shows up in production.
pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Parses one duration; the error text is what the operator sees next to the key.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write a number with a unit, e.g. \"5s\", \"500ms\", \"2h\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_units() {
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn refuses_unitless_and_garbage() {
        assert!(parse("30").unwrap_err().contains("unit"));
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }
}
