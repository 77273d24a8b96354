//! The PostgreSQL backend of switchyard: a [`switchyard_core::Backend`] over
//! sqlx's own pool for one endpoint, with tenant isolation applied at checkout.
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
//! use switchyard_postgres::{PgBackend, PgBackendConfig, PgCheckoutExt};
//!
//! let backend = Arc::new(PgBackend::new(
//!     PgBackendConfig::builder("pg-primary", "postgres://app:secret@127.0.0.1:5432/app")
//!         .pool(PoolSettings::default().with_max_size(16))
//!         .config(),
//! )?);
//! let tenants = TenantRegistry::new()
//!     .with_tier("standard", TierPolicy::new(Isolation::Schema).with_max_connections(4))
//!     .with_default_tier("standard");
//!
//! // Role and lag, over the backend's own probe connection.
//! let probe = backend.probe(Duration::from_secs(1)).await?;
//! println!("{} is {}", backend.endpoint(), probe.role);
//!
//! // `search_path` is "tenant_acme" for as long as the checkout lives.
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//! let mut conn = Checkout::acquire(
//!     &backend,
//!     CheckoutRequest::with_timeout(Duration::from_secs(2)).tenant(&acme),
//! )
//! .await?;
//! let open: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE open")
//!     .fetch_one(&mut *conn)
//!     .await
//!     .map_err(|e| conn.fail(e))?; // reports broken connections to the router
//! println!("acme has {open} open orders");
//! # Ok(()) }
//! ```
//!
//! # Isolation levels
//!
//! - [`Isolation::Database`](switchyard_core::Isolation::Database): each tenant
//!   database (the scope's target, e.g. `tenant_acme`) gets a pool of its own,
//!   opened on first use, at most
//!   [`tenant_pool_max_size`](PgBackendConfig::tenant_pool_max_size) connections
//!   each and [`max_tenant_pools`](PgBackendConfig::max_tenant_pools) pools in
//!   all; at the cap the least recently used idle pool is closed, and with none
//!   idle the checkout fails at once with [`PgError::TenantPoolsBusy`] inside an
//!   [`Error::Backend`](switchyard_core::Error::Backend). Pools unused for
//!   [`tenant_pool_idle_timeout`](PgBackendConfig::tenant_pool_idle_timeout)
//!   are closed by a sweeper task the backend owns. A database that does not
//!   exist is [`Error::TenantNotProvisioned`](switchyard_core::Error::TenantNotProvisioned)
//!   right away (sqlx does not retry `3D000`).
//! - [`Isolation::Schema`](switchyard_core::Isolation::Schema): `search_path` is
//!   set to the tenant schema alone (a quoted identifier, so case and `-`
//!   survive; `public` is not searched, so a table missing from the tenant
//!   schema is an error rather than someone else's table) in the same round
//!   trip that checks the schema exists; a missing one is
//!   `TenantNotProvisioned`. Returned connections get `RESET search_path`.
//! - [`Isolation::Row`](switchyard_core::Isolation::Row):
//!   `SELECT set_config($1, $2, false)` with the setting name and tenant bound
//!   as parameters; the setting is emptied on return. The rows themselves are
//!   filtered by PostgreSQL's row-level security:
//!   [`enable_row_level_security`] creates the policy.
//!
//! **Row-level security does not bind superusers or roles with `BYPASSRLS`**,
//! whatever the policy says, and binds a table's owner only with `FORCE ROW
//! LEVEL SECURITY` (which the helper sets). Connect the backend as an ordinary
//! role (`CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS`) and grant it the
//! tables; a backend connected as `postgres` sees every tenant's rows.
//!
//! # Returning connections
//!
//! Every healthy checkout comes back through one simple-protocol round trip on a
//! background task that undoes the scope and checks, in the same message,
//! `transaction_timestamp() = statement_timestamp()` (true only outside a
//! transaction block: a simple query outside one runs in an implicit
//! transaction stamped with the statement's own time). A connection is closed,
//! never pooled, when it comes back inside a transaction block, when a query
//! run through `&mut *checkout` was dropped before it finished (the
//! [`PgConn`] executor tracks this), or when the check fails (killed backend,
//! broken socket) or takes longer than
//! [`reset_timeout`](PgBackendConfig::reset_timeout) (a query abandoned on the
//! raw sqlx connection is drained by the check within that time, or the
//! connection is closed). Resets name only what was scoped (`RESET
//! search_path`, the row setting): `DISCARD ALL` would also drop the server side
//! of sqlx's prepared-statement cache, after which sqlx fails with `prepared
//! statement "sqlx_s_N" does not exist`.
//!
//! # Prepared statements and `search_path`
//!
//! sqlx prepares and caches every `sqlx::query` per connection, keyed by its
//! text. A statement prepared while `search_path` named tenant A's schema does
//! not stay bound to A's tables: PostgreSQL's plan cache records the
//! `search_path` a statement was analysed under and re-analyses it when the
//! path differs (since 9.3), so the same text run on the same physical
//! connection under tenant B reads B's tables. This crate's tests check exactly
//! that, so nothing is cleared on a tenant switch. One consequence: if tenant
//! schemas differ in shape, re-analysis that changes a cached statement's result
//! columns fails with `cached plan must not change result type` (an error, not a
//! leak); keep tenant schemas identical or use unprepared queries there.
//!
//! # Tenant affinity
//!
//! A schema- or row-scoped connection that comes back clean can wait in a small
//! stash still scoped, and the same tenant's next checkout takes it without the
//! scope round trip. It is on by default ([`AffinitySettings`]) because it
//! cannot leak: the return round trip that checks for an open transaction also
//! confirms the session still carries exactly that scope, a stashed connection
//! is handed out unreset only for that same scope, and any other use resets it
//! first. [`PgBackend::pg_stats`] counts hits and misses.
//!
//! Affinity yields to fairness: while any checkout waits for the pool, nothing
//! is stashed (returned connections go through the pool to the waiters in
//! order), so a saturated pool sees almost no hits. It pays off with spare
//! capacity and tenant locality; in this crate's tests, 4 tasks serving mostly
//! their own tenant on a pool of 8 hit about 70% of the time.
//!
//! # Errors
//!
//! [`classify`] and [`pg_error`] map sqlx errors onto
//! [`switchyard_core::Error`]; [`PgCheckoutExt::fail`] maps and reports in one
//! call. Messages never contain the URL's password ([`SecretUrl`](switchyard_core::SecretUrl)).
//!
//! A refused connection on checkout is retried by sqlx until the acquire
//! timeout, so a dead endpoint shows up on the checkout path as
//! [`Error::Timeout`](switchyard_core::Error::Timeout); probes connect on their
//! own and report it as a `Connect` error at once, and a probe that gets no
//! answer in time as [`Error::ProbeTimeout`](switchyard_core::Error::ProbeTimeout).

mod backend;
mod config;
mod connection;
mod error;
mod executor;
mod lifecycle;
mod probe;
mod returns;
mod rls;
mod slots;
mod sql;
mod stats;
mod tenant_pools;

pub use backend::PgBackend;
pub use config::{
    AffinitySettings, PgBackendBuilder, PgBackendConfig, DEFAULT_MAX_TENANT_POOLS,
    DEFAULT_RESET_TIMEOUT, DEFAULT_TENANT_POOL_IDLE_TIMEOUT, DEFAULT_TENANT_POOL_MAX_SIZE,
};
pub use connection::PgConn;
pub use error::{classify, pg_error, sqlstate, PgCheckoutExt, PgError};
pub use rls::{enable_row_level_security, POLICY_NAME};
pub use sql::{quote_ident, quote_literal, validate_setting_name};
pub use stats::PgStats;

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Checkout;

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PgBackend>();
        assert_send::<PgConn>();
        assert_send::<Checkout<PgBackend>>();
    };
}
