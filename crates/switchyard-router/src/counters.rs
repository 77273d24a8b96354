//! Lifetime counters of one endpoint, kept on the checkout path and shown in
//! [`EndpointStatus`](crate::EndpointStatus).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// A checkout whose acquire took longer than this counts as a wait.
pub const WAIT_THRESHOLD: Duration = Duration::from_millis(1);

/// Cumulative counters of one endpoint since it joined the cluster: plain
/// relaxed atomics, updated inline on the checkout path without locks or
/// allocation.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    checkouts: AtomicU64,
    waits: AtomicU64,
    timeouts: AtomicU64,
    ejections: AtomicU64,
    operation_timeouts: AtomicU64,
}

impl Counters {
    /// A connection was handed out after `waited`.
    pub fn acquired(&self, waited: Duration) {
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        if waited > WAIT_THRESHOLD {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An acquire gave up at its deadline.
    pub fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// An operation on a connection of the endpoint was cancelled at a deadline.
    pub fn operation_timed_out(&self) {
        self.operation_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// The endpoint was ejected.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> CheckoutCounters {
        CheckoutCounters {
            checkouts: self.checkouts.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            operation_timeouts: self.operation_timeouts.load(Ordering::Relaxed),
        }
    }
}

/// Cumulative counts for one endpoint since it joined the cluster (a removed
/// and re-added endpoint starts again from zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CheckoutCounters {
    /// Connections handed out.
    pub checkouts: u64,
    /// Checkouts that waited longer than [`WAIT_THRESHOLD`] for their
    /// connection (a queue behind a full pool, a slow connect).
    pub waits: u64,
    /// Acquires that gave up at their deadline.
    pub timeouts: u64,
    /// Passive ejections (failed checkouts and failed half-open trials).
    pub ejections: u64,
    /// Operations run by [`Cluster::run`](crate::Cluster::run) on its connections and cancelled
    /// at a deadline ([`Error::OperationTimeout`](switchyard_core::Error::OperationTimeout),
    /// either deadline; the metric `switchyard_operation_timeouts_total`
    /// tells them apart).
    pub operation_timeouts: u64,
}
