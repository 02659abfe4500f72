//! Resolving the host names AMS nodes register (`AMS_HOST_ADDRESS`) to the
//! addresses amslb connects to.
//!
//! Lookups never run on the membership path: [`Resolver::lookup`] answers from
//! the cache at once and, when a name is new or its answer older than
//! [`REFRESH`], starts one background lookup for it. At most [`CONCURRENCY`]
//! lookups run at a time, each bounded by [`TIMEOUT`]; when an answer changes a
//! name's address, [`Resolver::changed`] wakes the source, which publishes
//! again. A name that stops resolving keeps its last address (a DNS outage must
//! not empty the cluster; the health checks judge the node), and the cache holds
//! only the names of the current documents.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// How long an answer is used before the name is looked up again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Longest one lookup may take; a slower one counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Most lookups in flight at once.
pub const CONCURRENCY: usize = 8;

/// What the cache knows about a name right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The name's address (the last good one if the newest lookup failed).
    Addr(IpAddr),
    /// The first lookup has not answered yet.
    Pending,
    /// Every lookup so far failed.
    Failed,
}

#[derive(Debug)]
struct Name {
    addr: Option<IpAddr>,
    /// When the last lookup finished, successful or not.
    answered: Option<Instant>,
    in_flight: bool,
}

/// The host-name cache of one MongoDB source.
#[derive(Debug)]
pub struct Resolver {
    names: Mutex<HashMap<String, Name>>,
    limit: Arc<Semaphore>,
    changed: Notify,
}

impl Default for Resolver {
    fn default() -> Self {
        Self {
            names: Mutex::new(HashMap::new()),
            limit: Arc::new(Semaphore::new(CONCURRENCY)),
            changed: Notify::new(),
        }
    }
}

impl Resolver {
    /// The cached answer for `host`; starts a background lookup when the name
    /// is new or due (needs a Tokio runtime; without one nothing is started).
    pub fn lookup(self: &Arc<Self>, host: &str) -> Lookup {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let name = names.entry(host.to_string()).or_insert(Name {
            addr: None,
            answered: None,
            in_flight: false,
        });
        let due = name.answered.is_none_or(|at| at.elapsed() >= REFRESH);
        if due
            && !name.in_flight
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            name.in_flight = true;
            runtime.spawn(self.clone().resolve(host.to_string()));
        }
        match (name.addr, name.answered) {
            (Some(addr), _) => Lookup::Addr(addr),
            (None, None) => Lookup::Pending,
            (None, Some(_)) => Lookup::Failed,
        }
    }

    /// Forgets every name not in `keep` (documents gone or readdressed).
    pub fn retain(&self, keep: &HashSet<&str>) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|host, _| keep.contains(host.as_str()));
    }

    /// Resolves when a lookup changed a name's address (or failed its first time).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    async fn resolve(self: Arc<Self>, host: String) {
        let answer = match self.limit.clone().acquire_owned().await {
            Ok(_permit) => {
                let lookup = tokio::net::lookup_host((host.as_str(), 0));
                match tokio::time::timeout(TIMEOUT, lookup).await {
                    // IPv4 first: AMS nodes listen on it whatever else they have.
                    Ok(Ok(addrs)) => {
                        let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                        addrs
                            .iter()
                            .find(|a| a.is_ipv4())
                            .or(addrs.first())
                            .copied()
                            .ok_or_else(|| "no address".to_string())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
                }
            }
            Err(_) => Err("resolver closed".to_string()),
        };
        let changed = {
            let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            // Forgotten meanwhile: the answer is of no use.
            let Some(name) = names.get_mut(&host) else {
                return;
            };
            let first = name.answered.is_none();
            name.in_flight = false;
            name.answered = Some(Instant::now());
            match answer {
                Ok(addr) if name.addr != Some(addr) => {
                    tracing::info!(host, %addr, previous = ?name.addr, "node host name resolved");
                    name.addr = Some(addr);
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    if first || name.addr.is_some() {
                        tracing::warn!(host, error = e, kept = ?name.addr, "cannot resolve node host name");
                    }
                    first
                }
            }
        };
        if changed {
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_in_the_background_and_caches() {
        let r = Arc::new(Resolver::default());
        assert_eq!(r.lookup("localhost"), Lookup::Pending);
        tokio::time::timeout(Duration::from_secs(5), r.changed())
            .await
            .expect("an answer for localhost");
        match r.lookup("localhost") {
            Lookup::Addr(addr) => assert!(addr.is_loopback(), "{addr}"),
            other => panic!("{other:?}"),
        }
        // Answered from the cache: no second lookup is started.
        assert!(!r.names.lock().unwrap()["localhost"].in_flight);
        r.retain(&HashSet::new());
        assert!(r.names.lock().unwrap().is_empty());
    }
}
