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
