//! Topology sources for switchyard's router: follow the HA control plane a
//! team already runs instead of each router forming its own view.
//!
//! - [`PatroniSource`]: PostgreSQL members and the leader from Patroni's REST
//!   API (`/cluster`, checked against the leader's `/primary`).
//! - [`SentinelSource`]: the Redis master and replicas from a set of
//!   sentinels, by majority, switching at once on `+switch-master`.
//!
//! Both implement [`TopologySource`](switchyard_router::TopologySource);
//! [`Cluster::follow`](switchyard_router::Cluster::follow) applies what they
//! report, and `switchyard_router::source` documents how a source's roles
//! combine with the probes'.

mod patroni;
mod sentinel;

pub use patroni::{PatroniConfig, PatroniSource};
pub use sentinel::{SentinelConfig, SentinelSource};

/// `url` without its password, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
}
