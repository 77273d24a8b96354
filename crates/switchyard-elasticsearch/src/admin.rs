//! Provisioning helpers, run on an unscoped checkout.

use elasticsearch::indices::IndicesCreateParts;
use serde_json::{json, Map, Value};
use switchyard_core::{BackendErrorKind, Checkout, Error, Isolation, TenantScope};

use crate::error::{classify_status, EsError};
use crate::naming::{index_name, validate_field};
use crate::EsBackend;

/// Sends one admin request and fails on a non-success status.
async fn admin_call(
    conn: &Checkout<EsBackend>,
    scope: &TenantScope,
    request: impl std::future::Future<
        Output = Result<elasticsearch::http::response::Response, elasticsearch::Error>,
    >,
) -> Result<Value, Error> {
    let endpoint = conn.endpoint().clone();
    let timeout = conn.backend().request_timeout();
    let work = async {
        let response = request.await?;
        let status = response.status_code().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Ok::<_, elasticsearch::Error>((status, body))
    };
    let tenant = Some(scope.tenant());
    let (status, body) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| {
            Error::backend(
                &endpoint,
                tenant,
                BackendErrorKind::Io,
                EsError::RequestTimeout(timeout),
            )
        })?
        .map_err(|e| crate::es_error(&endpoint, Some(scope), e))?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(Error::backend(
            &endpoint,
            tenant,
            classify_status(status),
            EsError::from_body(status, &body),
        ))
    }
}

/// Creates the index of an index-scoped (database or schema) tenant, with
/// `body` as the create-index body (settings, mappings); returns its name.
///
/// Run it on an unscoped checkout (provisioning is not tenant traffic).
pub async fn create_tenant_index(
    conn: &Checkout<EsBackend>,
    scope: &TenantScope,
    body: Option<Value>,
) -> Result<String, Error> {
    let client = conn.client()?;
    let name = conn.backend().target_name(scope)?;
    let indices = client.indices();
    let request = indices
        .create(IndicesCreateParts::Index(&name))
        .body(body.unwrap_or_else(|| json!({})))
        .send();
    admin_call(conn, scope, request).await?;
    Ok(name)
}

/// Creates the filtered alias of a row-scoped tenant over `shared_index`;
/// returns the alias name.
///
/// The alias is the scope's target mapped by the backend's
/// [`IndexNaming`](crate::IndexNaming); it filters on
/// `term { <tenant_field>: <tenant id> }` and routes reads and writes with
/// the tenant id, so each tenant's documents live on one shard. Map the
/// tenant field as `keyword` in `shared_index`: on a `text` field the term
/// filter would match tokens, not the id. Run it on an unscoped checkout.
///
/// ```no_run
/// # async fn demo(admin: switchyard_core::Checkout<switchyard_elasticsearch::EsBackend>,
/// #               acme: &switchyard_core::TenantScope) -> Result<(), switchyard_core::Error> {
/// use serde_json::json;
/// use switchyard_elasticsearch::create_tenant_alias;
///
/// let client = admin.client()?;
/// client
///     .indices()
///     .create(elasticsearch::indices::IndicesCreateParts::Index("shared"))
///     .body(json!({ "mappings": { "properties": { "tenant_id": { "type": "keyword" } } } }))
///     .send()
///     .await
///     .map_err(|e| switchyard_elasticsearch::es_error(admin.endpoint(), None, e))?;
/// let alias = create_tenant_alias(&admin, "shared", acme).await?;
/// assert_eq!(alias, "tenant_acme");
/// # Ok(()) }
/// ```
pub async fn create_tenant_alias(
    conn: &Checkout<EsBackend>,
    shared_index: &str,
    scope: &TenantScope,
) -> Result<String, Error> {
    let client = conn.client()?;
    if scope.isolation() != Isolation::Row {
        return Err(Error::Config {
            path: format!("tenants.{}", scope.tenant()),
            message: format!(
                "a filtered alias is for row isolation; tenant {} is isolated by {}",
                scope.tenant(),
                scope.isolation()
            ),
        });
    }
    let backend = conn.backend();
    let rejected = |e: EsError| {
        Error::backend(
            conn.endpoint(),
            Some(scope.tenant()),
            BackendErrorKind::Rejected,
            e,
        )
    };
    // The shared index is named by the operator; it must still be a plain name.
    let shared = index_name(shared_index, crate::IndexNaming::Strict).map_err(rejected)?;
    let field = backend.tenant_field();
    validate_field(field).map_err(rejected)?;
    let alias = backend.target_name(scope)?;
    let mut term = Map::new();
    term.insert(field.to_owned(), Value::String(scope.tenant().to_string()));
    let actions = json!({
        "actions": [{
            "add": {
                "index": shared,
                "alias": alias,
                "filter": { "term": term },
                "routing": scope.tenant().as_str(),
            }
        }]
    });
    let indices = client.indices();
    let request = indices.update_aliases().body(actions).send();
    admin_call(conn, scope, request).await?;
    Ok(alias)
}
