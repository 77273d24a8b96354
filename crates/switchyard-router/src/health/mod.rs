//! Endpoint health: active probes, passive ejection, roles and lag.
//!
//! Two detectors feed one state per endpoint:
//!
//! - **Active** (the `prober` task): a task per endpoint probes it every `interval`
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
//! All of it logs state changes at `info` (recovery) or `warn` (loss) with the
//! reason.

pub(crate) mod ejection;
pub(crate) mod prober;

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use switchyard_core::{EndpointId, Error, Probe, Role};
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

/// Everything known about one endpoint's health; guarded by a mutex that the
/// pick path never takes (picks read the snapshot built from it).
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
    /// Since when the endpoint has continuously been primary; the longest-serving
    /// primary wins when probes see two.
    pub primary_since: Option<Instant>,
}

/// What routing depends on, to tell whether a change needs a new snapshot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RoutingKey {
    role: Role,
    up: bool,
    phase: Option<bool>,
    lag_ok: bool,
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
            primary_since: (role == Role::Primary).then_some(now),
        }
    }

    pub fn health(&self) -> Health {
        match (self.up, self.ejection.phase) {
            (false, _) => Health::Down,
            (true, Phase::Admitted) => Health::Up,
            (true, Phase::Ejected { .. }) => Health::Ejected,
            (true, Phase::HalfOpen) => Health::HalfOpen,
        }
    }

    /// Whether the replica is close enough to its primary to serve reads.
    pub fn lag_ok(&self, cfg: &HealthConfig) -> bool {
        match (self.lag, cfg.max_replica_lag) {
            (Some(lag), Some(max)) => lag <= max,
            _ => true,
        }
    }

    pub fn routing_key(&self, cfg: &HealthConfig) -> RoutingKey {
        RoutingKey {
            role: self.role,
            up: self.up,
            phase: match self.ejection.phase {
                Phase::Admitted => None,
                Phase::Ejected { .. } => Some(false),
                Phase::HalfOpen => Some(true),
            },
            lag_ok: self.lag_ok(cfg),
        }
    }

    /// Applies a good probe; logs what changed.
    pub fn probe_passed(&mut self, probe: Probe, cfg: &HealthConfig, who: &Who<'_>, now: Instant) {
        self.fails = 0;
        self.passes = self.passes.saturating_add(1);
        self.last_probe = Some(now);
        self.last_error = None;
        self.probe_rtt = Some(probe.rtt);
        if !self.up && self.passes >= cfg.rise {
            self.up = true;
            tracing::info!(cluster = who.cluster, endpoint = %who.endpoint, passes = self.passes, "endpoint up: {} consecutive probes passed", self.passes);
        }
        if probe.role != self.role {
            match (self.role, probe.role) {
                (_, Role::Primary) => {
                    tracing::warn!(cluster = who.cluster, endpoint = %who.endpoint, from = %self.role, "endpoint promoted: probe reports primary, was {}", self.role)
                }
                (Role::Primary, to) => {
                    tracing::warn!(cluster = who.cluster, endpoint = %who.endpoint, %to, "endpoint demoted: probe reports {to}, was primary")
                }
                (from, to) => {
                    tracing::info!(cluster = who.cluster, endpoint = %who.endpoint, %from, %to, "endpoint role changed from {from} to {to}")
                }
            }
            self.primary_since = (probe.role == Role::Primary).then_some(now);
            self.role = probe.role;
        }
        // A primary back from down has been serving as primary only since now
        // (going down cleared `primary_since`): an old primary restarted after a
        // failover must not outrank the promoted one.
        if self.up && self.role == Role::Primary && self.primary_since.is_none() {
            self.primary_since = Some(now);
        }
        let was_ok = self.lag_ok(cfg);
        self.lag = probe.lag;
        self.lag_bytes = probe.lag_bytes;
        self.version = probe.version;
        match (was_ok, self.lag_ok(cfg)) {
            (true, false) => {
                tracing::warn!(cluster = who.cluster, endpoint = %who.endpoint, lag = ?self.lag, max = ?cfg.max_replica_lag, "replica lag over the limit: no reads until it catches up")
            }
            (false, true) => {
                tracing::info!(cluster = who.cluster, endpoint = %who.endpoint, lag = ?self.lag, "replica caught up: serving reads again")
            }
            _ => {}
        }
    }

    /// Applies a failed probe; logs when it marks the endpoint down.
    pub fn probe_failed(&mut self, error: &Error, cfg: &HealthConfig, who: &Who<'_>, now: Instant) {
        self.passes = 0;
        self.fails = self.fails.saturating_add(1);
        self.last_probe = Some(now);
        // Error messages name endpoints, never URLs, so they are safe to show.
        self.last_error = Some(error.to_string());
        if self.up && self.fails >= cfg.fall {
            self.up = false;
            self.primary_since = None;
            tracing::warn!(cluster = who.cluster, endpoint = %who.endpoint, fails = self.fails, %error, "endpoint down: {} consecutive probes failed", self.fails);
        } else {
            tracing::debug!(cluster = who.cluster, endpoint = %who.endpoint, fails = self.fails, %error, "probe failed");
        }
    }
}

impl HealthState {
    /// Applies a probe that got no answer in time on an endpoint that must not
    /// be dropped for slowness alone (the only primary): recorded and shown,
    /// but it neither counts towards `fall` nor passes.
    pub fn probe_slow(&mut self, error: &Error, who: &Who<'_>, now: Instant) {
        if self.last_error.is_none() {
            tracing::warn!(cluster = who.cluster, endpoint = %who.endpoint, %error, "the only primary answers probes slowly or not at all; kept up, writes have nowhere else to go");
        } else {
            tracing::debug!(cluster = who.cluster, endpoint = %who.endpoint, %error, "the only primary's probe timed out again");
        }
        self.passes = 0;
        self.last_probe = Some(now);
        self.last_error = Some(error.to_string());
    }
}

/// Names for log lines.
pub(crate) struct Who<'a> {
    pub cluster: &'a str,
    pub endpoint: &'a EndpointId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> (String, EndpointId) {
        ("c".into(), EndpointId::new("e"))
    }

    fn refused() -> Error {
        Error::backend(
            &EndpointId::new("e"),
            None,
            switchyard_core::BackendErrorKind::Connect,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )
    }

    #[test]
    fn fall_and_rise_count_consecutive_probes() {
        let (c, e) = who();
        let who = Who {
            cluster: &c,
            endpoint: &e,
        };
        let cfg = HealthConfig {
            fall: 3,
            rise: 2,
            ..HealthConfig::default()
        };
        let now = Instant::now();
        let mut h = HealthState::new(Role::Replica, now);
        let ok = || Probe::new(Role::Replica, Duration::from_millis(1));
        h.probe_failed(&refused(), &cfg, &who, now);
        h.probe_failed(&refused(), &cfg, &who, now);
        h.probe_passed(ok(), &cfg, &who, now);
        h.probe_failed(&refused(), &cfg, &who, now);
        h.probe_failed(&refused(), &cfg, &who, now);
        assert_eq!(h.health(), Health::Up, "a pass in between resets the count");
        h.probe_failed(&refused(), &cfg, &who, now);
        assert_eq!(h.health(), Health::Down);
        assert!(h
            .last_error
            .as_deref()
            .unwrap()
            .contains("connect error on e"));
        h.probe_passed(ok(), &cfg, &who, now);
        assert_eq!(h.health(), Health::Down);
        h.probe_passed(ok(), &cfg, &who, now);
        assert_eq!(h.health(), Health::Up);
        assert_eq!(h.last_error, None);
    }

    #[test]
    fn a_primary_back_from_down_is_primary_only_from_then() {
        let (c, e) = who();
        let who = Who {
            cluster: &c,
            endpoint: &e,
        };
        let cfg = HealthConfig {
            fall: 1,
            rise: 1,
            ..HealthConfig::default()
        };
        let start = Instant::now();
        let mut h = HealthState::new(Role::Primary, start);
        h.probe_failed(&refused(), &cfg, &who, start);
        assert_eq!((h.health(), h.primary_since), (Health::Down, None));
        let back = start + Duration::from_secs(5);
        h.probe_passed(Probe::new(Role::Primary, Duration::ZERO), &cfg, &who, back);
        assert_eq!(h.health(), Health::Up);
        assert_eq!(
            h.primary_since,
            Some(back),
            "None would sort first and outrank a promoted replica"
        );
    }

    #[test]
    fn probes_teach_role_and_lag() {
        let (c, e) = who();
        let who = Who {
            cluster: &c,
            endpoint: &e,
        };
        let cfg = HealthConfig {
            max_replica_lag: Some(Duration::from_secs(5)),
            ..HealthConfig::default()
        };
        let now = Instant::now();
        let mut h = HealthState::new(Role::Primary, now);
        let before = h.routing_key(&cfg);
        let mut p = Probe::new(Role::Replica, Duration::ZERO);
        p.lag = Some(Duration::from_secs(9));
        h.probe_passed(p, &cfg, &who, now);
        assert_eq!(h.role, Role::Replica);
        assert_eq!(h.primary_since, None);
        assert!(!h.lag_ok(&cfg));
        assert_ne!(before, h.routing_key(&cfg));
        h.probe_passed(Probe::new(Role::Primary, Duration::ZERO), &cfg, &who, now);
        assert_eq!(h.primary_since, Some(now));
        assert!(h.lag_ok(&cfg));
    }
}
