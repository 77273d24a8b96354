//! Cluster configuration: plain `Deserialize` structs with safe, bounded defaults.
//!
//! Durations are human strings (`"500ms"`, `"10s"`). Every field has a default,
//! so `{}` is a valid configuration; [`ClusterConfig::validate`] reports every
//! problem at once, each with its path.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_core::Error;

/// The most a single endpoint may weigh; bounds the weighted round-robin cycle.
pub const MAX_WEIGHT: u32 = 1000;

/// The most attempts one checkout may make.
pub const MAX_ATTEMPTS: u32 = 10;

/// How a cluster spreads checkouts over its candidate endpoints.
///
/// A strategy is prepared once per candidate set, whenever the routing
/// snapshot is rebuilt (health, role, weights, topology); a pick then reads
/// the prepared state and the candidates' loads, takes no lock and allocates
/// nothing.
///
/// | strategy | pick cost | prepared per snapshot |
/// |---|---|---|
/// | `round_robin` | O(1): one atomic increment | nothing |
/// | `least_conn` | O(n) exact scan up to 32 candidates; O(1) above: the lighter of two random candidates (power of two choices) | nothing |
/// | `weighted_round_robin` | O(1): one atomic increment and an index | the interleaved cycle |
/// | `latency` | O(1): two random candidates compared | nothing |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Each candidate in turn, ignoring weights. O(1) per pick.
    RoundRobin,
    /// The candidate with the fewest checkouts in flight per unit of weight:
    /// exact up to 32 candidates, above that the lighter of two drawn at
    /// random.
    #[default]
    LeastConn,
    /// Smooth weighted round robin: exact proportions, no bursts.
    WeightedRoundRobin,
    /// Peak-EWMA latency times load, power of two choices.
    Latency,
}

/// Where reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPreference {
    /// Healthy replicas only; with none, reads fail with `NoHealthyEndpoint`.
    ReplicasOnly,
    /// Healthy replicas; the primary when no replica can serve.
    #[default]
    PreferReplicas,
    /// Replicas and the primary alike.
    Any,
}

/// Everything about one cluster except its endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Balancing strategy (default `least_conn`).
    pub strategy: StrategyKind,
    /// Where reads go (default `prefer_replicas`).
    pub read_preference: ReadPreference,
    /// Longest a checkout may take in all, retries included (default 10s).
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Longest a write waits for a primary to appear (default 10s), within the
    /// checkout deadline.
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// Active and passive health checking.
    pub health: HealthConfig,
    /// Retries of failed checkouts.
    pub retry: RetryConfig,
    /// The latency strategy's estimator.
    pub latency: LatencyConfig,
    /// Predictive warming of idle connections (off by default).
    pub warming: WarmingConfig,
    /// Reads given a causal token (see [`crate::causal`]).
    pub causal: CausalConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::default(),
            read_preference: ReadPreference::default(),
            checkout_timeout: Duration::from_secs(10),
            failover_timeout: Duration::from_secs(10),
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            latency: LatencyConfig::default(),
            warming: WarmingConfig::default(),
            causal: CausalConfig::default(),
        }
    }
}

/// How reads honour a causal token when no replica has applied it yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CausalConfig {
    /// Longest a read waits for a replica to apply its token (default
    /// 100ms), within the checkout deadline; a checkout's own
    /// [`CheckoutOptions::causal_wait`](crate::CheckoutOptions::causal_wait)
    /// replaces it.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// What a read does when the wait is over (default `primary`).
    pub fallback: CausalFallback,
}

impl Default for CausalConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_millis(100),
            fallback: CausalFallback::Primary,
        }
    }
}

/// Where a causal read goes when no replica applied its token in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CausalFallback {
    /// To the primary, which holds every write.
    #[default]
    Primary,
    /// Nowhere: the read fails with `CausalError::NotApplied`.
    Fail,
}

/// Active probes (HAProxy's `inter`, `fall`, `rise`) and passive ejection
/// (Envoy's outlier detection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between probes of one endpoint (default 2s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest one probe may take before it counts as failed (default 1s).
    ///
    /// May be longer than `interval`: probes of one endpoint never overlap,
    /// and the next starts as soon as a slow one answered. An answer within
    /// the timeout is a pass however slow, and its time feeds the latency
    /// estimate and the `probe_rtt` metric. A timeout on the only primary the
    /// cluster knows does not count towards `fall` (writes have nowhere else
    /// to go, so slowness must not become an outage); a refused or broken
    /// probe does.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed probes that mark an endpoint down (default 3).
    pub fall: u32,
    /// Consecutive good probes that mark it up again (default 2).
    pub rise: u32,
    /// First ejection after a failed checkout lasts this long (default 2s); each
    /// consecutive ejection doubles it.
    #[serde(with = "humantime_serde")]
    pub eject_base: Duration,
    /// Longest an ejection lasts (default 60s).
    #[serde(with = "humantime_serde")]
    pub eject_max: Duration,
    /// Adds up to 10% random jitter to each ejection, so endpoints ejected together
    /// are not retried together (default true).
    pub eject_jitter: bool,
    /// Most endpoints, in percent of the cluster, ejected at once (default 50).
    /// At least one endpoint may always be ejected.
    pub max_ejected_percent: u8,
    /// Replicas further behind than this serve no reads (default 10s; `null`
    /// accepts any lag, but never a replica whose engine says it holds no
    /// copy of its primary's data yet, such as a Redis replica in its first
    /// sync: see `HealthState::lag_ok` in [`crate::health`]).
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Option<Duration>,
    /// Longest a replica that stopped receiving its primary's stream (an
    /// orphaned PostgreSQL standby, a Redis replica whose link is down) keeps
    /// serving reads while `max_replica_lag` is set, counted from the last
    /// probe that saw it streaming (default `null`: for as long as its lag
    /// then plus the time since stays within `max_replica_lag`). Its lag is
    /// unknown; that sum bounds it. See [`crate::health`].
    #[serde(with = "humantime_serde")]
    pub detached_grace: Option<Duration>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
            eject_base: Duration::from_secs(2),
            eject_max: Duration::from_secs(60),
            eject_jitter: true,
            max_ejected_percent: 50,
            max_replica_lag: Some(Duration::from_secs(10)),
            detached_grace: None,
        }
    }
}

/// Retries of checkouts that failed with a retryable error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Most attempts per checkout or per [`run`](crate::Cluster::run), the first
    /// included (default 3). Writes make one unless marked idempotent.
    pub max_attempts: u32,
    /// Longest one attempt of a retryable checkout may wait before the next
    /// endpoint is tried (default 3s), so a hung replica cannot eat the whole
    /// deadline. Under [`run`](crate::Cluster::run) it bounds the checkout
    /// and the operation together; an attempt with no other after it runs to
    /// the whole deadline instead.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(3),
        }
    }
}

/// The peak-EWMA latency estimator (tower's `PeakEwma`, Finagle's `Aperture`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyConfig {
    /// How fast old samples are forgotten: the estimate falls to 1/e in this time
    /// (default 10s).
    #[serde(with = "humantime_serde")]
    pub decay: Duration,
    /// The estimate an endpoint starts with before any sample (default 30ms).
    #[serde(with = "humantime_serde")]
    pub default_rtt: Duration,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// Predictive warming: keep open connections near a forecast of demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmingConfig {
    /// Whether warmer tasks run (default false).
    pub enabled: bool,
    /// Time between demand samples and warming steps (default 1s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time constant of the demand forecast (default 30s).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Connections kept open regardless of the forecast (default 0).
    pub min_idle: u32,
    /// Most new connections opened per step (default 4).
    pub max_step: u32,
}

impl Default for WarmingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Duration::from_secs(1),
            window: Duration::from_secs(30),
            min_idle: 0,
            max_step: 4,
        }
    }
}

/// Per-endpoint settings given when an endpoint joins a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// Relative share of traffic, 1 to [`MAX_WEIGHT`] (default 1).
    pub weight: u32,
    /// The role assumed until the first probe answers (default `replica`).
    pub role: switchyard_core::Role,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            weight: 1,
            role: switchyard_core::Role::Replica,
        }
    }
}

impl EndpointConfig {
    /// An endpoint first assumed to be `role`, with weight 1.
    pub fn new(role: switchyard_core::Role) -> Self {
        Self { weight: 1, role }
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Every problem with these settings, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut problems = Vec::new();
        check_weight(self.weight, &format!("{path}.weight"), &mut problems);
        problems
    }
}

pub(crate) fn check_weight(weight: u32, path: &str, problems: &mut Vec<Error>) {
    if weight == 0 || weight > MAX_WEIGHT {
        problems.push(problem(
            path,
            format!("{weight} is outside 1..={MAX_WEIGHT}"),
        ));
    }
}

fn problem(path: &str, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl ClusterConfig {
    /// Every problem with this configuration, each as an [`Error::Config`] under `path`.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut out = Vec::new();
        let mut bad =
            |field: &str, message: String| out.push(problem(&format!("{path}.{field}"), message));
        let positive = |d: Duration| !d.is_zero();
        if !positive(self.checkout_timeout) {
            bad("checkout_timeout", "must be greater than zero".into());
        }
        if !positive(self.failover_timeout) {
            bad("failover_timeout", "must be greater than zero".into());
        } else if self.failover_timeout > self.checkout_timeout {
            bad(
                "failover_timeout",
                format!(
                    "{:?} is longer than checkout_timeout {:?}, which would cut it short",
                    self.failover_timeout, self.checkout_timeout
                ),
            );
        }
        let h = &self.health;
        if !positive(h.interval) {
            bad("health.interval", "must be greater than zero".into());
        }
        // A timeout longer than the interval is fine: probes never overlap
        // (the next starts once the previous answered or timed out), and a
        // timeout is what tells a slow endpoint from a dead one.
        if !positive(h.timeout) {
            bad("health.timeout", "must be greater than zero".into());
        }
        if h.fall == 0 || h.fall > 100 {
            bad("health.fall", format!("{} is outside 1..=100", h.fall));
        }
        if h.rise == 0 || h.rise > 100 {
            bad("health.rise", format!("{} is outside 1..=100", h.rise));
        }
        if !positive(h.eject_base) {
            bad("health.eject_base", "must be greater than zero".into());
        }
        if h.eject_max < h.eject_base {
            bad(
                "health.eject_max",
                format!(
                    "{:?} is shorter than eject_base {:?}",
                    h.eject_max, h.eject_base
                ),
            );
        }
        if h.max_ejected_percent > 100 {
            bad(
                "health.max_ejected_percent",
                format!("{} is more than 100", h.max_ejected_percent),
            );
        }
        if self.retry.max_attempts == 0 || self.retry.max_attempts > MAX_ATTEMPTS {
            bad(
                "retry.max_attempts",
                format!("{} is outside 1..={MAX_ATTEMPTS}", self.retry.max_attempts),
            );
        }
        if !positive(self.retry.attempt_timeout) {
            bad("retry.attempt_timeout", "must be greater than zero".into());
        }
        if !positive(self.latency.decay) {
            bad("latency.decay", "must be greater than zero".into());
        }
        let w = &self.warming;
        if !positive(w.interval) {
            bad("warming.interval", "must be greater than zero".into());
        }
        if !positive(w.window) {
            bad("warming.window", "must be greater than zero".into());
        }
        if w.max_step == 0 || w.max_step > 64 {
            bad(
                "warming.max_step",
                format!("{} is outside 1..=64", w.max_step),
            );
        }
        out
    }

    /// [`validate`](Self::validate) folded into one error naming every problem.
    pub fn check(&self, path: &str) -> Result<(), Error> {
        join_problems(path, self.validate(path))
    }
}

/// One [`Error::Config`] listing every problem, or `Ok` when there are none.
pub(crate) fn join_problems(path: &str, problems: Vec<Error>) -> Result<(), Error> {
    if problems.is_empty() {
        return Ok(());
    }
    let message = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Err(problem(path, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_bounded_defaults() {
        let c: ClusterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ClusterConfig::default());
        assert!(c.validate("clusters.main").is_empty());
        assert_eq!(c.strategy, StrategyKind::LeastConn);
        assert!(!c.warming.enabled);
        assert!(c.health.max_replica_lag.is_some());
    }

    #[test]
    fn parses_human_durations_and_names() {
        let c: ClusterConfig = serde_json::from_str(
            r#"{"strategy":"weighted_round_robin","read_preference":"any",
                "failover_timeout":"3s",
                "health":{"interval":"500ms","timeout":"200ms","max_replica_lag":null},
                "retry":{"max_attempts":2},
                "causal":{"wait":"50ms","fallback":"fail"}}"#,
        )
        .unwrap();
        assert_eq!(c.strategy, StrategyKind::WeightedRoundRobin);
        assert_eq!(c.read_preference, ReadPreference::Any);
        assert_eq!(c.failover_timeout, Duration::from_secs(3));
        assert_eq!(c.health.interval, Duration::from_millis(500));
        assert_eq!(c.health.max_replica_lag, None);
        assert_eq!(c.health.fall, 3);
        assert_eq!(c.retry.max_attempts, 2);
        assert_eq!(c.causal.wait, Duration::from_millis(50));
        assert_eq!(c.causal.fallback, CausalFallback::Fail);
        assert!(serde_json::from_str::<ClusterConfig>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let mut c = ClusterConfig {
            checkout_timeout: Duration::from_secs(1),
            ..ClusterConfig::default()
        };
        c.health.fall = 0;
        c.health.timeout = Duration::ZERO;
        c.health.eject_max = Duration::from_millis(1);
        c.health.max_ejected_percent = 101;
        c.retry.max_attempts = 0;
        let problems: Vec<String> = c
            .validate("clusters.pg")
            .iter()
            .map(ToString::to_string)
            .collect();
        let paths = [
            "clusters.pg.failover_timeout: ",
            "clusters.pg.health.timeout: ",
            "clusters.pg.health.fall: ",
            "clusters.pg.health.eject_max: ",
            "clusters.pg.health.max_ejected_percent: ",
            "clusters.pg.retry.max_attempts: ",
        ];
        assert_eq!(problems.len(), paths.len(), "{problems:#?}");
        for p in paths {
            assert!(
                problems.iter().any(|m| m.starts_with(p)),
                "{p} missing in {problems:#?}"
            );
        }
        let joined = c.check("clusters.pg").unwrap_err().to_string();
        assert!(joined.contains("health.fall") && joined.contains("retry.max_attempts"));
    }

    #[test]
    fn a_probe_timeout_may_exceed_the_interval() {
        let mut c = ClusterConfig::default();
        c.health.interval = Duration::from_millis(100);
        c.health.timeout = Duration::from_secs(1);
        assert!(c.validate("clusters.pg").is_empty());
    }

    #[test]
    fn endpoint_weight_is_bounded() {
        assert!(EndpointConfig::default().validate("e").is_empty());
        let bad = EndpointConfig::default()
            .weight(0)
            .validate("clusters.pg.endpoints[2]");
        assert_eq!(bad.len(), 1);
        assert!(bad[0]
            .to_string()
            .starts_with("clusters.pg.endpoints[2].weight: "));
        assert_eq!(
            EndpointConfig::default()
                .weight(MAX_WEIGHT + 1)
                .validate("e")
                .len(),
            1
        );
    }
}
