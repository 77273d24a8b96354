//! The operator's word on fencing: trust a primary the router fenced.
//!
//! The router fences a primary that its engine's history places behind, or
//! off, the line writes follow (see [`crate::election`]), and refuses writes
//! when primaries cannot be ordered at all. Only two things lift that: the
//! engine demoting the node (a probe sees it as a replica), or an operator (or
//! the control plane acting for one) naming the primary to trust here.

use switchyard_core::{Backend, EndpointId, Error, Role};

use crate::cluster::Cluster;
use crate::election::Line;

impl<B: Backend> Cluster<B> {
    /// Makes `endpoint`, a primary, the one writes follow: its line becomes
    /// the line, so it takes the writes and every primary not on that line
    /// (the one that had them included) is fenced instead.
    ///
    /// For the operator who has looked at both sides of a split brain, or at
    /// a fenced primary, and decided this one holds the data to keep. Fails
    /// with [`Error::Config`] when no such endpoint is in the cluster or its
    /// last probe did not find a primary.
    pub fn unfence(&self, endpoint: &EndpointId) -> Result<(), Error> {
        let shared = &self.shared;
        let mut topo = shared.lock();
        let i = shared.position(&topo, endpoint)?;
        let ep = &topo.endpoints[i];
        let (role, history) = {
            let h = ep.state.health();
            (h.role, h.history.clone())
        };
        if role != Role::Primary {
            return Err(Error::Config {
                path: format!("{}.endpoints.{endpoint}", shared.path()),
                message: format!(
                    "{endpoint} is not a primary (last probe: {role}): nothing to unfence"
                ),
            });
        }
        tracing::warn!(
            cluster = %shared.name,
            %endpoint,
            history = %history.as_ref().map_or_else(|| "no history".to_owned(), ToString::to_string),
            "operator unfenced {endpoint}: writes follow its line from now on"
        );
        topo.line = Some(Line {
            writer: endpoint.clone(),
            history,
        });
        shared.rebuild(&mut topo, "endpoint unfenced");
        Ok(())
    }
}
