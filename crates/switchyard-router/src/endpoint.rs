//! One endpoint as the router sees it: its backend, load, latency estimate,
//! health, and the observer that learns from its checkouts.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use switchyard_core::{
    Backend, BackendErrorKind, CheckoutObserver, EndpointId, Error, InFlight, Origin, Outcome, Role,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, EndpointConfig};
use crate::counters::Counters;
use crate::health::HealthState;
use crate::metrics::{EndpointMetrics, HeldSince};
use crate::strategy::{Load, LoadCell};

/// The backend-independent part of an endpoint.
///
/// Laid out in order, the checkout path's fields first (the cell, the
/// counters, the metrics handles a checkout records into, which lead
/// [`EndpointMetrics`]), from a cache line's start: a checkout touches two
/// lines of it (the compiler's own order spread the same fields over four).
/// At 1,024 endpoints no cache holds them all, and each line is a miss.
#[repr(C, align(64))]
pub(crate) struct EndpointState {
    /// Weight, checkouts in flight and latency: what the strategies read.
    pub load: Arc<LoadCell>,
    /// Lifetime counters shown in [`EndpointStatus`](crate::EndpointStatus).
    pub counters: Counters,
    pub metrics: EndpointMetrics,
    pub id: EndpointId,
    /// Changed only by the cluster ([`crate::apply`]).
    health: Mutex<HealthState>,
    /// Wakes the health task: the ejection timer changed, a probe is wanted
    /// now, or a caller reported a failure.
    pub wake: Notify,
    pub probe_now: AtomicBool,
    /// Endpoint failures reported as checkouts were dropped, not yet applied:
    /// the drop only leaves word here and in the cluster's [`Inbox`] (it never
    /// locks the cluster).
    reported: AtomicU32,
    /// Where a drop's report tells the cluster that some endpoint has word.
    inbox: Arc<Inbox>,
    /// The role a topology source gives the endpoint (`None`: no source);
    /// written by the cluster under its topology lock.
    designated: Mutex<Option<Role>>,
}

impl EndpointState {
    pub fn new(
        id: EndpointId,
        cluster: &str,
        engine: &'static str,
        endpoint: &EndpointConfig,
        config: &ClusterConfig,
        inbox: Arc<Inbox>,
    ) -> Self {
        let metrics = EndpointMetrics::new(engine, cluster, id.as_str());
        metrics.up.set(1.0);
        Self {
            load: Arc::new(LoadCell::new(
                endpoint.weight,
                config.latency.decay,
                config.latency.default_rtt,
            )),
            health: Mutex::new(HealthState::new(endpoint.role, Instant::now())),
            wake: Notify::new(),
            probe_now: AtomicBool::new(false),
            reported: AtomicU32::new(0),
            inbox,
            metrics,
            counters: Counters::default(),
            designated: Mutex::new(None),
            id,
        }
    }

    /// The health state; held only briefly and never across an `.await`.
    pub fn health(&self) -> MutexGuard<'_, HealthState> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The role a topology source gives the endpoint, if one does.
    pub fn designated(&self) -> Option<Role> {
        *self
            .designated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the role a topology source gives the endpoint.
    pub fn designate(&self, role: Option<Role>) {
        *self
            .designated
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = role;
    }

    /// Asks the prober for a probe now (e.g. a write met a read-only endpoint).
    pub fn request_probe(&self) {
        self.probe_now.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Takes the endpoint failures reported since the last call.
    pub fn take_reported(&self) -> u32 {
        self.reported.swap(0, Ordering::AcqRel)
    }
}

impl CheckoutObserver for EndpointState {
    fn on_acquired(&self, waited: Duration, at: Instant) {
        self.load.latency().observe_at(waited, at);
        self.metrics.acquired.increment(1);
        self.metrics.wait.record(waited);
        self.counters.acquired(waited);
    }

    fn on_acquire_failed(&self, error: &Error, waited: Duration) {
        self.metrics.failed.increment(1);
        if matches!(error, Error::Timeout { .. }) {
            self.metrics.timeouts.increment(1);
            self.counters.timed_out();
        }
        if error.is_endpoint_failure() {
            // A failed wait is a latency sample too: a hung node looks slow at
            // once. (The router's checkout loop takes the failure itself to
            // the cluster.)
            self.load.latency().observe(waited);
        } else if error.backend_kind() == Some(BackendErrorKind::ReadOnly) {
            self.request_probe();
        }
    }

    fn on_released(&self, acquired_at: Instant, outcome: Outcome) {
        self.metrics.held.record(HeldSince(acquired_at));
        if outcome == Outcome::EndpointFailure {
            self.reported.fetch_add(1, Ordering::AcqRel);
            self.inbox.post();
            self.wake.notify_one();
        }
    }

    fn in_flight(&self) -> Option<&InFlight> {
        Some(self.load.in_flight())
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("id", &self.id)
            .field("weight", &self.load.weight())
            .field("in_flight", &self.load.in_flight().get())
            .finish_non_exhaustive()
    }
}

/// Says that a dropped checkout reported an endpoint failure the cluster has
/// not applied yet. Endpoints post; the cluster takes, and applies what its
/// endpoints reported before anything reads health (a pick, the status, the
/// health task), so the pick right after a failed checkout's drop already
/// avoids the endpoint the failure ejected. Below the cluster, shared by it
/// and its endpoints: the drop reaches nothing above the endpoint.
#[derive(Debug, Default)]
pub(crate) struct Inbox(AtomicBool);

impl Inbox {
    fn post(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a report was posted since the last call (one load when not).
    #[inline]
    pub fn take(&self) -> bool {
        self.0.load(Ordering::Acquire) && self.0.swap(false, Ordering::AcqRel)
    }
}

/// An endpoint of a cluster: the backend and its state.
///
/// The state may outlive the backend: when only the pool behind an endpoint
/// changes, a new `Endpoint` with the new backend takes over the same state
/// (health, load, latency, counters).
pub(crate) struct Endpoint<B: Backend> {
    pub backend: Arc<B>,
    pub state: Arc<EndpointState>,
    /// Stops this endpoint's tasks (child of the cluster's token).
    pub cancel: CancellationToken,
    /// Stops the warmer while warming is on (child of `cancel`).
    pub warmer: Mutex<Option<CancellationToken>>,
}

impl<B: Backend> Endpoint<B> {
    pub fn new(backend: Arc<B>, state: Arc<EndpointState>, cancel: CancellationToken) -> Self {
        Self {
            backend,
            state,
            cancel,
            warmer: Mutex::new(None),
        }
    }

    /// The warmer slot; held only to start or stop the task.
    pub fn warmer(&self) -> MutexGuard<'_, Option<CancellationToken>> {
        self.warmer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn id(&self) -> &EndpointId {
        &self.state.id
    }
}

/// A checkout holds its endpoint, which is both where the connection came
/// from and who observes it: one reference count per checkout.
impl<B: Backend> Origin<B> for Endpoint<B> {
    #[inline]
    fn backend(&self) -> &B {
        &self.backend
    }

    #[inline]
    fn observer(&self) -> Option<&dyn CheckoutObserver> {
        Some(&*self.state)
    }
}

impl<B: Backend> Load for Endpoint<B> {
    #[inline]
    fn cell(&self) -> &Arc<LoadCell> {
        &self.state.load
    }
}

impl<B: Backend> fmt::Debug for Endpoint<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use metrics::Histogram;

    use super::*;

    #[test]
    fn a_checkout_touches_two_lines_of_its_endpoint_state() {
        // Everything `on_acquired` and `on_released` read or move: from the
        // cell's pointer to the last handle a checkout records into.
        let hot_end = offset_of!(EndpointState, metrics)
            + offset_of!(EndpointMetrics, held)
            + size_of::<Histogram>();
        assert_eq!(offset_of!(EndpointState, load), 0);
        assert!(hot_end <= 128, "the checkout path spans {hot_end} bytes");
        assert_eq!(std::mem::align_of::<EndpointState>(), 64);
    }
}
