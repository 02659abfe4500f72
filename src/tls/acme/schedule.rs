//! When to renew and how long to wait after a failure (pure functions).

use std::time::{Duration, SystemTime};

/// The moment a certificate valid from `not_before` to `not_after` should be
/// renewed: after `renew_at` of its lifetime, moved earlier by up to `jitter`
/// of the lifetime according to `draw` (in 0..1, drawn once per process so that
/// instances sharing a certificate spread out, but one instance keeps its plan).
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: f64,
    jitter: f64,
    draw: f64,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let fraction = (renew_at - jitter * draw.clamp(0.0, 1.0)).max(0.0);
    not_before + lifetime.mul_f64(fraction)
}

/// Wait after the `failures`-th consecutive failure (1-based): `min`, doubling
/// each time, never above `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    min.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_minus_jitter() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90 * 86_400);
        let at = |draw| {
            renewal_time(start, end, 2.0 / 3.0, 0.05, draw)
                .duration_since(start)
                .unwrap()
                .as_secs()
        };
        // Float arithmetic: allow a second either way.
        assert!(at(0.0).abs_diff(60 * 86_400) <= 1, "{}", at(0.0));
        // Full jitter: 5 % of 90 days (4.5 days) earlier.
        assert!(at(1.0).abs_diff(60 * 86_400 - 388_800) <= 1, "{}", at(1.0));
        assert!(at(0.5) < at(0.0) && at(0.5) > at(1.0));
    }

    #[test]
    fn expired_or_inverted_validity_is_due_now() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(
            renewal_time(t, t - Duration::from_secs(5), 0.66, 0.05, 0.3),
            t
        );
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(backoff(1, min, max), min);
        assert_eq!(backoff(2, min, max), Duration::from_secs(120));
        assert_eq!(backoff(4, min, max), Duration::from_secs(480));
        assert_eq!(backoff(7, min, max), max);
        assert_eq!(backoff(u32::MAX, min, max), max);
    }
}
