//! The cluster: endpoints of one engine, their shared state, and live topology.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use switchyard_core::{Backend, EndpointId, Error, Probe, TenantRegistry};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::config::{join_problems, ClusterConfig, EndpointConfig};
use crate::election::Line;
use crate::endpoint::{ClusterHooks, Endpoint, EndpointState};
use crate::health::ejection::{ejection_cap, Phase};
use crate::health::{prober, Who};
use crate::metrics::ClusterMetrics;
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
    pub(crate) shared: Arc<Shared<B>>,
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

pub(crate) struct Shared<B: Backend> {
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
    fenced: Vec<EndpointId>,
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
        let shared = Arc::new(Shared {
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
        });
        let cluster = Cluster {
            _owner: Arc::new(cancel.drop_guard()),
            shared,
        };
        for (backend, ep) in self.endpoints {
            cluster.shared.add(backend, ep)?;
        }
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

impl<B: Backend> Shared<B> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Topology<B>> {
        self.topology.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The topology source's record; taken after the topology lock, never before.
    pub(crate) fn source_cell(&self) -> MutexGuard<'_, Option<(SourceCell, CancellationToken)>> {
        self.source.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn who<'a>(&'a self, ep: &'a EndpointState) -> Who<'a> {
        Who {
            cluster: &self.name,
            endpoint: &ep.id,
        }
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

    pub(crate) fn add(
        self: &Arc<Self>,
        backend: Arc<B>,
        config: EndpointConfig,
    ) -> Result<(), Error> {
        let id = backend.endpoint().clone();
        self.check_endpoint(&backend, &config)?;
        let mut topo = self.lock();
        self.check_open()?;
        if topo.endpoints.iter().any(|e| e.id() == &id) {
            return Err(Error::Config {
                path: format!("{}.endpoints", self.path()),
                message: format!("duplicate endpoint {id}"),
            });
        }
        let ep = self.start_endpoint(backend, self.fresh_state(&id, &config), None);
        topo.endpoints.push(ep);
        tracing::info!(cluster = %self.name, endpoint = %id, role = %config.role, weight = config.weight, "endpoint added");
        self.rebuild(&mut topo, "endpoint added");
        Ok(())
    }

    /// A new endpoint's state: assumed up in its configured role.
    pub(crate) fn fresh_state(
        self: &Arc<Self>,
        id: &EndpointId,
        config: &EndpointConfig,
    ) -> Arc<EndpointState> {
        let weak: std::sync::Weak<Self> = Arc::downgrade(self);
        let hooks: std::sync::Weak<dyn ClusterHooks> = weak;
        Arc::new(EndpointState::new(
            id.clone(),
            &self.name,
            self.engine,
            config,
            &self.config.load(),
            hooks,
        ))
    }

    /// `backend` with `state`, and its tasks started: the prober (probing at
    /// once, or an interval after `last_probe`) and the warmer when warming is on.
    pub(crate) fn start_endpoint(
        &self,
        backend: Arc<B>,
        state: Arc<EndpointState>,
        last_probe: Option<Instant>,
    ) -> Arc<Endpoint<B>> {
        let ep = Arc::new(Endpoint::new(backend, state, self.cancel.child_token()));
        let span =
            tracing::info_span!("switchyard.prober", cluster = %self.name, endpoint = %ep.id());
        self.runtime.spawn(
            prober::run(
                Arc::clone(&ep),
                Arc::clone(&self.config),
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

    /// Stops an endpoint that left the cluster: its tasks end, and its state
    /// ignores what in-flight checkouts report from now on.
    pub(crate) fn retire(ep: &Endpoint<B>) {
        ep.state.removed.store(true, Ordering::Release);
        ep.cancel.cancel();
        ep.state.links.set(Vec::new());
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
            h.up && h.role == switchyard_core::Role::Primary && !fenced
        };
        topo.endpoints.iter().all(|e| {
            if std::ptr::eq(Arc::as_ptr(&e.state), ep) {
                primary(e)
            } else {
                !primary(e)
            }
        })
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
            .filter(|e| !std::ptr::eq(Arc::as_ptr(&e.state), ep))
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

impl<B: Backend> ClusterHooks for Shared<B> {
    fn endpoint_failed(&self, ep: &EndpointState, reason: &str) {
        let mut topo = self.lock();
        let config = self.config.load();
        let phase = ep.health().ejection.phase;
        match phase {
            Phase::Ejected { .. } => return,
            Phase::Admitted => {
                if let Some(why) =
                    self.ejection_refused(&topo, ep, config.health.max_ejected_percent)
                {
                    ep.metrics.ejections_capped.increment(1);
                    tracing::warn!(cluster = %self.name, endpoint = %ep.id, reason, "not ejecting endpoint: {why}");
                    return;
                }
            }
            Phase::HalfOpen => {}
        }
        let now = Instant::now();
        let backoff = ep.health().ejection.eject(&config.health, now);
        ep.half_open.store(false, Ordering::Release);
        ep.release_trial();
        ep.metrics.ejections.increment(1);
        ep.counters.ejected();
        if phase == Phase::HalfOpen {
            tracing::warn!(cluster = %self.name, endpoint = %ep.id, ?backoff, reason, "half-open trial failed: endpoint ejected again for {backoff:?}");
        } else {
            tracing::warn!(cluster = %self.name, endpoint = %ep.id, ?backoff, reason, "endpoint ejected for {backoff:?} after a failed checkout");
        }
        ep.wake.notify_one();
        self.rebuild(&mut topo, "endpoint ejected");
    }

    fn trial_passed(&self, ep: &EndpointState) {
        let mut topo = self.lock();
        if ep.removed.load(Ordering::Acquire) || !ep.health().ejection.readmit(Instant::now()) {
            return;
        }
        ep.half_open.store(false, Ordering::Release);
        ep.release_trial();
        tracing::info!(cluster = %self.name, endpoint = %ep.id, "endpoint re-admitted after a successful trial checkout");
        self.rebuild(&mut topo, "endpoint re-admitted");
    }

    fn probed(&self, ep: &EndpointState, result: Result<Probe, Error>) {
        let mut topo = self.lock();
        if ep.removed.load(Ordering::Acquire) {
            return;
        }
        let config = self.config.load();
        let cfg = &config.health;
        let now = Instant::now();
        let slow_only_primary = match &result {
            Err(Error::ProbeTimeout { elapsed, .. }) if Self::only_primary(&topo, ep) => {
                Some(*elapsed)
            }
            _ => None,
        };
        let at = now + cfg.interval;
        let changed = {
            let mut h = ep.health();
            match result {
                Ok(probe) => {
                    ep.metrics.probe_rtt.record(probe.rtt);
                    if let Some(lag) = probe.lag {
                        ep.metrics.lag.set(lag.as_secs_f64());
                    }
                    ep.ewma.observe(probe.rtt);
                    h.probe_passed(probe, cfg, &self.who(ep), now);
                }
                Err(error) => {
                    ep.metrics.probe_failures.increment(1);
                    match slow_only_primary {
                        Some(elapsed) => {
                            // Slow, as far as anyone can tell: the latency
                            // estimate learns it, routing does not drop it.
                            ep.ewma.observe(elapsed);
                            h.probe_slow(&error, &self.who(ep), now);
                        }
                        None => h.probe_failed(&error, cfg, &self.who(ep), now),
                    }
                }
            }
            h.reroute(cfg, at)
        };
        if changed {
            self.rebuild(&mut topo, "probe changed routing");
        }
    }

    fn ejection_expired(&self, ep: &EndpointState) {
        let mut topo = self.lock();
        if ep.removed.load(Ordering::Acquire) || !ep.health().ejection.expire(Instant::now()) {
            return;
        }
        ep.release_trial();
        ep.half_open.store(true, Ordering::Release);
        tracing::info!(cluster = %self.name, endpoint = %ep.id, "ejection over: endpoint half-open, the next checkout is a trial");
        self.rebuild(&mut topo, "endpoint half-open");
    }
}

/// Every tier of `tenants` that `backend` refuses (see
/// [`Backend::validate_tier`]), so a tier an engine cannot serve fails when the
/// cluster is built or its tenants replaced, not at the first checkout.
pub(crate) fn tier_problems<B: Backend>(backend: &B, tenants: &TenantRegistry) -> Vec<Error> {
    tenants.check_tiers(|name, tier| backend.validate_tier(name, tier))
}
