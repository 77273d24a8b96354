//! The ClickHouse backend of switchyard: a [`switchyard_core::Backend`] over the
//! official `clickhouse` crate's HTTP client for one endpoint, with tenant
//! isolation applied at checkout.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{
//!     Backend, Checkout, CheckoutRequest, Isolation, PoolSettings, TenantId, TenantRegistry,
//!     TierPolicy,
//! };
//! use switchyard_clickhouse::{ChBackend, Filter};
//!
//! #[derive(clickhouse::Row, serde::Serialize, serde::Deserialize)]
//! struct Event {
//!     tenant_id: String,
//!     ts: u64,
//!     kind: String,
//! }
//!
//! let backend = Arc::new(
//!     ChBackend::builder("ch-1", "http://app:secret@127.0.0.1:8123")
//!         .pool(PoolSettings::default().with_max_size(32))
//!         .row_database("shared")
//!         .build()?,
//! );
//! let probe = backend.probe(Duration::from_secs(1)).await?;
//! println!("{} runs ClickHouse {:?}", backend.endpoint(), probe.version);
//!
//! let tenants = TenantRegistry::new()
//!     .with_tier("shared", TierPolicy::new(Isolation::Row).with_max_connections(8))
//!     .with_tier("dedicated", TierPolicy::new(Isolation::Database))
//!     .with_default_tier("shared")
//!     .with_tenant(TenantId::new("bigco")?, "dedicated");
//!
//! // Row isolation: `shared.events`, only acme's rows, whatever the filter says.
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//! let conn = Checkout::acquire(
//!     &backend,
//!     CheckoutRequest::with_timeout(Duration::from_secs(2)).tenant(&acme),
//! )
//! .await?;
//! conn.insert_rows("events", [Event { tenant_id: "acme".into(), ts: 1, kind: "click".into() }])
//!     .await?;
//! let clicks: Vec<Event> = conn
//!     .select::<Event>("events")
//!     .filter(Filter::eq("kind", "click"))
//!     .fetch_all()
//!     .await?;
//! assert!(clicks.iter().all(|e| e.tenant_id == "acme"));
//! assert!(conn.client().is_err()); // no raw SQL on a row-scoped checkout
//! drop(conn);
//!
//! // Database isolation: the client's database is `tenant_bigco`.
//! let bigco = tenants.resolve(&TenantId::new("bigco")?)?;
//! let conn = Checkout::acquire(
//!     &backend,
//!     CheckoutRequest::with_timeout(Duration::from_secs(2)).tenant(&bigco),
//! )
//! .await?;
//! let n: u64 = conn.client()?.query("SELECT count() FROM events").fetch_one().await?;
//! # let _ = n; Ok(()) }
//! ```
//!
//! # Connections
//!
//! ClickHouse is reached over HTTP, which has no session to pool: the
//! `clickhouse` client keeps keep-alive sockets, and each request stands
//! alone. A checkout is a [`ChConnection`]: a permit from a
//! [`FairGate`](switchyard_core::FairGate) (waiting tenants served in turn) of
//! [`pool.max_size`](switchyard_core::PoolSettings::max_size) (so a busy
//! endpoint makes checkouts wait, then time out at their deadline, as a full
//! pool does) plus a client configured for the tenant. The scope lives only
//! in that handle; returning one is dropping it, with nothing to reset on the
//! server.
//!
//! The probe runs `SELECT 1, version()` within its timeout, outside the
//! in-flight bound. The role is always
//! [`Role::Standalone`](switchyard_core::Role::Standalone): every ClickHouse
//! replica takes writes, so there is no primary/replica notion to follow.
//!
//! # Isolation levels
//!
//! | level | how | servers |
//! |---|---|---|
//! | [`Database`](switchyard_core::Isolation::Database) (and `Schema`, which ClickHouse does not have) | the client's `database` is the scope's target (e.g. `tenant_acme`); the checkout first checks `system.databases` (cached for [`provision_cache_ttl`](ChBackendConfig::provision_cache_ttl)) and fails with [`Error::TenantNotProvisioned`](switchyard_core::Error::TenantNotProvisioned) if it is missing; `UNKNOWN_DATABASE` (81) later maps to the same | all |
//! | [`Row`](switchyard_core::Isolation::Row), handle-enforced | shared tables in [`row_database`](ChBackendConfig::row_database); [`ChConnection::select`] and [`ChConnection::count`] add `tenant_column = <tenant>` to every query, [`ChConnection::insert_rows`] sets or checks the tenant column of every row, and [`ChConnection::client`] is refused | all (18.16 included) |
//! | Row, server-enforced | row policies ([`row_policy_sql`]) reading a custom setting the handle sends ([`row_policy_setting`](ChBackendConfig::row_policy_setting)) or the user name | 20.4+ for `CREATE ROW POLICY`, 21.x+ for setting-based policies; untested here |
//!
//! What each level promises: the row level is enforced by the handle alone
//! (no raw client, a tenant filter on every read, the tenant checked on every
//! written row) and needs the tenant column to be `String` or
//! `LowCardinality(String)`: a numeric one would store tenant `007` as `7`, so
//! the column's type is checked once per table (and cached) before the first
//! row-scoped query ([`ChError::TenantColumnType`]). The database level sets
//! the client's default database; raw SQL naming another database is the
//! application's to avoid (or a per-tenant user's to refuse). A database tier
//! whose template can render `system`, `default`, `information_schema`, the row
//! database or the unscoped database is refused when the cluster is built, and
//! a scope naming one is refused at checkout. `tests/conformance.rs` runs the
//! test bed's isolation suite at both levels.
//!
//! Why a structured [`Filter`] and not a SQL fragment: no fragment spliced
//! into `WHERE tenant = ? AND (...)` is safe, because `1) OR (1` closes the
//! parenthesis, and a subquery or `UNION` in it reads other tenants' rows even
//! when the parentheses hold. A filter is data: identifiers are checked
//! ([`validate_identifier`]) and backquoted, values are bound.
//!
//! A database-scoped client resolves unqualified names in the tenant
//! database, but raw SQL can still name another database (`other.t`). For a
//! server-enforced boundary, give each tenant a user restricted to its
//! database (`<allow_databases>` in users.xml on 18.16; `GRANT` on 20.4+).
//!
//! # Errors
//!
//! [`ch_error`] and [`classify`] map clickhouse errors onto
//! [`switchyard_core::Error`] (refused connections and refused credentials are
//! `Connect`, other network failures `Io`, `READONLY` is `ReadOnly`, the rest
//! `Rejected`); [`ChCheckoutExt::fail`] maps and reports in one call. A hung
//! endpoint shows up as [`Error::Timeout`](switchyard_core::Error::Timeout)
//! from probes and as an `Io` [`ChError::QueryTimeout`] from handle queries
//! ([`query_timeout`](ChBackendConfig::query_timeout)).

mod backend;
mod config;
mod connection;
mod error;
mod filter;
mod policy;
mod tls;

pub use backend::ChBackend;
pub use config::{
    ChBackendBuilder, ChBackendConfig, DEFAULT_PROVISION_CACHE_TTL, DEFAULT_QUERY_TIMEOUT,
    DEFAULT_ROW_DATABASE, DEFAULT_TENANT_COLUMN,
};
pub use connection::{ChConnection, Select};
pub use error::{
    ch_error, classify, server_code, ChCheckoutExt, ChError, READONLY, UNKNOWN_DATABASE,
};
pub use filter::{validate_identifier, Filter, Value, MAX_IDENTIFIER_LEN};
pub use policy::{row_policy_sql, PolicyTenant};

/// The `clickhouse` crate this backend is built on, for `Row` derives and the
/// raw client's types.
pub use clickhouse;

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Checkout;

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChBackend>();
        assert_send_sync::<ChConnection>();
        assert_send::<Checkout<ChBackend>>();
    };
}
