//! Database-per-tenant: one small pool of [`Slots`] per tenant database, opened
//! on first use, capped in number, closed when idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use tokio::time::Instant;

use crate::error::PgError;
use crate::slots::{HandOff, Slots};

/// Use of one tenant pool: checkouts holding it open, and when it was last used.
#[derive(Debug)]
struct Usage {
    leases: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Usage {
    fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn last_used(&self) -> Instant {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps one tenant pool from being evicted while a checkout uses it.
#[derive(Debug)]
pub(crate) struct TenantLease(Arc<Usage>);

impl Clone for TenantLease {
    fn clone(&self) -> Self {
        lease(&self.0)
    }
}

impl Drop for TenantLease {
    fn drop(&mut self) {
        self.0.touch();
        self.0.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

struct TenantPool {
    slots: Arc<Slots>,
    usage: Arc<Usage>,
}

impl TenantPool {
    fn is_idle(&self) -> bool {
        self.usage.leases.load(Ordering::Acquire) == 0
    }
}

/// Counters of tenant pool churn.
#[derive(Debug, Default)]
pub(crate) struct TenantPoolCounters {
    pub(crate) opened: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) idle_closed: AtomicU64,
}

/// The per-tenant pools of one endpoint.
pub(crate) struct TenantPools {
    base: PgConnectOptions,
    max_size: u32,
    handoff: HandOff,
    max_pools: usize,
    idle_timeout: Duration,
    pools: Mutex<HashMap<Arc<str>, TenantPool>>,
    pub(crate) counters: TenantPoolCounters,
}

/// Occupancy summed over every tenant pool.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TenantPoolsUsage {
    pub(crate) pools: u32,
    pub(crate) size: u32,
    pub(crate) idle: u32,
    pub(crate) max_size: u32,
}

impl TenantPools {
    pub(crate) fn new(
        base: PgConnectOptions,
        max_size: u32,
        handoff: HandOff,
        max_pools: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            base,
            max_size,
            handoff,
            max_pools,
            idle_timeout,
            pools: Mutex::new(HashMap::new()),
            counters: TenantPoolCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, TenantPool>> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pool for `database`, opened (lazily: no connection yet) if needed,
    /// with a lease that keeps it from eviction until dropped.
    ///
    /// At the cap, the least recently used idle pool is closed to make room; if
    /// every pool is in use, this fails with [`PgError::TenantPoolsBusy`].
    pub(crate) fn get(
        &self,
        database: &str,
    ) -> Result<(Arc<Slots>, Arc<str>, TenantLease), PgError> {
        let mut pools = self.lock();
        if let Some((name, entry)) = pools.get_key_value(database) {
            return Ok((
                Arc::clone(&entry.slots),
                Arc::clone(name),
                lease(&entry.usage),
            ));
        }
        if pools.len() >= self.max_pools {
            let victim = pools
                .iter()
                .filter(|(_, p)| p.is_idle())
                .min_by_key(|(_, p)| p.usage.last_used())
                .map(|(name, _)| Arc::clone(name));
            let Some(victim) = victim else {
                return Err(PgError::TenantPoolsBusy {
                    max: self.max_pools,
                    database: database.to_owned(),
                });
            };
            if let Some(evicted) = pools.remove(&victim) {
                tracing::debug!(database = %victim, "evicting least recently used tenant pool");
                self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                evicted.slots.close();
            }
        }
        let name: Arc<str> = Arc::from(database);
        let slots = Slots::new(
            self.base.clone().database(database),
            self.max_size,
            self.handoff,
        );
        let usage = Arc::new(Usage {
            leases: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        let lease = lease(&usage);
        pools.insert(
            Arc::clone(&name),
            TenantPool {
                slots: Arc::clone(&slots),
                usage,
            },
        );
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(database, "opened tenant pool");
        Ok((slots, name, lease))
    }

    /// Drops the pool for `database` if nothing uses it and it holds no
    /// connection (after its database turned out not to exist), so missing
    /// databases do not fill the cap.
    pub(crate) fn forget_if_empty(&self, database: &str) {
        let mut pools = self.lock();
        let empty = pools
            .get(database)
            .is_some_and(|p| p.is_idle() && p.slots.is_unused());
        if empty {
            if let Some(entry) = pools.remove(database) {
                entry.slots.close();
            }
        }
    }

    /// Closes every pool unused for longer than the idle timeout; returns how
    /// many were closed.
    pub(crate) fn close_idle(&self, now: Instant) -> usize {
        let mut pools = self.lock();
        let stale: Vec<Arc<str>> = pools
            .iter()
            .filter(|(_, p)| {
                p.is_idle()
                    && now.saturating_duration_since(p.usage.last_used()) >= self.idle_timeout
            })
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in &stale {
            if let Some(entry) = pools.remove(name) {
                tracing::debug!(database = %name, "closing idle tenant pool");
                entry.slots.close();
            }
        }
        self.counters
            .idle_closed
            .fetch_add(stale.len() as u64, Ordering::Relaxed);
        stale.len()
    }

    /// Occupancy of all tenant pools.
    pub(crate) fn usage(&self) -> TenantPoolsUsage {
        let pools = self.lock();
        let mut usage = TenantPoolsUsage::default();
        for p in pools.values() {
            let occupancy = p.slots.occupancy();
            usage.pools += 1;
            usage.size += occupancy.size;
            usage.idle += occupancy.idle;
            usage.max_size += p.slots.max();
        }
        usage
    }

    /// The slots of every open tenant pool (for the sweeper).
    pub(crate) fn all_slots(&self) -> Vec<Arc<Slots>> {
        self.lock().values().map(|p| Arc::clone(&p.slots)).collect()
    }

    /// Closes every pool (the backend is going away).
    pub(crate) fn close_all(&self) {
        let mut pools = self.lock();
        for (_, entry) in pools.drain() {
            entry.slots.close();
        }
    }
}

fn lease(usage: &Arc<Usage>) -> TenantLease {
    usage.leases.fetch_add(1, Ordering::AcqRel);
    usage.touch();
    TenantLease(Arc::clone(usage))
}

impl std::fmt::Debug for TenantPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connect options hold the password: show only the counts.
        let usage = self.usage();
        f.debug_struct("TenantPools")
            .field("open", &usage.pools)
            .field("max_pools", &self.max_pools)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(max: usize) -> TenantPools {
        TenantPools::new(
            PgConnectOptions::new_without_pgpass()
                .host("127.0.0.1")
                .port(1),
            1,
            HandOff::default(),
            max,
            Duration::from_secs(10),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_least_recently_used_idle_pool_goes() {
        let p = pools(2);
        let (_, _, a) = p.get("a").unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        let (_, _, b) = p.get("b").unwrap();
        // Both in use: no room.
        let err = p.get("c").unwrap_err();
        assert!(
            err.to_string().contains("all 2 tenant pools are in use"),
            "{err}"
        );
        tokio::time::advance(Duration::from_millis(5)).await;
        drop(b);
        tokio::time::advance(Duration::from_millis(5)).await;
        drop(a);
        // a was released last, so b is the least recently used.
        let (_, name, _c) = p.get("c").unwrap();
        assert_eq!(&*name, "c");
        let open: Vec<String> = p.lock().keys().map(|k| k.to_string()).collect();
        assert!(
            open.contains(&"a".to_owned()) && !open.contains(&"b".to_owned()),
            "{open:?}"
        );
        assert_eq!(p.counters.evicted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_pools_close_after_the_timeout() {
        let p = pools(4);
        let (_, _, a) = p.get("a").unwrap();
        let (_, _, b) = p.get("b").unwrap();
        drop(a);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(p.close_idle(Instant::now()), 1);
        assert_eq!(p.usage().pools, 1);
        drop(b);
        assert_eq!(p.close_idle(Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.close_idle(Instant::now()), 1);
        assert_eq!(p.usage().pools, 0);
    }
}
