//! The Elasticsearch backend of switchyard: a [`switchyard_core::Backend`]
//! over the official `elasticsearch` crate's transport for one node, with
//! tenant isolation applied at checkout.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use serde_json::json;
//! use switchyard_core::{
//!     Backend, Checkout, CheckoutRequest, Isolation, PoolSettings, TenantId, TenantRegistry,
//!     TierPolicy,
//! };
//! use switchyard_elasticsearch::{create_tenant_alias, create_tenant_index, EsBackend, Refresh};
//!
//! let backend = Arc::new(
//!     EsBackend::builder("es-1", "http://elastic:secret@127.0.0.1:9200")
//!         .pool(PoolSettings::default().with_max_size(32))
//!         .build()?,
//! );
//! let probe = backend.probe(Duration::from_secs(1)).await?;
//! println!("{} runs Elasticsearch {:?}", backend.endpoint(), probe.version);
//!
//! let tenants = TenantRegistry::new()
//!     .with_tier("shared", TierPolicy::new(Isolation::Row))
//!     .with_tier("dedicated", TierPolicy::new(Isolation::Database))
//!     .with_default_tier("shared")
//!     .with_tenant(TenantId::new("bigco")?, "dedicated");
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//! let bigco = tenants.resolve(&TenantId::new("bigco")?)?;
//! let timeout = Duration::from_secs(2);
//!
//! // Once: provision on an unscoped checkout (`shared` maps tenant_id as keyword).
//! let admin = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout)).await?;
//! create_tenant_alias(&admin, "shared", acme.scope()).await?; // alias `tenant_acme`
//! create_tenant_index(&admin, bigco.scope(), None).await?; // index `tenant_bigco`
//! drop(admin);
//!
//! let conn = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout).tenant(&acme)).await?;
//! conn.index("1", json!({ "title": "hello" }), Refresh::True).await?; // tenant_id set to "acme"
//! let found = conn.search(json!({ "query": { "match": { "title": "hello" } } })).await?;
//! assert_eq!(found["hits"]["hits"][0]["_id"], "1");
//! assert!(conn.client().is_err()); // no raw client on a scoped checkout
//! # Ok(()) }
//! ```
//!
//! # Connections
//!
//! Elasticsearch is reached over HTTP, with no session to pool. A checkout
//! is an [`EsConnection`]: a permit from a
//! [`FairGate`](switchyard_core::FairGate) (waiting tenants served in turn) of
//! [`pool.max_size`](switchyard_core::PoolSettings::max_size) (a busy node
//! makes checkouts wait, then time out at their deadline, as a full pool
//! does) plus a handle confined to the tenant. Returning one is dropping it.
//! One [`EsBackend`] talks to one node through a single-node connection
//! pool; the router balances across nodes. The probe asks for cluster health
//! (`red` is an `Io` error, [`EsError::ClusterRed`]; `yellow` and `green` are
//! healthy) and the version, within its timeout, outside the in-flight bound.
//! The role is always [`Role::Standalone`](switchyard_core::Role::Standalone):
//! the cluster routes to shards internally, so every node serves reads and
//! writes.
//!
//! # Isolation levels
//!
//! - [`Database`](switchyard_core::Isolation::Database) (and `Schema`): an
//!   index per tenant, named by the scope's target (`tenant_acme`); the
//!   checkout checks it exists (cached) and fails with
//!   [`Error::TenantNotProvisioned`](switchyard_core::Error::TenantNotProvisioned)
//!   otherwise. [`create_tenant_index`] creates one.
//! - [`Row`](switchyard_core::Isolation::Row): a filtered alias per tenant over
//!   a shared index ([`create_tenant_alias`]: `term` filter on the tenant
//!   field, routing by tenant id). The handle addresses only the alias, adds
//!   its own tenant `term` filter to every query (so a misconfigured alias
//!   still leaks nothing), sets or checks the tenant field of every indexed
//!   document, stores ids as `<tenant>:<id>` (the get and delete APIs ignore
//!   alias filters, and ids are unique per shared index), and checks every hit
//!   and document that comes back.
//!
//! Index names must be lowercase while tenant ids need not be:
//! [`IndexNaming::Encode`] (default) writes each uppercase letter as `.` plus
//! the lowercase letter (`tenant_Acme` → `tenant_.acme`), which cannot
//! collide; [`IndexNaming::Strict`] refuses such tenants. A target that
//! Elasticsearch would read as special (starting with `_`, `-`, `+` or `.`,
//! like `_all` under the template `{id}`) is refused with
//! [`EsError::InvalidIndexName`] before anything is sent.
//!
//! Search bodies of scoped checkouts are checked before they are sent: keys
//! that name other indices (`index`, `_index`, `indices`, `indices_boost`,
//! `indexed_shape`, `pit`) are refused everywhere, and on a shared index also
//! those that read past filters or expose index-wide data (`global`,
//! `suggest`, `significant_terms`, `significant_text`, `more_like_this`,
//! `explain`, `knn`, `retriever`, `sub_searches`, `min_doc_count: 0`). Scores
//! on a shared index still use index-wide term statistics; use an index per
//! tenant where that matters.
//!
//! `min_doc_count` is compared as Elasticsearch parses it (`"0"` and `0.5`
//! count as zero), `profile` is refused on shared indices, and a tier whose
//! template can render `_all`, a `-` or `_` start, or an encoded `.` start (a
//! hidden or system index) is refused when the cluster is built.
//! `tests/conformance.rs` runs the test bed's isolation suite at both levels,
//! on the stand-in or on a real server by URL.
//!
//! # Errors
//!
//! [`es_error`], [`classify`] and [`classify_status`] map transport errors and
//! statuses onto [`switchyard_core::Error`] (refused connections and HTTP 401
//! are `Connect`; resets, timeouts, 429 and 5xx are `Io`; other statuses are
//! `Rejected`, with the server's error type and reason in [`EsError::Status`]);
//! [`EsCheckoutExt::fail`] maps and reports in one call.

mod admin;
mod backend;
mod body;
mod config;
mod connection;
mod error;
mod naming;
mod tls;

pub use admin::{create_tenant_alias, create_tenant_index};
pub use backend::EsBackend;
pub use config::{
    EsBackendBuilder, EsBackendConfig, DEFAULT_PROVISION_CACHE_TTL, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TENANT_FIELD,
};
pub use connection::EsConnection;
pub use error::{classify, classify_status, es_error, EsCheckoutExt, EsError};
pub use naming::{
    index_name, validate_doc_id, validate_field, IndexNaming, MAX_DOC_ID_LEN, MAX_INDEX_NAME_LEN,
};

/// The refresh policy of writes (`True`, `False`, `WaitFor`).
pub use elasticsearch::params::Refresh;

/// The `elasticsearch` crate this backend is built on, for the raw client of
/// unscoped checkouts.
pub use elasticsearch;

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Checkout;

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EsBackend>();
        assert_send_sync::<EsConnection>();
        assert_send::<Checkout<EsBackend>>();
    };
}
