//! The isolation conformance suite (switchyard-testkit) for Elasticsearch: an
//! index per tenant, and filtered aliases over a shared index. Runs on the
//! noida-db stand-in, or on a real server when `SWITCHYARD_ELASTICSEARCH_URL`
//! is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{backend_for, Fixture as Server};
use serde_json::{json, Value};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_elasticsearch::elasticsearch::indices::{IndicesCreateParts, IndicesDeleteParts};
use switchyard_elasticsearch::{create_tenant_alias, create_tenant_index, EsBackend, Refresh};
use switchyard_testkit::conformance::{self, error_chain, Attempt, Category, Fixture, TENANTS};

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// `min_doc_count: "0"`: Elasticsearch coerces the string to 0 and lists
    /// terms of every document in the shard.
    MinDocCountString,
    /// `min_doc_count: 0` as a number.
    MinDocCountZero,
    /// `profile: true` shows index-wide terms.
    Profile,
    /// A `global` aggregation ignores the query (and the alias filter).
    GlobalAggregation,
    /// A terms lookup naming another index.
    TermsLookup,
    /// Indexing a document that names another tenant.
    ForeignTenantField,
    /// Getting a document by another tenant's stored id.
    ForeignId,
    /// An id that is a path step.
    PathStepId,
    /// The raw client of a scoped checkout.
    RawClient,
}

const ESCAPES: &[(Category, Escape)] = &[
    (Category::HostileValue, Escape::MinDocCountString),
    (Category::Enumeration, Escape::MinDocCountZero),
    (Category::EngineCommand, Escape::Profile),
    (Category::CrossData, Escape::GlobalAggregation),
    (Category::CrossData, Escape::TermsLookup),
    (Category::CrossData, Escape::ForeignTenantField),
    (Category::CrossData, Escape::ForeignId),
    (Category::HostileValue, Escape::PathStepId),
    (Category::EngineCommand, Escape::RawClient),
];

struct EsFixture {
    level: Isolation,
    server: Server,
    backend: Arc<EsBackend>,
    registry: TenantRegistry,
}

impl EsFixture {
    async fn new(level: Isolation, test: &str) -> Self {
        let server = Server::start(test).await;
        let backend = backend_for(server.es.url(), 4);
        let template = NameTemplate::new(&format!("{}_{{id}}", server.run)).unwrap();
        let registry = TenantRegistry::new()
            .with_tier("t", TierPolicy::new(level).with_name_template(template))
            .with_default_tier("t");
        let fixture = Self {
            level,
            server,
            backend,
            registry,
        };
        fixture.provision().await;
        fixture
    }

    async fn provision(&self) {
        let mappings = json!({ "mappings": { "properties": {
            "tenant_id": { "type": "keyword" },
            "value": { "type": "keyword" },
        } } });
        let admin = self.unscoped().await;
        if self.level == Isolation::Row {
            let response = admin
                .client()
                .unwrap()
                .indices()
                .create(IndicesCreateParts::Index(&self.server.shared_index()))
                .body(mappings.clone())
                .send()
                .await
                .unwrap();
            assert!(response.status_code().is_success(), "{response:?}");
        }
        for t in TENANTS {
            let entry = self.registry.resolve(&TenantId::new(t).unwrap()).unwrap();
            if self.level == Isolation::Row {
                create_tenant_alias(&admin, &self.server.shared_index(), entry.scope())
                    .await
                    .unwrap();
            } else {
                create_tenant_index(&admin, entry.scope(), Some(mappings.clone()))
                    .await
                    .unwrap();
            }
        }
    }

    async fn cleanup(&self) {
        let admin = self.unscoped().await;
        let mut names = vec![self.server.shared_index()];
        for t in TENANTS {
            let entry = self.registry.resolve(&TenantId::new(t).unwrap()).unwrap();
            names.push(self.backend.target_name(entry.scope()).unwrap());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin
            .client()
            .unwrap()
            .indices()
            .delete(IndicesDeleteParts::Index(&names))
            .send()
            .await;
    }

    async fn unscoped(&self) -> Checkout<EsBackend> {
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap()
    }

    async fn scoped(&self, tenant: &str) -> Result<Checkout<EsBackend>, String> {
        let id = TenantId::new(tenant).map_err(|e| e.to_string())?;
        let entry = self.registry.resolve(&id).map_err(|e| error_chain(&e))?;
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)).tenant(&entry),
        )
        .await
        .map_err(|e| error_chain(&e))
    }

    /// A search body that must be refused on a shared index: if it reaches
    /// the server, Elasticsearch (by its documented semantics) answers with
    /// other tenants' terms, which the stand-in may not reproduce.
    async fn statistics_leak(&self, attacker: &str, body: Value, what: &str) -> Attempt {
        let conn = match self.scoped(attacker).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(e),
        };
        match conn.search(body).await {
            Err(e) => Attempt::Refused(error_chain(&e)),
            Ok(found) if self.level == Isolation::Row => Attempt::Breached(format!(
                "{what} reached the shared index; Elasticsearch answers it with index-wide terms: {found}"
            )),
            Ok(found) => Attempt::Ran(found.to_string()),
        }
    }
}

impl Fixture for EsFixture {
    type Escape = Escape;

    fn label(&self) -> String {
        format!(
            "elasticsearch/{} on {}",
            self.level,
            self.server.es.describe()
        )
    }

    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String> {
        let conn = self.scoped(tenant).await?;
        conn.index(key, json!({ "value": value }), Refresh::True)
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String> {
        let conn = self.scoped(tenant).await?;
        let found = conn
            .search(json!({ "size": 100, "query": { "term": { "value": conformance::marker(tenant) } } }))
            .await
            .map_err(|e| error_chain(&e))?;
        let mut values: Vec<String> = found["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|hit| hit["_id"] == key)
            .filter_map(|hit| hit["_source"]["value"].as_str().map(str::to_owned))
            .collect();
        if let Some(doc) = conn.get(key).await.map_err(|e| error_chain(&e))? {
            let value = doc["value"].as_str().unwrap_or_default().to_owned();
            if !values.contains(&value) {
                values.push(value);
            }
        }
        Ok(values)
    }

    async fn names(&self, tenant: &str) -> Result<Vec<String>, String> {
        let conn = self.scoped(tenant).await?;
        let found = conn
            .search(json!({ "size": 1000, "query": { "match_all": {} } }))
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(found["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|hit| hit["_id"].as_str().map(str::to_owned))
            .collect())
    }

    async fn checkout(&self, tenant: &str) -> Result<(), String> {
        self.scoped(tenant).await.map(drop)
    }

    fn reserved_templates(&self) -> Vec<(String, &'static str)> {
        vec![
            (
                "{id}".into(),
                "`_all` (every index) and `.security` (tenant `Security`)",
            ),
            ("Tenant_{id}".into(), "hidden `.tenant_...` indices"),
        ]
    }

    async fn configure(&self, template: &str) -> Result<(), String> {
        let template = NameTemplate::new(template).map_err(|e| e.to_string())?;
        let policy = TierPolicy::new(self.level).with_name_template(template);
        self.backend
            .validate_tier("t", &policy)
            .map_err(|e| error_chain(&e))
    }

    fn escapes(&self) -> Vec<(Category, Escape)> {
        ESCAPES.to_vec()
    }

    async fn attempt(&self, escape: Escape, attacker: &str, victim: &str) -> Attempt {
        let terms = |min: Value| json!({ "size": 0, "aggs": { "t": { "terms": { "field": "value", "min_doc_count": min } } } });
        match escape {
            Escape::MinDocCountString => {
                self.statistics_leak(attacker, terms(json!("0")), "min_doc_count \"0\"")
                    .await
            }
            Escape::MinDocCountZero => {
                self.statistics_leak(attacker, terms(json!(0)), "min_doc_count 0")
                    .await
            }
            Escape::Profile => {
                let body = json!({ "profile": true, "query": { "prefix": { "value": "marker" } } });
                self.statistics_leak(attacker, body, "profile: true").await
            }
            Escape::GlobalAggregation => {
                let body = json!({ "size": 0, "aggs": { "all": { "global": {}, "aggs": { "v": { "terms": { "field": "value" } } } } } });
                self.statistics_leak(attacker, body, "a global aggregation")
                    .await
            }
            Escape::TermsLookup => {
                let conn = match self.scoped(attacker).await {
                    Ok(c) => c,
                    Err(e) => return Attempt::Refused(e),
                };
                let body = json!({ "query": { "terms": { "value": {
                    "index": self.server.shared_index(), "id": format!("{victim}:marker"), "path": "value"
                } } } });
                match conn.search(body).await {
                    Ok(found) => Attempt::Ran(found.to_string()),
                    Err(e) => Attempt::Refused(error_chain(&e)),
                }
            }
            Escape::ForeignTenantField => {
                let conn = match self.scoped(attacker).await {
                    Ok(c) => c,
                    Err(e) => return Attempt::Refused(e),
                };
                let doc = json!({ "tenant_id": victim, "value": "planted" });
                match conn.index("planted", doc, Refresh::True).await {
                    Ok(()) => Attempt::Ran("indexed in the tenant's own index".into()),
                    Err(e) => Attempt::Refused(error_chain(&e)),
                }
            }
            Escape::ForeignId | Escape::PathStepId => {
                let conn = match self.scoped(attacker).await {
                    Ok(c) => c,
                    Err(e) => return Attempt::Refused(e),
                };
                let id = match escape {
                    Escape::ForeignId => format!("{victim}:marker"),
                    _ => "..".to_owned(),
                };
                Attempt::of(conn.get(&id).await)
            }
            Escape::RawClient => match self.scoped(attacker).await {
                Ok(conn) => match conn.client() {
                    Ok(_) => Attempt::Breached("a scoped checkout handed out its client".into()),
                    Err(e) => Attempt::Refused(error_chain(&e)),
                },
                Err(e) => Attempt::Refused(e),
            },
        }
    }
}

#[tokio::test]
async fn index_isolation_conforms() {
    let fixture = EsFixture::new(Isolation::Database, "conformance-index").await;
    conformance::run(&fixture).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn alias_isolation_conforms() {
    let fixture = EsFixture::new(Isolation::Row, "conformance-alias").await;
    conformance::run(&fixture).await;
    fixture.cleanup().await;
}
