//! Following a topology source: the task that asks it for reports and the one
//! place their changes are applied to the cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use switchyard_core::{Backend, EndpointId, Error, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::change::EndpointChange;
use crate::cluster::Cluster;
use crate::config::EndpointConfig;
use crate::metrics::SourceMetrics;
use crate::source::{Following, Member, Report, SourceCell, TopologySource, View};
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
    /// with, or added live) stay as they are. A member meets the checks
    /// [`add_endpoint`](Self::add_endpoint) runs: one refused (e.g. a tier its
    /// engine refuses) stays out, logged and listed in the source status's
    /// `refused`, and is tried again with the next view.
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
                    let refused_all = self.apply(&shared, &view);
                    unconfirmed = self.confirm(view.primary().map(|m| m.name.clone()));
                    self.tell_first(refused_all.map_or(Ok(()), Err));
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

    /// Applies the differences between the known members and `view` as one
    /// list of endpoint changes (one lock, one rebuild), and records the view
    /// and the members the cluster refused in its source status. Says why
    /// when the view named members and the cluster took in none of them.
    fn apply(&mut self, shared: &Arc<ClusterState<B>>, view: &View) -> Option<String> {
        let mut topo = shared.lock();
        if shared.check_open().is_err() {
            return None;
        }
        let mut refused = BTreeMap::new();
        let changes = self.changes(shared, &topo, view, &mut refused);
        let (ids, changes): (Vec<_>, Vec<_>) = changes.into_iter().unzip();
        let results = shared.apply_changes(&mut topo, changes);
        for (id, result) in ids.into_iter().zip(results) {
            if let Err(error) = result {
                refused.entry(id).or_insert_with(|| error.to_string());
            }
        }
        // A member refused is not known, so the next view tries it again.
        let before = std::mem::take(&mut self.known);
        self.known = (view.members.iter())
            .filter(|m| !refused.contains_key(&m.name))
            .map(|m| (m.name.clone(), m.clone()))
            .collect();
        for (endpoint, error) in &refused {
            tracing::error!(cluster = %shared.name, %endpoint, %error, "topology source change refused");
        }
        let refused_all = (self.known.is_empty() && !refused.is_empty()).then(|| {
            let why: Vec<String> = refused.iter().map(|(id, e)| format!("{id}: {e}")).collect();
            format!(
                "the cluster refused every member the source named ({})",
                why.join("; ")
            )
        });
        if let Some((cell, _)) = shared.source_cell().as_mut() {
            cell.viewed(&shared.name, view, self.known != before, refused);
        }
        refused_all
    }

    /// The endpoint changes that turn the known members into `view`, each
    /// with its member's name, decided under the topology lock; members
    /// refused on the way (no backend) go to `refused`. A new or moved member's
    /// endpoint is inserted, or replaces the cluster's endpoint of that name;
    /// a member the cluster does not have (removed live) is left alone.
    /// Removals come last, so a primary that moves to a new member joins
    /// before the old one leaves.
    fn changes(
        &self,
        shared: &ClusterState<B>,
        topo: &Topology<B>,
        view: &View,
        refused: &mut BTreeMap<EndpointId, String>,
    ) -> Vec<(EndpointId, EndpointChange<B>)> {
        let has = |id: &EndpointId| shared.position(topo, id).is_ok();
        let mut changes = Vec::new();
        for m in &view.members {
            let designate = (
                m.name.clone(),
                EndpointChange::Designate(m.name.clone(), m.role),
            );
            match self.known.get(&m.name) {
                Some(k) if (&k.host, k.port) == (&m.host, m.port) => {
                    if k.role != m.role && has(&m.name) {
                        changes.push(designate);
                    }
                }
                _ => match self.backend(shared, m) {
                    Ok(backend) => {
                        let config = EndpointConfig::new(m.role);
                        let endpoint = if has(&m.name) {
                            EndpointChange::Replace(backend, config)
                        } else {
                            EndpointChange::Insert(backend, config)
                        };
                        changes.extend([(m.name.clone(), endpoint), designate]);
                    }
                    Err(error) => drop(refused.insert(m.name.clone(), error.to_string())),
                },
            }
        }
        for id in self.known.keys() {
            if !view.members.iter().any(|m| &m.name == id) && has(id) {
                changes.push((id.clone(), EndpointChange::Remove(id.clone())));
            }
        }
        changes
    }

    /// The backend of `member`, which must carry the member's name.
    fn backend(&self, shared: &ClusterState<B>, member: &Member) -> Result<Arc<B>, Error> {
        let backend = (self.backends)(member)?;
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
        tracing::info!(cluster = %shared.name, endpoint = %member.name, host = %member.host, port = member.port, role = %member.role, "topology source: new or moved member");
        Ok(backend)
    }
}
