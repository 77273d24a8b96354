//! One endpoint as the router sees it: its backend, load, latency estimate,
//! health, and the observer that learns from its checkouts.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use switchyard_core::{
    Backend, BackendErrorKind, CheckoutObserver, EndpointId, Error, InFlight, Outcome, Probe, Role,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, EndpointConfig};
use crate::health::HealthState;
use crate::metrics::EndpointMetrics;
use crate::status::CheckoutCounters;
use crate::strategy::{Load, LoadLinks, PeakEwma};

/// What an endpoint's health events need from its cluster. Implemented by the
/// cluster and held weakly, so endpoints (kept alive by checkouts and tasks)
/// never keep a dropped cluster alive.
pub(crate) trait ClusterHooks: Send + Sync + 'static {
    /// Real traffic says the endpoint is unhealthy.
    fn endpoint_failed(&self, ep: &EndpointState, reason: &str);
    /// A checkout succeeded while the endpoint was half-open.
    fn trial_passed(&self, ep: &EndpointState);
    /// A probe finished.
    fn probed(&self, ep: &EndpointState, result: Result<Probe, Error>);
    /// The endpoint's ejection backoff ended.
    fn ejection_expired(&self, ep: &EndpointState);
}

/// The backend-independent part of an endpoint.
pub(crate) struct EndpointState {
    pub id: EndpointId,
    weight: AtomicU32,
    pub in_flight: Arc<InFlight>,
    pub links: Arc<LoadLinks>,
    pub ewma: PeakEwma,
    health: Mutex<HealthState>,
    /// Mirrors `health.ejection.phase == HalfOpen`, so the success path of a
    /// checkout stays on atomics.
    pub half_open: AtomicBool,
    /// The half-open trial has been handed to a checkout.
    trial_taken: AtomicBool,
    /// Wakes the prober: the ejection timer changed or a probe is wanted now.
    pub wake: Notify,
    pub probe_now: AtomicBool,
    /// Set when the endpoint leaves the cluster; its events are ignored after.
    pub removed: AtomicBool,
    pub hooks: Weak<dyn ClusterHooks>,
    pub metrics: EndpointMetrics,
    /// Lifetime counters shown in [`EndpointStatus`](crate::EndpointStatus).
    pub counters: Counters,
    /// The role a topology source gives the endpoint (`None`: no source);
    /// written by the cluster under its topology lock.
    designated: Mutex<Option<Role>>,
}

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
    fn acquired(&self, waited: Duration) {
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        if waited > WAIT_THRESHOLD {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An acquire gave up at its deadline.
    fn timed_out(&self) {
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

impl EndpointState {
    pub fn new(
        id: EndpointId,
        cluster: &str,
        engine: &'static str,
        endpoint: &EndpointConfig,
        config: &ClusterConfig,
        hooks: Weak<dyn ClusterHooks>,
    ) -> Self {
        let links = Arc::new(LoadLinks::default());
        let metrics = EndpointMetrics::new(engine, cluster, id.as_str());
        metrics.up.set(1.0);
        Self {
            in_flight: Arc::new(InFlight::watched(links.clone())),
            links,
            weight: AtomicU32::new(endpoint.weight.max(1)),
            ewma: PeakEwma::new(config.latency.decay, config.latency.default_rtt),
            health: Mutex::new(HealthState::new(endpoint.role, Instant::now())),
            half_open: AtomicBool::new(false),
            trial_taken: AtomicBool::new(false),
            wake: Notify::new(),
            probe_now: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            hooks,
            metrics,
            counters: Counters::default(),
            designated: Mutex::new(None),
            id,
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
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

    /// Claims the half-open trial; true for exactly one caller per half-open spell.
    pub fn claim_trial(&self) -> bool {
        self.half_open.load(Ordering::Acquire)
            && self
                .trial_taken
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Makes the trial available again (a new half-open spell, or a trial that
    /// ended without a verdict).
    pub fn release_trial(&self) {
        self.trial_taken.store(false, Ordering::Release);
    }

    /// Asks the prober for a probe now (e.g. a write met a read-only endpoint).
    pub fn request_probe(&self) {
        self.probe_now.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn hooks(&self) -> Option<Arc<dyn ClusterHooks>> {
        if self.removed.load(Ordering::Acquire) {
            return None;
        }
        self.hooks.upgrade()
    }
}

impl CheckoutObserver for EndpointState {
    fn on_acquired(&self, waited: Duration, at: Instant) {
        self.ewma.observe_at(waited, at);
        self.metrics.acquired.increment(1);
        self.metrics.wait.record(waited);
        self.counters.acquired(waited);
        if self.half_open.load(Ordering::Acquire) {
            if let Some(hooks) = self.hooks() {
                hooks.trial_passed(self);
            }
        }
    }

    fn on_acquire_failed(&self, error: &Error, waited: Duration) {
        self.metrics.failed.increment(1);
        if matches!(error, Error::Timeout { .. }) {
            self.metrics.timeouts.increment(1);
            self.counters.timed_out();
        }
        if error.is_endpoint_failure() {
            // A failed wait is a latency sample too: a hung node looks slow at once.
            self.ewma.observe(waited);
            if let Some(hooks) = self.hooks() {
                hooks.endpoint_failed(self, &error.to_string());
            }
        } else if matches!(
            error,
            Error::Backend {
                kind: BackendErrorKind::ReadOnly,
                ..
            }
        ) {
            self.request_probe();
        }
    }

    fn on_released(&self, held: Duration, outcome: Outcome) {
        self.metrics.held.record(held);
        if outcome == Outcome::EndpointFailure {
            if let Some(hooks) = self.hooks() {
                hooks.endpoint_failed(self, "the caller reported an endpoint failure");
            }
        }
    }
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("id", &self.id)
            .field("weight", &self.weight())
            .field("in_flight", &self.in_flight.get())
            .finish_non_exhaustive()
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
    pub observer: Arc<dyn CheckoutObserver>,
    /// Stops this endpoint's tasks (child of the cluster's token).
    pub cancel: CancellationToken,
    /// Stops the warmer while warming is on (child of `cancel`).
    pub warmer: Mutex<Option<CancellationToken>>,
}

impl<B: Backend> Endpoint<B> {
    pub fn new(backend: Arc<B>, state: Arc<EndpointState>, cancel: CancellationToken) -> Self {
        Self {
            backend,
            observer: state.clone(),
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

impl<B: Backend> Load for Endpoint<B> {
    fn weight(&self) -> u32 {
        self.state.weight()
    }
    fn in_flight(&self) -> &Arc<InFlight> {
        &self.state.in_flight
    }
    fn latency_ns(&self, now: Instant) -> f64 {
        // A floor keeps load in the cost when every estimate has decayed to zero.
        self.state.ewma.estimate_ns(now).max(1_000.0)
    }
}

impl<B: Backend> fmt::Debug for Endpoint<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}
