//! Helpers for the crate's own tests.

use crate::{Cluster, EndpointStatus};
use switchyard_core::Backend;

/// Lets spawned tasks run until they block again (paused clock: no time passes).
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

pub fn status_of<B: Backend>(cluster: &Cluster<B>, id: &str) -> EndpointStatus {
    cluster.status().endpoint(id).cloned().unwrap()
}
