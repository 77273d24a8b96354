//! Live changes to a running cluster: its configuration, tenants and endpoints.
//!
//! Every change is made under the cluster's topology lock and ends in one
//! snapshot rebuild, so a checkout sees the cluster either before or after it,
//! never half-way. Checkouts in flight finish on the endpoint and backend they
//! started on.

use std::sync::Arc;

use switchyard_core::{Backend, EndpointId, Error, TenantRegistry};

use crate::change::EndpointChange;
use crate::cluster::Cluster;
use crate::config::{join_problems, ClusterConfig, EndpointConfig, StrategyKind};
use crate::state::{tier_problems, ClusterState};

impl<B: Backend> Cluster<B> {
    /// Replaces the tenant registry while checkouts run.
    ///
    /// Checkouts already holding a connection keep the quota permit of the old
    /// registry, so for a moment a tenant may hold up to twice its quota.
    pub fn set_tenants(&self, tenants: TenantRegistry) -> Result<(), Error> {
        tenants.validate()?;
        let problems: Vec<Error> = self
            .shared
            .lock()
            .endpoints
            .iter()
            .flat_map(|ep| tier_problems(&*ep.backend, &tenants))
            .collect();
        join_problems(&self.shared.path(), problems)?;
        self.shared.tenants.store(Arc::new(tenants));
        Ok(())
    }

    /// Replaces the whole configuration while traffic flows.
    ///
    /// Validated as [`ClusterBuilder::build`](crate::ClusterBuilder::build)
    /// validates it: an invalid one fails with one [`Error::Config`] naming
    /// every problem with its path, and the running one stays. A valid one
    /// takes effect at once:
    ///
    /// - `strategy`, `read_preference` and `health.max_replica_lag`: the
    ///   routing snapshot is rebuilt with them;
    /// - `checkout_timeout`, `failover_timeout` and `retry`: from the next
    ///   checkout (checkouts under way keep the deadline they started with);
    /// - `health`: every prober is woken and reads the new settings, so a new
    ///   `interval` applies to the probe already scheduled and `timeout`,
    ///   `fall` and `rise` to the next probe. Ejection settings apply to the
    ///   next ejection; one under way keeps its backoff;
    /// - `warming.enabled` starts or stops the warmers; the other warming
    ///   settings apply from each warmer's next step;
    /// - `latency.decay` applies to every endpoint's estimate in place;
    ///   `latency.default_rtt` is a starting value, so it applies to endpoints
    ///   added (or re-pointed) afterwards.
    pub fn set_config(&self, config: ClusterConfig) -> Result<(), Error> {
        let shared = &self.shared;
        let path = shared.path();
        join_problems(&path, config.validate(&path))?;
        let mut topo = shared.lock();
        shared.check_open()?;
        let warming = config.warming.enabled;
        let decay = config.latency.decay;
        shared.config.store(Arc::new(config));
        for ep in &topo.endpoints {
            ep.state.load.latency().set_decay(decay);
            shared.set_warmer(ep, warming);
            ep.state.wake.notify_one();
        }
        tracing::info!(cluster = %shared.name, "configuration replaced");
        shared.rebuild(&mut topo, "configuration changed");
        Ok(())
    }

    /// Switches the balancing strategy while traffic flows.
    pub fn set_strategy(&self, strategy: StrategyKind) {
        let shared = &self.shared;
        let mut topo = shared.lock();
        let mut next = ClusterConfig::clone(&shared.config.load());
        next.strategy = strategy;
        shared.config.store(Arc::new(next));
        shared.rebuild(&mut topo, "strategy changed");
    }

    /// Applies `changes` to the endpoints in order, in one step: one lock, one
    /// routing rebuild, so a checkout sees the cluster either before or after
    /// all of them (as tower's balancer consumes `discover::Change`s). Returns
    /// each change's result; a change that fails leaves the others applied.
    pub fn change_endpoints(
        &self,
        changes: impl IntoIterator<Item = EndpointChange<B>>,
    ) -> Vec<Result<(), Error>> {
        self.shared.change_endpoints(changes)
    }

    fn change_one(&self, change: EndpointChange<B>) -> Result<(), Error> {
        self.change_endpoints([change])
            .pop()
            .unwrap_or(Err(Error::Closed))
    }

    /// Adds an endpoint while traffic flows; its prober starts at once.
    pub fn add_endpoint(&self, backend: Arc<B>, config: EndpointConfig) -> Result<(), Error> {
        self.change_one(EndpointChange::Insert(backend, config))
    }

    /// Removes an endpoint: no new checkouts go to it and its tasks stop;
    /// checkouts in flight finish normally. Returns whether it was there.
    pub fn remove_endpoint(&self, id: &EndpointId) -> bool {
        self.change_one(EndpointChange::Remove(id.clone())).is_ok()
    }

    /// Replaces the endpoint with `backend`'s id by a new one, in one routing
    /// change: there is no moment without it, so re-pointing the primary never
    /// leaves writes without a writer.
    ///
    /// The new endpoint starts afresh, as [`add_endpoint`](Self::add_endpoint)
    /// starts one: assumed up in `config.role`, probed at once, with new
    /// counters and latency estimate. Use it when the endpoint now points
    /// somewhere else (a new URL or role); when only the pool in front of the
    /// same server changed, [`replace_backend`](Self::replace_backend) keeps
    /// what is known about it. Checkouts in flight on the old backend finish
    /// normally, and the old endpoint's tasks stop.
    ///
    /// Fails with [`Error::Config`] when there is no such endpoint or `config`
    /// is invalid.
    pub fn replace_endpoint(&self, backend: Arc<B>, config: EndpointConfig) -> Result<(), Error> {
        self.change_one(EndpointChange::Replace(backend, config))
    }

    /// Puts `backend` in front of the endpoint with the same id, keeping
    /// everything the router knows about the endpoint: health (up or down,
    /// role, lag, ejection), weight, load, latency estimate and counters. It
    /// serves at once, and its next probe comes an interval after the last.
    ///
    /// For a backend reaching the same server with other pool settings; when
    /// the endpoint points somewhere else, use
    /// [`replace_endpoint`](Self::replace_endpoint). Checkouts in flight on the
    /// old backend finish normally (and still count against the endpoint's
    /// load), and the old backend's tasks stop.
    ///
    /// Fails with [`Error::Config`] when there is no such endpoint.
    pub fn replace_backend(&self, backend: Arc<B>) -> Result<(), Error> {
        self.change_one(EndpointChange::ReplaceBackend(backend))
    }

    /// Changes an endpoint's weight (1 to [`MAX_WEIGHT`](crate::config::MAX_WEIGHT)).
    pub fn set_weight(&self, id: &EndpointId, weight: u32) -> Result<(), Error> {
        self.change_one(EndpointChange::Reweight(id.clone(), weight))
    }

    /// Stops the cluster for every clone: its probers and warmers end, its
    /// endpoints leave, and checkouts fail with [`Error::Closed`] from now on
    /// (writes waiting for a primary at once). Checkouts in flight finish
    /// normally. Idempotent; a closed cluster cannot be reopened.
    ///
    /// Dropping the last clone stops the tasks too; `close` is for a cluster
    /// that must stop while clones are still held, e.g. one removed from the
    /// configuration.
    pub fn close(&self) {
        let shared = &self.shared;
        let mut topo = shared.lock();
        if shared.cancel.is_cancelled() {
            return;
        }
        shared.cancel.cancel();
        for ep in topo.endpoints.drain(..) {
            ClusterState::retire(&ep);
        }
        tracing::info!(cluster = %shared.name, "cluster closed");
        shared.rebuild(&mut topo, "cluster closed");
    }

    /// Whether [`close`](Self::close) ran.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }
}
