//! Mapping Elasticsearch failures onto [`switchyard_core::Error`].

use std::time::Duration;

use serde_json::Value;
use switchyard_core::{BackendErrorKind, Checkout, EndpointId, Error, TenantId, TenantScope};

/// What kind of failure a transport error is, for retry and ejection decisions.
///
/// A refused, unreachable or failed connect is [`BackendErrorKind::Connect`];
/// any other transport failure (reset, timeout, broken response) is
/// [`BackendErrorKind::Io`]; a client-side problem that never reached the
/// server (a body that would not serialize) is [`BackendErrorKind::Rejected`].
pub fn classify(error: &elasticsearch::Error) -> BackendErrorKind {
    if error.is_json() {
        return BackendErrorKind::Rejected;
    }
    BackendErrorKind::of_network(error)
}

/// What kind of failure an HTTP status from Elasticsearch is.
///
/// 401 (credentials refused) is `Connect`, as a refused login is for other
/// engines; 429 (rejected for load) and 5xx are `Io`, worth retrying
/// elsewhere or later; every other status is `Rejected`.
pub fn classify_status(status: u16) -> BackendErrorKind {
    match status {
        401 => BackendErrorKind::Connect,
        429 | 500..=599 => BackendErrorKind::Io,
        _ => BackendErrorKind::Rejected,
    }
}

/// Turns a transport error from a checkout on `endpoint` into a switchyard
/// [`Error::Backend`] with the kind from [`classify`].
pub fn es_error(
    endpoint: &EndpointId,
    scope: Option<&TenantScope>,
    error: elasticsearch::Error,
) -> Error {
    let kind = classify(&error);
    Error::connect(
        endpoint,
        scope.map(TenantScope::tenant),
        kind,
        EsError::Transport(error),
    )
}

/// Crate-specific failures, carried as the source of an [`Error::Backend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EsError {
    /// A scope's target cannot be an index or alias name.
    #[error("{name:?} cannot be an index name: {reason}")]
    InvalidIndexName {
        /// The target (truncated to 80 characters).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A document id was refused before it reached a URL.
    #[error("invalid document id {id:?}: {reason}")]
    InvalidDocId {
        /// The id (truncated to 80 characters).
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// The tenant field name is not a plain top-level key.
    #[error("invalid tenant field {field:?}: use a non-empty top-level key without '.', '*' or spaces, not starting with '_'")]
    InvalidField {
        /// The field (truncated to 80 characters).
        field: String,
    },
    /// A scoped checkout was asked for something that could leave its
    /// tenant's index or alias (the raw client).
    #[error("a scoped checkout for tenant {tenant} does not expose {what}")]
    Confined {
        /// The checkout's tenant.
        tenant: TenantId,
        /// What was asked for.
        what: &'static str,
    },
    /// An unscoped checkout was asked for a tenant operation.
    #[error("{operation} needs a tenant-scoped checkout; use client() on unscoped ones")]
    Unscoped {
        /// The operation.
        operation: &'static str,
    },
    /// A request body holds a key that could reach beyond the tenant's data.
    #[error(
        "request body key {key:?} at {path} is not allowed on a {mode}-scoped checkout: {reason}"
    )]
    ForbiddenKey {
        /// The refused key.
        key: String,
        /// Where it was, as a JSON pointer.
        path: String,
        /// `index` or `row`.
        mode: &'static str,
        /// Why the key is refused.
        reason: &'static str,
    },
    /// A body or document is not a JSON object.
    #[error("{what} must be a JSON object")]
    NotAnObject {
        /// What was not an object.
        what: &'static str,
    },
    /// A document to index names another tenant in the tenant field.
    #[error("document has {field} = {found}, but the checkout is for tenant {tenant}")]
    ForeignTenant {
        /// The tenant field.
        field: String,
        /// The checkout's tenant.
        tenant: TenantId,
        /// The value found (truncated to 80 characters).
        found: String,
    },
    /// The server returned a document of another tenant. The filtered alias
    /// and the handle's own filter should make this impossible; it is
    /// reported, never returned.
    #[error("elasticsearch returned document {id:?} that does not belong to tenant {tenant}")]
    ForeignDocument {
        /// The stored `_id`.
        id: String,
        /// The checkout's tenant.
        tenant: TenantId,
    },
    /// Elasticsearch answered with an error status.
    #[error("elasticsearch returned {status}{}{}", ty.as_deref().map(|t| format!(" {t}")).unwrap_or_default(), reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error `type` (`index_not_found_exception`, ...).
        ty: Option<String>,
        /// The error `reason`.
        reason: Option<String>,
    },
    /// The cluster reported `red`: some primary shards are unassigned.
    #[error("cluster {cluster} is red ({unassigned} unassigned shards)")]
    ClusterRed {
        /// The cluster name.
        cluster: String,
        /// `unassigned_shards` from the health report.
        unassigned: u64,
    },
    /// A response was not what the API documents.
    #[error("unexpected response: {0}")]
    UnexpectedResponse(String),
    /// A request took longer than the configured request timeout.
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    /// The transport failed.
    #[error(transparent)]
    Transport(elasticsearch::Error),
}

impl EsError {
    /// Builds [`EsError::Status`] from an error response body.
    pub(crate) fn from_body(status: u16, body: &Value) -> Self {
        let error = &body["error"];
        let text = |v: &Value| v.as_str().map(|s| s.chars().take(500).collect::<String>());
        EsError::Status {
            status,
            ty: text(&error["type"]),
            reason: text(&error["reason"]).or_else(|| text(error)),
        }
    }

    /// The Elasticsearch error type, for [`EsError::Status`].
    pub fn error_type(&self) -> Option<&str> {
        match self {
            EsError::Status { ty, .. } => ty.as_deref(),
            _ => None,
        }
    }
}

/// Convenience for reporting Elasticsearch failures on a checkout.
pub trait EsCheckoutExt {
    /// Maps `error` with [`es_error`], reports it with
    /// [`Checkout::report_failure`] and returns it.
    ///
    /// ```no_run
    /// # async fn demo(mut conn: switchyard_core::Checkout<switchyard_elasticsearch::EsBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use switchyard_elasticsearch::EsCheckoutExt;
    ///
    /// let client = conn.client()?.clone();
    /// let info = client.info().send().await.map_err(|e| conn.fail(e))?;
    /// # let _ = info; Ok(()) }
    /// ```
    fn fail(&mut self, error: elasticsearch::Error) -> Error;
}

impl EsCheckoutExt for Checkout<crate::EsBackend> {
    fn fail(&mut self, error: elasticsearch::Error) -> Error {
        let error = es_error(self.endpoint(), self.scope(), error);
        self.report_failure(&error);
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(classify_status(401), BackendErrorKind::Connect);
        assert_eq!(classify_status(429), BackendErrorKind::Io);
        assert_eq!(classify_status(503), BackendErrorKind::Io);
        assert_eq!(classify_status(400), BackendErrorKind::Rejected);
        assert_eq!(classify_status(404), BackendErrorKind::Rejected);
    }

    #[test]
    fn error_bodies_are_summarised() {
        let body = json!({"error": {"type": "index_not_found_exception", "reason": "no such index [x]"}, "status": 404});
        let e = EsError::from_body(404, &body);
        assert_eq!(e.error_type(), Some("index_not_found_exception"));
        assert_eq!(
            e.to_string(),
            "elasticsearch returned 404 index_not_found_exception: no such index [x]"
        );
        let e = EsError::from_body(500, &json!({"error": "boom"}));
        assert_eq!(e.to_string(), "elasticsearch returned 500: boom");
        let e = EsError::from_body(502, &Value::Null);
        assert_eq!(e.to_string(), "elasticsearch returned 502");
    }
}
