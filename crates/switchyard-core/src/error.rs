//! The error type shared by every switchyard crate.

use std::fmt;
use std::time::Duration;

use crate::backend::Intent;
use crate::endpoint::EndpointId;
use crate::tenant::{TemplateError, TenantId, TenantIdError};

/// A boxed driver error, kept as the `source` of [`Error::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong between asking for a connection and giving it back.
///
/// Variants carry the endpoint and tenant they concern; driver errors stay
/// reachable through [`std::error::Error::source`]. Messages never contain
/// secrets: endpoints are shown by name or redacted URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tenant id failed validation; nothing was sent anywhere.
    #[error(transparent)]
    InvalidTenant(#[from] TenantIdError),

    /// A tier's name template is malformed.
    #[error(transparent)]
    InvalidTemplate(#[from] TemplateError),

    /// The tenant is not registered and there is no default tier.
    #[error("tenant {tenant} is not registered and no default tier is configured")]
    UnknownTenant {
        /// The tenant asked for.
        tenant: TenantId,
    },

    /// The tenant's database or schema name would exceed the identifier limit.
    #[error("tenant {tenant} is too long for name template {template}")]
    TenantNameTooLong {
        /// The tenant asked for.
        tenant: TenantId,
        /// The template it did not fit.
        template: String,
    },

    /// No connection became available before the deadline.
    #[error(
        "timed out after {elapsed:?} waiting for a connection to {endpoint}{}",
        ForTenant(tenant)
    )]
    Timeout {
        /// Endpoint that was asked.
        endpoint: EndpointId,
        /// Tenant the checkout was for.
        tenant: Option<TenantId>,
        /// Time spent waiting.
        elapsed: Duration,
    },

    /// An operation run on a checked-out connection (through the router's
    /// `Cluster::run`) overran a deadline and was cancelled; its connection was
    /// closed, never pooled. [`Error::Timeout`] is the other timeout: no
    /// connection in time.
    #[error(
        "operation on {endpoint}{} cancelled: {deadline} deadline passed after {elapsed:?}",
        ForTenant(tenant)
    )]
    OperationTimeout {
        /// Endpoint the operation ran on.
        endpoint: EndpointId,
        /// Tenant the checkout was for.
        tenant: Option<TenantId>,
        /// Which deadline fired.
        deadline: Deadline,
        /// Time the attempt had run (checkout and operation).
        elapsed: Duration,
    },

    /// A health probe got no answer in time: the endpoint is hung or
    /// unreachable (a down node, a paused process, a stalled network).
    #[error("probe of {endpoint} timed out after {elapsed:?}")]
    ProbeTimeout {
        /// Endpoint that was probed.
        endpoint: EndpointId,
        /// Time spent waiting for the answer.
        elapsed: Duration,
    },

    /// The tenant already holds its tier's maximum of concurrent checkouts.
    #[error("tenant {tenant} holds its quota of {limit} connections (waited {waited:?})")]
    QuotaExceeded {
        /// The tenant over quota.
        tenant: TenantId,
        /// The tier's limit.
        limit: u32,
        /// Time spent waiting for a permit.
        waited: Duration,
    },

    /// Every endpoint that could serve the request is down or ejected.
    #[error("no healthy endpoint in cluster {cluster} for {intent}")]
    NoHealthyEndpoint {
        /// Cluster name.
        cluster: String,
        /// What the checkout was for.
        intent: Intent,
    },

    /// The cluster has no writable primary, and none appeared within the failover timeout.
    #[error("no primary in cluster {cluster} after waiting {waited:?}")]
    NoPrimary {
        /// Cluster name.
        cluster: String,
        /// Time spent waiting for a primary.
        waited: Duration,
    },

    /// Several endpoints report primary and their engine's histories do not
    /// say which one writes moved to (unrelated lines, or one line written by
    /// two): writes are refused rather than sent to a guess.
    #[error(
        "split brain in cluster {cluster}: {} report primary and their histories cannot be ordered; \
         writes refused until all but one are demoted or an operator names the one to trust",
        Names(primaries)
    )]
    SplitBrain {
        /// Cluster name.
        cluster: String,
        /// The primaries that could not be ordered.
        primaries: Vec<EndpointId>,
    },

    /// The tenant's database, schema or index does not exist on the endpoint.
    #[error("{what} {name:?} for tenant {tenant} does not exist on {endpoint}")]
    TenantNotProvisioned {
        /// Endpoint that was asked.
        endpoint: EndpointId,
        /// The tenant.
        tenant: TenantId,
        /// `database`, `schema`, `index`, ...
        what: &'static str,
        /// The missing object's name.
        name: String,
    },

    /// Applying or undoing a tenant scope failed; the connection was discarded.
    #[error("could not {action} tenant scope for {tenant} on {endpoint}")]
    Scope {
        /// Endpoint of the connection.
        endpoint: EndpointId,
        /// The tenant.
        tenant: TenantId,
        /// `apply` or `reset`.
        action: &'static str,
        /// The driver error.
        #[source]
        source: BoxError,
    },

    /// The engine or its driver failed.
    #[error("{kind} error on {endpoint}{}", ForTenant(tenant))]
    Backend {
        /// Endpoint that failed.
        endpoint: EndpointId,
        /// Tenant the checkout was for.
        tenant: Option<TenantId>,
        /// What kind of failure it was, for retry and ejection decisions.
        kind: BackendErrorKind,
        /// The driver error.
        #[source]
        source: BoxError,
    },

    /// A TLS handshake with the endpoint was refused: its certificate is not
    /// trusted or does not name the host, or it refused ours. A configuration
    /// problem, so neither retried elsewhere nor counted against the
    /// endpoint's health (see [`crate::TlsSettings`]).
    #[error("TLS handshake with {endpoint} failed: {failure}")]
    Tls {
        /// Endpoint whose handshake failed.
        endpoint: EndpointId,
        /// Why.
        failure: crate::TlsFailure,
        /// The driver error.
        #[source]
        source: BoxError,
    },

    /// A checkout was refused before any I/O: what it asks cannot be done on
    /// this endpoint as it is set up (the tenant's scope names a target the
    /// engine cannot take, such as an unsafe name or a reserved user; a source
    /// the scope needs is missing; the pool cannot run). Found at checkout,
    /// not when the configuration was read; the same request fails the same
    /// way again, so it is neither retried nor counted against the endpoint's
    /// health.
    #[error("checkout refused on {endpoint}{}: {reason}", ForTenant(tenant))]
    CheckoutRefused {
        /// Endpoint that refused.
        endpoint: EndpointId,
        /// Tenant the checkout was for.
        tenant: Option<TenantId>,
        /// Why, and what to fix.
        reason: String,
    },

    /// Configuration is invalid.
    #[error("{path}: {message}")]
    Config {
        /// Where in the configuration the problem is (`clusters.main.endpoints[1].url`).
        path: String,
        /// What is wrong.
        message: String,
    },

    /// A causal token was refused, or could not be honoured or made (see
    /// [`crate::CausalToken`]).
    #[error("causal token in cluster {cluster}: {reason}")]
    Causal {
        /// Cluster name.
        cluster: String,
        /// Why.
        #[source]
        reason: crate::CausalError,
    },

    /// The pool or router was shut down.
    #[error("switchyard was shut down")]
    Closed,
}

/// Which deadline of a routed operation fired (as deadpool's `TimeoutType`
/// says which of its timeouts did). Waiting for a connection is
/// [`Error::Timeout`]; these two bound the operation run on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Deadline {
    /// One attempt's deadline (`retry.attempt_timeout`): the endpoint did not
    /// finish in the time one attempt may take, so it is charged with a
    /// failure and a read moves to another endpoint.
    Attempt,
    /// The whole operation's deadline (`checkout_timeout`, or the caller's)
    /// passed before the attempt's own: nothing is left to retry with, and
    /// the endpoint is not blamed for the caller's impatience.
    Budget,
}

impl fmt::Display for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deadline::Attempt => "attempt",
            Deadline::Budget => "whole-operation",
        })
    }
}

/// The kind of a backend failure, which decides retries and ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The endpoint could not be reached (refused, unreachable, TLS or auth at connect).
    Connect,
    /// The connection broke mid-operation (reset, closed, protocol error).
    Io,
    /// The endpoint answered but is read-only (a replica asked to write).
    ReadOnly,
    /// The server rejected the request (syntax, constraint, permission).
    Rejected,
}

impl BackendErrorKind {
    /// The kind of an I/O failure: refused, unreachable or no such address
    /// is [`Connect`](Self::Connect), anything else [`Io`](Self::Io).
    pub fn of_io(kind: std::io::ErrorKind) -> Self {
        use std::io::ErrorKind as K;
        match kind {
            K::ConnectionRefused
            | K::NotFound
            | K::AddrNotAvailable
            | K::HostUnreachable
            | K::NetworkUnreachable => Self::Connect,
            _ => Self::Io,
        }
    }

    /// The kind of an HTTP client's network failure: [`Connect`](Self::Connect)
    /// when a link of `error`'s chain is an I/O error [`of_io`](Self::of_io)
    /// calls so, or hyper-util's connect error; [`Io`](Self::Io) otherwise.
    pub fn of_network(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut current = Some(error);
        while let Some(e) = current {
            let io = e.downcast_ref::<std::io::Error>();
            // hyper-util's legacy client error prints its kind first.
            let debug = format!("{e:?}");
            if io.is_some_and(|io| Self::of_io(io.kind()) == Self::Connect)
                || debug.starts_with("Error(Connect")
                || debug.starts_with("hyper_util::client::legacy::Error(Connect")
            {
                return Self::Connect;
            }
            current = e.source();
        }
        Self::Io
    }
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendErrorKind::Connect => "connect",
            BackendErrorKind::Io => "i/o",
            BackendErrorKind::ReadOnly => "read-only",
            BackendErrorKind::Rejected => "server",
        })
    }
}

impl Error {
    /// Wraps a driver error.
    pub fn backend(
        endpoint: &EndpointId,
        tenant: Option<&TenantId>,
        kind: BackendErrorKind,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            endpoint: endpoint.clone(),
            tenant: tenant.cloned(),
            kind,
            source: source.into(),
        }
    }

    /// [`Error::Tls`] when `source` failed in a TLS handshake, else
    /// [`Error::backend`] of `kind`: what engines call on connect errors.
    pub fn connect(
        endpoint: &EndpointId,
        tenant: Option<&TenantId>,
        kind: BackendErrorKind,
        source: impl Into<BoxError>,
    ) -> Self {
        let source = source.into();
        match crate::TlsFailure::find(source.as_ref()) {
            Some(failure) => Error::Tls {
                endpoint: endpoint.clone(),
                failure,
                source,
            },
            None => Error::backend(endpoint, tenant, kind, source),
        }
    }

    /// Whether the same request may succeed on another endpoint or a moment later.
    ///
    /// True for timeouts (waiting or operating), unreachable or broken endpoints, read-only replicas and
    /// a missing healthy endpoint or primary; false for everything the caller must
    /// fix (bad tenant, quota, config, rejected queries).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::OperationTimeout { .. }
            | Error::NoHealthyEndpoint { .. }
            | Error::NoPrimary { .. } => true,
            Error::Backend { kind, .. } => matches!(
                kind,
                BackendErrorKind::Connect | BackendErrorKind::Io | BackendErrorKind::ReadOnly
            ),
            _ => false,
        }
    }

    /// Whether the error says the endpoint itself is unhealthy (for passive ejection).
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::ProbeTimeout { .. }
                | Error::OperationTimeout {
                    deadline: Deadline::Attempt,
                    ..
                }
                | Error::Backend {
                    kind: BackendErrorKind::Connect | BackendErrorKind::Io,
                    ..
                }
        )
    }

    /// The kind of an [`Error::Backend`], `None` for every other variant.
    pub fn backend_kind(&self) -> Option<BackendErrorKind> {
        match self {
            Error::Backend { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The endpoint the error concerns, when it concerns one.
    pub fn endpoint(&self) -> Option<&EndpointId> {
        match self {
            Error::Timeout { endpoint, .. }
            | Error::OperationTimeout { endpoint, .. }
            | Error::ProbeTimeout { endpoint, .. }
            | Error::TenantNotProvisioned { endpoint, .. }
            | Error::Scope { endpoint, .. }
            | Error::Tls { endpoint, .. }
            | Error::CheckoutRefused { endpoint, .. }
            | Error::Backend { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }
}

struct Names<'a>(&'a [EndpointId]);

impl fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

struct ForTenant<'a>(&'a Option<TenantId>);

impl fmt::Display for ForTenant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t) => write!(f, " for tenant {t}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> EndpointId {
        EndpointId::new("pg-replica-1")
    }

    #[test]
    fn messages_are_lowercase_and_carry_context() {
        let t = TenantId::new("acme").unwrap();
        let e = Error::Timeout {
            endpoint: ep(),
            tenant: Some(t.clone()),
            elapsed: Duration::from_millis(250),
        };
        assert_eq!(
            e.to_string(),
            "timed out after 250ms waiting for a connection to pg-replica-1 for tenant acme"
        );
        let e = Error::ProbeTimeout {
            endpoint: ep(),
            elapsed: Duration::from_millis(500),
        };
        assert_eq!(e.to_string(), "probe of pg-replica-1 timed out after 500ms");
        assert!(e.is_endpoint_failure() && !e.is_retryable());
        assert_eq!(e.endpoint(), Some(&ep()));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::backend(&ep(), None, BackendErrorKind::Connect, io);
        assert_eq!(e.to_string(), "connect error on pg-replica-1");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn an_operation_timeout_names_its_deadline_and_blames_only_a_slow_attempt() {
        let t = TenantId::new("acme").unwrap();
        let attempt = Error::OperationTimeout {
            endpoint: ep(),
            tenant: Some(t),
            deadline: Deadline::Attempt,
            elapsed: Duration::from_millis(300),
        };
        assert_eq!(
            attempt.to_string(),
            "operation on pg-replica-1 for tenant acme cancelled: attempt deadline passed after 300ms"
        );
        assert!(attempt.is_retryable() && attempt.is_endpoint_failure());
        assert_eq!(attempt.endpoint(), Some(&ep()));
        let budget = Error::OperationTimeout {
            endpoint: ep(),
            tenant: None,
            deadline: Deadline::Budget,
            elapsed: Duration::from_millis(40),
        };
        assert!(budget.to_string().contains("whole-operation deadline"));
        assert!(!budget.is_endpoint_failure());
    }

    #[test]
    fn retryability_follows_the_kind() {
        let io = || std::io::Error::other("x");
        assert!(Error::backend(&ep(), None, BackendErrorKind::Connect, io()).is_retryable());
        assert!(Error::backend(&ep(), None, BackendErrorKind::Io, io()).is_retryable());
        assert!(!Error::backend(&ep(), None, BackendErrorKind::Rejected, io()).is_retryable());
        assert!(!Error::from(TenantIdError::Empty).is_retryable());
        let quota = Error::QuotaExceeded {
            tenant: TenantId::new("a").unwrap(),
            limit: 1,
            waited: Duration::ZERO,
        };
        assert!(!quota.is_retryable());
        assert!(!quota.is_endpoint_failure());
        assert!(Error::backend(&ep(), None, BackendErrorKind::Io, io()).is_endpoint_failure());
        assert!(
            !Error::backend(&ep(), None, BackendErrorKind::ReadOnly, io()).is_endpoint_failure()
        );
    }
}
