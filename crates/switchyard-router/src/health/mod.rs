//! Endpoint health: active probes, passive ejection, roles and lag.
//!
//! Two detectors feed one state per endpoint:
//!
//! - **Active** (the cluster's `prober` task): a task per endpoint probes it every `interval`
//!   with a `timeout`. As in HAProxy, `fall` consecutive failures mark it down
//!   and `rise` consecutive successes mark it up again; a probe also reports the
//!   endpoint's role (so promotions are followed) and its replication lag.
//! - **Passive** (ejection): a checkout refused or timed out
//!   ([`Error::is_endpoint_failure`](switchyard_core::Error::is_endpoint_failure))
//!   ejects the endpoint at once, without waiting for `fall` probes, for
//!   `eject_base` doubling per consecutive ejection up to `eject_max`. When the
//!   backoff ends the endpoint is half-open: one trial checkout goes through;
//!   success re-admits it, failure ejects it again for twice as long.
//!
//! # Why ejection is capped
//!
//! Passive ejection trusts the client's view, and the client can be the thing
//! that is broken: its own network blips, its event loop stalls, a burst
//! exhausts every pool at once. Were each endpoint ejected on its own evidence,
//! one such incident would eject all of them and turn a slowdown into a total
//! outage, and the last endpoints left would take the whole load and fail in
//! turn. So, as Envoy's `max_ejection_percent`, at most `max_ejected_percent`
//! of a cluster's endpoints (at least one) are out at once; past the cap,
//! failures are logged and counted but the endpoint keeps serving, and active
//! probes (which are not capped) still take down what is really down.
//!
//! For the same reason the last writable endpoint is never ejected passively:
//! writes have nowhere else to go, and ejection would only turn a slow primary
//! into no primary. Active probes still mark it down when it stops answering.
//!
//! One `HealthState` per endpoint holds all of it, and changes only
//! through a pure transition, `HealthState::on`: an event (a probe's
//! result, a checkout's outcome, the ejection timer) in, the changes out. Its
//! owner, the cluster, applies each transition in one place: it logs every
//! change at `info` (recovery) or `warn` (loss) with the reason, counts it,
//! and rebuilds the routing snapshot when routing moved.

pub(crate) mod ejection;

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use switchyard_core::{Error, History, Probe, Role};
use tokio::time::Instant;

pub use ejection::EjectionStatus;
use ejection::{Ejection, Phase};

use crate::config::HealthConfig;

/// An endpoint's health as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Serving traffic.
    Up,
    /// Marked down by `fall` failed probes; back after `rise` good ones.
    Down,
    /// Taken out by a failed checkout until its backoff ends.
    Ejected,
    /// Backoff over; one trial checkout decides.
    HalfOpen,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Ejected => "ejected",
            Health::HalfOpen => "half-open",
        })
    }
}

/// Everything known about one endpoint's health: probe fall/rise, role, lag
/// and history, passive ejection and the half-open trial. Changed only by
/// [`on`](Self::on), and only by its owner, the cluster, under the endpoint's
/// mutex (which the pick path never takes: picks read the snapshot built from it).
#[derive(Debug, Clone)]
pub(crate) struct HealthState {
    pub role: Role,
    pub up: bool,
    fails: u32,
    passes: u32,
    pub ejection: Ejection,
    pub lag: Option<Duration>,
    pub lag_bytes: Option<u64>,
    pub version: Option<String>,
    pub probe_rtt: Option<Duration>,
    pub last_error: Option<String>,
    pub last_probe: Option<Instant>,
    /// Where the endpoint stands in the engine's replication history (the
    /// line a primary writes, a replica follows), from the last good probe.
    pub history: Option<History>,
    /// Whether the replica receives its primary's stream, from the last good
    /// probe (`None`: the engine does not say, or a primary).
    pub streaming: Option<bool>,
    /// When a probe last saw the replica streaming, and its lag then: what
    /// bounds its staleness once it stops. Only probes of it as a replica
    /// count, and a role change forgets it.
    last_streamed: Option<(Instant, Option<Duration>)>,
    /// Whether the replica was a primary since a probe last saw it streaming
    /// (a demoted primary): the engine's own link-down time then says nothing
    /// about its data, which are its own writes, not a copy of the new line.
    demoted: bool,
    /// Whether the engine says the replica holds no copy of its primary's
    /// data ([`Probe::unsynced`]), from the last good probe.
    unsynced: bool,
    /// The routing key as of the last probe, to tell whether the next one
    /// changes routing (lag bounds move with time, so recomputing the old
    /// state's key at the new time would miss it). `None` before the first
    /// probe, which always counts as a change: it replaces a configured guess.
    routed: Option<RoutingKey>,
}

/// What routing depends on, to tell whether a change needs a new snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoutingKey {
    role: Role,
    health: Health,
    lag_ok: bool,
    line: Option<History>,
}

/// Something that happened to an endpoint: what [`HealthState::on`] takes.
#[derive(Debug)]
pub(crate) enum Event {
    /// A probe answered.
    ProbePassed(Probe),
    /// A probe failed.
    ProbeFailed(Error),
    /// A probe got no answer in time from an endpoint that must not be
    /// dropped for slowness alone (the only primary): recorded and shown,
    /// but it neither counts towards `fall` nor passes.
    ProbeSlow(Error),
    /// Real traffic failed on the endpoint (a refused or timed-out checkout,
    /// or a failure its caller reported). `refused` is why the cluster will
    /// not eject it now (the cap, or the last writer), if so.
    CheckoutFailed {
        reason: String,
        refused: Option<String>,
    },
    /// The ejection timer fired.
    BackoffOver,
    /// A checkout asks for the half-open trial.
    TrialClaimed,
    /// The trial checkout got its connection.
    TrialPassed,
    /// The trial checkout ended without a verdict (cancelled, or failed for
    /// a reason that says nothing about the endpoint).
    TrialAbandoned,
}

/// One thing an event changed, for the owner to log and count.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// `rise` consecutive probes passed.
    Up { passes: u32 },
    /// `fall` consecutive probes failed.
    Down { fails: u32, error: String },
    /// A probe failed, below `fall`.
    ProbeFailed { fails: u32, error: String },
    /// The only primary's probe timed out (`again`: not the first in a row).
    SlowOnlyPrimary { again: bool, error: String },
    /// The probe reports another role.
    Promoted { from: Role },
    /// A primary's probe reports another role.
    Demoted { to: Role },
    /// Neither side of the change is a primary.
    RoleChanged { from: Role, to: Role },
    /// The replica stopped receiving its primary's stream.
    StreamingStopped,
    /// The replica receives its primary's stream again.
    StreamingAgain,
    /// The replica holds no copy of its primary's data.
    Unsynced,
    /// The replica synced with its primary.
    Synced,
    /// The replica's lag went over `max_replica_lag`.
    LagOver { lag: Option<Duration> },
    /// The replica's lag is back within `max_replica_lag`.
    CaughtUp { lag: Option<Duration> },
    /// Ejected for `backoff` (`trial_failed`: from half-open).
    Ejected {
        backoff: Duration,
        trial_failed: bool,
        reason: String,
    },
    /// Not ejected: the cluster refused (`why`).
    EjectionRefused { why: String, reason: String },
    /// The backoff ended: one trial checkout decides.
    HalfOpen,
    /// The trial checkout was handed out.
    TrialTaken,
    /// The trial is available again.
    TrialReturned,
    /// The trial passed: back in service.
    Readmitted,
}

/// What one event did: the changes, and whether routing must be rebuilt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub changes: Vec<Change>,
    pub reroute: bool,
}

impl Transition {
    fn one(change: Change, reroute: bool) -> Option<Self> {
        Some(Self {
            changes: vec![change],
            reroute,
        })
    }
}

impl HealthState {
    pub fn new(role: Role, now: Instant) -> Self {
        Self {
            role,
            up: true,
            fails: 0,
            passes: 0,
            ejection: Ejection::new(now),
            lag: None,
            lag_bytes: None,
            version: None,
            probe_rtt: None,
            last_error: None,
            last_probe: None,
            history: None,
            streaming: None,
            last_streamed: None,
            demoted: false,
            unsynced: false,
            routed: None,
        }
    }

    pub fn health(&self) -> Health {
        match (self.up, self.ejection.phase) {
            (false, _) => Health::Down,
            (true, Phase::Admitted) => Health::Up,
            (true, Phase::Ejected { .. }) => Health::Ejected,
            (true, Phase::HalfOpen { .. }) => Health::HalfOpen,
        }
    }

    /// Applies `event` at `now`: the one way health changes. A pure function
    /// of the state, the event, the settings and the time (as tower's
    /// `RttEstimate::update`), save the ejection jitter; `None` when nothing
    /// changed that anyone needs to hear of.
    pub fn on(&mut self, event: Event, cfg: &HealthConfig, now: Instant) -> Option<Transition> {
        match event {
            Event::ProbePassed(probe) => self.probe_passed(probe, cfg, now),
            Event::ProbeFailed(error) => self.probe_failed(&error, cfg, now),
            Event::ProbeSlow(error) => self.probe_slow(&error, cfg, now),
            Event::CheckoutFailed { reason, refused } => {
                let trial_failed = match (self.ejection.phase, refused) {
                    (Phase::Ejected { .. }, _) => return None,
                    (Phase::Admitted, Some(why)) => {
                        return Transition::one(Change::EjectionRefused { why, reason }, false)
                    }
                    (Phase::Admitted, None) => false,
                    (Phase::HalfOpen { .. }, _) => true,
                };
                let backoff = self.ejection.eject(cfg, now);
                let change = Change::Ejected {
                    backoff,
                    trial_failed,
                    reason,
                };
                Transition::one(change, true)
            }
            Event::BackoffOver => self
                .ejection
                .expire(now)
                .then_some(Change::HalfOpen)
                .and_then(|c| Transition::one(c, true)),
            Event::TrialPassed => self
                .ejection
                .readmit(now)
                .then_some(Change::Readmitted)
                .and_then(|c| Transition::one(c, true)),
            Event::TrialClaimed => self
                .ejection
                .take_trial(true)
                .then_some(Change::TrialTaken)
                .and_then(|c| Transition::one(c, false)),
            Event::TrialAbandoned => self
                .ejection
                .take_trial(false)
                .then_some(Change::TrialReturned)
                .and_then(|c| Transition::one(c, false)),
        }
    }

    /// Whether the replica is close enough to its primary to serve reads at
    /// `at` (the caller looks one probe interval ahead, so a replica drifting
    /// out of bounds is out before it gets there, not a probe after).
    ///
    /// A replica the engine says holds no copy of its primary's data
    /// ([`Probe::unsynced`]: never synced since it started or became a
    /// replica, or a full resync under way) serves no reads, with or without
    /// `max_replica_lag`: an unset limit accepts stale data, not an empty
    /// restarted node or a demoted primary's own writes.
    ///
    /// Otherwise, with no `max_replica_lag`, any lag is accepted. With one:
    /// while the replica streams, its reported lag decides. Once it stops (an
    /// orphaned PostgreSQL standby, a Redis replica whose link is down) its
    /// lag is unknown; what is known is a bound: the lag it had when a probe
    /// last saw it streaming plus the time since (or the engine's own
    /// link-down time, if larger). It serves while that bound is within
    /// `max_replica_lag` and, when set, it has been detached no longer than
    /// `detached_grace`. One not seen streaming since this router met it
    /// serves only on the engine's own link-down time, and a primary demoted
    /// since it was last seen streaming (its data are its own writes) not at
    /// all, until a probe sees it streaming.
    pub fn lag_ok(&self, cfg: &HealthConfig, at: Instant) -> bool {
        if self.unsynced {
            return false;
        }
        let Some(max) = cfg.max_replica_lag else {
            return true;
        };
        if self.streaming != Some(false) {
            return self.lag.is_none_or(|lag| lag <= max);
        }
        let Some((seen, lag_then)) = self.last_streamed else {
            return !self.demoted && self.lag.is_some_and(|lag| lag <= max);
        };
        let detached_for = at.saturating_duration_since(seen);
        if cfg.detached_grace.is_some_and(|grace| detached_for > grace) {
            return false;
        }
        let bound = lag_then.unwrap_or_default().saturating_add(detached_for);
        bound.max(self.lag.unwrap_or_default()) <= max
    }

    /// Records the routing key one probe interval after `now` (after a
    /// probe), and ends a probe's transition: true when the key differs from
    /// the last one recorded.
    fn probed(
        &mut self,
        changes: Vec<Change>,
        cfg: &HealthConfig,
        now: Instant,
    ) -> Option<Transition> {
        let key = self.routing_key(cfg, now + cfg.interval);
        let reroute = self.routed.as_ref() != Some(&key);
        self.routed = Some(key);
        (reroute || !changes.is_empty()).then_some(Transition { changes, reroute })
    }

    pub fn routing_key(&self, cfg: &HealthConfig, at: Instant) -> RoutingKey {
        RoutingKey {
            role: self.role,
            health: self.health(),
            lag_ok: self.lag_ok(cfg, at),
            line: self.history.as_ref().map(crate::election::line_of),
        }
    }

    fn probe_passed(
        &mut self,
        probe: Probe,
        cfg: &HealthConfig,
        now: Instant,
    ) -> Option<Transition> {
        let mut changes = Vec::new();
        self.fails = 0;
        self.passes = self.passes.saturating_add(1);
        self.last_probe = Some(now);
        self.last_error = None;
        self.probe_rtt = Some(probe.rtt);
        if !self.up && self.passes >= cfg.rise {
            self.up = true;
            changes.push(Change::Up {
                passes: self.passes,
            });
        }
        if probe.role != self.role {
            changes.push(match (self.role, probe.role) {
                (from, Role::Primary) => Change::Promoted { from },
                (Role::Primary, to) => {
                    self.demoted = true;
                    Change::Demoted { to }
                }
                (from, to) => Change::RoleChanged { from, to },
            });
            self.role = probe.role;
            self.last_streamed = None;
        }
        let at = now + cfg.interval;
        let was_ok = self.lag_ok(cfg, at);
        match (self.streaming == Some(false), probe.streaming) {
            (false, Some(false)) => changes.push(Change::StreamingStopped),
            (true, Some(true)) => changes.push(Change::StreamingAgain),
            _ => {}
        }
        match (self.unsynced, probe.unsynced) {
            (false, true) => changes.push(Change::Unsynced),
            (true, false) => changes.push(Change::Synced),
            _ => {}
        }
        self.unsynced = probe.unsynced;
        if probe.role == Role::Replica && probe.streaming != Some(false) && !probe.unsynced {
            self.last_streamed = Some((now, probe.lag));
            self.demoted = false;
        }
        self.streaming = probe.streaming;
        self.history = probe.history;
        self.lag = probe.lag;
        self.lag_bytes = probe.lag_bytes;
        self.version = probe.version;
        match (was_ok, self.lag_ok(cfg, at)) {
            (true, false) => changes.push(Change::LagOver { lag: self.lag }),
            (false, true) => changes.push(Change::CaughtUp { lag: self.lag }),
            _ => {}
        }
        self.probed(changes, cfg, now)
    }

    fn probe_failed(
        &mut self,
        error: &Error,
        cfg: &HealthConfig,
        now: Instant,
    ) -> Option<Transition> {
        self.passes = 0;
        self.fails = self.fails.saturating_add(1);
        self.last_probe = Some(now);
        // Error messages name endpoints, never URLs, so they are safe to show.
        let error = error.to_string();
        self.last_error = Some(error.clone());
        let (fails, change) = (self.fails, self.up && self.fails >= cfg.fall);
        let change = if change {
            self.up = false;
            Change::Down { fails, error }
        } else {
            Change::ProbeFailed { fails, error }
        };
        self.probed(vec![change], cfg, now)
    }

    fn probe_slow(
        &mut self,
        error: &Error,
        cfg: &HealthConfig,
        now: Instant,
    ) -> Option<Transition> {
        let again = self.last_error.is_some();
        let error = error.to_string();
        self.passes = 0;
        self.last_probe = Some(now);
        self.last_error = Some(error.clone());
        self.probed(vec![Change::SlowOnlyPrimary { again, error }], cfg, now)
    }
}

#[cfg(test)]
mod tests;
