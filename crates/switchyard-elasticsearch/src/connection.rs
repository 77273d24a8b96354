//! The handle a checkout derefs to: confined to one tenant's index or
//! filtered alias, with the only operations a scoped checkout may run.

use std::fmt;
use std::sync::Arc;

use elasticsearch::indices::IndicesRefreshParts;
use elasticsearch::params::Refresh;
use elasticsearch::{CountParts, DeleteParts, Elasticsearch, GetParts, IndexParts, SearchParts};
use serde_json::{json, Value};
use switchyard_core::{Error, GatePermit, Isolation, TenantId};

use crate::backend::Shared;
use crate::body::{check_hits, guard, object, source_is_tenants, stored_id, tenant_query};
use crate::error::EsError;
use crate::naming::validate_doc_id;

/// What a scoped handle addresses.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// The tenant's own index.
    Index { tenant: TenantId, index: Arc<str> },
    /// The tenant's filtered alias over a shared index; documents carry the
    /// tenant in `field` and their ids are stored as `<tenant>:<id>`.
    Alias {
        tenant: TenantId,
        alias: Arc<str>,
        field: Arc<str>,
    },
}

impl Target {
    pub(crate) fn tenant(&self) -> &TenantId {
        match self {
            Target::Index { tenant, .. } | Target::Alias { tenant, .. } => tenant,
        }
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Target::Index { index, .. } => index,
            Target::Alias { alias, .. } => alias,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Target::Index { .. } => "index",
            Target::Alias { .. } => "alias",
        }
    }

    pub(crate) fn cache_key(&self) -> String {
        format!("{}:{}", self.kind(), self.name())
    }

    /// The `_id` a tenant-local id is stored under.
    fn stored_id(&self, id: &str) -> String {
        match self {
            Target::Index { .. } => id.to_owned(),
            Target::Alias { tenant, .. } => stored_id(tenant, id),
        }
    }
}

/// An Elasticsearch connection from an [`EsBackend`](crate::EsBackend): a slot
/// of the node's in-flight bound plus a handle confined to the checkout's
/// tenant.
///
/// | checkout | [`client`](Self::client) | [`search`](Self::search), [`count`](Self::count), [`index`](Self::index), [`get`](Self::get), [`delete`](Self::delete), [`refresh`](Self::refresh) |
/// |---|---|---|
/// | unscoped | the node's client | refused ([`EsError::Unscoped`]) |
/// | index (database or schema) scope | refused ([`EsError::Confined`]) | on the tenant's index only |
/// | row scope | refused | on the tenant's filtered alias, with the tenant term added to every query, set or checked on every document, and the tenant prefix on every `_id` |
///
/// Bodies go through a key check first (see the crate docs), ids through
/// [`validate_doc_id`], and the index is never taken from the caller.
pub struct EsConnection {
    shared: Arc<Shared>,
    target: Option<Target>,
    _permit: GatePermit,
}

impl EsConnection {
    pub(crate) fn new(shared: Arc<Shared>, permit: GatePermit) -> Self {
        Self {
            shared,
            target: None,
            _permit: permit,
        }
    }

    pub(crate) fn set_target(&mut self, target: Target) {
        self.target = Some(target);
    }

    pub(crate) fn reset(&mut self) {
        self.target = None;
    }

    /// The tenant this handle is confined to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        self.target.as_ref().map(Target::tenant)
    }

    /// The index (index scope) or alias (row scope) this handle addresses.
    pub fn target(&self) -> Option<&str> {
        self.target.as_ref().map(Target::name)
    }

    /// `Database` for an index scope, `Row` for an alias scope, `None` when unscoped.
    pub fn isolation(&self) -> Option<Isolation> {
        self.target.as_ref().map(|t| match t {
            Target::Index { .. } => Isolation::Database,
            Target::Alias { .. } => Isolation::Row,
        })
    }

    /// The node's client, for unscoped checkouts (administration: creating
    /// indices and aliases, cluster APIs). A scoped checkout refuses with
    /// [`EsError::Confined`]: the raw client reaches every index.
    pub fn client(&self) -> Result<&Elasticsearch, Error> {
        match &self.target {
            None => Ok(&self.shared.client),
            Some(t) => Err(self.shared.rejected(
                Some(t.tenant()),
                EsError::Confined {
                    tenant: t.tenant().clone(),
                    what: "the raw client",
                },
            )),
        }
    }

    fn scoped(&self, operation: &'static str) -> Result<&Target, Error> {
        self.target
            .as_ref()
            .ok_or_else(|| self.shared.rejected(None, EsError::Unscoped { operation }))
    }

    fn rejected(&self, error: EsError) -> Error {
        self.shared.rejected(self.tenant(), error)
    }

    /// Runs a search (`POST <target>/_search`) and returns the response body.
    ///
    /// On a row scope the body's `query` is wrapped as
    /// `bool { filter: [term { <tenant_field>: <tenant> }], must: [query] }`,
    /// every hit's `_id` comes back without the tenant prefix, and a hit of
    /// another tenant fails the call with [`EsError::ForeignDocument`].
    ///
    /// ```no_run
    /// # async fn demo(conn: switchyard_core::Checkout<switchyard_elasticsearch::EsBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use serde_json::json;
    ///
    /// let found = conn
    ///     .search(json!({ "query": { "match": { "title": "rust" } }, "size": 10 }))
    ///     .await?;
    /// for hit in found["hits"]["hits"].as_array().into_iter().flatten() {
    ///     println!("{} {}", hit["_id"], hit["_source"]["title"]);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn search(&self, body: Value) -> Result<Value, Error> {
        let target = self.scoped("search")?;
        let row = matches!(target, Target::Alias { .. });
        guard(&body, row).map_err(|e| self.rejected(e))?;
        let mut body = object(body, "a search body").map_err(|e| self.rejected(e))?;
        if let Target::Alias { tenant, field, .. } = target {
            let query = body.remove("query");
            body.insert("query".into(), tenant_query(query, field, tenant));
        }
        let names = [target.name()];
        let request = self
            .shared
            .client
            .search(SearchParts::Index(&names))
            .body(Value::Object(body))
            .send();
        let mut response = self.ok(target, request).await?;
        if let Target::Alias { tenant, field, .. } = target {
            check_hits(&mut response, field, tenant).map_err(|e| self.rejected(e))?;
        }
        Ok(response)
    }

    /// Counts the documents matching `query` (all of the tenant's when `None`).
    pub async fn count(&self, query: Option<Value>) -> Result<u64, Error> {
        let target = self.scoped("count")?;
        let row = matches!(target, Target::Alias { .. });
        if let Some(q) = &query {
            guard(q, row).map_err(|e| self.rejected(e))?;
        }
        let query = match target {
            Target::Alias { tenant, field, .. } => Some(tenant_query(query, field, tenant)),
            Target::Index { .. } => query,
        };
        let body = match query {
            Some(q) => json!({ "query": q }),
            None => json!({}),
        };
        let names = [target.name()];
        let request = self
            .shared
            .client
            .count(CountParts::Index(&names))
            .body(body)
            .send();
        let response = self.ok(target, request).await?;
        response["count"].as_u64().ok_or_else(|| {
            self.shared.rejected(
                self.tenant(),
                EsError::UnexpectedResponse("count without a count".into()),
            )
        })
    }

    /// Indexes (creates or replaces) document `id`.
    ///
    /// On a row scope the tenant field is set when missing or null, a
    /// document naming another tenant is refused with
    /// [`EsError::ForeignTenant`] before anything is sent, the id is stored
    /// as `<tenant>:<id>` (so tenants cannot overwrite each other's ids), and
    /// the write goes through the alias with `require_alias=true` (a missing
    /// alias fails instead of creating an index by that name).
    pub async fn index(&self, id: &str, doc: Value, refresh: Refresh) -> Result<(), Error> {
        let target = self.scoped("index")?;
        validate_doc_id(id).map_err(|e| self.rejected(e))?;
        let mut doc = object(doc, "a document").map_err(|e| self.rejected(e))?;
        if let Target::Alias { tenant, field, .. } = target {
            match doc.get(&**field) {
                None | Some(Value::Null) => {
                    doc.insert(field.to_string(), Value::String(tenant.as_str().to_owned()));
                }
                Some(Value::String(s)) if s == tenant.as_str() => {}
                Some(other) => {
                    let found = other.to_string().chars().take(80).collect();
                    return Err(self.rejected(EsError::ForeignTenant {
                        field: field.to_string(),
                        tenant: tenant.clone(),
                        found,
                    }));
                }
            }
        }
        let stored = target.stored_id(id);
        let request = self
            .shared
            .client
            .index(IndexParts::IndexId(target.name(), &stored))
            .body(Value::Object(doc))
            .refresh(refresh);
        let request = match target {
            Target::Alias { .. } => request.require_alias(true),
            Target::Index { .. } => request,
        };
        self.ok(target, request.send()).await?;
        Ok(())
    }

    /// The `_source` of document `id`, or `None` when there is none.
    ///
    /// The get API ignores alias filters, so on a row scope the id is looked
    /// up under the tenant prefix and the document's tenant field is checked
    /// as well; a document of another tenant is an error, never returned.
    pub async fn get(&self, id: &str) -> Result<Option<Value>, Error> {
        let target = self.scoped("get")?;
        let found = self.fetch(target, id).await?;
        Ok(found.map(|mut doc| doc["_source"].take()))
    }

    /// Fetches the raw get response of a tenant document, checked.
    async fn fetch(&self, target: &Target, id: &str) -> Result<Option<Value>, Error> {
        validate_doc_id(id).map_err(|e| self.rejected(e))?;
        let stored = target.stored_id(id);
        let request = self
            .shared
            .client
            .get(GetParts::IndexId(target.name(), &stored))
            .send();
        let (status, body) = self.shared.call(self.tenant(), request).await?;
        if status == 404 && body["found"] == Value::Bool(false) {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(self.shared.status_error(Some(target), status, &body));
        }
        if let Target::Alias { tenant, field, .. } = target {
            if !source_is_tenants(&body["_source"], field, tenant) {
                return Err(self.rejected(EsError::ForeignDocument {
                    id: stored,
                    tenant: tenant.clone(),
                }));
            }
        }
        Ok(Some(body))
    }

    /// Deletes document `id`; `false` when there was none.
    ///
    /// The delete API ignores alias filters too, so on a row scope the
    /// document is fetched and checked first and deleted only if it is still
    /// that version (`if_seq_no` / `if_primary_term`); a concurrent change
    /// makes the delete fail with a 409 rather than touch a replacement.
    pub async fn delete(&self, id: &str, refresh: Refresh) -> Result<bool, Error> {
        let target = self.scoped("delete")?;
        validate_doc_id(id).map_err(|e| self.rejected(e))?;
        let stored = target.stored_id(id);
        let mut request = self
            .shared
            .client
            .delete(DeleteParts::IndexId(target.name(), &stored))
            .refresh(refresh);
        if let Target::Alias { .. } = target {
            let Some(found) = self.fetch(target, id).await? else {
                return Ok(false);
            };
            let (Some(seq_no), Some(term)) =
                (found["_seq_no"].as_i64(), found["_primary_term"].as_i64())
            else {
                return Err(self.rejected(EsError::UnexpectedResponse(
                    "get without _seq_no and _primary_term".into(),
                )));
            };
            request = request.if_seq_no(seq_no).if_primary_term(term);
        }
        let (status, body) = self.shared.call(self.tenant(), request.send()).await?;
        match (status, body["result"].as_str()) {
            (200..=299, Some("deleted")) => Ok(true),
            (404, Some("not_found")) => Ok(false),
            _ => Err(self.shared.status_error(Some(target), status, &body)),
        }
    }

    /// Refreshes the tenant's index (through the alias on a row scope), so
    /// that what was indexed is visible to search.
    pub async fn refresh(&self) -> Result<(), Error> {
        let target = self.scoped("refresh")?;
        let names = [target.name()];
        let indices = self.shared.client.indices();
        let request = indices.refresh(IndicesRefreshParts::Index(&names)).send();
        self.ok(target, request).await?;
        Ok(())
    }

    /// Sends a request and returns its body if the status is a success.
    async fn ok(
        &self,
        target: &Target,
        request: impl std::future::Future<
            Output = Result<elasticsearch::http::response::Response, elasticsearch::Error>,
        >,
    ) -> Result<Value, Error> {
        let (status, body) = self.shared.call(self.tenant(), request).await?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(self.shared.status_error(Some(target), status, &body))
        }
    }
}

impl fmt::Debug for EsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EsConnection")
            .field("endpoint", &self.shared.endpoint)
            .field("tenant", &self.tenant())
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}
