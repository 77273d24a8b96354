//! Counters beyond [`PoolStats`](switchyard_core::PoolStats): affinity, resets,
//! tenant pool churn.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a [`PgBackend`](crate::PgBackend) has done with its connections since it
/// was built. Read with [`PgBackend::pg_stats`](crate::PgBackend::pg_stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStats {
    /// Schema or row checkouts served by a stashed connection already scoped to
    /// their tenant (no scope round trip).
    pub affinity_hits: u64,
    /// Schema or row checkouts that found no such connection.
    pub affinity_misses: u64,
    /// Stashed connections reset and taken by another tenant because the pool
    /// had no idle connection.
    pub affinity_stolen: u64,
    /// Connections put in the stash.
    pub stashed: u64,
    /// Stashed connections pushed out by newer ones (reset and pooled).
    pub stash_evictions: u64,
    /// Connections in the stash right now.
    pub stashed_now: u32,
    /// Scoped connections reset and returned to the pool.
    pub resets: u64,
    /// Connections closed because they came back inside a transaction block
    /// (or, for the stash, no longer carrying their scope).
    pub closed_dirty: u64,
    /// Connections closed because their reset or check failed or timed out
    /// (broken connection, checkout dropped mid-query).
    pub reset_failures: u64,
    /// Connections closed because a query run through them was dropped before
    /// it finished (a timed-out or cancelled future).
    pub closed_mid_query: u64,
    /// Connections discarded on request (endpoint failure, failed scope).
    pub discarded: u64,
    /// Tenant database pools opened.
    pub tenant_pools_opened: u64,
    /// Idle tenant pools closed to make room under `max_tenant_pools`.
    pub tenant_pools_evicted: u64,
    /// Tenant pools closed after `tenant_pool_idle_timeout`.
    pub tenant_pools_idle_closed: u64,
}

impl PgStats {
    /// Affinity hits over schema and row checkouts, or `None` before any.
    pub fn affinity_hit_rate(&self) -> Option<f64> {
        let total = self.affinity_hits + self.affinity_misses;
        (total > 0).then(|| self.affinity_hits as f64 / total as f64)
    }
}

/// Return-path counters.
#[derive(Debug, Default)]
pub(crate) struct ReturnCounters {
    pub(crate) resets: AtomicU64,
    pub(crate) closed_dirty: AtomicU64,
    pub(crate) reset_failures: AtomicU64,
    pub(crate) closed_mid_query: AtomicU64,
    pub(crate) discarded: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
