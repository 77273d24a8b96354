//! What every clone of a cluster shares, and the routing rebuild.
//!
//! The face ([`Cluster`](crate::Cluster) and its builder) holds this state;
//! the machinery that changes it (health in `apply`, the prober, endpoint
//! changes, the topology source's follower) imports the state, never the
//! face, as bb8 keeps `PoolInner` below `Pool`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use switchyard_core::{Backend, EndpointId, Error, TenantRegistry};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{join_problems, ClusterConfig, EndpointConfig};
use crate::election::Line;
use crate::endpoint::{Endpoint, EndpointState, Inbox};
use crate::health::Health;
use crate::metrics::{CausalMetrics, ClusterMetrics};
use crate::source::SourceCell;
use crate::topology::Snapshot;

/// What every clone of a [`Cluster`](crate::Cluster) shares: its configuration, tenants,
/// routing snapshot and topology, and the handles of its tasks.
pub(crate) struct ClusterState<B: Backend> {
    pub name: Arc<str>,
    pub engine: &'static str,
    /// The configuration in force; replaced whole by `set_config` and
    /// `set_strategy` (under the topology lock), read by every checkout once
    /// and by the probers and warmers every round.
    pub config: Arc<ArcSwap<ClusterConfig>>,
    pub tenants: ArcSwap<TenantRegistry>,
    pub snapshot: ArcSwap<Snapshot<B>>,
    topology: Mutex<Topology<B>>,
    /// Woken after every rebuild: writes waiting for a primary re-check.
    pub changed: Notify,
    /// Bumped after every rebuild, for `poll_ready`.
    pub generation: watch::Sender<u64>,
    pub cancel: CancellationToken,
    pub runtime: tokio::runtime::Handle,
    pub metrics: ClusterMetrics,
    /// Causal reads' series and counts.
    pub causal: CausalMetrics,
    /// The topology source being followed, if any, and its task's token.
    source: Mutex<Option<(SourceCell, CancellationToken)>>,
    /// Failures the endpoints' dropped checkouts reported, not yet applied.
    pub inbox: Arc<Inbox>,
}

pub(crate) struct Topology<B: Backend> {
    pub endpoints: Vec<Arc<Endpoint<B>>>,
    /// The last endpoint writes went to, to count and log failovers.
    last_writer: Option<EndpointId>,
    writer: Option<EndpointId>,
    /// The line writes follow (see [`crate::election`]); kept while no
    /// primary is up, so the next one is judged against it.
    pub line: Option<Line>,
    /// Fenced primaries and split-brain primaries of the last rebuild, to log
    /// changes.
    pub fenced: Vec<EndpointId>,
    split_brain: Vec<EndpointId>,
}

impl<B: Backend> ClusterState<B> {
    /// A cluster's state with no endpoints yet, its tasks under `cancel`.
    pub(crate) fn new(
        name: Arc<str>,
        engine: &'static str,
        config: ClusterConfig,
        tenants: TenantRegistry,
        runtime: tokio::runtime::Handle,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            metrics: ClusterMetrics::new(engine, &name),
            causal: CausalMetrics::new(engine, &name),
            snapshot: ArcSwap::from_pointee(Snapshot::empty(&config)),
            topology: Mutex::new(Topology {
                endpoints: Vec::new(),
                last_writer: None,
                writer: None,
                line: None,
                fenced: Vec::new(),
                split_brain: Vec::new(),
            }),
            tenants: ArcSwap::from_pointee(tenants),
            changed: Notify::new(),
            generation: watch::Sender::new(0),
            cancel,
            engine,
            config: Arc::new(ArcSwap::from_pointee(config)),
            runtime,
            name,
            source: Mutex::new(None),
            inbox: Arc::default(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Topology<B>> {
        self.topology.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The topology source's record; taken after the topology lock, never before.
    pub(crate) fn source_cell(&self) -> MutexGuard<'_, Option<(SourceCell, CancellationToken)>> {
        self.source.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `clusters.<name>`, the root of this cluster's configuration paths.
    pub(crate) fn path(&self) -> String {
        format!("clusters.{}", self.name)
    }

    /// [`Error::Closed`] once [`Cluster::close`] ran.
    pub(crate) fn check_open(&self) -> Result<(), Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Validates an endpoint's settings under its path.
    pub(crate) fn check_endpoint(&self, backend: &B, config: &EndpointConfig) -> Result<(), Error> {
        let id = backend.endpoint();
        let mut problems = config.validate(&format!("{}.endpoints.{id}", self.path()));
        problems.extend(tier_problems(backend, &self.tenants.load()));
        join_problems(&self.path(), problems)
    }

    /// Every tier of the current registry that `backend` refuses
    /// ([`Backend::validate_tier`]), as one config error.
    pub(crate) fn check_tiers(&self, backend: &B, tenants: &TenantRegistry) -> Result<(), Error> {
        join_problems(&self.path(), tier_problems(backend, tenants))
    }

    /// The position of endpoint `id`, or a config error naming it.
    pub(crate) fn position(&self, topo: &Topology<B>, id: &EndpointId) -> Result<usize, Error> {
        topo.endpoints
            .iter()
            .position(|e| e.id() == id)
            .ok_or_else(|| Error::Config {
                path: format!("{}.endpoints", self.path()),
                message: format!("no endpoint {id}"),
            })
    }

    /// A new endpoint's state: assumed up in its configured role.
    pub(crate) fn fresh_state(
        &self,
        id: &EndpointId,
        config: &EndpointConfig,
    ) -> Arc<EndpointState> {
        Arc::new(EndpointState::new(
            id.clone(),
            &self.name,
            self.engine,
            config,
            &self.config.load(),
            Arc::clone(&self.inbox),
        ))
    }

    /// Publishes a new snapshot. Called with the topology lock held, after every
    /// change to anything routing depends on.
    pub(crate) fn rebuild(&self, topo: &mut Topology<B>, reason: &str) {
        let config = self.config.load();
        let snap = Snapshot::build(topo.endpoints.clone(), &config, &mut topo.line);
        self.log_fencing(topo, &snap);
        let writer = snap.writer().cloned();
        if writer != topo.writer {
            match (&topo.last_writer, &writer) {
                (Some(old), Some(new)) if old != new => {
                    self.metrics.failovers.increment(1);
                    tracing::warn!(cluster = %self.name, from = %old, to = %new, "failover: writes move from {old} to {new}");
                }
                (_, Some(new)) => {
                    tracing::info!(cluster = %self.name, endpoint = %new, "writes go to {new}")
                }
                (_, None) if self.cancel.is_cancelled() => {}
                (_, None) => tracing::warn!(
                    cluster = %self.name,
                    failover_timeout = ?config.failover_timeout,
                    "no writable endpoint: writes wait for a primary"
                ),
            }
            if writer.is_some() {
                topo.last_writer.clone_from(&writer);
            }
            topo.writer = writer;
        }
        for ep in &snap.endpoints {
            let serving = matches!(ep.state.health().health(), Health::Up);
            ep.state.metrics.up.set(if serving { 1.0 } else { 0.0 });
        }
        self.snapshot.store(Arc::new(snap));
        self.changed.notify_waiters();
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        tracing::debug!(cluster = %self.name, reason, "routing snapshot rebuilt");
    }

    /// Logs and counts primaries fenced or released and split brains begun or
    /// ended by a rebuild: what an operator is paged for.
    fn log_fencing(&self, topo: &mut Topology<B>, snap: &Snapshot<B>) {
        let line = topo.line.as_ref();
        let history = |id: &EndpointId| {
            snap.endpoints
                .iter()
                .find(|e| e.id() == id)
                .and_then(|e| e.state.health().history.as_ref().map(ToString::to_string))
                .unwrap_or_else(|| "no history".into())
        };
        for ep in &snap.endpoints {
            let fenced = snap.fenced.contains(ep.id());
            if fenced == topo.fenced.contains(ep.id()) {
                continue;
            }
            ep.state.metrics.fenced.set(if fenced { 1.0 } else { 0.0 });
            if fenced {
                ep.state.metrics.fencings.increment(1);
                tracing::warn!(
                    cluster = %self.name,
                    endpoint = %ep.id(),
                    history = %history(ep.id()),
                    line = ?line.map(|l| l.writer.as_str()),
                    "primary FENCED: it is behind or off the line writes follow; it gets no writes and no reads until it is demoted or Cluster::unfence names it"
                );
            } else {
                tracing::info!(cluster = %self.name, endpoint = %ep.id(), "endpoint no longer fenced");
            }
        }
        if snap.split_brain != topo.split_brain {
            self.metrics
                .split_brain
                .set(if snap.split_brain.is_empty() {
                    0.0
                } else {
                    1.0
                });
            if snap.split_brain.is_empty() {
                tracing::info!(cluster = %self.name, "split brain over: writes accepted again");
            } else {
                let primaries: Vec<String> = snap
                    .split_brain
                    .iter()
                    .map(|id| format!("{id} ({})", history(id)))
                    .collect();
                tracing::error!(
                    cluster = %self.name,
                    ?primaries,
                    "SPLIT BRAIN: several primaries whose histories cannot be ordered; writes refused until all but one are demoted or Cluster::unfence names the one to trust"
                );
            }
        }
        topo.fenced.clone_from(&snap.fenced);
        topo.split_brain.clone_from(&snap.split_brain);
    }
}

/// Every tier of `tenants` that `backend` refuses (see
/// [`Backend::validate_tier`]), so a tier an engine cannot serve fails when the
/// cluster is built or its tenants replaced, not at the first checkout.
pub(crate) fn tier_problems<B: Backend>(backend: &B, tenants: &TenantRegistry) -> Vec<Error> {
    tenants.check_tiers(|name, tier| backend.validate_tier(name, tier))
}
