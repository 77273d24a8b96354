//! switchyard's router: which endpoint of a cluster serves each checkout.
//!
//! A [`Cluster`] holds the endpoints of one engine (a primary and replicas,
//! each a [`Backend`](switchyard_core::Backend) with its own pool) and routes
//! every checkout:
//!
//! - **writes** to the current primary, learned from probes, so a promotion
//!   moves them; with no primary they wait up to `failover_timeout`, woken the
//!   moment one appears, then fail with [`Error::NoPrimary`];
//! - **reads** to healthy replicas within `max_replica_lag`, falling back to the
//!   primary per [`ReadPreference`], retried on another endpoint within a
//!   bounded budget when they fail with a retryable error;
//! - through a balancing [`StrategyKind`] chosen per cluster: round robin, least
//!   connections, smooth weighted round robin, or peak-EWMA latency with power
//!   of two choices. Picks read an immutable snapshot (no lock, no allocation);
//! - around unhealthy endpoints: active probes with HAProxy-style `fall`/`rise`,
//!   passive ejection on a failed checkout with exponential backoff and a
//!   half-open trial, capped as Envoy caps it (see [`health`]);
//! - never backwards: of several primaries, writes go to the newest by the
//!   engine's own history (timeline, replication id, election); an old
//!   primary back after a failover is fenced, unordered primaries refuse
//!   writes with [`Error::SplitBrain`], and [`Cluster::unfence`] is the
//!   operator's override;
//! - **read-your-writes** on replicas with a causal token
//!   ([`Cluster::run_write`], [`Cluster::run_after`]): a read given one is
//!   served by a replica that has applied the write, else after a bounded
//!   wait by the primary (see [`causal`]);
//! - scoped to a tenant through a live-swappable
//!   [`TenantRegistry`](switchyard_core::TenantRegistry): every connection is
//!   made by [`switchyard_core::Checkout::acquire`], which applies the scope and
//!   quota.
//!
//! The whole configuration ([`Cluster::set_config`]: timeouts, retries,
//! health, read preference, warming, latency, causal reads, strategy), the endpoints (added,
//! removed, or replaced in one step), weights and the tenant registry can
//! change while traffic flows; a cluster removed from service stops with
//! [`Cluster::close`]. The cluster is also a [`tower::Service`] ([`ClusterService`]),
//! reports [`metrics`] and a [`ClusterStatus`], and can warm pools ahead of
//! demand ([`warming`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), switchyard_core::Error> {
//! use std::sync::Arc;
//! use switchyard_core::noop::NoopBackend;
//! use switchyard_core::{Intent, Isolation, Role, TenantId, TenantRegistry, TierPolicy};
//! use switchyard_router::{CheckoutOptions, Cluster, ClusterConfig, EndpointConfig, StrategyKind};
//!
//! // An engine crate's backends in real use; NoopBackend has no server behind it.
//! let primary = Arc::new(NoopBackend::with_role("pg-1", Role::Primary));
//! let replica = Arc::new(NoopBackend::with_role("pg-2", Role::Replica));
//!
//! let config: ClusterConfig = serde_json::from_str(r#"{
//!     "strategy": "least_conn",
//!     "failover_timeout": "5s",
//!     "health": { "interval": "1s", "timeout": "500ms", "max_replica_lag": "10s" }
//! }"#).map_err(|e| switchyard_core::Error::Config { path: "clusters.main".into(), message: e.to_string() })?;
//!
//! let cluster = Cluster::builder("main")
//!     .engine("postgres")
//!     .config(config)
//!     .tenants(
//!         TenantRegistry::new()
//!             .with_tier("standard", TierPolicy::new(Isolation::Schema).with_max_connections(4))
//!             .with_default_tier("standard"),
//!     )
//!     .endpoint(primary.clone(), EndpointConfig::new(Role::Primary))
//!     .endpoint(replica.clone(), EndpointConfig::new(Role::Replica).weight(2))
//!     .build()?;
//!
//! let acme = TenantId::new("acme")?;
//! let write = cluster.checkout(Intent::Write, Some(&acme)).await?;
//! assert_eq!(write.endpoint().as_str(), "pg-1");
//! assert_eq!(write.tenant(), Some(&acme));
//! let read = cluster.checkout(Intent::Read, Some(&acme)).await?;
//! assert_eq!(read.endpoint().as_str(), "pg-2");
//! drop((write, read));
//!
//! // The replica is promoted: the next probe sees it, and writes follow.
//! primary.set_role(Role::Replica);
//! replica.set_role(Role::Primary);
//! # tokio::time::pause();
//! tokio::time::sleep(std::time::Duration::from_secs(1)).await; // a probe interval
//! # for _ in 0..20 { tokio::task::yield_now().await; }
//! let write = cluster
//!     .checkout_with(Intent::Write, None, CheckoutOptions::new().idempotent(true))
//!     .await?;
//! assert_eq!(write.endpoint().as_str(), "pg-2");
//!
//! // Live topology: a third endpoint joins, and the strategy changes.
//! cluster.add_endpoint(Arc::new(NoopBackend::with_role("pg-3", Role::Replica)), EndpointConfig::default())?;
//! cluster.set_strategy(StrategyKind::WeightedRoundRobin);
//! assert_eq!(cluster.status().endpoints.len(), 3);
//! # Ok(()) }
//! ```

mod apply;
pub mod causal;
mod change;
pub mod checkout;
mod cluster;
pub mod config;
mod counters;
mod election;
mod endpoint;
mod fencing;
mod follow;
pub mod health;
mod live;
pub mod metrics;
mod prober;
mod run;
pub mod service;
pub mod source;
mod state;
pub mod status;
mod strategy;
mod topology;
pub mod warming;

/// The strategies alone, for the `scale` bench's pick rows: not API, may
/// change in any release.
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod __bench {
    pub use crate::strategy::{Load, LoadCell, PeakEwma, Picker, Strategy};
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use causal::CausalStats;
pub use change::EndpointChange;
pub use checkout::CheckoutOptions;
pub use cluster::{Cluster, ClusterBuilder};
pub use config::{
    CausalConfig, CausalFallback, ClusterConfig, EndpointConfig, HealthConfig, LatencyConfig,
    ReadPreference, RetryConfig, StrategyKind, WarmingConfig,
};
pub use health::{EjectionStatus, Health};
pub use service::{ClusterService, Route};
pub use source::{SourceState, SourceStatus, SourceUnreachable, TopologySource};
pub use status::{CheckoutCounters, ClusterStatus, EndpointStatus, WAIT_THRESHOLD};
pub use switchyard_core::Error;
