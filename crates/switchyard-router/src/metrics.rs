//! Metrics the router emits through the [`metrics`] facade: the one place their
//! names are defined.
//!
//! Every series carries `engine` and `cluster` labels; per-endpoint series also
//! carry `endpoint` (an endpoint name, never a URL). Install a recorder (e.g.
//! `metrics-exporter-prometheus`) before building clusters: handles are
//! registered once per endpoint, so the checkout path records without looking
//! anything up or allocating.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `switchyard_checkouts_total` | counter | endpoint, `result` = `ok`/`error` | checkouts handed out or failed, per attempt |
//! | `switchyard_checkout_wait_seconds` | histogram | endpoint | wait for a connection, successful attempts |
//! | `switchyard_checkout_timeouts_total` | counter | endpoint | attempts that hit their deadline |
//! | `switchyard_operation_timeouts_total` | counter | endpoint, `deadline` = `attempt`/`budget` | operations run by `Cluster::run` cancelled at a deadline ([`Error::OperationTimeout`]): `attempt` (`retry.attempt_timeout`; the endpoint is charged, a read moves on) or `budget` (the whole deadline) |
//! | `switchyard_checkout_held_seconds` | histogram | endpoint | how long connections were held |
//! | `switchyard_checkout_errors_total` | counter | `kind` = `no_healthy_endpoint`/`no_primary` | checkouts that found no endpoint |
//! | `switchyard_retries_total` | counter | `intent` | attempts retried on another endpoint |
//! | `switchyard_failovers_total` | counter | | writes moved to a new primary |
//! | `switchyard_primary_wait_seconds` | histogram | | time writes waited for a primary |
//! | `switchyard_ejections_total` | counter | endpoint | passive ejections |
//! | `switchyard_ejections_capped_total` | counter | endpoint | ejections refused by `max_ejected_percent` or the last-writer rule |
//! | `switchyard_endpoint_up` | gauge | endpoint | 1 when serving (up and admitted), else 0 |
//! | `switchyard_endpoint_fenced` | gauge | endpoint | 1 while the endpoint is a primary fenced behind the line writes follow |
//! | `switchyard_fenced_total` | counter | endpoint | times the endpoint was fenced |
//! | `switchyard_split_brain` | gauge | | 1 while primaries nothing orders make writes refused |
//! | `switchyard_probe_rtt_seconds` | histogram | endpoint | round trip of good probes |
//! | `switchyard_probe_failures_total` | counter | endpoint | failed probes |
//! | `switchyard_replica_lag_seconds` | gauge | endpoint | replication lag, where reported |
//! | `switchyard_in_flight` | gauge | endpoint | checkouts in flight, sampled every probe |
//! | `switchyard_pool_in_use` | gauge | endpoint | connections in use, from `Backend::stats` |
//! | `switchyard_pool_idle` | gauge | endpoint | idle connections, from `Backend::stats` |
//! | `switchyard_pool_size` | gauge | endpoint | open connections, from `Backend::stats` |
//! | `switchyard_warming_forecast` | gauge | endpoint | forecast concurrent demand (warming on) |
//! | `switchyard_source_up` | gauge | | 1 while the cluster's topology source answers, 0 while it is unreachable |
//! | `switchyard_source_errors_total` | counter | | reports of an unreachable topology source |
//! | `switchyard_source_changes_total` | counter | | topology source views that changed the endpoints or roles |
//! | `switchyard_causal_reads_total` | counter | `served` = `replica`/`primary` | reads given a causal token, by where they were served |
//! | `switchyard_causal_waits_total` | counter | | causal reads that waited for a node to apply their token |
//! | `switchyard_causal_wait_seconds` | histogram | | how long those waits took |
//! | `switchyard_causal_fallbacks_total` | counter | | causal reads that gave up on the replicas (to the primary, or failed) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, IntoF64, Label};
use switchyard_core::{Deadline, Error, Intent, PoolStats};
use tokio::time::Instant;

/// `switchyard_checkouts_total`
pub const CHECKOUTS: &str = "switchyard_checkouts_total";
/// `switchyard_checkout_wait_seconds`
pub const CHECKOUT_WAIT: &str = "switchyard_checkout_wait_seconds";
/// `switchyard_checkout_timeouts_total`
pub const CHECKOUT_TIMEOUTS: &str = "switchyard_checkout_timeouts_total";
/// `switchyard_operation_timeouts_total`
pub const OPERATION_TIMEOUTS: &str = "switchyard_operation_timeouts_total";
/// `switchyard_checkout_held_seconds`
pub const CHECKOUT_HELD: &str = "switchyard_checkout_held_seconds";
/// `switchyard_checkout_errors_total`
pub const CHECKOUT_ERRORS: &str = "switchyard_checkout_errors_total";
/// `switchyard_retries_total`
pub const RETRIES: &str = "switchyard_retries_total";
/// `switchyard_failovers_total`
pub const FAILOVERS: &str = "switchyard_failovers_total";
/// `switchyard_primary_wait_seconds`
pub const PRIMARY_WAIT: &str = "switchyard_primary_wait_seconds";
/// `switchyard_ejections_total`
pub const EJECTIONS: &str = "switchyard_ejections_total";
/// `switchyard_ejections_capped_total`
pub const EJECTIONS_CAPPED: &str = "switchyard_ejections_capped_total";
/// `switchyard_endpoint_up`
pub const ENDPOINT_UP: &str = "switchyard_endpoint_up";
/// `switchyard_endpoint_fenced`
pub const ENDPOINT_FENCED: &str = "switchyard_endpoint_fenced";
/// `switchyard_fenced_total`
pub const FENCED_TOTAL: &str = "switchyard_fenced_total";
/// `switchyard_split_brain`
pub const SPLIT_BRAIN: &str = "switchyard_split_brain";
/// `switchyard_probe_rtt_seconds`
pub const PROBE_RTT: &str = "switchyard_probe_rtt_seconds";
/// `switchyard_probe_failures_total`
pub const PROBE_FAILURES: &str = "switchyard_probe_failures_total";
/// `switchyard_replica_lag_seconds`
pub const REPLICA_LAG: &str = "switchyard_replica_lag_seconds";
/// `switchyard_in_flight`
pub const IN_FLIGHT: &str = "switchyard_in_flight";
/// `switchyard_pool_in_use`
pub const POOL_IN_USE: &str = "switchyard_pool_in_use";
/// `switchyard_pool_idle`
pub const POOL_IDLE: &str = "switchyard_pool_idle";
/// `switchyard_pool_size`
pub const POOL_SIZE: &str = "switchyard_pool_size";
/// `switchyard_warming_forecast`
pub const WARMING_FORECAST: &str = "switchyard_warming_forecast";

/// `switchyard_source_up`
pub const SOURCE_UP: &str = "switchyard_source_up";
/// `switchyard_source_errors_total`
pub const SOURCE_ERRORS: &str = "switchyard_source_errors_total";
/// `switchyard_source_changes_total`
pub const SOURCE_CHANGES: &str = "switchyard_source_changes_total";

/// `switchyard_causal_reads_total`
pub const CAUSAL_READS: &str = "switchyard_causal_reads_total";
/// `switchyard_causal_waits_total`
pub const CAUSAL_WAITS: &str = "switchyard_causal_waits_total";
/// `switchyard_causal_wait_seconds`
pub const CAUSAL_WAIT: &str = "switchyard_causal_wait_seconds";
/// `switchyard_causal_fallbacks_total`
pub const CAUSAL_FALLBACKS: &str = "switchyard_causal_fallbacks_total";

/// The time since a checkout's connection was handed out, read from the
/// clock only when a recorder is behind the histogram: a `metrics` handle
/// converts what it is given only if it records, so a service that installs
/// no recorder pays no clock read per release.
pub(crate) struct HeldSince(pub Instant);

impl IntoF64 for HeldSince {
    fn into_f64(self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// Handles for one endpoint's series, registered once.
///
/// In order, the three every checkout records into first (see
/// [`EndpointState`](crate::endpoint::EndpointState)).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct EndpointMetrics {
    pub acquired: Counter,
    pub wait: Histogram,
    pub held: Histogram,
    pub failed: Counter,
    pub timeouts: Counter,
    pub attempt_overruns: Counter,
    pub budget_overruns: Counter,
    pub ejections: Counter,
    pub ejections_capped: Counter,
    pub up: Gauge,
    pub fenced: Gauge,
    pub fencings: Counter,
    pub probe_rtt: Histogram,
    pub probe_failures: Counter,
    pub lag: Gauge,
    pub in_flight: Gauge,
    pub pool_in_use: Gauge,
    pub pool_idle: Gauge,
    pub pool_size: Gauge,
    pub forecast: Gauge,
}

fn labels(engine: &'static str, cluster: &str, endpoint: &str) -> Vec<Label> {
    vec![
        Label::from_static_parts("engine", engine),
        Label::new("cluster", cluster.to_owned()),
        Label::new("endpoint", endpoint.to_owned()),
    ]
}

impl EndpointMetrics {
    pub fn new(engine: &'static str, cluster: &str, endpoint: &str) -> Self {
        let l = labels(engine, cluster, endpoint);
        let with = |k: &'static str, v: &'static str| {
            let mut l = l.clone();
            l.push(Label::from_static_parts(k, v));
            l
        };
        Self {
            acquired: metrics::counter!(CHECKOUTS, with("result", "ok")),
            failed: metrics::counter!(CHECKOUTS, with("result", "error")),
            wait: metrics::histogram!(CHECKOUT_WAIT, l.clone()),
            timeouts: metrics::counter!(CHECKOUT_TIMEOUTS, l.clone()),
            attempt_overruns: metrics::counter!(OPERATION_TIMEOUTS, with("deadline", "attempt")),
            budget_overruns: metrics::counter!(OPERATION_TIMEOUTS, with("deadline", "budget")),
            held: metrics::histogram!(CHECKOUT_HELD, l.clone()),
            ejections: metrics::counter!(EJECTIONS, l.clone()),
            ejections_capped: metrics::counter!(EJECTIONS_CAPPED, l.clone()),
            up: metrics::gauge!(ENDPOINT_UP, l.clone()),
            fenced: metrics::gauge!(ENDPOINT_FENCED, l.clone()),
            fencings: metrics::counter!(FENCED_TOTAL, l.clone()),
            probe_rtt: metrics::histogram!(PROBE_RTT, l.clone()),
            probe_failures: metrics::counter!(PROBE_FAILURES, l.clone()),
            lag: metrics::gauge!(REPLICA_LAG, l.clone()),
            in_flight: metrics::gauge!(IN_FLIGHT, l.clone()),
            pool_in_use: metrics::gauge!(POOL_IN_USE, l.clone()),
            pool_idle: metrics::gauge!(POOL_IDLE, l.clone()),
            pool_size: metrics::gauge!(POOL_SIZE, l.clone()),
            forecast: metrics::gauge!(WARMING_FORECAST, l),
        }
    }

    /// An operation was cancelled at `deadline`.
    pub fn operation_timed_out(&self, deadline: Deadline) {
        match deadline {
            Deadline::Attempt => self.attempt_overruns.increment(1),
            _ => self.budget_overruns.increment(1),
        }
    }

    pub fn pool(&self, stats: PoolStats, in_flight: u32) {
        self.pool_in_use.set(f64::from(stats.in_use()));
        self.pool_idle.set(f64::from(stats.idle));
        self.pool_size.set(f64::from(stats.size));
        self.in_flight.set(f64::from(in_flight));
    }
}

/// Handles for one cluster's series.
#[derive(Debug)]
pub(crate) struct ClusterMetrics {
    pub retries_read: Counter,
    pub retries_write: Counter,
    pub failovers: Counter,
    pub primary_wait: Histogram,
    pub no_healthy: Counter,
    pub no_primary: Counter,
    pub split_brain: Gauge,
}

/// A cluster's labels (`engine`, `cluster`), and a function adding one more.
pub(crate) fn cluster_labels(
    engine: &'static str,
    cluster: &str,
) -> (
    Vec<Label>,
    impl Fn(&'static str, &'static str) -> Vec<Label>,
) {
    let l = vec![
        Label::from_static_parts("engine", engine),
        Label::new("cluster", cluster.to_owned()),
    ];
    let base = l.clone();
    let with = move |k: &'static str, v: &'static str| {
        let mut l = base.clone();
        l.push(Label::from_static_parts(k, v));
        l
    };
    (l, with)
}

impl ClusterMetrics {
    pub fn new(engine: &'static str, cluster: &str) -> Self {
        let (l, with) = cluster_labels(engine, cluster);
        Self {
            retries_read: metrics::counter!(RETRIES, with("intent", "read")),
            retries_write: metrics::counter!(RETRIES, with("intent", "write")),
            failovers: metrics::counter!(FAILOVERS, l.clone()),
            primary_wait: metrics::histogram!(PRIMARY_WAIT, l.clone()),
            no_healthy: metrics::counter!(CHECKOUT_ERRORS, with("kind", "no_healthy_endpoint")),
            no_primary: metrics::counter!(CHECKOUT_ERRORS, with("kind", "no_primary")),
            split_brain: metrics::gauge!(SPLIT_BRAIN, l.clone()),
        }
    }

    pub fn retry(&self, intent: Intent) {
        match intent {
            Intent::Read => self.retries_read.increment(1),
            Intent::Write => self.retries_write.increment(1),
        }
    }

    pub fn no_endpoint(&self, error: &Error) {
        match error {
            Error::NoPrimary { .. } => self.no_primary.increment(1),
            Error::NoHealthyEndpoint { .. } => self.no_healthy.increment(1),
            _ => {}
        }
    }

    pub fn waited_for_primary(&self, waited: Duration) {
        self.primary_wait.record(waited);
    }
}

/// Handles for one cluster's topology source series.
#[derive(Debug)]
pub(crate) struct SourceMetrics {
    pub up: Gauge,
    pub errors: Counter,
    pub changes: Counter,
}

impl SourceMetrics {
    pub fn new(engine: &'static str, cluster: &str) -> Self {
        let l = vec![
            Label::from_static_parts("engine", engine),
            Label::new("cluster", cluster.to_owned()),
        ];
        Self {
            up: metrics::gauge!(SOURCE_UP, l.clone()),
            errors: metrics::counter!(SOURCE_ERRORS, l.clone()),
            changes: metrics::counter!(SOURCE_CHANGES, l),
        }
    }
}

/// What causal reads of one cluster did since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CausalStats {
    /// Token reads served by a replica.
    pub replica_reads: u64,
    /// Token reads served by the primary (fallbacks included).
    pub primary_reads: u64,
    /// Token reads that waited for a node to apply their token.
    pub waits: u64,
    /// Their waits, summed.
    pub wait_time: Duration,
    /// Token reads that gave up on the replicas and went to the primary (or
    /// failed, with `causal.fallback = fail`).
    pub fallbacks: u64,
}

/// The cluster's causal-read series and counts; touched only by token reads
/// ([`crate::causal`]).
#[derive(Debug)]
pub(crate) struct CausalMetrics {
    replica: Counter,
    primary: Counter,
    waits: Counter,
    wait: Histogram,
    fallbacks: Counter,
    counts: [AtomicU64; 5],
}

const REPLICA: usize = 0;
const PRIMARY: usize = 1;
const WAITS: usize = 2;
const WAIT_NANOS: usize = 3;
const FALLBACKS: usize = 4;

impl CausalMetrics {
    pub(crate) fn new(engine: &'static str, cluster: &str) -> Self {
        let (l, with) = cluster_labels(engine, cluster);
        Self {
            replica: metrics::counter!(CAUSAL_READS, with("served", "replica")),
            primary: metrics::counter!(CAUSAL_READS, with("served", "primary")),
            waits: metrics::counter!(CAUSAL_WAITS, l.clone()),
            wait: metrics::histogram!(CAUSAL_WAIT, l.clone()),
            fallbacks: metrics::counter!(CAUSAL_FALLBACKS, l),
            counts: Default::default(),
        }
    }

    fn bump(&self, which: usize, by: u64) {
        self.counts[which].fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn served(&self, on_writer: bool, waited: Option<Duration>) {
        if on_writer {
            self.primary.increment(1);
            self.bump(PRIMARY, 1);
        } else {
            self.replica.increment(1);
            self.bump(REPLICA, 1);
        }
        if let Some(waited) = waited {
            self.waited(waited);
        }
    }

    pub(crate) fn waited(&self, waited: Duration) {
        self.waits.increment(1);
        self.wait.record(waited);
        self.bump(WAITS, 1);
        self.bump(
            WAIT_NANOS,
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    pub(crate) fn fell_back(&self) {
        self.fallbacks.increment(1);
        self.bump(FALLBACKS, 1);
    }

    pub(crate) fn stats(&self) -> CausalStats {
        let n = |i: usize| self.counts[i].load(Ordering::Relaxed);
        CausalStats {
            replica_reads: n(REPLICA),
            primary_reads: n(PRIMARY),
            waits: n(WAITS),
            wait_time: Duration::from_nanos(n(WAIT_NANOS)),
            fallbacks: n(FALLBACKS),
        }
    }
}
