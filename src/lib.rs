//! switchyard: one router for PostgreSQL, Redis, MongoDB, ClickHouse and
//! Elasticsearch, with balancing, health checks, failover and tenant isolation
//! applied at checkout.
//!
//! This facade re-exports the crates a service links in. The contracts live in
//! [`core`]; engine backends and the router are added behind one cargo feature
//! each as they land.

pub use switchyard_core as core;
pub use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Error, Intent, Isolation, PoolSettings, Role, SecretUrl,
    TenantId, TenantRegistry, TenantScope, TierPolicy,
};
pub use switchyard_router as router;
pub use switchyard_router::{Cluster, ClusterConfig};

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
pub use switchyard_postgres as postgres;

/// The Redis backend (feature `redis`).
#[cfg(feature = "redis")]
pub use switchyard_redis as redis;
