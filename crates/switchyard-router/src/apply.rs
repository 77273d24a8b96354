//! The one place health changes: the cluster applies an endpoint's health
//! event ([`Event`]) through the endpoint's pure transition
//! ([`HealthState::on`](crate::health::HealthState::on)), then logs and
//! counts what changed and rebuilds the routing snapshot when routing moved.
//!
//! Events come from the endpoint's health task (probes, the ejection timer)
//! and from the checkout path (a failed acquire, the half-open trial, and
//! the failures dropped checkouts left in the [`Inbox`](crate::endpoint::Inbox),
//! taken before each pick), never from a callback reaching up from an
//! endpoint.

use std::sync::Arc;

use switchyard_core::{Backend, Error, Role};
use tokio::time::Instant;

use crate::endpoint::{Endpoint, EndpointState};
use crate::health::ejection::ejection_cap;
use crate::health::{Change, Event};
use crate::state::{ClusterState, Topology};

impl<B: Backend> ClusterState<B> {
    /// Applies `event` to the health of `state`, if it is still one of the
    /// cluster's endpoints; true when anything changed.
    pub(crate) fn apply(&self, state: &EndpointState, event: Event) -> bool {
        let mut topo = self.lock();
        if !topo.endpoints.iter().any(|e| same(e, state)) {
            return false;
        }
        let config = self.config.load();
        let event = match event {
            Event::CheckoutFailed { reason, .. } => Event::CheckoutFailed {
                refused: self.ejection_refused(&topo, state, config.health.max_ejected_percent),
                reason,
            },
            Event::ProbeFailed(error @ Error::ProbeTimeout { .. })
                if Self::only_primary(&topo, state) =>
            {
                Event::ProbeSlow(error)
            }
            event => event,
        };
        observe_probe(state, &event);
        let transition = state.health().on(event, &config.health, Instant::now());
        let Some(transition) = transition else {
            return false;
        };
        for change in &transition.changes {
            self.record(state, change, config.health.max_replica_lag);
        }
        if transition.reroute {
            self.rebuild(&mut topo, "endpoint health changed");
        }
        true
    }

    /// Applies the endpoint failures reported as checkouts were dropped since
    /// the last call, if the inbox says there are any.
    #[inline]
    pub(crate) fn apply_reported(&self) {
        if self.inbox.take() {
            self.apply_reported_now();
        }
    }

    #[cold]
    fn apply_reported_now(&self) {
        let snap = self.snapshot.load_full();
        for ep in snap
            .endpoints
            .iter()
            .filter(|ep| ep.state.take_reported() > 0)
        {
            let reason = "the caller reported an endpoint failure".to_owned();
            self.apply(
                &ep.state,
                Event::CheckoutFailed {
                    reason,
                    refused: None,
                },
            );
        }
    }

    /// Logs and counts one change, where the state is owned.
    fn record(&self, ep: &EndpointState, change: &Change, max: Option<std::time::Duration>) {
        let (cluster, endpoint) = (&*self.name, &ep.id);
        match change {
            Change::Up { passes } => {
                tracing::info!(cluster, %endpoint, passes, "endpoint up: {passes} consecutive probes passed")
            }
            Change::Down { fails, error } => {
                tracing::warn!(cluster, %endpoint, fails, %error, "endpoint down: {fails} consecutive probes failed")
            }
            Change::ProbeFailed { fails, error } => {
                tracing::debug!(cluster, %endpoint, fails, %error, "probe failed")
            }
            Change::SlowOnlyPrimary {
                again: false,
                error,
            } => {
                tracing::warn!(cluster, %endpoint, %error, "the only primary answers probes slowly or not at all; kept up, writes have nowhere else to go")
            }
            Change::SlowOnlyPrimary { again: true, error } => {
                tracing::debug!(cluster, %endpoint, %error, "the only primary's probe timed out again")
            }
            Change::Promoted { from } => {
                tracing::warn!(cluster, %endpoint, %from, "endpoint promoted: probe reports primary, was {from}")
            }
            Change::Demoted { to } => {
                tracing::warn!(cluster, %endpoint, %to, "endpoint demoted: probe reports {to}, was primary")
            }
            Change::RoleChanged { from, to } => {
                tracing::info!(cluster, %endpoint, %from, %to, "endpoint role changed from {from} to {to}")
            }
            Change::StreamingStopped => {
                tracing::warn!(cluster, %endpoint, "replica not streaming from its primary: its lag is unknown from now on")
            }
            Change::StreamingAgain => {
                tracing::info!(cluster, %endpoint, "replica streaming from its primary again")
            }
            Change::Unsynced => {
                tracing::warn!(cluster, %endpoint, "replica holds no copy of its primary's data (never synced since it started or became a replica, or a full resync is under way): no reads until it has synced")
            }
            Change::Synced => {
                tracing::info!(cluster, %endpoint, "replica synced with its primary")
            }
            Change::LagOver { lag } => {
                tracing::warn!(cluster, %endpoint, ?lag, ?max, "replica lag over the limit: no reads until it catches up")
            }
            Change::CaughtUp { lag } => {
                tracing::info!(cluster, %endpoint, ?lag, "replica caught up: serving reads again")
            }
            Change::Ejected {
                backoff,
                trial_failed,
                reason,
            } => {
                ep.metrics.ejections.increment(1);
                ep.counters.ejected();
                // The ejection timer moved.
                ep.wake.notify_one();
                if *trial_failed {
                    tracing::warn!(cluster, %endpoint, ?backoff, reason, "half-open trial failed: endpoint ejected again for {backoff:?}");
                } else {
                    tracing::warn!(cluster, %endpoint, ?backoff, reason, "endpoint ejected for {backoff:?} after a failed checkout");
                }
            }
            Change::EjectionRefused { why, reason } => {
                ep.metrics.ejections_capped.increment(1);
                tracing::warn!(cluster, %endpoint, reason, "not ejecting endpoint: {why}");
            }
            Change::HalfOpen => {
                tracing::info!(cluster, %endpoint, "ejection over: endpoint half-open, the next checkout is a trial")
            }
            Change::Readmitted => {
                tracing::info!(cluster, %endpoint, "endpoint re-admitted after a successful trial checkout")
            }
            Change::TrialTaken | Change::TrialReturned => {}
        }
    }

    /// Whether `ep` is up as a primary and no other endpoint is (a primary
    /// fenced by its history does not count): writes have nowhere else to
    /// go, so a probe it does not answer in time says "slow" rather than
    /// "dead" (a refused or broken probe still says dead).
    fn only_primary(topo: &Topology<B>, ep: &EndpointState) -> bool {
        // A primary fenced by its history (behind or off the line writes
        // follow) takes no writes while it stays so: it is no alternative. One
        // without history is fenced only while another writes, so it is.
        let primary = |e: &Endpoint<B>| {
            let h = e.state.health();
            let fenced = h.history.is_some() && topo.fenced.contains(e.id());
            h.up && h.role == Role::Primary && !fenced
        };
        topo.endpoints.iter().all(|e| primary(e) == same(e, ep))
    }

    /// Whether ejecting `ep` would break the cap or leave writes nowhere to go.
    fn ejection_refused(
        &self,
        topo: &Topology<B>,
        ep: &EndpointState,
        max_ejected_percent: u8,
    ) -> Option<String> {
        let out = topo
            .endpoints
            .iter()
            .filter(|e| !same(e, ep))
            .filter(|e| e.state.health().ejection.is_out())
            .count();
        let cap = ejection_cap(topo.endpoints.len(), max_ejected_percent);
        if out >= cap {
            return Some(format!(
                "{out} of {} endpoints already ejected (max_ejected_percent {max_ejected_percent})",
                topo.endpoints.len(),
            ));
        }
        let snap = self.snapshot.load();
        if snap.write.candidates.len() == 1 && snap.writer() == Some(&ep.id) {
            return Some("it is the only writable endpoint".into());
        }
        None
    }
}

/// Whether `ep` carries `state` (a replaced backend keeps its state).
fn same<B: Backend>(ep: &Arc<Endpoint<B>>, state: &EndpointState) -> bool {
    std::ptr::eq(Arc::as_ptr(&ep.state), state)
}

/// What a probe's answer teaches besides health: its metrics and the
/// latency estimate (a slow only primary's timeout counts as latency).
fn observe_probe(ep: &EndpointState, event: &Event) {
    match event {
        Event::ProbePassed(probe) => {
            ep.metrics.probe_rtt.record(probe.rtt);
            if let Some(lag) = probe.lag {
                ep.metrics.lag.set(lag.as_secs_f64());
            }
            ep.load.latency().observe(probe.rtt);
        }
        Event::ProbeSlow(error) => {
            ep.metrics.probe_failures.increment(1);
            if let Error::ProbeTimeout { elapsed, .. } = error {
                ep.load.latency().observe(*elapsed);
            }
        }
        Event::ProbeFailed(_) => ep.metrics.probe_failures.increment(1),
        _ => {}
    }
}
