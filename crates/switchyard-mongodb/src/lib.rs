//! The MongoDB backend of switchyard: a [`switchyard_core::Backend`] over the
//! official `mongodb` driver for one endpoint (or one replica set), with tenant
//! isolation applied by the handle a checkout derefs to.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mongodb::bson::doc;
//! use switchyard_core::{
//!     Backend, Checkout, CheckoutRequest, Isolation, PoolSettings, TenantId, TenantRegistry,
//!     TierPolicy,
//! };
//! use switchyard_mongodb::{MongoBackend, MongoBackendConfig, MongoCheckoutExt};
//!
//! // One backend per member: the router sees each node's role and lag.
//! let backend = Arc::new(MongoBackend::new(
//!     MongoBackendConfig::builder("mongo-1", "mongodb://app:secret@127.0.0.1:27017/app")
//!         .pool(PoolSettings::default().with_max_size(16))
//!         .config(),
//! )?);
//! let probe = backend.probe(Duration::from_secs(1)).await?;
//! println!("{} is {} (version {:?})", backend.endpoint(), probe.role, probe.version);
//!
//! let tenants = TenantRegistry::new()
//!     .with_tier("shared", TierPolicy::new(Isolation::Row).with_max_connections(4))
//!     .with_default_tier("shared");
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//! let mut conn = Checkout::acquire(
//!     &backend,
//!     CheckoutRequest::with_timeout(Duration::from_secs(2)).tenant(&acme),
//! )
//! .await?;
//!
//! // Row isolation: the handle adds {tenant_id: "acme"} to the document and
//! // to the filter; another tenant's rows cannot be named through it.
//! let orders = conn.collection("orders")?;
//! orders.insert_one(doc! { "sku": "a-1", "open": true }, None).await?;
//! let open = orders.count_documents(doc! { "open": true }, None).await;
//! let open = open.map_err(|e| conn.fail(e))?; // reports endpoint failures
//! println!("acme has {open} open orders");
//! # Ok(()) }
//! ```
//!
//! # Checkouts without connections
//!
//! The driver pools its connections internally and has no checkout object, so a
//! checkout here is a [`MongoConn`] handle: a share of the backend's in-flight
//! bound (a [`FairGate`](switchyard_core::FairGate) of `pool.max_size` permits,
//! so waits, deadlines and tenant quotas behave as with any pool, and waiting
//! tenants are served in turn) plus the tenant it serves. Nothing is
//! sent at checkout; the driver connects on first use. Every operation goes
//! through [`ScopedCollection`], which confines it to the tenant before
//! anything is sent.
//!
//! # Isolation levels
//!
//! - [`Isolation::Database`](switchyard_core::Isolation::Database): the
//!   scope's target (e.g. `tenant_acme`) is the tenant's database. MongoDB
//!   creates databases on first write, so there is nothing to provision; one
//!   driver pool serves every tenant database, because a MongoDB connection is
//!   not bound to a database (every command names its own). The target must be
//!   a valid database name and may not be `admin`, `local`, `config` or the
//!   shared database.
//! - [`Isolation::Schema`](switchyard_core::Isolation::Schema): collection
//!   prefixes in the shared database. Tenant `acme`'s `orders` is
//!   `tenant_acme__orders`: the separator is `__`, so a prefix may neither
//!   contain `__` nor end with `_` (checked at checkout, before any I/O), which
//!   makes every (prefix, collection) pair map to a different name. A dot, the
//!   MongoDB idiom, is refused by wire-compatible servers that keep
//!   collections as SQL tables; a single `_` would be ambiguous (`tenant_a` +
//!   `b_x` = `tenant_a_b` + `x`).
//! - [`Isolation::Row`](switchyard_core::Isolation::Row): the shared database,
//!   with the configured [`tenant_field`](MongoBackendConfig::tenant_field)
//!   (default `tenant_id`; the scope's `row_setting` is a SQL notion and not
//!   used) holding the tenant id on every document. The handle:
//!   - ANDs `{tenant_id: T}` with every filter (find, update, replace,
//!     delete, count, distinct): added next to the filter's clauses, or as
//!     `{$and: [{tenant_id: T}, filter]}` when the filter names the field
//!     itself, so no filter can widen the result;
//!   - sets the field on every inserted or replacing document that lacks it,
//!     and refuses documents that set it to anything else;
//!   - refuses updates whose operators touch the field (`$set`, `$unset`,
//!     `$inc`, ... on it or a sub-path, `$rename` from or to it), and makes
//!     upserts insert it with `$setOnInsert`;
//!   - starts every pipeline with `{$match: {tenant_id: T}}` and refuses
//!     stages that reach other data (`$lookup`, `$graphLookup`,
//!     `$unionWith`, `$out`, `$merge`, collection statistics and searches,
//!     cluster-wide stages), also inside `$facet`;
//!   - refuses collection names containing `__`, which belong to prefix
//!     tenants in the same database.
//!
//! Pipelines of database and prefix tenants may use the cross-collection
//! stages within their own scope: prefix tenants' collection names are
//! prefixed (`{$lookup: {from: "items"}}` reads `tenant_acme__items`), and a
//! stage naming another database is refused. Refusals are
//! [`Error::Backend`](switchyard_core::Error::Backend) of kind `Rejected` with a
//! [`MongoError`] source ([`mongo_cause`] finds it).
//!
//! Raw access cannot leak a scope: the driver's `Client`, `Database` and
//! `Collection` all reach every database (`.client()`), so a scoped handle hands
//! none of them out ([`MongoConn::client`] answers only unscoped checkouts),
//! and sessions and transactions are therefore available to unscoped
//! checkouts only.
//!
//! What the row level leaves to the application: the shared collections must
//! keep MongoDB's default (simple, binary) collation. A caller's `collation`
//! option is refused on row-scoped operations ([`MongoError::CollationRefused`]),
//! because it would apply to the tenant condition too (case-insensitive:
//! `{tenant_id: "acme"}` matches `ACME`), but a collection created with a
//! non-simple default collation applies it anyway. A database tier whose
//! template can render `admin`, `local`, `config` or the shared database
//! (ignoring case) is refused when the cluster is built. `tests/conformance.rs`
//! runs the test bed's isolation suite at each level, on the stand-in or on a
//! real server by URL.
//!
//! # Returning handles
//!
//! Unscoping is a local change: no connection carries tenant state (see
//! [`Backend::inspect`](switchyard_core::Backend::inspect) on
//! [`MongoBackend`]), so a handle goes back without a round trip or a
//! background task. A cancelled operation (its future dropped, or stopped by
//! the operation timeout) cannot hand its reply to the next user either: the
//! driver closes a connection that comes back in the middle of a command
//! instead of pooling it, which this crate's tests check through a slow proxy.
//!
//! # Probes
//!
//! A probe runs `hello` on a small client of its own (so a busy pool never
//! makes a live endpoint look dead), then `buildInfo` for the version:
//!
//! - a writable primary, standalone server or mongos is
//!   [`Role::Primary`](switchyard_core::Role::Primary), a secondary
//!   [`Role::Replica`](switchyard_core::Role::Replica); an arbiter or a
//!   recovering member fails the probe ([`MongoError::NotServing`]);
//! - lag, on a secondary in direct mode: the primary's `optimeDate` minus the
//!   secondary's, from `replSetGetStatus` (which needs the `clusterMonitor`
//!   role; without it the lag is `None`); MongoDB reports no byte lag;
//! - a refused or unreachable endpoint fails with a `Connect` error at once,
//!   a hung one with [`Error::Timeout`](switchyard_core::Error::Timeout) at the
//!   probe's timeout.
//!
//! # Causal reads
//!
//! [`MongoBackend`] is a
//! [`CausalBackend`](switchyard_core::CausalBackend): through the router, a
//! write yields a token naming its operation time in the replica set, and a
//! read given the token is served by a secondary only once that secondary
//! answers a read sent with `readConcern: {afterClusterTime}` at that time,
//! in the handle's own tenant namespace (what the driver's causally
//! consistent sessions do, with the position carried in the token). A server
//! outside any replica set gives no token
//! ([`CausalError::Unsupported`](switchyard_core::CausalError::Unsupported)).
//! The rules, elections included, are in this crate's `causal` module
//! source; the router's side in `switchyard_router::causal`.
//!
//! # Errors
//!
//! [`classify`] and [`mongo_error`] map driver errors onto
//! [`switchyard_core::Error`]; [`MongoCheckoutExt::fail`] reports a failure to
//! the router in one call. Messages never contain the URL's password.

mod backend;
mod causal;
mod collection;
mod config;
mod conn;
mod error;
mod names;
mod pipeline;
mod probe;
mod row;
mod stats;
mod tls;

pub use backend::MongoBackend;
pub use collection::ScopedCollection;
pub use config::{
    MongoBackendBuilder, MongoBackendConfig, Topology, DEFAULT_DATABASE,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_OPERATION_TIMEOUT, DEFAULT_TENANT_FIELD,
};
pub use conn::MongoConn;
pub use error::{classify, mongo_cause, mongo_error, server_code, MongoCheckoutExt, MongoError};
pub use names::{MAX_DATABASE_LEN, MAX_NAMESPACE_LEN, PREFIX_SEPARATOR};
pub use stats::MongoStats;

/// The driver, re-exported so callers use the same version (`bson`, options).
pub use mongodb;

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Checkout;

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MongoBackend>();
        assert_send_sync::<MongoConn>();
        assert_send::<Checkout<MongoBackend>>();
        assert_send::<ScopedCollection<'static>>();
    };
}
