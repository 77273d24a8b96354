//! The cluster: endpoints of one engine, their shared state, and live topology.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use switchyard_core::{Backend, EndpointId, Error, TenantRegistry};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::config::{join_problems, ClusterConfig, EndpointConfig};
use crate::election::Line;
use crate::endpoint::{Endpoint, EndpointState, Inbox};
use crate::metrics::ClusterMetrics;
use crate::prober;
use crate::source::follow::SourceCell;
use crate::topology::Snapshot;
use crate::warming;

/// A cluster of endpoints of one engine, and the router in front of them.
///
/// Cheap to clone: clones share everything. Background tasks (one prober per
/// endpoint, and a warmer per endpoint while warming is on) run until the last
/// clone is dropped or [`close`](Self::close) is called. Checkouts still held
/// then keep their endpoint alive and are returned normally.
pub struct Cluster<B: Backend> {
    pub(crate) shared: Arc<ClusterState<B>>,
    _owner: Arc<DropGuard>,
}

impl<B: Backend> Clone for Cluster<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            _owner: Arc::clone(&self._owner),
        }
    }
}

impl<B: Backend> fmt::Debug for Cluster<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.shared.name)
            .field("endpoints", &self.shared.snapshot.load().endpoints)
            .finish_non_exhaustive()
    }
}

/// What every clone of a [`Cluster`] shares: its configuration, tenants,
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
    pub causal: crate::causal::CausalMetrics,
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

/// Builds a [`Cluster`]: configuration, tenants and the initial endpoints.
pub struct ClusterBuilder<B: Backend> {
    name: String,
    engine: &'static str,
    config: ClusterConfig,
    tenants: TenantRegistry,
    endpoints: Vec<(Arc<B>, EndpointConfig)>,
}

impl<B: Backend> fmt::Debug for ClusterBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("name", &self.name)
            .field("engine", &self.engine)
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> ClusterBuilder<B> {
    /// Replaces the configuration (default: [`ClusterConfig::default`]).
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.config = config;
        self
    }

    /// Names the engine in spans and metric labels (default `"unknown"`).
    pub fn engine(mut self, engine: &'static str) -> Self {
        self.engine = engine;
        self
    }

    /// Sets the tenant registry (default: empty, so every tenant is unknown).
    pub fn tenants(mut self, tenants: TenantRegistry) -> Self {
        self.tenants = tenants;
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, backend: Arc<B>, config: EndpointConfig) -> Self {
        self.endpoints.push((backend, config));
        self
    }

    /// Validates everything and starts the cluster's tasks.
    ///
    /// Fails with [`Error::Config`] listing every problem, or when called
    /// outside a tokio runtime.
    pub fn build(self) -> Result<Cluster<B>, Error> {
        let path = format!("clusters.{}", self.name);
        let mut problems = self.config.validate(&path);
        for (i, (backend, ep)) in self.endpoints.iter().enumerate() {
            problems.extend(ep.validate(&format!("{path}.endpoints[{i}]")));
            let dup = self.endpoints[..i]
                .iter()
                .any(|(b, _)| b.endpoint() == backend.endpoint());
            if dup {
                problems.push(Error::Config {
                    path: format!("{path}.endpoints[{i}]"),
                    message: format!("duplicate endpoint {}", backend.endpoint()),
                });
            }
        }
        if let Err(e) = self.tenants.validate() {
            problems.push(e);
        }
        for (backend, _) in &self.endpoints {
            problems.extend(tier_problems(&**backend, &self.tenants));
        }
        join_problems(&path, problems)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            path: path.clone(),
            message: "a cluster must be built inside a tokio runtime".into(),
        })?;
        let cancel = CancellationToken::new();
        let name: Arc<str> = self.name.into();
        let shared = Arc::new(ClusterState {
            metrics: ClusterMetrics::new(self.engine, &name),
            causal: crate::causal::CausalMetrics::new(self.engine, &name),
            snapshot: ArcSwap::from_pointee(Snapshot::empty(&self.config)),
            topology: Mutex::new(Topology {
                endpoints: Vec::new(),
                last_writer: None,
                writer: None,
                line: None,
                fenced: Vec::new(),
                split_brain: Vec::new(),
            }),
            tenants: ArcSwap::from_pointee(self.tenants),
            changed: Notify::new(),
            generation: watch::Sender::new(0),
            cancel: cancel.clone(),
            engine: self.engine,
            config: Arc::new(ArcSwap::from_pointee(self.config)),
            runtime,
            name,
            source: Mutex::new(None),
            inbox: Arc::default(),
        });
        let cluster = Cluster {
            _owner: Arc::new(cancel.drop_guard()),
            shared,
        };
        let changes = self
            .endpoints
            .into_iter()
            .map(|(backend, ep)| crate::live::EndpointChange::Insert(backend, ep));
        cluster
            .change_endpoints(changes)
            .into_iter()
            .collect::<Result<(), Error>>()?;
        Ok(cluster)
    }
}

impl<B: Backend> Cluster<B> {
    /// Starts building a cluster called `name` (used in errors, logs and metrics).
    pub fn builder(name: impl Into<String>) -> ClusterBuilder<B> {
        ClusterBuilder {
            name: name.into(),
            engine: "unknown",
            config: ClusterConfig::default(),
            tenants: TenantRegistry::new(),
            endpoints: Vec::new(),
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration in force (as built, or as last set with
    /// [`set_config`](Self::set_config) or [`set_strategy`](Self::set_strategy)).
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.shared.config.load_full()
    }

    /// The tenant registry in use.
    pub fn tenants(&self) -> Arc<TenantRegistry> {
        self.shared.tenants.load_full()
    }

    /// The endpoints' ids, in the order they were added.
    pub fn endpoint_ids(&self) -> Vec<EndpointId> {
        self.shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .map(|e| e.id().clone())
            .collect()
    }
}

impl<B: Backend> ClusterState<B> {
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

    /// `backend` with `state`, and its tasks started: the prober (probing at
    /// once, or an interval after `last_probe`) and the warmer when warming is on.
    pub(crate) fn start_endpoint(
        self: &Arc<Self>,
        backend: Arc<B>,
        state: Arc<EndpointState>,
        last_probe: Option<Instant>,
    ) -> Arc<Endpoint<B>> {
        let ep = Arc::new(Endpoint::new(backend, state, self.cancel.child_token()));
        let span =
            tracing::info_span!("switchyard.prober", cluster = %self.name, endpoint = %ep.id());
        self.runtime.spawn(
            prober::run(
                Arc::clone(self),
                Arc::clone(&ep),
                last_probe,
                ep.cancel.clone(),
            )
            .instrument(span),
        );
        if self.config.load().warming.enabled {
            self.set_warmer(&ep, true);
        }
        ep
    }

    /// Starts or stops `ep`'s warmer.
    pub(crate) fn set_warmer(&self, ep: &Arc<Endpoint<B>>, on: bool) {
        let mut slot = ep.warmer();
        match (on, slot.is_some()) {
            (true, false) => {
                let token = ep.cancel.child_token();
                let span = tracing::info_span!("switchyard.warmer", cluster = %self.name, endpoint = %ep.id());
                self.runtime.spawn(
                    warming::run(Arc::clone(ep), Arc::clone(&self.config), token.clone())
                        .instrument(span),
                );
                *slot = Some(token);
            }
            (false, true) => {
                if let Some(token) = slot.take() {
                    token.cancel();
                }
            }
            _ => {}
        }
    }

    /// Stops an endpoint that left the cluster: its tasks end (what its
    /// in-flight checkouts report is ignored, as it is no longer one of the
    /// cluster's endpoints).
    pub(crate) fn retire(ep: &Endpoint<B>) {
        ep.cancel.cancel();
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
            let serving = matches!(ep.state.health().health(), crate::health::Health::Up);
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
