//! A point-in-time view of a cluster, for dashboards, `switchyard watch` and tests.

use std::time::Duration;

use serde::Serialize;
use switchyard_core::{Backend, EndpointId, PoolStats, Role};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::{ReadPreference, StrategyKind};
pub use crate::counters::{CheckoutCounters, WAIT_THRESHOLD};
use crate::health::{EjectionStatus, Health};
use crate::source::SourceStatus;

/// The state of a whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The engine label given to the builder.
    pub engine: &'static str,
    /// The balancing strategy in use.
    pub strategy: StrategyKind,
    /// Where reads go.
    pub read_preference: ReadPreference,
    /// The endpoint writes go to now, if any.
    pub writer: Option<EndpointId>,
    /// Primaries whose histories cannot be ordered; while any are listed,
    /// writes fail with [`Error::SplitBrain`](switchyard_core::Error::SplitBrain).
    pub split_brain: Vec<EndpointId>,
    /// Every endpoint, in the order they were added.
    pub endpoints: Vec<EndpointStatus>,
    /// The topology source the cluster follows (`None`: static configuration).
    pub source: Option<SourceStatus>,
}

/// The state of one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStatus {
    /// The endpoint's name.
    pub id: EndpointId,
    /// Its role, as the last probe reported (or as configured before any probe).
    pub role: Role,
    /// The role the topology source gives it (`None`: no source).
    pub source_role: Option<Role>,
    /// Its weight.
    pub weight: u32,
    /// Up, down, ejected or half-open.
    pub health: Health,
    /// Whether reads are routed to it now.
    pub serves_reads: bool,
    /// Whether writes are routed to it now.
    pub serves_writes: bool,
    /// Whether it is a primary fenced behind (or off) the line writes follow:
    /// no writes, no reads, until it is demoted or
    /// [`Cluster::unfence`] names it.
    pub fenced: bool,
    /// Where it stands in the engine's replication history, from the last
    /// good probe (timeline, replication id, election), where reported.
    pub history: Option<String>,
    /// Checkouts in flight, waiting ones included.
    pub in_flight: u32,
    /// The peak-EWMA latency estimate.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// The current ejection, if any.
    pub ejection: Option<EjectionStatus>,
    /// Replication lag, where the engine reports it.
    #[serde(with = "humantime_serde")]
    pub lag: Option<Duration>,
    /// Replication lag in bytes or offsets, where reported.
    pub lag_bytes: Option<u64>,
    /// Server version from the last probe.
    pub version: Option<String>,
    /// Round trip of the last good probe.
    #[serde(with = "humantime_serde")]
    pub probe_rtt: Option<Duration>,
    /// The last probe's error, if it failed. Messages name endpoints, never URLs
    /// or credentials.
    pub last_probe_error: Option<String>,
    /// The backend's pool occupancy.
    pub pool: PoolStats,
    /// Checkouts, waits, timeouts, ejections and operation timeouts since the endpoint joined.
    pub counters: CheckoutCounters,
}

impl<B: Backend> Cluster<B> {
    /// A snapshot of every endpoint's state.
    pub fn status(&self) -> ClusterStatus {
        self.shared.apply_reported();
        let snap = self.shared.snapshot.load();
        let now = Instant::now();
        let endpoints = snap
            .endpoints
            .iter()
            .map(|ep| {
                let h = ep.state.health().clone();
                let serves = |set: &crate::topology::Candidates<B>| {
                    set.candidates.iter().any(|c| c.id() == ep.id())
                };
                EndpointStatus {
                    id: ep.id().clone(),
                    role: h.role,
                    source_role: ep.state.designated(),
                    weight: ep.state.load.weight(),
                    health: h.health(),
                    serves_reads: serves(&snap.read),
                    serves_writes: serves(&snap.write),
                    fenced: snap.fenced.contains(ep.id()),
                    history: h.history.as_ref().map(ToString::to_string),
                    in_flight: ep.state.load.in_flight().get(),
                    latency: ep.state.load.latency().estimate(now),
                    ejection: h.ejection.status(now),
                    lag: h.lag,
                    lag_bytes: h.lag_bytes,
                    version: h.version,
                    probe_rtt: h.probe_rtt,
                    last_probe_error: h.last_error,
                    pool: ep.backend.stats(),
                    counters: ep.state.counters.snapshot(),
                }
            })
            .collect();
        ClusterStatus {
            name: self.name().to_owned(),
            engine: self.shared.engine,
            strategy: snap.strategy,
            read_preference: snap.read_preference,
            writer: snap.writer().cloned(),
            split_brain: snap.split_brain.clone(),
            endpoints,
            source: self
                .shared
                .source_cell()
                .as_ref()
                .map(|(cell, _)| cell.status()),
        }
    }
}

impl ClusterStatus {
    /// The status of endpoint `id`, if it is in the cluster.
    pub fn endpoint(&self, id: &str) -> Option<&EndpointStatus> {
        self.endpoints.iter().find(|e| e.id.as_str() == id)
    }
}
