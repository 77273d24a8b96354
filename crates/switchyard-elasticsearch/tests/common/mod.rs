//! Shared fixture: an Elasticsearch server from the test bed (the real one
//! when `SWITCHYARD_ELASTICSEARCH_URL` is set, else the noida-db stand-in),
//! tenant indices, a shared index with a filtered alias per row tenant, and
//! documents marked with their tenant's id.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, PoolSettings, TenantEntry,
    TenantId, TenantRegistry, TierPolicy,
};
use switchyard_elasticsearch::elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesRefreshParts,
};
use switchyard_elasticsearch::elasticsearch::SearchParts;
use switchyard_elasticsearch::{
    create_tenant_alias, create_tenant_index, EsBackend, EsBackendConfig, Refresh,
};
use switchyard_testkit::{ElasticServer, ServerKind};

/// Documents per tenant written by [`Fixture::seed`].
pub const DOCS_PER_TENANT: usize = 3;

pub struct Fixture {
    pub es: ElasticServer,
    /// A unique prefix for this test's index names, so runs against a shared
    /// real server do not collide.
    pub run: String,
    pub version: String,
}

impl Fixture {
    /// Starts (or connects to) a server and prints what it is.
    pub async fn start(test: &str) -> Self {
        let started = Instant::now();
        let es = ElasticServer::start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let backend = backend_for(es.url(), 4);
        let probe = backend.probe(Duration::from_secs(10)).await.unwrap();
        let version = probe.version.clone().unwrap_or_default();
        eprintln!(
            "[{test}] running against {} reporting Elasticsearch {version} (ready in {} ms, probe rtt {:?})",
            es.describe(),
            started.elapsed().as_millis(),
            probe.rtt
        );
        let run = format!(
            "r{}{}",
            std::process::id(),
            test.replace(|c: char| !c.is_ascii_alphanumeric(), "")
        )
        .to_ascii_lowercase();
        Self { es, run, version }
    }

    pub fn is_real(&self) -> bool {
        self.es.kind() == ServerKind::Real
    }

    /// The shared index of row tenants.
    pub fn shared_index(&self) -> String {
        format!("{}_shared", self.run)
    }

    /// Tier `db` (an index per tenant, `<run>_{id}`), tier `row` (filtered
    /// aliases `<run>_row_{id}`, the default), the given tenants on `db`.
    pub fn registry(&self, index_tenants: &[String]) -> TenantRegistry {
        let template = |t: &str| NameTemplate::new(&format!("{}_{t}", self.run)).unwrap();
        let mut reg = TenantRegistry::new()
            .with_tier(
                "db",
                TierPolicy::new(Isolation::Database).with_name_template(template("{id}")),
            )
            .with_tier(
                "row",
                TierPolicy::new(Isolation::Row).with_name_template(template("row_{id}")),
            )
            .with_default_tier("row");
        for t in index_tenants {
            reg = reg.with_tenant(TenantId::new(t).unwrap(), "db");
        }
        reg
    }

    /// Creates each index tenant's index and the shared index with an alias
    /// per row tenant, then writes [`DOCS_PER_TENANT`] documents per tenant
    /// through scoped checkouts.
    pub async fn seed(
        &self,
        backend: &Arc<EsBackend>,
        reg: &TenantRegistry,
        index_tenants: &[String],
        row_tenants: &[String],
    ) {
        let mappings = json!({ "mappings": { "properties": {
            "tenant_id": { "type": "keyword" },
            "n": { "type": "long" },
            "label": { "type": "keyword" },
        } } });
        let admin = checkout(backend, None).await.unwrap();
        for t in index_tenants {
            let entry = reg.resolve(&TenantId::new(t).unwrap()).unwrap();
            create_tenant_index(&admin, entry.scope(), Some(mappings.clone()))
                .await
                .unwrap_or_else(|e| panic!("index for {t}: {e:?}"));
        }
        let client = admin.client().unwrap();
        let shared = self.shared_index();
        let response = client
            .indices()
            .create(IndicesCreateParts::Index(&shared))
            .body(mappings.clone())
            .send()
            .await
            .unwrap();
        assert!(response.status_code().is_success(), "{response:?}");
        for t in row_tenants {
            let entry = reg.resolve(&TenantId::new(t).unwrap()).unwrap();
            create_tenant_alias(&admin, &self.shared_index(), entry.scope())
                .await
                .unwrap_or_else(|e| panic!("alias for {t}: {e:?}"));
        }
        drop(admin);
        for t in index_tenants.iter().chain(row_tenants) {
            let entry = reg.resolve(&TenantId::new(t).unwrap()).unwrap();
            let conn = checkout(backend, Some(&entry))
                .await
                .unwrap_or_else(|e| panic!("checkout for {t}: {e:?}"));
            for n in 0..DOCS_PER_TENANT {
                let mut doc = json!({ "n": n, "label": format!("secret of {t}") });
                if conn.isolation() == Some(Isolation::Database) {
                    doc["tenant_id"] = t.as_str().into();
                }
                conn.index(&n.to_string(), doc, Refresh::False)
                    .await
                    .unwrap();
            }
            conn.refresh().await.unwrap();
        }
    }

    /// Deletes this run's indices (they live on after a real server's test).
    pub async fn cleanup(
        &self,
        backend: &Arc<EsBackend>,
        reg: &TenantRegistry,
        index_tenants: &[String],
    ) {
        let mut names = vec![self.shared_index()];
        for t in index_tenants {
            let entry = reg.resolve(&TenantId::new(t).unwrap()).unwrap();
            names.push(backend.target_name(entry.scope()).unwrap());
        }
        let admin = checkout(backend, None).await.unwrap();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin
            .client()
            .unwrap()
            .indices()
            .delete(IndicesDeleteParts::Index(&names))
            .send()
            .await;
    }

    /// Every document of the shared index, read with an unscoped client.
    pub async fn shared_docs(&self, backend: &Arc<EsBackend>) -> Vec<Value> {
        let admin = checkout(backend, None).await.unwrap();
        let client = admin.client().unwrap();
        let shared = self.shared_index();
        let _ = client
            .indices()
            .refresh(IndicesRefreshParts::Index(&[&shared]))
            .send()
            .await
            .unwrap();
        let body: Value = client
            .search(SearchParts::Index(&[&shared]))
            .body(json!({ "size": 10_000, "query": { "match_all": {} } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["hits"]["hits"].as_array().cloned().unwrap_or_default()
    }
}

/// A backend for `url` with an in-flight bound of `max_size`.
pub fn backend_for(url: &str, max_size: u32) -> Arc<EsBackend> {
    let config = EsBackendConfig::builder("es-test", url)
        .pool(
            PoolSettings::default()
                .with_max_size(max_size)
                .with_acquire_timeout(Duration::from_secs(10)),
        )
        .request_timeout(Duration::from_secs(10))
        .config();
    Arc::new(EsBackend::new(config).unwrap())
}

pub fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// A checkout on `backend` within 10s, scoped to `tenant` when given.
pub async fn checkout(
    backend: &Arc<EsBackend>,
    tenant: Option<&TenantEntry>,
) -> Result<Checkout<EsBackend>, switchyard_core::Error> {
    let request = CheckoutRequest::with_timeout(Duration::from_secs(10));
    Checkout::acquire(
        backend,
        tenant.into_iter().fold(request, CheckoutRequest::tenant),
    )
    .await
}
