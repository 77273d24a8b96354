//! The contracts every switchyard engine and the router share.
//!
//! switchyard routes a service's database checkouts across a cluster of
//! endpoints per engine and confines each checkout to one tenant. This crate
//! holds the vocabulary, and no engine or routing policy:
//!
//! - [`Backend`]: what an engine crate implements for one endpoint: acquire a
//!   connection before a deadline, apply a tenant scope, probe health and role,
//!   report pool statistics, and take a connection back (inspect, recycle,
//!   keep or discard);
//! - [`Checkout`]: the RAII guard a caller holds; dropping it sends the
//!   connection down the one return path, releases the in-flight count and the
//!   tenant quota, and reports the outcome;
//! - [`TenantId`], [`Isolation`], [`TenantScope`], [`TenantRegistry`],
//!   [`TierPolicy`]: who a tenant is, how it is isolated and how much it may hold;
//! - [`Intent`], [`Role`], [`Probe`] (with the endpoint's replication
//!   [`History`]), [`PoolSettings`], [`SecretUrl`];
//! - [`CausalToken`], [`CausalBackend`]: read-your-writes on replicas;
//! - [`FairQueue`] and [`FairGate`]: checkouts waiting for a saturated pool
//!   are served tenant by tenant in turn, weighted by tier;
//! - [`Error`]: one typed error with [`Error::is_retryable`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), switchyard_core::Error> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::noop::NoopBackend;
//! use switchyard_core::{Checkout, CheckoutRequest, Isolation, TenantId, TenantRegistry, TierPolicy};
//!
//! let tenants = TenantRegistry::new()
//!     .with_tier("standard", TierPolicy::new(Isolation::Row).with_max_connections(8))
//!     .with_default_tier("standard");
//!
//! // A tenant id from a request header is validated before anything else happens.
//! assert!(TenantId::new("acme'; --").is_err());
//! let acme = tenants.resolve(&TenantId::new("acme")?)?;
//!
//! let backend = Arc::new(NoopBackend::new("primary"));
//! let conn = Checkout::acquire(
//!     &backend,
//!     CheckoutRequest::with_timeout(Duration::from_secs(2)).tenant(&acme),
//! )
//! .await?;
//! assert_eq!(conn.tenant(), Some(&TenantId::new("acme")?));
//! # Ok(()) }
//! ```

mod backend;
mod builder;
mod causal;
mod checkout;
mod endpoint;
mod error;
mod fair;
mod gate;
mod history;
mod http;
#[cfg(any(test, feature = "test-util"))]
pub mod noop;
mod operation;
pub mod provision;
mod registry;
mod tenant;
mod tls;
mod tls_client;

pub use backend::{Backend, Intent, PoolStats, Probe, Recycle, Returned, Role};
pub use causal::{CausalBackend, CausalError, CausalToken, Coverage};
pub use checkout::{
    Checkout, CheckoutObserver, CheckoutRequest, InFlight, InFlightToken, Origin, Outcome,
};
pub use endpoint::{percent_decode, EndpointId, PoolSettings, SecretUrl};
pub use error::{BackendErrorKind, BoxError, Deadline, Error};
pub use fair::{FairQueue, LingerTimer, QueueClass, QueueOrder, Share, WaitKey};
pub use gate::{FairGate, GateError, GatePermit, DEFAULT_LINGER};
pub use history::History;
pub use http::HttpUrl;
pub use operation::OperationError;
pub use registry::{
    deadline_after, Quota, TenantEntry, TenantRegistry, TierPolicy, DEFAULT_ROW_SETTING,
};
pub use tenant::{
    Isolation, NameTemplate, TemplateError, TenantId, TenantIdError, TenantScope, MAX_TENANT_ID_LEN,
};
pub use tls::{ClientIdentity, TlsFailure, TlsMaterial, TlsSettings, Transport};
