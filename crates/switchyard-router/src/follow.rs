//! Following a topology source: the task that asks it for reports and the one
//! place their changes are applied to the cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use switchyard_core::{Backend, EndpointId, Error, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::config::EndpointConfig;
use crate::metrics::SourceMetrics;
use crate::source::{diff, Change, Following, Member, Report, SourceCell, TopologySource, View};
use crate::state::{ClusterState, Topology};

/// While the designated primary has not yet probed as primary (a promotion
/// under way), it is probed this often, so writes resume within a probe's
/// round trip of the promotion instead of a whole probe interval.
const CONFIRM_EVERY: Duration = Duration::from_millis(25);

impl<B: Backend> Cluster<B> {
    /// Follows `source` from now on: its members become the cluster's
    /// endpoints (each one's backend made by `backends`) and its roles
    /// designate the primary, combined with the probes as the
    /// [module docs](crate::source) describe. A member named as an endpoint
    /// the cluster already has replaces it; endpoints given otherwise (built
    /// with, or added live) stay as they are.
    ///
    /// Returns at once; [`Following::ready`] waits for the first view. The
    /// source is asked for reports by one task, which stops when the cluster
    /// closes or its last clone is dropped. Following a second source
    /// replaces the first one's task.
    pub fn follow<S, F>(&self, source: S, backends: F) -> Following
    where
        S: TopologySource,
        F: Fn(&Member) -> Result<Arc<B>, Error> + Send + Sync + 'static,
    {
        let shared = &self.shared;
        let described = source.describe();
        let (first_tx, first) = watch::channel(None);
        let token = shared.cancel.child_token();
        {
            let mut cell = shared.source_cell();
            if let Some((_, old)) = cell.take() {
                old.cancel();
            }
            *cell = Some((
                SourceCell::new(
                    described.clone(),
                    SourceMetrics::new(shared.engine, &shared.name),
                ),
                token.clone(),
            ));
        }
        let span =
            tracing::info_span!("switchyard.source", cluster = %shared.name, source = %described);
        let follower = Follower {
            shared: Arc::downgrade(shared),
            backends,
            known: BTreeMap::new(),
            first: Some(first_tx),
        };
        shared
            .runtime
            .spawn(follower.run(source, token).instrument(span));
        Following {
            cluster: Arc::clone(&shared.name),
            source: described,
            first,
        }
    }
}

struct Follower<B: Backend, F> {
    shared: Weak<ClusterState<B>>,
    backends: F,
    /// The members applied so far, by name.
    known: BTreeMap<EndpointId, Member>,
    /// Told the outcome of the first report, then dropped.
    first: Option<watch::Sender<Option<Result<(), String>>>>,
}

impl<B, F> Follower<B, F>
where
    B: Backend,
    F: Fn(&Member) -> Result<Arc<B>, Error> + Send + Sync + 'static,
{
    async fn run<S: TopologySource>(mut self, mut source: S, cancel: CancellationToken) {
        let mut unconfirmed: Option<EndpointId> = None;
        loop {
            let report = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                report = source.next() => report,
                () = tokio::time::sleep(CONFIRM_EVERY), if unconfirmed.is_some() => {
                    unconfirmed = self.confirm(unconfirmed.take());
                    continue;
                }
            };
            let Some(shared) = self.shared.upgrade() else {
                break;
            };
            match report {
                Report::View(view) => {
                    self.apply(&shared, &view);
                    unconfirmed = self.confirm(view.primary().map(|m| m.name.clone()));
                    self.tell_first(Ok(()));
                }
                Report::Unreachable(reason) => {
                    if let Some((cell, _)) = shared.source_cell().as_mut() {
                        cell.lost(&shared.name, &reason);
                    }
                    self.tell_first(Err(reason));
                }
            }
        }
        tracing::debug!("source follower stopped");
    }

    fn tell_first(&mut self, outcome: Result<(), String>) {
        if let Some(tx) = self.first.take() {
            tx.send_replace(Some(outcome));
        }
    }

    /// Whether `primary` still has to probe as primary; asks for a probe if so.
    fn confirm(&self, primary: Option<EndpointId>) -> Option<EndpointId> {
        let shared = self.shared.upgrade()?;
        let id = primary?;
        let snap = shared.snapshot.load();
        let ep = snap.endpoints.iter().find(|e| e.id() == &id)?;
        if ep.state.health().role == Role::Primary {
            return None;
        }
        ep.state.request_probe();
        Some(id)
    }

    /// Applies the differences between the known members and `view` in one
    /// step, and records the view in the cluster's source status.
    fn apply(&mut self, shared: &Arc<ClusterState<B>>, view: &View) {
        let changes = diff(&self.known, view);
        let mut topo = shared.lock();
        if shared.check_open().is_err() {
            return;
        }
        let applied = changes.len();
        for change in changes {
            if let Err(error) = self.apply_one(shared, &mut topo, change) {
                tracing::error!(cluster = %shared.name, %error, "topology source change refused");
            }
        }
        if applied > 0 {
            shared.rebuild(&mut topo, "topology source changed");
        }
        if let Some((cell, _)) = shared.source_cell().as_mut() {
            cell.viewed(&shared.name, view, applied > 0);
        }
    }

    fn apply_one(
        &mut self,
        shared: &Arc<ClusterState<B>>,
        topo: &mut Topology<B>,
        change: Change,
    ) -> Result<(), Error> {
        let position =
            |topo: &Topology<B>, id: &EndpointId| topo.endpoints.iter().position(|e| e.id() == id);
        match change {
            Change::Insert(member) | Change::Repoint(member) => {
                let backend = (self.backends)(&member)?;
                if backend.endpoint() != &member.name {
                    return Err(Error::Config {
                        path: format!("{}.source", shared.path()),
                        message: format!(
                            "the backend made for member {} is called {}",
                            member.name,
                            backend.endpoint()
                        ),
                    });
                }
                let state = shared.fresh_state(&member.name, &EndpointConfig::new(member.role));
                state.designate(Some(member.role));
                let ep = shared.start_endpoint(backend, state, None);
                match position(topo, &member.name) {
                    Some(pos) => {
                        let old = std::mem::replace(&mut topo.endpoints[pos], ep);
                        ClusterState::retire(&old);
                        tracing::info!(cluster = %shared.name, endpoint = %member.name, host = %member.host, port = member.port, role = %member.role, "topology source: endpoint re-pointed");
                    }
                    None => {
                        topo.endpoints.push(ep);
                        tracing::info!(cluster = %shared.name, endpoint = %member.name, host = %member.host, port = member.port, role = %member.role, "topology source: endpoint added");
                    }
                }
                self.known.insert(member.name.clone(), member);
            }
            Change::Remove(id) => {
                if let Some(pos) = position(topo, &id) {
                    let ep = topo.endpoints.remove(pos);
                    ClusterState::retire(&ep);
                }
                self.known.remove(&id);
                tracing::info!(cluster = %shared.name, endpoint = %id, "topology source: endpoint removed");
            }
            Change::Role(id, role) => {
                if let Some(pos) = position(topo, &id) {
                    let state = &topo.endpoints[pos].state;
                    state.designate(Some(role));
                    state.request_probe();
                }
                if let Some(known) = self.known.get_mut(&id) {
                    known.role = role;
                }
                tracing::warn!(cluster = %shared.name, endpoint = %id, %role, "topology source: endpoint is now {role}");
            }
        }
        Ok(())
    }
}
