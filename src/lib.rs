//! switchyard: one router for PostgreSQL, Redis, MongoDB, ClickHouse and
//! Elasticsearch, with balancing, health checks, failover and tenant isolation
//! applied at checkout.
//!
//! This facade re-exports the crates a service links in: the contracts in
//! [`core`], the [`router`], and one engine backend per cargo feature
//! (`postgres` and `redis` by default; `mongodb`, `clickhouse`,
//! `elasticsearch`, or `full` for all).

pub use switchyard_core as core;
pub use switchyard_core::{
    Backend, CausalError, CausalToken, Checkout, CheckoutRequest, Error, Intent, Isolation,
    PoolSettings, Role, SecretUrl, TenantId, TenantRegistry, TenantScope, TierPolicy, TlsFailure,
    TlsSettings,
};
pub use switchyard_router as router;
pub use switchyard_router::{Cluster, ClusterConfig};

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
pub use switchyard_postgres as postgres;

/// The Redis backend (feature `redis`).
#[cfg(feature = "redis")]
pub use switchyard_redis as redis;

/// The MongoDB backend (feature `mongodb`).
#[cfg(feature = "mongodb")]
pub use switchyard_mongodb as mongodb;

/// The ClickHouse backend (feature `clickhouse`).
#[cfg(feature = "clickhouse")]
pub use switchyard_clickhouse as clickhouse;

/// The Elasticsearch backend (feature `elasticsearch`).
#[cfg(feature = "elasticsearch")]
pub use switchyard_elasticsearch as elasticsearch;

/// Compiles the README's Rust examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
