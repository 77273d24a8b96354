#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant isolation against Elasticsearch (the real server when
//! `SWITCHYARD_ELASTICSEARCH_URL` is set, else the noida-db stand-in): the
//! cross-tenant leak test, escape attempts through scoped handles, and
//! hostile tenant ids.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backend_for, checkout, tenant, Fixture, DOCS_PER_TENANT};
use serde_json::{json, Value};
use switchyard_core::{
    Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, Isolation, NameTemplate, TenantId,
    TierPolicy,
};
use switchyard_elasticsearch::{EsBackend, EsBackendConfig, EsError, IndexNaming, Refresh};
use switchyard_testkit::FaultProxy;

const TASKS: u64 = 16;
const CHECKOUTS_PER_TASK: u64 = 640;

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn hits(body: &Value) -> Vec<Value> {
    body["hits"]["hits"].as_array().cloned().unwrap_or_default()
}

/// Many tasks, many tenants, an index per tenant and filtered aliases over a
/// shared index, fewer in-flight slots than tasks: every document read must
/// belong to the checking-out tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_tenant_ever_reads_another_tenants_documents() {
    let fx = Fixture::start("leak").await;
    // Mixed case on purpose: `Ix0` and `ix0` must get different indices.
    let mut index_tenants = names("Ix", 4);
    index_tenants.extend(names("ix", 4));
    let row_tenants = names("row-", 16);
    let backend = backend_for(fx.es.url(), 8);
    let reg = Arc::new(fx.registry(&index_tenants));
    fx.seed(&backend, &reg, &index_tenants, &row_tenants).await;
    let all: Arc<Vec<String>> =
        Arc::new(index_tenants.iter().chain(&row_tenants).cloned().collect());

    let checkouts = Arc::new(AtomicU64::new(0));
    let docs_read = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (backend, reg, all) = (backend.clone(), reg.clone(), all.clone());
        let (checkouts, docs_read) = (checkouts.clone(), docs_read.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(0xe5 + task);
            for i in 0..CHECKOUTS_PER_TASK {
                let name = &all[rng.usize(..all.len())];
                let entry = reg.resolve(&tenant(name)).unwrap();
                let conn = checkout(&backend, Some(&entry))
                    .await
                    .unwrap_or_else(|e| panic!("checkout for {name}: {e}"));
                checkouts.fetch_add(1, Ordering::Relaxed);
                assert_eq!(conn.tenant().map(TenantId::as_str), Some(name.as_str()));
                let docs = if i % 10 == 3 {
                    // By id: every tenant has documents 0..3, so an id lookup
                    // that crossed tenants would show.
                    let id = rng.usize(..DOCS_PER_TENANT).to_string();
                    let doc = conn
                        .get(&id)
                        .await
                        .unwrap()
                        .unwrap_or_else(|| panic!("{name}/{id} missing"));
                    vec![json!({ "_id": id, "_source": doc })]
                } else {
                    let body = conn
                        .search(json!({ "query": { "match_all": {} }, "size": 50 }))
                        .await
                        .unwrap_or_else(|e| panic!("search for {name}: {e:?}"));
                    hits(&body)
                };
                assert!(!docs.is_empty(), "{name} sees nothing");
                for doc in &docs {
                    assert_eq!(
                        doc["_source"]["tenant_id"],
                        name.as_str(),
                        "tenant {name} read {doc}"
                    );
                    assert_eq!(
                        doc["_source"]["label"],
                        format!("secret of {name}"),
                        "tenant {name} read {doc}"
                    );
                }
                docs_read.fetch_add(docs.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let checkouts = checkouts.load(Ordering::Relaxed);
    eprintln!(
        "leak test against {}: {checkouts} checkouts ({} index tenants, {} alias tenants), \
         {checkouts} reads verified (90% searches, 10% gets; {} documents, every one the \
         checking-out tenant's), {TASKS} tasks over 8 in-flight slots, in {elapsed:?}",
        fx.es.describe(),
        index_tenants.len(),
        row_tenants.len(),
        docs_read.load(Ordering::Relaxed),
    );
    assert!(checkouts >= 10_000);
    assert_eq!(backend.stats().in_use(), 0);
    // The shared index holds each row tenant's documents under its own prefix.
    let shared = fx.shared_docs(&backend).await;
    assert_eq!(shared.len(), row_tenants.len() * DOCS_PER_TENANT);
    for doc in &shared {
        let owner = doc["_source"]["tenant_id"].as_str().unwrap();
        assert!(
            doc["_id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{owner}:")),
            "{doc}"
        );
    }
    fx.cleanup(&backend, &reg, &index_tenants).await;
}

fn rejected_with(err: &Error) -> Option<&EsError> {
    (err.backend_kind() == Some(BackendErrorKind::Rejected))
        .then(|| std::error::Error::source(err)?.downcast_ref::<EsError>())
        .flatten()
}

/// Every way out of a scoped handle is refused before anything is sent: the
/// proxy in front of the server is stalled while the attempts run, so a
/// request that did go out would hang instead of failing at once.
#[tokio::test]
async fn scoped_handles_cannot_be_escaped() {
    let fx = Fixture::start("escape").await;
    let direct = backend_for(fx.es.url(), 4);
    let reg = fx.registry(&["ix".into()]);
    fx.seed(&direct, &reg, &["ix".into()], &["a".into(), "b".into()])
        .await;
    let before = fx.shared_docs(&direct).await;

    let upstream = match fx.es.addr() {
        Some(addr) => addr,
        None => url_addr(fx.es.url()),
    };
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let backend = backend_for(&format!("http://127.0.0.1:{}", proxy.port()), 4);
    let a = reg.resolve(&tenant("a")).unwrap();
    let ix = reg.resolve(&tenant("ix")).unwrap();
    let row = checkout(&backend, Some(&a)).await.unwrap();
    let own = checkout(&backend, Some(&ix)).await.unwrap();
    assert_eq!(row.isolation(), Some(Isolation::Row));
    assert_eq!(own.isolation(), Some(Isolation::Database));

    proxy.stall_all(true);
    let started = Instant::now();
    for conn in [&row, &own] {
        let err = conn.client().unwrap_err();
        assert!(
            matches!(rejected_with(&err), Some(EsError::Confined { .. })),
            "{err}"
        );
    }
    let everywhere = [
        json!({ "query": { "terms": { "n": { "index": fx.shared_index(), "id": "b:0", "path": "n" } } } }),
        json!({ "query": { "more_like_this": { "fields": ["label"], "like": [{ "_index": fx.shared_index(), "_id": "b:0" }] } } }),
        json!({ "pit": { "id": "anything", "keep_alive": "1m" } }),
        json!({ "indices_boost": [{ "other": 2.0 }] }),
        json!({ "query": { "geo_shape": { "x": { "indexed_shape": { "index": "other", "id": "1", "path": "s" } } } } }),
        json!({ "query": { "percolate": { "field": "q", "index": "other", "id": "1" } } }),
    ];
    for body in &everywhere {
        for conn in [&row, &own] {
            let err = conn.search(body.clone()).await.unwrap_err();
            assert!(
                matches!(rejected_with(&err), Some(EsError::ForbiddenKey { .. })),
                "{body}: {err}"
            );
        }
    }
    let shared_only = [
        json!({ "size": 0, "aggs": { "all": { "global": {}, "aggs": { "labels": { "terms": { "field": "label" } } } } } }),
        json!({ "suggest": { "s": { "text": "secret", "term": { "field": "label" } } } }),
        json!({ "aggs": { "t": { "terms": { "field": "label", "min_doc_count": 0 } } } }),
        json!({ "aggs": { "s": { "significant_terms": { "field": "label" } } } }),
        json!({ "query": { "match_all": {} }, "explain": true }),
        json!({ "knn": { "field": "v", "query_vector": [1.0], "k": 10, "num_candidates": 10 } }),
        json!({ "retriever": { "standard": { "query": { "match_all": {} } } } }),
    ];
    for body in &shared_only {
        let err = row.search(body.clone()).await.unwrap_err();
        assert!(
            matches!(rejected_with(&err), Some(EsError::ForbiddenKey { .. })),
            "{body}: {err}"
        );
        let err = row.count(Some(body.clone())).await.unwrap_err();
        assert!(rejected_with(&err).is_some(), "{body}: {err}");
    }
    // Documents naming another tenant, ids that are path steps, non-objects.
    for doc in [
        json!({ "tenant_id": "b", "label": "planted" }),
        json!({ "tenant_id": ["a", "b"] }),
        json!({ "tenant_id": 1 }),
    ] {
        let err = row
            .index("planted", doc.clone(), Refresh::True)
            .await
            .unwrap_err();
        assert!(
            matches!(rejected_with(&err), Some(EsError::ForeignTenant { .. })),
            "{doc}: {err}"
        );
    }
    let err = row
        .index("x", json!(["not", "an", "object"]), Refresh::True)
        .await
        .unwrap_err();
    assert!(
        matches!(rejected_with(&err), Some(EsError::NotAnObject { .. })),
        "{err}"
    );
    let err = row.search(json!("match_all")).await.unwrap_err();
    assert!(
        matches!(rejected_with(&err), Some(EsError::NotAnObject { .. })),
        "{err}"
    );
    for conn in [&row, &own] {
        for id in ["..", ".", ""] {
            let err = conn.get(id).await.unwrap_err();
            assert!(
                matches!(rejected_with(&err), Some(EsError::InvalidDocId { .. })),
                "{id:?}: {err}"
            );
            let err = conn.delete(id, Refresh::True).await.unwrap_err();
            assert!(
                matches!(rejected_with(&err), Some(EsError::InvalidDocId { .. })),
                "{id:?}: {err}"
            );
            let err = conn.index(id, json!({}), Refresh::True).await.unwrap_err();
            assert!(
                matches!(rejected_with(&err), Some(EsError::InvalidDocId { .. })),
                "{id:?}: {err}"
            );
        }
    }
    let refused_in = started.elapsed();
    assert!(
        refused_in < Duration::from_secs(2),
        "something waited on the stalled proxy: {refused_in:?}"
    );
    proxy.stall_all(false);

    // What does reach the server stays inside the tenant: ids are prefixed,
    // so `b:0` or b's local `0` never name b's documents.
    for id in ["b:0", "../b:0", "b%3A0"] {
        assert_eq!(row.get(id).await.unwrap(), None, "{id}");
        assert!(!row.delete(id, Refresh::True).await.unwrap(), "{id}");
    }
    let mine = row.get("0").await.unwrap().unwrap();
    assert_eq!(mine["tenant_id"], "a");
    // Queries that name the tenant field only narrow.
    for query in [
        json!({ "term": { "tenant_id": "b" } }),
        json!({ "bool": { "should": [{ "term": { "tenant_id": "b" } }, { "match_all": {} }] } }),
        json!({ "bool": { "must_not": [{ "term": { "tenant_id": "a" } }] } }),
        json!({ "ids": { "values": ["b:0", "b:1"] } }),
    ] {
        let found = row
            .search(json!({ "query": query.clone(), "size": 100 }))
            .await
            .unwrap();
        for hit in hits(&found) {
            assert_eq!(hit["_source"]["tenant_id"], "a", "{query} -> {hit}");
        }
        let n = row.count(Some(query.clone())).await.unwrap();
        assert!(n <= DOCS_PER_TENANT as u64, "{query} counted {n}");
    }
    // Writing `b:0` as tenant a creates a's own `a:b:0`, never b's `b:0`.
    row.index("b:0", json!({ "label": "a's, named b:0" }), Refresh::True)
        .await
        .unwrap();
    assert!(row.delete("b:0", Refresh::True).await.unwrap());
    let after = fx.shared_docs(&direct).await;
    assert_eq!(before.len(), after.len());
    let b_docs = |docs: &[Value]| {
        let mut v: Vec<String> = docs
            .iter()
            .filter(|d| d["_source"]["tenant_id"] == "b")
            .map(|d| format!("{}={}", d["_id"], d["_source"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(b_docs(&before), b_docs(&after), "b's documents unchanged");
    eprintln!(
        "escape attempts refused in {refused_in:?} with the proxy stalled; b's documents untouched"
    );
    drop((row, own));
    fx.cleanup(&direct, &reg, &["ix".into()]).await;
}

fn url_addr(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let u = url::Url::parse(url).unwrap();
    (u.host_str().unwrap(), u.port_or_known_default().unwrap())
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
}

/// Hostile tenant ids never reach the server, and ids that are valid but
/// would make special index names are refused before any I/O.
#[tokio::test]
async fn hostile_tenant_ids_are_rejected_before_any_io() {
    let fx = Fixture::start("injection").await;
    let direct = backend_for(fx.es.url(), 4);
    let reg = fx.registry(&["victim".into()]);
    fx.seed(&direct, &reg, &["victim".into()], &["a".into()])
        .await;
    let before = fx.shared_docs(&direct).await.len();

    let upstream = fx.es.addr().unwrap_or_else(|| url_addr(fx.es.url()));
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let proxied = format!("http://127.0.0.1:{}", proxy.port());
    let backend = backend_for(&proxied, 4);
    let long = "x".repeat(64);
    let hostile = [
        "a'; DROP TABLE x; --",
        "a\"b",
        "../x",
        long.as_str(),
        "zürich",
        "テナント",
        "",
        "*",
        "a,b",
        "a b",
        "a/b",
        "a.b",
        "index:x",
    ];
    for raw in hostile {
        let err = Error::from(TenantId::new(raw).unwrap_err());
        assert!(matches!(err, Error::InvalidTenant(_)), "{raw:?}: {err}");
    }
    // Valid ids whose index name would be special under the template `{id}`.
    let bare =
        TierPolicy::new(Isolation::Database).with_name_template(NameTemplate::new("{id}").unwrap());
    let timeout = Duration::from_secs(5);
    for raw in ["_all", "_", "-x", "_cat", "Upper"] {
        let scope = Arc::new(bare.scope(&tenant(raw)).unwrap());
        let err = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(timeout).scope(scope),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(rejected_with(&err), Some(EsError::InvalidIndexName { .. })),
            "{raw:?}: {err}"
        );
    }
    // Strict naming refuses uppercase instead of encoding it.
    let strict = Arc::new(
        EsBackend::new(
            EsBackendConfig::builder("es-strict", proxied.as_str())
                .index_naming(IndexNaming::Strict)
                .config(),
        )
        .unwrap(),
    );
    let upper = reg.resolve(&tenant("Victim")).unwrap();
    let err = checkout(&strict, Some(&upper)).await.unwrap_err();
    assert!(
        matches!(rejected_with(&err), Some(EsError::InvalidIndexName { .. })),
        "{err}"
    );
    assert_eq!(proxy.accepted(), 0, "nothing was sent");

    // Encoded, `Victim` is a tenant of its own, not `victim`.
    let err = checkout(&backend, Some(&upper)).await.unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { name, .. } if name.ends_with("row_.victim")),
        "{err}"
    );
    assert_eq!(
        fx.shared_docs(&direct).await.len(),
        before,
        "data unchanged"
    );
    eprintln!(
        "{} hostile ids and 5 special index names refused before I/O",
        hostile.len()
    );
    fx.cleanup(&direct, &reg, &["victim".into()]).await;
}
