//! `[health]`: active probes and passive failure tracking of nodes.

use super::duration;
use serde::Deserialize;
use std::time::Duration;

/// `[health]`; the defaults are HAProxy's `check inter 2000 rise 2 fall 3`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Run active probes at all; when off, only passive failures mark nodes down.
    pub enabled: bool,
    /// What an HTTP probe asks the node.
    pub check: HealthCheck,
    /// Path probed with `GET` on each node's HTTP port (`check = "liveness"`).
    pub path: String,
    /// Application probed with `HEAD /{app}` (`check = "app"`).
    pub app: String,
    /// Time between two probes of one node.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// A probe that has no answer after this long fails.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Consecutive good probes that bring a down node back.
    pub rise: u32,
    /// Consecutive failed probes that take an up node down.
    pub fall: u32,
    /// The status a good probe answers with.
    pub expect_status: u16,
    /// Consecutive connect failures or 5xx answers on real traffic that take a
    /// node down at once, before the probes notice; 0 turns passive checks off.
    pub passive_failures: u32,
    /// After a passive mark-down, how long to wait before probing the node again.
    #[serde(with = "duration")]
    pub passive_backoff: Duration,
    /// A node that comes back up gets a share of new sessions that grows from
    /// nothing to its full share over this time; "0s" turns slow start off.
    #[serde(with = "duration")]
    pub slow_start: Duration,
}

/// The HTTP probe of `[health] check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// `GET [health] path`, good when it answers `expect_status`.
    Liveness,
    /// `HEAD /{app}`, as AMS probes a peer before it relays a stream from it,
    /// good on a 2xx or 3xx answer: a deployed application answers (AMS's
    /// servlet container redirects `/{app}` to `/{app}/`), one that is still
    /// starting or missing answers 404, while liveness already says 200.
    App,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            check: HealthCheck::Liveness,
            path: "/rest/v2/liveness".into(),
            app: "LiveApp".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            expect_status: 200,
            passive_failures: 3,
            passive_backoff: Duration::from_secs(5),
            slow_start: Duration::ZERO,
        }
    }
}

/// Checks `[health]`; returns warnings, or the key and reason of the first problem.
pub fn validate(health: &HealthConfig) -> Result<Vec<String>, (String, String)> {
    let fail = |key: &str, reason: &str| Err((format!("health.{key}"), reason.to_string()));
    if !health.path.starts_with('/') {
        return fail("path", "must start with '/'");
    }
    let app_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if health.app.is_empty() || !health.app.chars().all(app_ok) || health.app.starts_with('.') {
        return fail(
            "app",
            "must be an application name (letters, digits, '_', '-', '.'), such as \"LiveApp\"",
        );
    }
    if health.interval.is_zero() {
        return fail("interval", "must be longer than 0s");
    }
    if health.timeout.is_zero() {
        return fail("timeout", "must be longer than 0s");
    }
    if health.rise == 0 {
        return fail("rise", "must be at least 1");
    }
    if health.fall == 0 {
        return fail("fall", "must be at least 1");
    }
    if !(100..=599).contains(&health.expect_status) {
        return fail(
            "expect_status",
            "must be an HTTP status between 100 and 599",
        );
    }
    let mut warnings = Vec::new();
    if health.timeout > health.interval {
        warnings.push(format!(
            "health.timeout ({:?}) is longer than health.interval ({:?}): a hung node is probed less often than configured",
            health.timeout, health.interval
        ));
    }
    Ok(warnings)
}
