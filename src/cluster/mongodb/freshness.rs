//! When is a node's heartbeat too old? The clock-skew rule lives here.
//!
//! AMS nodes stamp `lastUpdateTime` with their own wall clock; ours may differ
//! by seconds (or worse, on a badly synced VM). Comparing the two clocks alone
//! would evict every node whose clock runs behind and keep a dead node whose
//! clock runs ahead. So the rule is:
//!
//! 1. **Observation first.** Once we have seen a node's document, the node is
//!    fresh as long as we keep seeing its `lastUpdateTime` *change*, timed by
//!    our own monotonic clock. Skew does not matter at all here: a node 10 min
//!    behind that refreshes every 5 s is fresh; a node 10 min ahead that stopped
//!    refreshing goes stale `stale_after` (+ allowance) after its last change.
//! 2. **First sight uses the wall clock, with an allowance.** For a document we
//!    have not seen change yet (amslb just started, or the node just appeared),
//!    its age is `our wall clock - lastUpdateTime`, at least zero. The allowance
//!    in the limit below covers ordinary skew; a node whose clock is further
//!    behind is held back only until its next heartbeat, which rule 1 then
//!    times. A timestamp in the future counts as age 0, and rule 1 bounds how
//!    long that can keep a dead node.
//! 3. **Outages stop the clock.** The timer only runs while MongoDB answers
//!    ([`ConnectedClock`]), and an outage counts from the last answer, not from
//!    when we noticed it: heartbeats we could not see do not make nodes stale,
//!    so an outage keeps the last known membership, and after it nodes have
//!    their usual time to refresh.
//!
//! A node is stale when more than `stale_after + allowance` has passed since
//! its last (observed or back-dated) heartbeat; the allowance is a quarter of
//! `stale_after`, at most 5 s. Polling adds at most one
//! `poll_interval` of delay to observations, well inside AMS's 5 s period vs 20 s.

use std::time::{Duration, Instant};

/// Skew tolerated on top of `stale_after`: a quarter of it, at most 5 s, so
/// that short test values keep their meaning.
pub fn skew_allowance(stale_after: Duration) -> Duration {
    (stale_after / 4).min(Duration::from_secs(5))
}

/// Milliseconds on a clock that only runs while MongoDB answers.
#[derive(Debug, Clone)]
pub struct ConnectedClock {
    origin: Instant,
    paused_total: Duration,
    paused_at: Option<Instant>,
}

impl ConnectedClock {
    /// A clock that starts paused: until MongoDB first answers we know nothing.
    pub fn new(at: Instant) -> Self {
        Self {
            origin: at,
            paused_total: Duration::ZERO,
            paused_at: Some(at),
        }
    }

    /// Connected milliseconds elapsed at `at` since the clock was created.
    pub fn now_ms(&self, at: Instant) -> i64 {
        let frozen = self
            .paused_at
            .map_or(Duration::ZERO, |p| at.saturating_duration_since(p));
        let run = at
            .saturating_duration_since(self.origin)
            .saturating_sub(self.paused_total + frozen);
        millis(run)
    }

    /// Stops the clock as of `at`, which may lie in the past (MongoDB's last
    /// answer); a no-op when already stopped.
    pub fn pause(&mut self, at: Instant) {
        self.paused_at.get_or_insert(at);
    }

    /// Restarts the clock (MongoDB answered); a no-op when running.
    pub fn resume(&mut self, at: Instant) {
        if let Some(p) = self.paused_at.take() {
            self.paused_total += at.saturating_duration_since(p);
        }
    }
}

/// Whole milliseconds of `d`, saturating (no real duration gets near the limit).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Connected-clock time of a heartbeat seen for the first time (rule 2): `now_ms`
/// back-dated by the heartbeat's wall-clock age. `None` (no readable heartbeat)
/// dates it so far back that the node is stale.
pub fn first_seen_at(last_update_ms: Option<i64>, wall_now_ms: i64, now_ms: i64) -> i64 {
    match last_update_ms {
        Some(beat) => now_ms.saturating_sub(wall_now_ms.saturating_sub(beat).max(0)),
        None => i64::MIN / 2,
    }
}

/// Whether a heartbeat last seen (or back-dated) at `beat_at` is too old at `now_ms`.
pub fn is_stale(beat_at: i64, now_ms: i64, stale_after: Duration) -> bool {
    now_ms.saturating_sub(beat_at) > millis(stale_after + skew_allowance(stale_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(20);
    const WALL: i64 = 1_700_000_000_000;

    fn first(age_ms: i64) -> i64 {
        first_seen_at(Some(WALL - age_ms), WALL, 0)
    }

    #[test]
    fn allowance_is_a_quarter_capped_at_five_seconds() {
        assert_eq!(skew_allowance(STALE), Duration::from_secs(5));
        assert_eq!(
            skew_allowance(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn first_sight_tolerates_skew_within_allowance() {
        // 25 s old by the wall clocks: within 20 s + 5 s allowance on first sight.
        assert!(!is_stale(first(25_000), 0, STALE));
        assert!(is_stale(first(25_001), 0, STALE));
        // Clock ahead of ours: age 0, and it goes stale 25 s later without a beat.
        let ahead = first(-60_000);
        assert!(!is_stale(ahead, 25_000, STALE));
        assert!(is_stale(ahead, 25_001, STALE));
        // No heartbeat at all: stale.
        assert!(is_stale(first_seen_at(None, WALL, 0), 0, STALE));
    }

    #[test]
    fn observed_beats_ignore_the_node_clock() {
        // A node 10 min behind is stale on first sight...
        assert!(is_stale(first(600_000), 0, STALE));
        // ...and fresh from the first change we observe, timed by our clock.
        assert!(!is_stale(30_000, 50_000, STALE));
        assert!(is_stale(30_000, 55_001, STALE));
    }

    #[test]
    fn connected_clock_stops_during_outages() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut clock = ConnectedClock::new(t0);
        assert_eq!(clock.now_ms(at(1_000)), 0, "paused until MongoDB answers");
        clock.resume(at(1_000));
        assert_eq!(clock.now_ms(at(3_000)), 2_000);
        clock.pause(at(3_000));
        clock.pause(at(4_000));
        assert_eq!(clock.now_ms(at(60_000)), 2_000);
        clock.resume(at(60_000));
        clock.resume(at(61_000));
        assert_eq!(clock.now_ms(at(62_000)), 4_000);
        // Pausing as of an earlier moment takes back the time since then.
        clock.pause(at(63_000));
        assert_eq!(clock.now_ms(at(65_000)), 5_000);
    }
}
