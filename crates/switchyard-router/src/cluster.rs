//! The cluster: endpoints of one engine, their shared state, and live topology.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use switchyard_core::{Backend, EndpointId, Error, Probe, TenantRegistry};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::config::{self, join_problems, ClusterConfig, EndpointConfig, StrategyKind};
use crate::endpoint::{ClusterHooks, Endpoint, EndpointState};
use crate::health::ejection::{ejection_cap, Phase};
use crate::health::{prober, Who};
use crate::metrics::ClusterMetrics;
use crate::topology::Snapshot;
use crate::warming;

/// A cluster of endpoints of one engine, and the router in front of them.
///
/// Cheap to clone: clones share everything. Background tasks (one prober per
/// endpoint, and a warmer per endpoint when warming is on) run until the last
/// clone is dropped. Checkouts still held then keep their endpoint alive and
/// are returned normally.
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
    pub config: ClusterConfig,
    pub tenants: ArcSwap<TenantRegistry>,
    pub snapshot: ArcSwap<Snapshot<B>>,
    topology: Mutex<Topology<B>>,
    /// Woken after every rebuild: writes waiting for a primary re-check.
    pub changed: Notify,
    /// Bumped after every rebuild, for `poll_ready`.
    pub generation: watch::Sender<u64>,
    pub cancel: CancellationToken,
    runtime: tokio::runtime::Handle,
    pub metrics: ClusterMetrics,
}

struct Topology<B: Backend> {
    endpoints: Vec<Arc<Endpoint<B>>>,
    strategy: StrategyKind,
    /// The last endpoint writes went to, to count and log failovers.
    last_writer: Option<EndpointId>,
    writer: Option<EndpointId>,
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
        join_problems(&path, problems)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            path: path.clone(),
            message: "a cluster must be built inside a tokio runtime".into(),
        })?;
        let cancel = CancellationToken::new();
        let name: Arc<str> = self.name.into();
        let shared = Arc::new(Shared {
            metrics: ClusterMetrics::new(self.engine, &name),
            snapshot: ArcSwap::from_pointee(Snapshot::empty(
                self.config.strategy,
                self.config.read_preference,
            )),
            topology: Mutex::new(Topology {
                endpoints: Vec::new(),
                strategy: self.config.strategy,
                last_writer: None,
                writer: None,
            }),
            tenants: ArcSwap::from_pointee(self.tenants),
            changed: Notify::new(),
            generation: watch::Sender::new(0),
            cancel: cancel.clone(),
            engine: self.engine,
            config: self.config,
            runtime,
            name,
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

    /// The configuration it was built with.
    pub fn config(&self) -> &ClusterConfig {
        &self.shared.config
    }

    /// The tenant registry in use.
    pub fn tenants(&self) -> Arc<TenantRegistry> {
        self.shared.tenants.load_full()
    }

    /// Replaces the tenant registry while checkouts run.
    ///
    /// Checkouts already holding a connection keep the quota permit of the old
    /// registry, so for a moment a tenant may hold up to twice its quota.
    pub fn set_tenants(&self, tenants: TenantRegistry) -> Result<(), Error> {
        tenants.validate()?;
        self.shared.tenants.store(Arc::new(tenants));
        Ok(())
    }

    /// Adds an endpoint while traffic flows; its prober starts at once.
    pub fn add_endpoint(&self, backend: Arc<B>, config: EndpointConfig) -> Result<(), Error> {
        self.shared.add(backend, config)
    }

    /// Removes an endpoint: no new checkouts go to it and its tasks stop;
    /// checkouts in flight finish normally. Returns whether it was there.
    pub fn remove_endpoint(&self, id: &EndpointId) -> bool {
        let shared = &self.shared;
        let mut topo = shared.lock();
        let Some(pos) = topo.endpoints.iter().position(|e| e.id() == id) else {
            return false;
        };
        let ep = topo.endpoints.remove(pos);
        ep.state
            .removed
            .store(true, std::sync::atomic::Ordering::Release);
        ep.cancel.cancel();
        ep.state.links.set(Vec::new());
        tracing::info!(cluster = %shared.name, endpoint = %id, "endpoint removed");
        shared.rebuild(&mut topo, "endpoint removed");
        true
    }

    /// Changes an endpoint's weight (1 to [`MAX_WEIGHT`](config::MAX_WEIGHT)).
    pub fn set_weight(&self, id: &EndpointId, weight: u32) -> Result<(), Error> {
        let mut problems = Vec::new();
        config::check_weight(
            weight,
            &format!("clusters.{}.endpoints.{id}.weight", self.name()),
            &mut problems,
        );
        join_problems(&format!("clusters.{}", self.name()), problems)?;
        let mut topo = self.shared.lock();
        let ep = topo
            .endpoints
            .iter()
            .find(|e| e.id() == id)
            .ok_or_else(|| Error::Config {
                path: format!("clusters.{}.endpoints", self.name()),
                message: format!("no endpoint {id}"),
            })?;
        ep.state.set_weight(weight);
        self.shared.rebuild(&mut topo, "weight changed");
        Ok(())
    }

    /// Switches the balancing strategy while traffic flows.
    pub fn set_strategy(&self, strategy: StrategyKind) {
        let mut topo = self.shared.lock();
        topo.strategy = strategy;
        self.shared.rebuild(&mut topo, "strategy changed");
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
    fn lock(&self) -> MutexGuard<'_, Topology<B>> {
        self.topology.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn who<'a>(&'a self, ep: &'a EndpointState) -> Who<'a> {
        Who {
            cluster: &self.name,
            endpoint: &ep.id,
        }
    }

    fn add(self: &Arc<Self>, backend: Arc<B>, config: EndpointConfig) -> Result<(), Error> {
        let id = backend.endpoint().clone();
        join_problems(
            &format!("clusters.{}", self.name),
            config.validate(&format!("clusters.{}.endpoints.{id}", self.name)),
        )?;
        let mut topo = self.lock();
        if topo.endpoints.iter().any(|e| e.id() == &id) {
            return Err(Error::Config {
                path: format!("clusters.{}.endpoints", self.name),
                message: format!("duplicate endpoint {id}"),
            });
        }
        let weak: std::sync::Weak<Self> = Arc::downgrade(self);
        let hooks: std::sync::Weak<dyn ClusterHooks> = weak;
        let state = EndpointState::new(
            id.clone(),
            &self.name,
            self.engine,
            &config,
            &self.config,
            hooks,
        );
        let ep = Arc::new(Endpoint::new(backend, state, self.cancel.child_token()));
        let span = tracing::info_span!("switchyard.prober", cluster = %self.name, endpoint = %id);
        self.runtime.spawn(
            prober::run(
                Arc::clone(&ep),
                self.config.health.clone(),
                ep.cancel.clone(),
            )
            .instrument(span),
        );
        if self.config.warming.enabled {
            let span =
                tracing::info_span!("switchyard.warmer", cluster = %self.name, endpoint = %id);
            self.runtime.spawn(
                warming::run(
                    Arc::clone(&ep),
                    self.config.warming.clone(),
                    self.config.health.timeout,
                    ep.cancel.clone(),
                )
                .instrument(span),
            );
        }
        topo.endpoints.push(ep);
        tracing::info!(cluster = %self.name, endpoint = %id, role = %config.role, weight = config.weight, "endpoint added");
        self.rebuild(&mut topo, "endpoint added");
        Ok(())
    }

    /// Publishes a new snapshot. Called with the topology lock held, after every
    /// change to anything routing depends on.
    fn rebuild(&self, topo: &mut Topology<B>, reason: &str) {
        let snap = Snapshot::build(topo.endpoints.clone(), topo.strategy, &self.config);
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
                (_, None) => tracing::warn!(
                    cluster = %self.name,
                    failover_timeout = ?self.config.failover_timeout,
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

    /// Whether ejecting `ep` would break the cap or leave writes nowhere to go.
    fn ejection_refused(&self, topo: &Topology<B>, ep: &EndpointState) -> Option<String> {
        let out = topo
            .endpoints
            .iter()
            .filter(|e| !std::ptr::eq(Arc::as_ptr(&e.state), ep))
            .filter(|e| e.state.health().ejection.is_out())
            .count();
        let cap = ejection_cap(topo.endpoints.len(), self.config.health.max_ejected_percent);
        if out >= cap {
            return Some(format!(
                "{out} of {} endpoints already ejected (max_ejected_percent {})",
                topo.endpoints.len(),
                self.config.health.max_ejected_percent
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
        let phase = ep.health().ejection.phase;
        match phase {
            Phase::Ejected { .. } => return,
            Phase::Admitted => {
                if let Some(why) = self.ejection_refused(&topo, ep) {
                    ep.metrics.ejections_capped.increment(1);
                    tracing::warn!(cluster = %self.name, endpoint = %ep.id, reason, "not ejecting endpoint: {why}");
                    return;
                }
            }
            Phase::HalfOpen => {}
        }
        let now = Instant::now();
        let backoff = ep.health().ejection.eject(&self.config.health, now);
        ep.half_open
            .store(false, std::sync::atomic::Ordering::Release);
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
        if ep.removed.load(std::sync::atomic::Ordering::Acquire)
            || !ep.health().ejection.readmit(Instant::now())
        {
            return;
        }
        ep.half_open
            .store(false, std::sync::atomic::Ordering::Release);
        ep.release_trial();
        tracing::info!(cluster = %self.name, endpoint = %ep.id, "endpoint re-admitted after a successful trial checkout");
        self.rebuild(&mut topo, "endpoint re-admitted");
    }

    fn probed(&self, ep: &EndpointState, result: Result<Probe, Error>) {
        let mut topo = self.lock();
        if ep.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let cfg = &self.config.health;
        let now = Instant::now();
        let changed = {
            let mut h = ep.health();
            let before = h.routing_key(cfg);
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
                    h.probe_failed(&error, cfg, &self.who(ep), now);
                }
            }
            before != h.routing_key(cfg)
        };
        if changed {
            self.rebuild(&mut topo, "probe changed routing");
        }
    }

    fn ejection_expired(&self, ep: &EndpointState) {
        let mut topo = self.lock();
        if ep.removed.load(std::sync::atomic::Ordering::Acquire)
            || !ep.health().ejection.expire(Instant::now())
        {
            return;
        }
        ep.release_trial();
        ep.half_open
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(cluster = %self.name, endpoint = %ep.id, "ejection over: endpoint half-open, the next checkout is a trial");
        self.rebuild(&mut topo, "endpoint half-open");
    }
}
