//! Counters beyond [`PoolStats`](switchyard_core::PoolStats): affinity, resets,
//! tenant pool churn.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a [`PgBackend`](crate::PgBackend) has done with its connections since it
/// was built. Read with [`PgBackend::pg_stats`](crate::PgBackend::pg_stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStats {
    /// Checkouts served by a connection whose session last served the same
    /// owner (same tenant, or unscoped to unscoped): no reset, no new scope.
    pub affinity_hits: u64,
    /// Checkouts that found no connection of their own owner: served by a
    /// new connection, or by another owner's, completely reset and given the
    /// new scope in one round trip.
    pub affinity_misses: u64,
    /// Returned connections handed straight to a waiting checkout of their own
    /// owner ahead of other waiters.
    pub handoffs: u64,
    /// Complete resets run (owner changes that succeeded).
    pub resets: u64,
    /// Connections closed because they came back inside a transaction block
    /// or no longer carrying their owner's scope.
    pub closed_dirty: u64,
    /// Connections closed because their check or reset failed or timed out
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
    /// Affinity hits over all checkouts, or `None` before any.
    pub fn affinity_hit_rate(&self) -> Option<f64> {
        let total = self.affinity_hits + self.affinity_misses;
        (total > 0).then(|| self.affinity_hits as f64 / total as f64)
    }
}

/// Checkout and return-path counters.
#[derive(Debug, Default)]
pub(crate) struct ReturnCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
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
