//! Following a topology source: the task that asks it for reports and the one
//! place their changes are applied to the cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use switchyard_core::{Backend, EndpointId, Error, Role};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{diff, Change, Member, Report, SourceState, SourceStatus, TopologySource, View};
use crate::cluster::{Cluster, ClusterState, Topology};
use crate::config::EndpointConfig;
use crate::metrics::SourceMetrics;

/// While the designated primary has not yet probed as primary (a promotion
/// under way), it is probed this often, so writes resume within a probe's
/// round trip of the promotion instead of a whole probe interval.
const CONFIRM_EVERY: Duration = Duration::from_millis(25);

/// A cluster's source and what it last said; owned by the cluster, updated
/// by the follower task only.
#[derive(Debug)]
pub(crate) struct SourceCell {
    status: SourceStatus,
    unreachable_since: Option<Instant>,
    metrics: SourceMetrics,
}

impl SourceCell {
    /// The status as of now.
    pub(crate) fn status(&self) -> SourceStatus {
        let mut status = self.status.clone();
        status.unreachable_for = self.unreachable_since.map(|t| t.elapsed());
        status
    }
}

/// The source of a cluster that [`Cluster::follow`] started: wait for its
/// first view with [`ready`](Self::ready).
#[derive(Debug)]
pub struct Following {
    cluster: Arc<str>,
    source: String,
    first: watch::Receiver<Option<Result<(), String>>>,
}

/// A topology source gave no view: unreachable at start, or no answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUnreachable {
    /// The cluster.
    pub cluster: String,
    /// [`TopologySource::describe`] of the source.
    pub source: String,
    /// What went wrong (never a secret).
    pub reason: String,
}

impl fmt::Display for SourceUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster {}: topology source {} is unreachable: {}",
            self.cluster, self.source, self.reason
        )
    }
}

impl std::error::Error for SourceUnreachable {}

impl Following {
    /// Waits for the source's first report: `Ok` once its first view is
    /// applied, an error naming the source when it reports itself
    /// unreachable or says nothing within `timeout`. Either way the cluster
    /// keeps following it (close the cluster to stop).
    pub async fn ready(mut self, timeout: Duration) -> Result<(), SourceUnreachable> {
        let error = |reason: String| SourceUnreachable {
            cluster: self.cluster.to_string(),
            source: self.source.clone(),
            reason,
        };
        let outcome = tokio::time::timeout(timeout, self.first.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(first)) => match first.clone() {
                Some(Ok(())) => Ok(()),
                Some(Err(reason)) => Err(error(reason)),
                None => Err(error("no report".into())),
            },
            Ok(Err(_)) => Err(error("the cluster closed before the first report".into())),
            Err(_) => Err(error(format!("no answer within {timeout:?}"))),
        }
    }

    /// The source, as described in logs and status.
    pub fn source(&self) -> &str {
        &self.source
    }
}

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
                SourceCell {
                    status: SourceStatus {
                        source: described.clone(),
                        state: SourceState::Starting,
                        primary: None,
                        roles: BTreeMap::new(),
                        changes: 0,
                        last_view: None,
                        last_error: None,
                        unreachable_for: None,
                    },
                    unreachable_since: None,
                    metrics: SourceMetrics::new(shared.engine, &shared.name),
                },
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
                    lost(&shared, &reason);
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
        let mut cell = shared.source_cell();
        if let Some((cell, _)) = cell.as_mut() {
            if cell.status.state == SourceState::Unreachable {
                tracing::info!(cluster = %shared.name, source = %cell.status.source, "topology source reachable again");
            }
            cell.unreachable_since = None;
            cell.status.state = SourceState::Following;
            cell.status.last_error = None;
            cell.status.last_view = Some(SystemTime::now());
            cell.status.primary = view.primary().map(|m| m.name.clone());
            cell.status.roles = view
                .members
                .iter()
                .map(|m| (m.name.clone(), m.role))
                .collect();
            cell.metrics.up.set(1.0);
            if applied > 0 {
                cell.status.changes += 1;
                cell.metrics.changes.increment(1);
            }
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

/// Records that the source is unreachable; the topology stays as it is.
fn lost<B: Backend>(shared: &ClusterState<B>, reason: &str) {
    let mut cell = shared.source_cell();
    let Some((cell, _)) = cell.as_mut() else {
        return;
    };
    cell.metrics.errors.increment(1);
    cell.metrics.up.set(0.0);
    if cell.status.state != SourceState::Unreachable {
        tracing::warn!(cluster = %shared.name, source = %cell.status.source, reason, "topology source unreachable: keeping the last known topology");
        cell.unreachable_since = Some(Instant::now());
    } else {
        tracing::debug!(cluster = %shared.name, reason, "topology source still unreachable");
    }
    cell.status.state = SourceState::Unreachable;
    cell.status.last_error = Some(reason.to_owned());
}
