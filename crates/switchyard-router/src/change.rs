//! Endpoint changes as data ([`EndpointChange`]), applied to the cluster's
//! state in one place, and the tasks an endpoint runs while it is one of the
//! cluster's (its prober, and its warmer while warming is on).
//!
//! A change list is applied under one lock and ends in one routing rebuild,
//! as tower's balancer consumes `discover::Change::{Insert, Remove}` in one
//! loop (`tower/src/balance/p2c/service.rs`).

use std::sync::Arc;

use switchyard_core::{Backend, EndpointId, Error, Role};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{self, join_problems, EndpointConfig};
use crate::endpoint::{Endpoint, EndpointState};
use crate::state::{ClusterState, Topology};
use crate::{prober, warming};

/// One change to a cluster's endpoints, for
/// [`Cluster::change_endpoints`](crate::Cluster::change_endpoints).
#[derive(Debug)]
#[non_exhaustive]
pub enum EndpointChange<B: Backend> {
    /// A new endpoint ([`Cluster::add_endpoint`](crate::Cluster::add_endpoint)).
    Insert(Arc<B>, EndpointConfig),
    /// The endpoint with the backend's id, started afresh
    /// ([`Cluster::replace_endpoint`](crate::Cluster::replace_endpoint)).
    Replace(Arc<B>, EndpointConfig),
    /// A new backend in front of the same server, keeping what the router
    /// knows ([`Cluster::replace_backend`](crate::Cluster::replace_backend)).
    ReplaceBackend(Arc<B>),
    /// A new weight ([`Cluster::set_weight`](crate::Cluster::set_weight)).
    Reweight(EndpointId, u32),
    /// The role a topology source gives the endpoint, as
    /// [`Cluster::follow`](crate::Cluster::follow) applies it: writes go only to
    /// the designated primary, once it probes as primary (see
    /// [`source`](crate::source)). An endpoint whose designation changes is
    /// probed at once.
    Designate(EndpointId, Role),
    /// The endpoint leaves ([`Cluster::remove_endpoint`](crate::Cluster::remove_endpoint)).
    Remove(EndpointId),
}

impl<B: Backend> ClusterState<B> {
    /// Applies `changes` in order under one lock, with one routing rebuild
    /// when any of them took; returns each change's result.
    pub(crate) fn change_endpoints(
        self: &Arc<Self>,
        changes: impl IntoIterator<Item = EndpointChange<B>>,
    ) -> Vec<Result<(), Error>> {
        self.apply_changes(&mut self.lock(), changes)
    }

    /// [`change_endpoints`](Self::change_endpoints) under the lock `topo`
    /// holds, for a caller that decided the changes under it.
    pub(crate) fn apply_changes(
        self: &Arc<Self>,
        topo: &mut Topology<B>,
        changes: impl IntoIterator<Item = EndpointChange<B>>,
    ) -> Vec<Result<(), Error>> {
        let results: Vec<_> = changes
            .into_iter()
            .map(|change| self.change(topo, change))
            .collect();
        if results.iter().any(Result::is_ok) {
            self.rebuild(topo, "endpoints changed");
        }
        results
    }

    /// Applies one change under the topology lock, without the rebuild.
    fn change(
        self: &Arc<Self>,
        topo: &mut Topology<B>,
        change: EndpointChange<B>,
    ) -> Result<(), Error> {
        let name = &self.name;
        match change {
            EndpointChange::Insert(backend, config) => {
                let id = backend.endpoint().clone();
                self.check_endpoint(&backend, &config)?;
                self.check_open()?;
                if topo.endpoints.iter().any(|e| e.id() == &id) {
                    return Err(Error::Config {
                        path: format!("{}.endpoints", self.path()),
                        message: format!("duplicate endpoint {id}"),
                    });
                }
                let ep = self.start_endpoint(backend, self.fresh_state(&id, &config), None);
                topo.endpoints.push(ep);
                tracing::info!(cluster = %name, endpoint = %id, role = %config.role, weight = config.weight, "endpoint added");
            }
            EndpointChange::Replace(backend, config) => {
                let id = backend.endpoint().clone();
                self.check_endpoint(&backend, &config)?;
                self.check_open()?;
                let pos = self.position(topo, &id)?;
                let ep = self.start_endpoint(backend, self.fresh_state(&id, &config), None);
                let old = std::mem::replace(&mut topo.endpoints[pos], ep);
                ClusterState::retire(&old);
                tracing::info!(cluster = %name, endpoint = %id, role = %config.role, weight = config.weight, "endpoint replaced");
            }
            EndpointChange::ReplaceBackend(backend) => {
                let id = backend.endpoint().clone();
                self.check_tiers(&backend, &self.tenants.load())?;
                self.check_open()?;
                let pos = self.position(topo, &id)?;
                let state = Arc::clone(&topo.endpoints[pos].state);
                let last_probe = state.health().last_probe;
                let ep = self.start_endpoint(backend, state, last_probe);
                let old = std::mem::replace(&mut topo.endpoints[pos], ep);
                // The state lives on in the new endpoint: only the old tasks stop.
                old.cancel.cancel();
                tracing::info!(cluster = %name, endpoint = %id, "endpoint backend replaced");
            }
            EndpointChange::Reweight(id, weight) => {
                let mut problems = Vec::new();
                let path = format!("{}.endpoints.{id}.weight", self.path());
                config::check_weight(weight, &path, &mut problems);
                join_problems(&self.path(), problems)?;
                let pos = self.position(topo, &id)?;
                topo.endpoints[pos].state.load.set_weight(weight);
            }
            EndpointChange::Designate(id, role) => {
                let state = &topo.endpoints[self.position(topo, &id)?].state;
                let before = state.designated();
                state.designate(Some(role));
                if before.is_some_and(|before| before != role) {
                    state.request_probe();
                    tracing::warn!(cluster = %name, endpoint = %id, %role, "topology source: endpoint is now {role}");
                }
            }
            EndpointChange::Remove(id) => {
                let pos = self.position(topo, &id)?;
                let ep = topo.endpoints.remove(pos);
                ClusterState::retire(&ep);
                tracing::info!(cluster = %name, endpoint = %id, "endpoint removed");
            }
        }
        Ok(())
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
}
