//! Per-client-address limits (`[[limit]]`): concurrent connections and token
//! buckets (requests per second, publish sessions per minute).
//!
//! Each limit has a fixed-size table, allocated once: a set-associative cache
//! of [`WAYS`] entries per set, the set chosen by a keyed hash of the address
//! (so an attacker cannot aim many addresses at one set). A new address takes
//! a free entry of its set, else the least recently seen one without open
//! connections, else the least recently seen one. So a flood of source
//! addresses evicts old entries instead of growing memory; the price is that
//! an evicted client starts over with a full bucket.

use crate::config::Config;
use crate::config::rules::{LimitConfig, LimitKind, RouteName, in_any};
use crate::metrics::Metrics;
use crate::route::RouteKind;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

/// Entries per set.
const WAYS: usize = 8;

/// At most one "over the limit" log line per limit per this many microseconds.
const LOG_EVERY_US: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    client: Option<IpAddr>,
    /// Bumped whenever the entry gets a new client, so a connection guard of
    /// an evicted client does not release the newcomer's count.
    generation: u32,
    /// Last use, in microseconds since the table was made.
    touched: u64,
    connections: u32,
    tokens: f64,
}

const EMPTY: Entry = Entry {
    client: None,
    generation: 0,
    touched: 0,
    connections: 0,
    tokens: 0.0,
};

/// One limit's table of client addresses.
#[derive(Debug)]
struct Table {
    sets: Box<[Mutex<[Entry; WAYS]>]>,
    hasher: std::collections::hash_map::RandomState,
    born: Instant,
    last_log: AtomicU64,
    suppressed: AtomicU64,
}

impl Table {
    fn new(size: usize) -> Self {
        let sets = size.div_ceil(WAYS).max(1);
        Self {
            sets: (0..sets).map(|_| Mutex::new([EMPTY; WAYS])).collect(),
            hasher: Default::default(),
            born: Instant::now(),
            last_log: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_micros() as u64
    }

    /// Runs `f` on `client`'s entry (made fresh with a full bucket of `burst`
    /// when new); `f` gets (entry, set index, way, whether new).
    fn with_entry<R>(
        &self,
        client: IpAddr,
        burst: f64,
        f: impl FnOnce(&mut Entry, usize, usize) -> R,
    ) -> R {
        let index = (self.hasher.hash_one(client) % self.sets.len() as u64) as usize;
        let now = self.now();
        let mut set = self.sets[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let way = set
            .iter()
            .position(|e| e.client == Some(client))
            .unwrap_or_else(|| {
                let victim = set
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| (e.client.is_some(), e.connections > 0, e.touched))
                    .map_or(0, |(way, _)| way);
                let old = set[victim];
                set[victim] = Entry {
                    client: Some(client),
                    generation: old.generation.wrapping_add(1),
                    touched: now,
                    connections: 0,
                    tokens: burst,
                };
                victim
            });
        let entry = &mut set[way];
        let result = f(entry, index, way);
        entry.touched = now;
        result
    }

    /// Takes one token from `client`'s bucket; `false` when it is empty.
    fn take(&self, client: IpAddr, per_second: f64, burst: u32) -> bool {
        let burst = f64::from(burst);
        let now = self.now();
        self.with_entry(client, burst, |entry, _, _| {
            let elapsed = now.saturating_sub(entry.touched) as f64 / 1e6;
            entry.tokens = (entry.tokens + elapsed * per_second).min(burst);
            if entry.tokens >= 1.0 {
                entry.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Counts one more connection of `client`, unless it has `max` open.
    fn open(self: &Arc<Self>, client: IpAddr, max: u32) -> Option<Held> {
        self.with_entry(client, 0.0, |entry, set, way| {
            (entry.connections < max).then(|| {
                entry.connections += 1;
                Held {
                    table: self.clone(),
                    set,
                    way,
                    generation: entry.generation,
                }
            })
        })
    }

    /// Whether to write a log line now, and how many were left out before it.
    fn should_log(&self) -> Option<u64> {
        let now = self.now().max(1);
        let last = self.last_log.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= LOG_EVERY_US)
            && self
                .last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// One open connection counted in a table; released when dropped.
#[derive(Debug)]
struct Held {
    table: Arc<Table>,
    set: usize,
    way: usize,
    generation: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut set = self.table.sets[self.set]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = &mut set[self.way];
        if entry.generation == self.generation {
            entry.connections = entry.connections.saturating_sub(1);
        }
    }
}

/// A client connection's places in the `max_connections` tables; dropping it
/// releases them.
#[derive(Debug, Default)]
pub struct ConnectionHold(Vec<Held>);

/// Which limit refused, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Over(pub String);

/// The tables of every configured limit, by name; a reload keeps the tables
/// (and what they count) of limits whose name and size stay.
#[derive(Debug, Default)]
pub struct Limits {
    tables: RwLock<HashMap<String, Arc<Table>>>,
}

impl Limits {
    /// No tables yet; each is made on first use.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self, config: &Config, limit: &LimitConfig) -> Arc<Table> {
        let fits = |t: &Arc<Table>| t.sets.len() == limit.table_size.div_ceil(WAYS).max(1);
        if let Some(table) = self
            .tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&limit.name)
            .filter(|t| fits(t))
        {
            return table.clone();
        }
        let mut tables = self.tables.write().unwrap_or_else(PoisonError::into_inner);
        // Tables of limits a reload removed go now (the only time this is written).
        tables.retain(|name, _| config.limits.iter().any(|l| &l.name == name));
        let table = tables
            .entry(limit.name.clone())
            .and_modify(|t| {
                if !fits(t) {
                    *t = Arc::new(Table::new(limit.table_size));
                }
            })
            .or_insert_with(|| Arc::new(Table::new(limit.table_size)));
        table.clone()
    }

    fn applicable<'a>(
        config: &'a Config,
        listener: &'a str,
        client: IpAddr,
    ) -> impl Iterator<Item = &'a LimitConfig> + 'a {
        config
            .limits
            .iter()
            .filter(move |l| l.on_listener(listener) && !in_any(&l.exempt, client))
    }

    /// Counts a new connection of `client` against every `max_connections`
    /// limit of `listener`.
    pub fn open_connection(
        &self,
        config: &Config,
        listener: &str,
        client: IpAddr,
    ) -> Result<ConnectionHold, Over> {
        let mut hold = ConnectionHold::default();
        for limit in Self::applicable(config, listener, client) {
            if let LimitKind::Connections(max) = limit.kind() {
                match self.table(config, limit).open(client, max) {
                    Some(held) => hold.0.push(held),
                    None => return Err(Over(limit.name.clone())),
                }
            }
        }
        Ok(hold)
    }

    /// Takes a token for one request of kind `route` (path `path`) from every
    /// `requests_per_second` limit that counts it.
    pub fn request(
        &self,
        config: &Config,
        listener: &str,
        client: IpAddr,
        route: RouteKind,
        path: &str,
    ) -> Result<(), Over> {
        for limit in Self::applicable(config, listener, client) {
            if limit.requests_per_second.is_none()
                || !(limit.routes.is_empty()
                    || limit
                        .routes
                        .iter()
                        .any(|r| super::rules::route_matches(*r, route, path)))
            {
                continue;
            }
            self.take(config, limit, client)?;
        }
        Ok(())
    }

    /// Whether some `per_minute` limit counts publish sessions of `kind` on
    /// `listener` (for any client): then the listener must look for them.
    pub fn counts_publishes(config: &Config, listener: &str, kind: RouteName) -> bool {
        config
            .limits
            .iter()
            .any(|l| l.on_listener(listener) && l.counts_publish(kind))
    }

    /// Takes a token for a new publish session of `kind` from every
    /// `per_minute` limit that counts it.
    pub fn publish(
        &self,
        config: &Config,
        listener: &str,
        client: IpAddr,
        kind: RouteName,
    ) -> Result<(), Over> {
        for limit in Self::applicable(config, listener, client) {
            if limit.counts_publish(kind) {
                self.take(config, limit, client)?;
            }
        }
        Ok(())
    }

    fn take(&self, config: &Config, limit: &LimitConfig, client: IpAddr) -> Result<(), Over> {
        if let LimitKind::Rate { per_second, burst } = limit.kind()
            && !self.table(config, limit).take(client, per_second, burst)
        {
            return Err(Over(limit.name.clone()));
        }
        Ok(())
    }

    /// Records a refusal: counted in `amslb_limited_total`, logged at most
    /// once a second per limit (with how many refusals the silence hid).
    pub fn refused(
        &self,
        metrics: &Metrics,
        listener: &str,
        over: &Over,
        client: IpAddr,
        what: &str,
    ) {
        metrics.limited(listener, &over.0);
        let table = self
            .tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&over.0)
            .cloned();
        if let Some(suppressed) = table.and_then(|t| t.should_log()) {
            tracing::warn!(
                listener,
                limit = %over.0,
                %client,
                what,
                suppressed,
                "client over its limit, refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
    }

    #[test]
    fn bucket_refills_at_its_rate_up_to_burst() {
        let table = Table::new(64);
        assert!((0..3).all(|_| table.take(ip(1), 1000.0, 3)));
        assert!(!table.take(ip(1), 1000.0, 3));
        // Another client has its own bucket.
        assert!(table.take(ip(2), 1000.0, 3));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!((0..3).all(|_| table.take(ip(1), 1000.0, 3)));
        assert!(!table.take(ip(1), 1000.0, 3));
    }

    #[test]
    fn connections_are_held_and_released() {
        let table = Arc::new(Table::new(64));
        let held: Vec<_> = (0..2).filter_map(|_| table.open(ip(1), 2)).collect();
        assert_eq!(held.len(), 2);
        assert!(table.open(ip(1), 2).is_none());
        drop(held);
        assert!(table.open(ip(1), 2).is_some());
    }

    #[test]
    fn a_flood_of_addresses_evicts_instead_of_growing() {
        let table = Arc::new(Table::new(64));
        let busy = table.open(ip(1), 1).unwrap();
        for n in 2..100_000 {
            table.take(ip(n), 1.0, 1);
        }
        assert_eq!(table.sets.len(), 8);
        // The client with an open connection was kept (its set had idle entries to evict).
        assert!(table.open(ip(1), 1).is_none());
        drop(busy);
        assert!(table.open(ip(1), 1).is_some());
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let mut table = Table::new(64);
        table.born -= std::time::Duration::from_secs(10);
        assert_eq!(table.should_log(), Some(0));
        assert_eq!(table.should_log(), None);
        assert_eq!(table.should_log(), None);
        // A second later the next line says how many it stood for.
        table.last_log.store(1, Ordering::Relaxed);
        assert_eq!(table.should_log(), Some(2));
    }
}
