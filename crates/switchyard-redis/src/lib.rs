//! Redis for switchyard: a deadpool-redis pool per endpoint, role probes, and
//! tenant isolation applied at checkout.
//!
//! [`RedisBackend`] implements [`switchyard_core::Backend`]. A checkout derefs
//! to a [`RedisConnection`], which is confined to the checkout's tenant:
//!
//! | isolation | at checkout | what holds the tenant in |
//! |---|---|---|
//! | [`Database`](switchyard_core::Isolation::Database) | `SELECT <index>` (index from the config by the scope's target) | its own logical database; commands that leave it (`SELECT`, `MOVE`, `SWAPDB`, `FLUSHALL`, ...) are refused |
//! | [`Schema`](switchyard_core::Isolation::Schema) | nothing | the handle puts every key under `<target>:` and refuses what it cannot confine |
//! | [`Row`](switchyard_core::Isolation::Row) | `AUTH <target> <password>` | an ACL user the server holds to `~<target>:*`, plus the same prefixing |
//!
//! What each level leaves to the application: nothing on scoped checkouts
//! (they have no raw access). The database level relies on the handle (the
//! server cannot hold a connection to one database); pub/sub is server-wide,
//! so a database tenant's `PUBLISH` channels are prefixed like keys. The ACL
//! level is enforced by the server too: a deny-by-default command allow-list
//! built from the handle's own table ([`tenant_user_commands`]), so a script
//! cannot `SCAN`, `SELECT` or `MOVE` its way out. `tests/conformance.rs` runs
//! the test bed's isolation suite at each level.
//!
//! Scoped connections never expose the socket: commands go through typed
//! methods ([`RedisConnection::get`], [`RedisConnection::hset`], ...) or a
//! [`Command`] checked against a table of key positions. Unscoped checkouts
//! get [`RedisConnection::raw`] for the whole `redis` API. Before a connection
//! goes back to the pool its session is reset; a connection whose reset fails,
//! whose command was cancelled mid-flight, or whose socket broke is closed.
//!
//! Needs Redis 6.2 or later (`RESET`, ACL users) speaking RESP2. A tenant that
//! needs a server of its own gets a [`RedisBackend`] (or a router cluster) of
//! its own, checked out unscoped.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{Checkout, CheckoutRequest, Isolation, TenantId, TenantRegistry, TierPolicy};
//! use switchyard_redis::{provision_acl_users, RedisBackend, StaticPasswords};
//!
//! let tenants = TenantRegistry::new()
//!     .with_tier("shared", TierPolicy::new(Isolation::Schema).with_max_connections(4))
//!     .with_tier("strict", TierPolicy::new(Isolation::Row).with_max_connections(4))
//!     .with_default_tier("shared")
//!     .with_tenant(TenantId::new("globex")?, "strict");
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//! let globex = tenants.resolve(&TenantId::new("globex")?)?;
//!
//! // Random per-tenant passwords, kept by the service (a secret store in production).
//! let passwords = StaticPasswords::generate([globex.scope().tenant()])?;
//! let backend = Arc::new(
//!     RedisBackend::builder("cache-1", "redis://127.0.0.1:6379")
//!         .max_size(16)
//!         .acl_passwords(passwords.clone())
//!         .build()?,
//! );
//!
//! // Once per node: create the tenant ACL users (an unscoped, admin checkout).
//! let mut admin = Checkout::acquire(&backend, CheckoutRequest::with_timeout(Duration::from_secs(1))).await?;
//! provision_acl_users(&mut admin, [&**globex.scope()], &passwords).await?;
//! drop(admin);
//!
//! let timeout = Duration::from_millis(500);
//! let mut conn = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout).tenant(&acme)).await?;
//! conn.set("greeting", "hello").await?; // stored as tenant_acme:greeting
//! let greeting: Option<String> = conn.get("greeting").await?;
//! assert_eq!(greeting.as_deref(), Some("hello"));
//! assert!(conn.raw().is_err()); // no way around the prefix
//! # Ok(()) }
//! ```

pub mod acl;
mod backend;
mod causal;
mod commands;
mod config;
mod connection;
mod error;
mod keys;
mod probe;
mod table;
mod tls;
mod users;

pub use acl::{
    acl_user, key_prefix, provision_acl_users, remove_acl_users, tenant_user_commands, AclPassword,
    AclPasswords, StaticPasswords,
};
pub use backend::{RedisBackend, RedisCounters};
pub use config::{DatabaseResolver, RedisBackendBuilder, RedisBackendConfig};
pub use connection::{RawConnection, RedisConnection};
pub use error::{error_kind, redis_error, ConfinementError};
pub use keys::Command;

/// The `redis` crate this backend is built on (deadpool-redis's re-export), for
/// `redis::cmd` on unscoped checkouts and for `FromRedisValue`/`ToRedisArgs`.
pub use deadpool_redis::redis;
