#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant isolation against a real PostgreSQL: no checkout ever sees or writes
//! another tenant's rows, whatever the physical connection served before.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{checkout, exec, pid, registry, Fixture, READ_ITEMS, TIMEOUT};
use sqlx::Connection;
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Error, Isolation, TenantId, TenantRegistry,
};
use switchyard_postgres::{quote_ident, PgBackend, PgCheckoutExt};

struct Tally {
    checkouts: AtomicU64,
    reads: AtomicU64,
    writes: Mutex<HashMap<String, u64>>,
    cancelled: AtomicU64,
    abandoned_tx: AtomicU64,
    unscoped: AtomicU64,
}

/// One scoped checkout: read and verify; sometimes write, abandon a query
/// mid-flight, or leave a transaction open.
async fn scoped_round(
    backend: &Arc<PgBackend>,
    tenants: &TenantRegistry,
    id: &str,
    rng: &mut fastrand::Rng,
    tally: &Tally,
    task: usize,
    n: usize,
) {
    let tenant = TenantId::new(id).unwrap();
    let entry = tenants.resolve(&tenant).unwrap();
    let isolation = entry.scope().isolation();
    let mut conn = checkout(backend, Some(&entry)).await;
    tally.checkouts.fetch_add(1, Ordering::Relaxed);

    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| conn.fail(e))
        .unwrap_or_else(|e| panic!("read for {id} ({isolation}): {e:?}"));
    tally.reads.fetch_add(1, Ordering::Relaxed);
    let foreign: Vec<_> = rows.iter().filter(|(t, _)| t != id).collect();
    assert!(
        foreign.is_empty(),
        "LEAK: tenant {id} ({isolation}) saw {foreign:?}"
    );
    let marker = format!("marker-{id}");
    assert!(
        rows.iter().any(|(_, v)| *v == marker),
        "tenant {id} ({isolation}) cannot see its own marker: {rows:?}"
    );

    if rng.u8(..4) == 0 {
        // The session carries exactly this tenant's scope and nothing else.
        let (path, setting): (String, String) = sqlx::query_as(
            "SELECT current_setting('search_path'), coalesce(current_setting('app.tenant_id', true), '')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        match isolation {
            Isolation::Schema => {
                assert_eq!(path, quote_ident(&format!("tenant_{id}")));
                assert_eq!(setting, "", "schema tenant {id} carries a row setting");
            }
            Isolation::Row => {
                assert_eq!(setting, id);
                assert_eq!(path, "\"$user\", public");
            }
            Isolation::Database => {
                assert_eq!(setting, "");
                assert_eq!(path, "\"$user\", public");
            }
        }
    }

    match rng.u8(..100) {
        0..=9 => {
            let val = format!("w-{task}-{n}");
            sqlx::query("INSERT INTO items (tenant, val) VALUES ($1, $2)")
                .bind(id)
                .bind(&val)
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("write for {id} ({isolation}): {e}"));
            *tally
                .writes
                .lock()
                .unwrap()
                .entry(id.to_owned())
                .or_default() += 1;
        }
        10..=11 => {
            // Dropped in the middle of a query, half the time through the
            // checkout's executor (seen, closed), half on the raw sqlx
            // connection (unseen, drained by the return check).
            let slow = sqlx::query("SELECT pg_sleep(0.03)");
            if rng.bool() {
                let _ =
                    tokio::time::timeout(Duration::from_millis(2), slow.execute(&mut *conn)).await;
            } else {
                let _ =
                    tokio::time::timeout(Duration::from_millis(2), slow.execute(&mut **conn)).await;
            }
            tally.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        12..=13 => {
            // Left inside a transaction with an uncommitted write.
            exec(&mut conn, "BEGIN").await;
            sqlx::query("INSERT INTO items (tenant, val) VALUES ($1, 'uncommitted')")
                .bind(id)
                .execute(&mut *conn)
                .await
                .unwrap();
            tally.abandoned_tx.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// One unscoped checkout: it must carry no tenant scope at all.
async fn unscoped_round(backend: &Arc<PgBackend>, tally: &Tally) {
    let mut conn = checkout(backend, None).await;
    tally.checkouts.fetch_add(1, Ordering::Relaxed);
    tally.unscoped.fetch_add(1, Ordering::Relaxed);
    let (path, setting): (String, String) = sqlx::query_as(
        "SELECT current_setting('search_path'), coalesce(current_setting('app.tenant_id', true), '')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        path, "\"$user\", public",
        "unscoped checkout kept a search_path"
    );
    assert_eq!(setting, "", "unscoped checkout kept a row setting");
    // RLS with no tenant set: nothing visible.
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(rows.is_empty(), "LEAK: unscoped checkout saw {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tenant_ever_sees_another_tenants_rows() {
    let fx = Fixture::start(0).await;
    fx.create_row_table().await;
    let mut tenants: Vec<(&str, Isolation)> = Vec::new();
    for id in ["d0", "d1", "d2", "D-3"] {
        fx.create_database_tenant(id).await;
        tenants.push((id, Isolation::Database));
    }
    for id in ["s0", "s1", "s2", "S-3"] {
        fx.create_schema_tenant(id).await;
        tenants.push((id, Isolation::Schema));
    }
    for id in ["r0", "r1", "r2", "R-3"] {
        fx.create_row_tenant(id).await;
        tenants.push((id, Isolation::Row));
    }
    let reg = Arc::new(registry(&tenants, None));
    let mut config = fx.config(6);
    config.tenant_pool_max_size = 2;
    config.max_tenant_pools = 4;
    config.reset_timeout = Duration::from_secs(2);
    config.affinity.max_bypass = 2;
    let backend = fx.backend(config);
    let ids: Arc<Vec<String>> = Arc::new(tenants.iter().map(|(id, _)| id.to_string()).collect());

    const TASKS: usize = 16;
    const ROUNDS: usize = 640;
    let tally = Arc::new(Tally {
        checkouts: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        writes: Mutex::new(HashMap::new()),
        cancelled: AtomicU64::new(0),
        abandoned_tx: AtomicU64::new(0),
        unscoped: AtomicU64::new(0),
    });
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let (backend, reg, ids, tally) = (backend.clone(), reg.clone(), ids.clone(), tally.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(task as u64);
            let home = task % ids.len();
            for n in 0..ROUNDS {
                if rng.u8(..20) == 0 {
                    unscoped_round(&backend, &tally).await;
                } else {
                    // Half the time the task's own tenant (so affinity hits),
                    // else anyone.
                    let id = if rng.bool() {
                        &ids[home]
                    } else {
                        &ids[rng.usize(..ids.len())]
                    };
                    scoped_round(&backend, &reg, id, &mut rng, &tally, task, n).await;
                }
                if rng.bool() {
                    // Bursty arrivals, so the pool swings between saturated
                    // (hand-offs to waiters) and spare (idle hits, resets).
                    tokio::time::sleep(Duration::from_micros(rng.u64(..3000))).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    let checkouts = tally.checkouts.load(Ordering::Relaxed);
    // The last returns are checked on tasks: let them finish.
    switchyard_testkit::wait_until(TIMEOUT, || async { backend.stats().in_use() == 0 })
        .await
        .unwrap();
    let stats = backend.pg_stats();
    eprintln!(
        "leak test: {checkouts} checkouts ({} reads verified, {} unscoped, {} cancelled mid-query, \
         {} abandoned transactions) over {} tenants in {:.1}s, zero leaks",
        tally.reads.load(Ordering::Relaxed),
        tally.unscoped.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.abandoned_tx.load(Ordering::Relaxed),
        ids.len(),
        elapsed.as_secs_f64()
    );
    eprintln!(
        "leak test stats: {stats:?}; affinity hit rate {:.1}%",
        stats.affinity_hit_rate().unwrap_or(0.0) * 100.0
    );
    assert!(checkouts >= 10_000, "only {checkouts} checkouts");
    // Every abandoned transaction was found and its connection closed, but
    // for those still idle: a return makes no round trip, the next checkout's
    // check finds them (see `a_checkout_left_in_a_transaction_is_closed_and_rolled_back`).
    let unchecked = u64::from(backend.stats().idle);
    assert!(stats.closed_dirty + unchecked >= tally.abandoned_tx.load(Ordering::Relaxed));

    // Writes landed where they belong, and no abandoned transaction committed.
    let writes = tally.writes.lock().unwrap().clone();
    let mut audit = fx.admin(common::APP_DB).await;
    for (id, isolation) in &tenants {
        let (mut conn, table) = match isolation {
            Isolation::Database => (
                fx.admin(&format!("tenant_{id}")).await,
                "public.items".to_owned(),
            ),
            Isolation::Schema => (
                fx.admin(common::APP_DB).await,
                format!("{}.items", quote_ident(&format!("tenant_{id}"))),
            ),
            Isolation::Row => (fx.admin(common::APP_DB).await, "public.items".to_owned()),
        };
        let filter = if *isolation == Isolation::Row {
            format!("WHERE tenant = '{id}'")
        } else {
            String::new()
        };
        let (foreign, written, uncommitted): (i64, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FILTER (WHERE tenant <> '{id}'), \
                    count(*) FILTER (WHERE val LIKE 'w-%'), \
                    count(*) FILTER (WHERE val = 'uncommitted') FROM {table} {filter}"
            )))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(foreign, 0, "{id}'s table holds other tenants' rows");
        assert_eq!(
            written as u64,
            writes.get(*id).copied().unwrap_or(0),
            "writes of {id}"
        );
        assert_eq!(uncommitted, 0, "an abandoned transaction of {id} committed");
        conn.close().await.unwrap();
    }
    let decoys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.items WHERE tenant = 'nobody'")
            .fetch_one(&mut audit)
            .await
            .unwrap();
    assert_eq!(decoys, 1);
}

/// A statement sqlx prepared under tenant A's `search_path` is re-analysed by
/// PostgreSQL under tenant B's: same connection, same cached statement, B's rows.
#[tokio::test]
async fn prepared_statements_follow_the_search_path() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    fx.create_schema_tenant("b").await;
    let reg = registry(&[("a", Isolation::Schema), ("b", Isolation::Schema)], None);
    let mut config = fx.config(1);
    config.affinity.enabled = false;
    let backend = fx.backend(config);
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();
    let b = reg.resolve(&TenantId::new("b").unwrap()).unwrap();

    let mut conn = checkout(&backend, Some(&a)).await;
    let pid_a = pid(&mut conn).await;
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(rows.iter().all(|(t, _)| t == "a") && !rows.is_empty());
    let cached_a = conn.cached_statements_size();
    drop(conn);

    // The same physical connection, now scoped to b (pool of one).
    let mut conn = checkout(&backend, Some(&b)).await;
    let pid_b = pid(&mut conn).await;
    assert_eq!(pid_a, pid_b, "expected the same physical connection");
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|(t, _)| t == "b"),
        "cached statement read {rows:?} under b"
    );
    // It really was the statement prepared under a: one server-side statement
    // for that text, and sqlx's cache did not grow for it.
    let prepared: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements WHERE statement = $1")
            .bind(READ_ITEMS)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(prepared, 1);
    assert!(conn.cached_statements_size() <= cached_a + 2);
    drop(conn);

    // A tenant whose table has another shape: re-analysis changes the result
    // type, which PostgreSQL refuses (an error, never a leak).
    let mut app = fx.app(common::APP_DB).await;
    exec(
        &mut app,
        "CREATE SCHEMA tenant_c; CREATE TABLE tenant_c.items (tenant text, val text, extra int); \
         INSERT INTO tenant_c.items VALUES ('c', 'marker-c', 1)",
    )
    .await;
    let reg = registry(&[("c", Isolation::Schema)], None);
    let c = reg.resolve(&TenantId::new("c").unwrap()).unwrap();
    let mut conn = checkout(&backend, Some(&a)).await;
    sqlx::query("SELECT * FROM items")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let mut conn = checkout(&backend, Some(&c)).await;
    let err = sqlx::query("SELECT * FROM items")
        .fetch_all(&mut *conn)
        .await
        .unwrap_err();
    eprintln!("different shape under the same prepared statement: {err}");
    assert!(
        err.to_string()
            .contains("cached plan must not change result type"),
        "{err}"
    );
}

/// A connection already scoped to the tenant is handed back to it without a
/// scope round trip; another tenant only ever gets it after a reset.
#[tokio::test]
async fn affinity_reuses_a_tenants_own_connection_and_resets_for_others() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    fx.create_row_table().await;
    fx.create_row_tenant("b").await;
    let reg = registry(&[("a", Isolation::Schema), ("b", Isolation::Row)], None);
    let backend = fx.backend(fx.config(1));
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();
    let b = reg.resolve(&TenantId::new("b").unwrap()).unwrap();

    let mut conn = checkout(&backend, Some(&a)).await;
    let first = pid(&mut conn).await;
    drop(conn);
    // Back, checked, idle with its owner recorded.
    switchyard_testkit::wait_until(TIMEOUT, || async { backend.stats().idle == 1 })
        .await
        .unwrap();

    let mut conn = checkout(&backend, Some(&a)).await;
    assert_eq!(pid(&mut conn).await, first);
    assert_eq!(conn.session_scope().map(|s| s.tenant().as_str()), Some("a"));
    let stats = backend.pg_stats();
    assert_eq!((stats.affinity_hits, stats.affinity_misses), (1, 1));
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(rows.iter().all(|(t, _)| t == "a") && !rows.is_empty());
    drop(conn);
    switchyard_testkit::wait_until(TIMEOUT, || async { backend.stats().idle == 1 })
        .await
        .unwrap();

    // b finds only a's connection (a pool of one) and gets it reset first.
    let mut conn = checkout(&backend, Some(&b)).await;
    assert_eq!(pid(&mut conn).await, first);
    assert_eq!(backend.pg_stats().resets, 1);
    let (path, setting): (String, String) = sqlx::query_as(
        "SELECT current_setting('search_path'), current_setting('app.tenant_id', true)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        (path.as_str(), setting.as_str()),
        ("\"$user\", public", "b")
    );
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        rows.iter().all(|(t, _)| t == "b") && !rows.is_empty(),
        "{rows:?}"
    );
    drop(conn);

    // A connection whose scope was changed behind the backend's back is
    // closed by its owner's next checkout, never served to it.
    switchyard_testkit::wait_until(TIMEOUT, || async { backend.stats().idle == 1 })
        .await
        .unwrap();
    let mut conn = checkout(&backend, Some(&b)).await;
    exec(
        &mut conn,
        "SELECT set_config('app.tenant_id', 'someone-else', false)",
    )
    .await;
    let changed = pid(&mut conn).await;
    drop(conn);
    let mut conn = checkout(&backend, Some(&b)).await;
    assert_eq!(backend.pg_stats().closed_dirty, 1);
    assert_ne!(pid(&mut conn).await, changed);
    let setting: String = sqlx::query_scalar("SELECT current_setting('app.tenant_id', true)")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(setting, "b");
}

/// Affinity hit rate with tenant locality (each task serves mostly its own
/// tenant, sometimes a random one), on a pool with room to spare (requests
/// arrive with think time) and on a saturated one (always a waiter; two tasks
/// per tenant, so a returned connection can find a waiter of its own owner:
/// a return goes back at once, before its own task asks again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_hit_rate_under_a_local_workload() {
    let fx = Fixture::start(0).await;
    fx.create_row_table().await;
    let mut tenants = Vec::new();
    let ids: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            fx.create_schema_tenant(id).await;
            tenants.push((id.as_str(), Isolation::Schema));
        } else {
            fx.create_row_tenant(id).await;
            tenants.push((id.as_str(), Isolation::Row));
        }
    }
    let reg = Arc::new(registry(&tenants, None));
    let mut rates = HashMap::new();
    // (name, tasks, tasks per tenant, pool size, think time between checkouts)
    let workloads = [
        (
            "spare capacity",
            4usize,
            1usize,
            8u32,
            Duration::from_millis(1),
        ),
        ("saturated", 8, 2, 4, Duration::ZERO),
    ];
    for (name, tasks, per_tenant, pool, think) in workloads {
        for enabled in [true, false] {
            let mut config = fx.config(pool);
            config.affinity.enabled = enabled;
            let backend = fx.backend(config);
            let started = Instant::now();
            let mut handles = Vec::new();
            for task in 0..tasks {
                let (backend, reg, ids) = (backend.clone(), reg.clone(), ids.clone());
                handles.push(tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(100 + task as u64);
                    for _ in 0..200 {
                        let id = if rng.u8(..10) < 8 {
                            &ids[task / per_tenant]
                        } else {
                            &ids[rng.usize(..ids.len())]
                        };
                        let entry = reg.resolve(&TenantId::new(id).unwrap()).unwrap();
                        let mut conn = checkout(&backend, Some(&entry)).await;
                        let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
                            .fetch_all(&mut *conn)
                            .await
                            .unwrap();
                        assert!(
                            rows.iter().all(|(t, _)| t == id) && !rows.is_empty(),
                            "LEAK for {id}: {rows:?}"
                        );
                        drop(conn);
                        if !think.is_zero() {
                            // Requests arriving spaced out, not a wait for a condition.
                            tokio::time::sleep(think).await;
                        }
                    }
                }));
            }
            for h in handles {
                h.await.unwrap();
            }
            let stats = backend.pg_stats();
            let rate = stats.affinity_hit_rate().unwrap_or(0.0);
            eprintln!(
                "affinity {} ({name}: {tasks} tasks, pool {pool}): hit rate {:.1}% \
                 ({} hits, {} misses, {} handoffs, {} resets) in {:.2}s",
                if enabled { "on" } else { "off" },
                rate * 100.0,
                stats.affinity_hits,
                stats.affinity_misses,
                stats.handoffs,
                stats.resets,
                started.elapsed().as_secs_f64()
            );
            rates.insert((name, enabled), rate);
        }
    }
    let spare = rates[&("spare capacity", true)];
    assert!(
        spare > 0.3,
        "hit rate with affinity on and spare capacity: {spare}"
    );
    // Under load, returned connections go to waiters of their own tenant.
    let saturated = rates[&("saturated", true)];
    assert!(
        saturated > 0.3,
        "hit rate with affinity on and a saturated pool: {saturated}"
    );
    assert_eq!(rates[&("spare capacity", false)], 0.0);
    assert_eq!(rates[&("saturated", false)], 0.0);
}

/// One tenant holding its whole quota does not slow the others down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_at_its_quota_does_not_starve_the_others() {
    let fx = Fixture::start(0).await;
    let ids = ["noisy", "q1", "q2", "q3"];
    for id in ids {
        fx.create_schema_tenant(id).await;
    }
    let tenants: Vec<_> = ids.iter().map(|id| (*id, Isolation::Schema)).collect();
    let reg = Arc::new(registry(&tenants, Some(2)));
    let backend = fx.backend(fx.config(4));
    let noisy = reg.resolve(&TenantId::new("noisy").unwrap()).unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(checkout(&backend, Some(&noisy)).await);
    }
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_millis(200)).tenant(&noisy),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::QuotaExceeded { limit: 2, .. }),
        "{err}"
    );

    let mut handles = Vec::new();
    for id in &ids[1..] {
        let (backend, reg, id) = (backend.clone(), reg.clone(), id.to_string());
        handles.push(tokio::spawn(async move {
            let entry = reg.resolve(&TenantId::new(&id).unwrap()).unwrap();
            let mut slowest = Duration::ZERO;
            for _ in 0..50 {
                let started = Instant::now();
                let mut conn = checkout(&backend, Some(&entry)).await;
                let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
                assert!(rows.iter().all(|(t, _)| *t == id));
                slowest = slowest.max(started.elapsed());
            }
            slowest
        }));
    }
    for h in handles {
        let slowest = h.await.unwrap();
        assert!(
            slowest < Duration::from_secs(2),
            "slowest checkout took {slowest:?}"
        );
    }
    // Still at quota the whole time.
    assert_eq!(noisy.quota().unwrap().in_use(), 2);
    drop(held);
}
