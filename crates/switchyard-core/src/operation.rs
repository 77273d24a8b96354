//! Driver errors of work done on a checked-out connection, turned into
//! [`Error`] with the checkout's context.
//!
//! The router's `Cluster::run` lets an operation fail with its driver's own
//! error (`sqlx::Error`, `redis::RedisError`) and converts it once, with the
//! endpoint and tenant scope of the connection it ran on, so the error
//! decides retries and ejection the same way wherever it came from. Each
//! engine crate implements the conversion for its driver's error; an
//! operation that already speaks [`Error`] passes it through.

use crate::endpoint::EndpointId;
use crate::error::Error;
use crate::tenant::TenantScope;

/// An error an operation on a connection of type `C` may fail with.
///
/// `C` is the engine's connection type (what a checkout derefs to), so that
/// each engine crate may implement this for its driver's error type.
pub trait OperationError<C>: Sized {
    /// The switchyard error for this failure on `endpoint`, for a checkout
    /// scoped to `scope` when it was.
    fn into_error(self, endpoint: &EndpointId, scope: Option<&TenantScope>) -> Error;
}

/// Already a switchyard error: passed through as it is.
impl<C> OperationError<C> for Error {
    fn into_error(self, _endpoint: &EndpointId, _scope: Option<&TenantScope>) -> Error {
        self
    }
}
