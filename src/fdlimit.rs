//! The open-file limit (`RLIMIT_NOFILE`). Every proxied connection holds two
//! descriptors (client side and node side), so the usual soft limit of 1024
//! caps amslb near 500 connections whatever `[global] max_connections` says.
//! Like HAProxy, amslb raises the soft limit to the hard one at start (no
//! privilege needed) and logs it; when even that is too low for
//! `max_connections`, start-up and `amslb check` say so.

use rlimit::Resource;

/// Descriptors one proxied connection or tunnel holds: client and node side.
const PER_CONNECTION: u64 = 2;
/// Descriptors beyond the connections: listeners, event loops, health probes,
/// idle pooled node connections, the log and certificate files.
const RESERVE: u64 = 256;

/// The soft limit before and after raising it, and the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    before: u64,
    soft: u64,
    hard: u64,
}

/// Raises the soft open-file limit to the hard limit, logs the result, and
/// warns when the limit is too low for `max_connections`.
pub fn raise(max_connections: usize) {
    let limits = match raise_to_hard() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot raise the open file limit: {e}");
            return;
        }
    };
    if limits.soft > limits.before {
        tracing::info!(
            "open file limit {} (raised from {}; the hard limit)",
            limits.soft,
            limits.before
        );
    } else {
        tracing::info!(
            "open file limit {} (hard limit {})",
            limits.soft,
            limits.hard
        );
    }
    if let Some(warning) = shortfall(max_connections, limits) {
        tracing::warn!("{warning}");
    }
}

/// Sets the soft limit to the hard one (when lower) and reads both back.
fn raise_to_hard() -> std::io::Result<Limits> {
    let (before, hard) = Resource::NOFILE.get()?;
    if before < hard {
        Resource::NOFILE.set(hard, hard)?;
    }
    let (soft, hard) = Resource::NOFILE.get()?;
    Ok(Limits { before, soft, hard })
}

/// Descriptors `max_connections` connections need, with the reserve.
fn needed(max_connections: usize) -> u64 {
    u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(RESERVE)
}

/// The warning to give when `limits` cannot hold `max_connections`, if any.
fn shortfall(max_connections: usize, limits: Limits) -> Option<String> {
    let needed = needed(max_connections);
    (limits.soft < needed).then(|| {
        format!(
            "open file limit {soft} is too low for [global] max_connections = {max_connections}: \
             each proxied connection holds {PER_CONNECTION} file descriptors (client and node \
             side), so about {needed} are needed and connections will fail near {reachable}; \
             raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower max_connections",
            soft = limits.soft,
            reachable = limits.soft.saturating_sub(RESERVE) / PER_CONNECTION,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(soft: u64) -> Limits {
        Limits {
            before: soft,
            soft,
            hard: soft,
        }
    }

    #[test]
    fn two_descriptors_per_connection_plus_the_reserve_are_needed() {
        assert_eq!(needed(1000), 2256);
        assert_eq!(needed(usize::MAX), u64::MAX);
    }

    #[test]
    fn a_limit_below_the_need_is_reported_with_the_figures() {
        let warning = shortfall(5000, limits(4096)).unwrap();
        assert!(warning.contains("open file limit 4096"), "{warning}");
        assert!(warning.contains("max_connections = 5000"), "{warning}");
        assert!(warning.contains("about 10256"), "{warning}");
        assert!(warning.contains("near 1920"), "{warning}");
        assert_eq!(shortfall(1000, limits(2256)), None);
        assert!(shortfall(1000, limits(2255)).is_some());
    }
}
