//! The PostgreSQL backend of switchyard: a [`switchyard_core::Backend`] that
//! pools sqlx `PgConnection`s for one endpoint itself, with tenant isolation
//! applied at checkout and a complete session reset whenever a connection
//! changes owner.
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
//!   right away. A tier whose template can render the URL's own database,
//!   `postgres`, `template0` or `template1` is refused when the cluster is
//!   built ([`Backend::validate_tier`](switchyard_core::Backend::validate_tier)),
//!   and such a target is refused at checkout with [`PgError::ReservedDatabase`].
//! - [`Isolation::Schema`](switchyard_core::Isolation::Schema): `search_path` is
//!   set to the tenant schema alone (a quoted identifier, so case and `-`
//!   survive; `public` is not searched, so a table missing from the tenant
//!   schema is an error rather than someone else's table) in the same round
//!   trip that checks the schema exists; a missing one is
//!   `TenantNotProvisioned`. Templates that can render `public`,
//!   `information_schema`, `pg_catalog` or `pg_toast` are refused.
//! - [`Isolation::Row`](switchyard_core::Isolation::Row):
//!   `set_config('<setting>', '<tenant>', false)` with both quoted as
//!   literals (the setting name is checked to be a plain dotted name when the
//!   cluster is built, the tenant id to be letters, digits, `_` and `-`). The
//!   rows themselves are
//!   filtered by PostgreSQL's row-level security:
//!   [`enable_row_level_security`] creates the policy.
//!
//! **Row-level security does not bind superusers or roles with `BYPASSRLS`**,
//! whatever the policy says, and binds a table's owner only with `FORCE ROW
//! LEVEL SECURITY` (which the helper sets). Connect the backend as an ordinary
//! role (`CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS`) and grant it the
//! tables; a backend connected as `postgres` sees every tenant's rows.
//!
//! # What each mode promises
//!
//! | level | enforced by | the application must not |
//! |---|---|---|
//! | database | the server: a pool per tenant database | reach other databases through `dblink` or `postgres_fdw` |
//! | schema | `search_path` only | name another tenant's schema, `SET search_path`, `SET ROLE` |
//! | schema, [`tenant_roles`](PgBackendConfig::tenant_roles) | the server: the checkout runs as the tenant's role ([`provision_tenant_role`]); `tenant_b.items` is `permission denied for schema` | `SET ROLE` / `RESET ROLE` (PostgreSQL 15 checks the login role's memberships) |
//! | row | the server's RLS on the row setting | set the row setting itself; connect as a superuser or `BYPASSRLS` role |
//! | row, `tenant_roles` | the server's RLS keyed on the role ([`enable_role_row_security`]): a `set_config` changes nothing | `SET ROLE` / `RESET ROLE` |
//!
//! A connection handed to another owner gets the complete reset below
//! (which also ends any role), and a tier whose template can render `postgres`,
//! `template0`, `template1`, the shared pool's database, `public`,
//! `pg_catalog`, `information_schema` or `pg_toast` is refused when the
//! cluster is built ([`Backend::validate_tier`](switchyard_core::Backend::validate_tier)).
//! `tests/conformance.rs` runs the test bed's isolation suite at each level.
//!
//! # Owners, resets and round trips
//!
//! Every connection remembers the owner its session last served: a tenant's
//! scope, or none for an unscoped checkout. Handed to the same owner, it needs
//! neither reset nor scope; handed to another, it gets a complete reset and
//! the new scope in one simple-protocol message: held cursors closed, session
//! authorization and role back to the login role, every setting reset, listen
//! channels dropped, advisory locks released, temporary relations and
//! sequence state discarded, SQL-level prepared statements deallocated (sqlx's
//! own protocol-level statements are kept: the plan cache re-plans them when
//! `search_path` or the role changes, so no statement cache needs clearing).
//! The same message refuses a session inside a transaction block.
//!
//! A returned connection goes back without a round trip, unless sqlx has work
//! queued on it (a dropped `Transaction`'s `ROLLBACK`: then it is checked on
//! return, on a task). Whoever takes it next checks it in the one message
//! that checkout sends anyway: the same owner's check (outside a transaction
//! block, still carrying exactly its owner's scope, alive; between unscoped
//! checkouts, which are no tenant's, a bare `SELECT` that only asks the first
//! and the last, as sqlx's ping does, and resets nothing) or the owner change
//! above. One that fails or times out
//! ([`reset_timeout`](PgBackendConfig::reset_timeout)) or is found inside a
//! transaction block is closed, never served: closing rolls back what it left
//! open (a transaction left open by raw SQL stays open on the idle connection
//! until then, or until the sweeper checks a connection that has sat idle
//! unchecked for a second, whichever comes first). One that had a query dropped mid-way through `&mut *checkout`
//! (the [`PgConn`] executor tracks this) is closed on return. So a checkout
//! costs, besides the caller's queries, one round trip of our own; sqlx's
//! `PgPool` spends two pings (one on acquire, one on release) and resets
//! nothing. The `lifecycle` module's docs list every path.
//!
//! # Tenant affinity
//!
//! Idle connections keep their owner, and a checkout takes the most recently
//! returned one of its own owner first ([`AffinitySettings`]). Under load,
//! waiting checkouts are served tenant by tenant in turn (core's
//! [`FairQueue`](switchyard_core::FairQueue), weighted by tier), and a
//! returned connection goes straight to the oldest waiting checkout of its own
//! owner while that tenant is fewer than
//! [`max_bypass`](AffinitySettings::max_bypass) grants ahead of the tenant
//! whose turn it is: tenants served about equally need no owner change, and
//! no tenant waits unfairly long. A returned connection
//! whose owner has nobody waiting and holds less than an equal share of the
//! pool is kept for that owner's next checkout for at most
//! [`linger`](AffinitySettings::linger) (1ms) before it goes on: a quiet
//! tenant among noisy ones keeps its warm sessions. [`PgBackend::pg_stats`] counts hits, misses, hand-offs and
//! resets. With affinity off, every checkout of a used connection resets it.
//!
//! # Prepared statements and `search_path`
//!
//! sqlx prepares and caches every `sqlx::query` per connection, keyed by its
//! text. A statement prepared while `search_path` named tenant A's schema does
//! not stay bound to A's tables: PostgreSQL's plan cache records the
//! `search_path` a statement was analysed under and re-analyses it when the
//! path differs (since 9.3), so the same text run on the same physical
//! connection under tenant B reads B's tables. This crate's tests check exactly
//! that. One consequence: if tenant schemas differ in shape, re-analysis that
//! changes a cached statement's result columns fails with `cached plan must
//! not change result type` (an error, not a leak); keep tenant schemas
//! identical or use unprepared queries there.
//!
//! # Errors
//!
//! [`classify`] and [`pg_error`] map sqlx errors onto
//! [`switchyard_core::Error`]; [`PgCheckoutExt::fail`] maps and reports in one
//! call. Messages never contain the URL's password ([`SecretUrl`](switchyard_core::SecretUrl)).
//!
//! A connection the backend opens is tried once: a refused one fails the
//! checkout at once with a `Connect` error, so the router retries elsewhere.
//! Probes connect on their own dedicated connection and report the same; a
//! probe that gets no answer in time is
//! [`Error::ProbeTimeout`](switchyard_core::Error::ProbeTimeout).

mod backend;
mod causal;
mod config;
mod connection;
mod error;
mod executor;
mod lifecycle;
mod probe;
mod returns;
mod rls;
mod roles;
mod slots;
mod sql;
mod stats;
mod tenant_pools;
mod tls;

pub use backend::PgBackend;
pub use config::{
    AffinitySettings, PgBackendBuilder, PgBackendConfig, DEFAULT_MAX_TENANT_POOLS,
    DEFAULT_RESET_TIMEOUT, DEFAULT_TENANT_POOL_IDLE_TIMEOUT, DEFAULT_TENANT_POOL_MAX_SIZE,
};
pub use connection::PgConn;
pub use error::{classify, pg_error, sqlstate, PgCheckoutExt, PgError};
pub use rls::{enable_row_level_security, POLICY_NAME};
pub use roles::{enable_role_row_security, provision_tenant_role, ROLE_POLICY_NAME};
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
