#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The invariant: a checkout for tenant A never sees tenant B's data, at every
//! isolation level, under concurrency, on connections that served other
//! tenants a moment before.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, Document};
use mongodb::options::FindOptions;
use switchyard_core::{Isolation, TenantEntry, TenantId};
use switchyard_mongodb::MongoBackend;
use tokio::task::JoinSet;

use common::*;

const WORKERS: u64 = 24;
const CHECKOUTS_PER_WORKER: u64 = 420;
const TENANTS: usize = 30;

#[derive(Default)]
struct Tally {
    checkouts: AtomicU64,
    docs_verified: AtomicU64,
    writes: AtomicU64,
    leaks: AtomicU64,
}

/// Whether `doc` belongs to `tenant` (the `owner` the test writes, and for
/// row isolation also the enforced tenant field).
fn owned_by(doc: &Document, tenant: &TenantId, isolation: Isolation) -> bool {
    let owner_ok = doc.get_str("owner") == Ok(tenant.as_str());
    let field_ok = isolation != Isolation::Row || doc.get_str("tenant_id") == Ok(tenant.as_str());
    owner_ok && field_ok
}

async fn one_checkout(
    backend: &Arc<MongoBackend>,
    entry: &TenantEntry,
    other: &TenantId,
    roll: u32,
    seq: u64,
    tally: &Tally,
) {
    let tenant = entry.scope().tenant();
    let isolation = entry.scope().isolation();
    let conn = checkout(backend, entry).await;
    assert_eq!(conn.tenant(), Some(tenant));
    let items = conn.collection("items").unwrap();
    let check = |docs: &[Document]| {
        for d in docs {
            if owned_by(d, tenant, isolation) {
                tally.docs_verified.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.leaks.fetch_add(1, Ordering::Relaxed);
                eprintln!("LEAK: tenant {tenant} ({isolation}) read {d}");
            }
        }
    };
    match roll {
        0..=59 => {
            let limit = FindOptions::builder().limit(10).build();
            let docs = items.find(doc! {}, limit).await.unwrap();
            assert!(!docs.is_empty(), "tenant {tenant} lost its seed documents");
            check(&docs);
        }
        60..=74 => {
            items
                .insert_one(
                    doc! { "owner": tenant.as_str(), "seq": seq as i64, "kind": "w" },
                    None,
                )
                .await
                .unwrap();
            tally.writes.fetch_add(1, Ordering::Relaxed);
            let found = items
                .find_one(doc! { "seq": seq as i64 }, None)
                .await
                .unwrap()
                .expect("own write is visible");
            check(&[found]);
        }
        75..=87 => {
            // Asking for another tenant's documents outright finds nothing.
            let docs = items
                .find(doc! { "owner": other.as_str() }, None)
                .await
                .unwrap();
            check(&docs);
            let docs = items
                .find(
                    doc! { "$or": [{ "owner": other.as_str() }, { "kind": "seed" }] },
                    FindOptions::builder().limit(10).build(),
                )
                .await
                .unwrap();
            check(&docs);
        }
        _ => {
            let owners = items.distinct("owner", doc! {}, None).await.unwrap();
            assert_eq!(
                owners,
                vec![Bson::String(tenant.to_string())],
                "distinct owners seen by {tenant} ({isolation})"
            );
            tally.docs_verified.fetch_add(1, Ordering::Relaxed);
        }
    }
    tally.checkouts.fetch_add(1, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_checkout_ever_sees_another_tenants_documents() {
    let server = server().await;
    let url = server.url().to_owned();
    let tag = unique("lk");
    let shared = format!("{tag}_shared");
    let backend = backend(&url, &shared, 16);
    let (registry, ids) = tenants(&tag, 4, TENANTS);
    let registry = Arc::new(registry);
    let entries: Vec<Arc<TenantEntry>> = ids.iter().map(|t| registry.resolve(t).unwrap()).collect();

    // Every tenant starts with three documents of its own.
    let seeding = Instant::now();
    for entry in &entries {
        let conn = checkout(&backend, entry).await;
        let owner = entry.scope().tenant().as_str();
        conn.collection("items")
            .unwrap()
            .insert_many(
                (0..3).map(|i| doc! { "owner": owner, "seq": -(i + 1), "kind": "seed" }),
                None,
            )
            .await
            .unwrap();
    }
    eprintln!("seeded {TENANTS} tenants in {:?}", seeding.elapsed());

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..WORKERS {
        let backend = Arc::clone(&backend);
        let entries = entries.clone();
        let ids = ids.clone();
        let tally = Arc::clone(&tally);
        workers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(worker);
            for i in 0..CHECKOUTS_PER_WORKER {
                let t = rng.usize(..entries.len());
                let other = &ids[(t + 1 + rng.usize(..entries.len() - 1)) % ids.len()];
                let seq = worker * 1_000_000 + i;
                one_checkout(&backend, &entries[t], other, rng.u32(..100), seq, &tally).await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed();

    // Audit what is stored, outside switchyard: every document sits in its
    // owner's namespace.
    let raw = raw_client(&url).await;
    let mut stored = 0;
    for entry in &entries {
        let (db, coll) = real_namespace(&shared, entry, "items");
        let tenant = entry.scope().tenant();
        for d in all_docs(&raw, &db, &coll).await {
            let isolation = entry.scope().isolation();
            if isolation == Isolation::Row && d.get_str("tenant_id") != Ok(tenant.as_str()) {
                continue; // another row tenant's document in the shared collection
            }
            stored += 1;
            assert!(
                owned_by(&d, tenant, isolation),
                "{tenant} ({isolation}) stores {d}"
            );
        }
    }

    let checkouts = tally.checkouts.load(Ordering::Relaxed);
    let verified = tally.docs_verified.load(Ordering::Relaxed);
    let leaks = tally.leaks.load(Ordering::Relaxed);
    let stats = backend.mongo_stats();
    eprintln!(
        "{checkouts} checkouts by {WORKERS} tasks for {TENANTS} tenants (database, prefix, row) in {elapsed:?} \
         ({:.0}/s): {verified} reads verified, {} writes, {leaks} leaks; {stored} documents audited; \
         {} driver connections opened in all",
        checkouts as f64 / elapsed.as_secs_f64(),
        tally.writes.load(Ordering::Relaxed),
        stats.connections_created,
    );
    assert!(checkouts >= 10_000, "{checkouts} checkouts");
    assert_eq!(leaks, 0, "documents of other tenants were read");
    assert!(verified > checkouts, "reads were verified");
    // Far fewer connections than checkouts: connections served many tenants.
    assert!(stats.connections_created <= 16 + 4, "{stats:?}");
    assert_eq!(stats.handles_out, 0);

    let mut dbs: Vec<String> = entries
        .iter()
        .filter(|e| e.scope().isolation() == Isolation::Database)
        .map(|e| e.scope().target().to_owned())
        .collect();
    dbs.push(shared);
    cleanup(&server, &url, dbs).await;
}

#[tokio::test]
async fn a_connection_that_just_served_another_tenant_shows_only_the_new_one() {
    let server = server().await;
    let url = server.url().to_owned();
    let tag = unique("rc");
    let shared = format!("{tag}_shared");
    // One driver connection for everyone.
    let backend = backend(&url, &shared, 1);
    let levels = [Isolation::Database, Isolation::Schema, Isolation::Row];
    let id = |s: String| TenantId::new(&s).unwrap();
    let mut registry = registry(&tag, 1);
    for level in levels {
        for who in ["a", "b"] {
            registry = registry.with_tenant(id(format!("{who}{}", tier(level))), tier(level));
        }
    }
    let mut dbs = vec![shared.clone()];
    for level in levels {
        let a = registry.resolve(&id(format!("a{}", tier(level)))).unwrap();
        let b = registry.resolve(&id(format!("b{}", tier(level)))).unwrap();
        for round in 0..20_i64 {
            for (me, other) in [(&a, &b), (&b, &a)] {
                let conn = checkout(&backend, me).await;
                let items = conn.collection("reuse").unwrap();
                let owner = me.scope().tenant().as_str();
                items
                    .insert_one(doc! { "owner": owner, "round": round }, None)
                    .await
                    .unwrap();
                let docs = items.find(doc! {}, None).await.unwrap();
                assert_eq!(docs.len() as i64, round + 1, "{level}: {docs:?}");
                assert!(
                    docs.iter().all(|d| d.get_str("owner") == Ok(owner)),
                    "{docs:?}"
                );
                let theirs = other.scope().tenant().as_str();
                let none = items.find(doc! { "owner": theirs }, None).await.unwrap();
                assert!(none.is_empty(), "{level}: {none:?}");
            }
        }
        if level == Isolation::Database {
            dbs.push(a.scope().target().to_owned());
            dbs.push(b.scope().target().to_owned());
        }
    }
    let stats = backend.mongo_stats();
    eprintln!("{stats:?}");
    assert_eq!(
        stats.connections_created, 1,
        "one physical connection served every tenant"
    );
    assert_eq!(stats.handles_acquired, 3 * 20 * 2);
    cleanup(&server, &url, dbs).await;
}

#[tokio::test]
async fn a_cancelled_operation_never_hands_its_reply_to_the_next_tenant() {
    let server = server().await;
    let (proxy, url) = proxied(&server, server.url()).await;
    let tag = unique("cx");
    let shared = format!("{tag}_shared");
    // One driver connection: whatever A leaves behind, B gets next.
    let backend = backend(&url, &shared, 1);
    let id = |s: &str| TenantId::new(s).unwrap();
    let registry = registry(&tag, 1)
        .with_tenant(id("a"), "row")
        .with_tenant(id("b"), "row");
    let a = registry.resolve(&id("a")).unwrap();
    let b = registry.resolve(&id("b")).unwrap();
    for entry in [&a, &b] {
        let conn = checkout(&backend, entry).await;
        let owner = entry.scope().tenant().as_str();
        conn.collection("items")
            .unwrap()
            .insert_many((0..20).map(|i| doc! { "owner": owner, "i": i }), None)
            .await
            .unwrap();
    }

    proxy.set_latency(Duration::from_millis(150));
    let closed_before = backend.mongo_stats().connections_closed;
    for round in 0..3 {
        {
            let conn = checkout(&backend, &a).await;
            let items = conn.collection("items").unwrap();
            // A's query is on the wire when its future is dropped.
            let cancelled =
                tokio::time::timeout(Duration::from_millis(50), items.find(doc! {}, None)).await;
            assert!(
                cancelled.is_err(),
                "round {round}: the query finished too soon"
            );
        }
        let conn = checkout(&backend, &b).await;
        let docs = conn
            .collection("items")
            .unwrap()
            .find(doc! {}, None)
            .await
            .unwrap();
        assert_eq!(docs.len(), 20, "round {round}");
        assert!(
            docs.iter().all(|d| d.get_str("owner") == Ok("b")),
            "round {round}: b read {docs:?}"
        );
    }
    let stats = backend.mongo_stats();
    eprintln!("{stats:?}");
    // The driver closes a connection dropped mid-command instead of pooling it.
    assert!(stats.connections_closed - closed_before >= 3, "{stats:?}");
    proxy.heal();
    cleanup(&server, server.url(), [shared]).await;
}
