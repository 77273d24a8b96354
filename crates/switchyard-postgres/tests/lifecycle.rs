#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Connection life cycle against a real PostgreSQL: returns after cancelled
//! queries, open transactions and killed sessions; tenant database pools;
//! probes through promotion, pause and kill; hostile tenant input.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{checkout, exec, pid, registry, Fixture, READ_ITEMS, TIMEOUT};
use sqlx::Row;
use switchyard_core::{
    Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, Isolation, Role, TenantEntry,
    TenantId, TenantScope,
};
use switchyard_postgres::{PgBackend, PgBackendConfig};
use switchyard_testkit::{poll_until, wait_until, FaultProxy};

/// search_path, row setting and whether a transaction block is open (simple
/// protocol: only there is a statement's own implicit transaction started at
/// the statement's timestamp).
async fn session_state(conn: &mut Checkout<PgBackend>) -> (String, String, bool) {
    let row = sqlx::raw_sql(
        "SELECT current_setting('search_path'), coalesce(current_setting('app.tenant_id', true), ''), \
         now() <> statement_timestamp()",
    )
    .fetch_one(&mut **conn)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

const CLEAN_PATH: &str = "\"$user\", public";

/// Opens a transaction block on `conn` and writes `val` into tenant a's
/// table inside it, leaving the block open.
async fn open_block(conn: &mut Checkout<PgBackend>, val: &str) {
    exec(conn, "BEGIN").await;
    exec(
        conn,
        &format!("INSERT INTO tenant_a.items VALUES ('a', '{val}')"),
    )
    .await;
}

/// Rows of tenant a's table with `val`, as a superuser sees them.
async fn committed(fx: &Fixture, val: &str) -> i64 {
    let mut admin = fx.admin(common::APP_DB).await;
    sqlx::query_scalar("SELECT count(*) FROM tenant_a.items WHERE val = $1")
        .bind(val)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

/// The error of a checkout for a scope built by hand.
async fn hand_scoped(backend: &Arc<PgBackend>, scope: TenantScope) -> Error {
    let request = CheckoutRequest::with_timeout(TIMEOUT).scope(Arc::new(scope));
    Checkout::acquire(backend, request).await.unwrap_err()
}

/// Starts `sql` on a checkout for `entry` (through the checkout's own
/// executor, or on the raw sqlx connection), abandons it after `cut_ms`, and
/// returns that connection's pid and the next unscoped checkout's, whose
/// session must be clean.
async fn abandon(
    backend: &Arc<PgBackend>,
    entry: &TenantEntry,
    sql: &'static str,
    raw: bool,
    cut_ms: u64,
) -> (i32, i32) {
    let mut conn = checkout(backend, Some(entry)).await;
    let abandoned = pid(&mut conn).await;
    let cut = Duration::from_millis(cut_ms);
    let timed_out = if raw {
        tokio::time::timeout(cut, sqlx::query(sql).execute(&mut **conn)).await
    } else {
        tokio::time::timeout(cut, sqlx::query(sql).execute(&mut *conn)).await
    }
    .is_err();
    assert!(timed_out, "{sql} finished within {cut:?}");
    drop(conn);
    let mut conn = checkout(backend, None).await;
    assert_eq!(
        session_state(&mut conn).await,
        (CLEAN_PATH.into(), String::new(), false)
    );
    (abandoned, pid(&mut conn).await)
}

#[tokio::test]
async fn a_checkout_dropped_mid_query_never_comes_back_dirty() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    fx.create_row_table().await;
    fx.create_row_tenant("b").await;
    let reg = registry(&[("a", Isolation::Schema), ("b", Isolation::Row)], None);
    let mut config = fx.config(1);
    config.reset_timeout = Duration::from_millis(300);
    let backend = fx.backend(config);

    for id in ["a", "b"] {
        let entry = reg.resolve(&TenantId::new(id).unwrap()).unwrap();
        // Through the checkout's own executor, the abandoned query is seen:
        // the connection is closed at once, not drained.
        let before = backend.pg_stats().closed_mid_query;
        let (abandoned, next) = abandon(&backend, &entry, "SELECT pg_sleep(0.1)", false, 10).await;
        assert_ne!(next, abandoned);
        assert_eq!(backend.pg_stats().closed_mid_query, before + 1);

        // On the raw sqlx connection it is not seen: a short query is drained
        // by the return check and the connection reused clean.
        let (abandoned, next) = abandon(&backend, &entry, "SELECT pg_sleep(0.1)", true, 10).await;
        let same = next == abandoned;

        // A long one on the raw connection: the check times out and the
        // connection is closed.
        let before = backend.pg_stats().reset_failures;
        let (abandoned, next) = abandon(&backend, &entry, "SELECT pg_sleep(5)", true, 20).await;
        assert_ne!(next, abandoned, "a connection stuck in a query came back");
        assert_eq!(backend.pg_stats().reset_failures, before + 1);
        eprintln!("tenant {id}: short cancelled query reused same connection: {same}");
    }
}

#[tokio::test]
async fn a_checkout_left_in_a_transaction_is_closed_and_rolled_back() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    let reg = registry(&[("a", Isolation::Schema)], None);
    let backend = fx.backend(fx.config(1));
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();

    for scoped in [true, false] {
        let mut conn = checkout(&backend, scoped.then_some(&a)).await;
        let first = pid(&mut conn).await;
        open_block(&mut conn, "uncommitted").await;
        drop(conn);
        let mut conn = checkout(&backend, None).await;
        assert_ne!(
            pid(&mut conn).await,
            first,
            "a connection inside a transaction came back"
        );
        assert_eq!(
            session_state(&mut conn).await,
            (CLEAN_PATH.into(), String::new(), false)
        );
        drop(conn);
    }
    // A failed transaction block, unscoped: the same owner's check is a bare
    // `SELECT`, which such a session rejects.
    let mut conn = checkout(&backend, None).await;
    let failed = pid(&mut conn).await;
    exec(&mut conn, "BEGIN").await;
    assert!(sqlx::raw_sql("SELECT 1/0")
        .execute(&mut **conn)
        .await
        .is_err());
    drop(conn);
    let mut conn = checkout(&backend, None).await;
    assert_ne!(
        pid(&mut conn).await,
        failed,
        "a connection in a failed transaction came back"
    );
    drop(conn);
    assert_eq!(backend.pg_stats().closed_dirty, 3);
    assert_eq!(committed(&fx, "uncommitted").await, 0);

    // A transaction opened through sqlx and dropped is rolled back by sqlx and
    // the connection stays usable.
    let mut conn = checkout(&backend, Some(&a)).await;
    {
        let mut tx = sqlx::Connection::begin(&mut **conn).await.unwrap();
        sqlx::query("INSERT INTO items VALUES ('a', 'uncommitted')")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    drop(conn);
    let mut conn = checkout(&backend, Some(&a)).await;
    assert!(!session_state(&mut conn).await.2);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE val = 'uncommitted'")
        .fetch_one(&mut **conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// With `affinity.check` off, the owner's own connection comes back with no
/// round trip at all (counted on the wire), carrying what the owner's SQL
/// left on it, as sqlx's pool with `test_before_acquire(false)` would. An
/// owner change still gets the complete reset, and still finds a transaction
/// block the owner left open: that connection is closed and the block rolled
/// back, never handed to the next tenant.
#[tokio::test]
async fn with_the_check_off_the_owner_gets_its_connection_back_with_no_round_trip() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    fx.create_schema_tenant("b").await;
    let reg = registry(&[("a", Isolation::Schema), ("b", Isolation::Schema)], None);
    let proxy = FaultProxy::start_counting_postgres(fx.pg.primary().addr())
        .await
        .unwrap();
    let mut config = fx.config(1);
    config.url = common::url_at(proxy.port(), common::APP_ROLE, common::APP_DB).into();
    config.affinity.check = false;
    let backend = fx.backend(config);
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();
    let b = reg.resolve(&TenantId::new("b").unwrap()).unwrap();

    let mut conn = checkout(&backend, Some(&a)).await;
    let first = pid(&mut conn).await;
    exec(&mut conn, "CREATE TEMP TABLE left_by_a (x int)").await;
    drop(conn);
    let before = proxy.pg_messages().unwrap();
    let mut conn = checkout(&backend, Some(&a)).await;
    let trips = proxy.pg_messages().unwrap().since(&before).round_trips();
    assert_eq!(trips, 0, "the owner's own checkout made round trips");
    assert_eq!(pid(&mut conn).await, first);
    // The owner's own leftovers stay for the owner.
    exec(&mut conn, "INSERT INTO left_by_a VALUES (1)").await;
    open_block(&mut conn, "left open").await;
    drop(conn);

    // Another owner: the open block is found, the connection closed.
    let mut conn = checkout(&backend, Some(&b)).await;
    assert_ne!(
        pid(&mut conn).await,
        first,
        "a session inside a's transaction went to b"
    );
    let row = sqlx::raw_sql(
        "SELECT to_regclass('pg_temp.left_by_a') IS NULL, current_setting('search_path')",
    )
    .fetch_one(&mut **conn)
    .await
    .unwrap();
    assert!(row.get::<bool, _>(0), "a's temp table reached b");
    assert_eq!(row.get::<String, _>(1), "\"tenant_b\"");
    drop(conn);
    assert_eq!(
        committed(&fx, "left open").await,
        0,
        "the block a left open was committed"
    );
}

/// A transaction left open by raw SQL holds its locks on the idle connection
/// only until the sweeper checks it, not until `idle_timeout`, even when no
/// checkout ever comes.
#[tokio::test]
async fn a_transaction_left_open_on_an_idle_pool_is_rolled_back_by_the_sweeper() {
    let fx = Fixture::start(0).await;
    let mut config = fx.config(2);
    config.pool = config.pool.with_idle_timeout(None);
    let backend = fx.backend(config);
    let mut conn = checkout(&backend, None).await;
    exec(&mut conn, "BEGIN").await;
    exec(&mut conn, "SELECT pg_advisory_xact_lock(4242)").await;
    drop(conn);

    let mut admin = fx.admin(common::APP_DB).await;
    let free = async {
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(4242)")
                .fetch_one(&mut admin)
                .await
                .unwrap();
            if got {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), free)
        .await
        .expect("the abandoned transaction still holds its lock");
    assert_eq!(backend.pg_stats().closed_dirty, 1);
    // The pool is still whole: the next checkout opens a new connection.
    let mut conn = checkout(&backend, None).await;
    exec(&mut conn, "SELECT 1").await;
}

#[tokio::test]
async fn a_connection_whose_reset_fails_is_discarded() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    let reg = registry(&[("a", Isolation::Schema)], None);
    let mut config = fx.config(2);
    config.affinity.enabled = false;
    let backend = fx.backend(config);
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();
    let mut admin = fx.admin("postgres").await;

    let mut conn = checkout(&backend, Some(&a)).await;
    let victim = pid(&mut conn).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(victim)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(killed);
    drop(conn);
    for round in 0..3 {
        let mut conn = checkout(&backend, Some(&a)).await;
        assert_ne!(pid(&mut conn).await, victim);
        if round == 0 {
            // The dead connection went back without a round trip; the
            // checkout that took it failed its check, closed it and opened
            // another.
            assert_eq!(backend.pg_stats().reset_failures, 1);
            assert_eq!(backend.pg_stats().resets, 0);
        }
        let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
            .fetch_all(&mut **conn)
            .await
            .unwrap();
        assert!(rows.iter().all(|(t, _)| t == "a") && !rows.is_empty());
    }

    backend.close().await;
    let err = Checkout::acquire(&backend, CheckoutRequest::with_timeout(TIMEOUT).tenant(&a))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed), "{err}");
}

#[tokio::test]
async fn tenant_databases_get_capped_lazily_opened_pools() {
    let fx = Fixture::start(0).await;
    for id in ["a", "b", "c"] {
        fx.create_database_tenant(id).await;
    }
    let reg = registry(
        &[
            ("a", Isolation::Database),
            ("b", Isolation::Database),
            ("c", Isolation::Database),
            ("ghost", Isolation::Database),
        ],
        None,
    );
    let mut config = fx.config(2);
    config.max_tenant_pools = 2;
    config.tenant_pool_max_size = 1;
    config.tenant_pool_idle_timeout = Duration::from_millis(300);
    let backend = fx.backend(config);
    let entry = |id: &str| reg.resolve(&TenantId::new(id).unwrap()).unwrap();
    let checkout = |id: &str| {
        let e = entry(id);
        let backend = backend.clone();
        async move {
            Checkout::acquire(&backend, CheckoutRequest::with_timeout(TIMEOUT).tenant(&e)).await
        }
    };
    assert_eq!(backend.stats().tenant_pools, 0);

    // A database that does not exist: TenantNotProvisioned, fast, no pool kept.
    let started = Instant::now();
    let err = checkout("ghost").await.unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { what: "database", name, .. } if name == "tenant_ghost"),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.stats().tenant_pools, 0);

    let mut a = checkout("a").await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut **a)
        .await
        .unwrap();
    assert!(rows.iter().all(|(t, _)| t == "a") && !rows.is_empty());
    assert_eq!(a.tenant_database(), Some("tenant_a"));
    let mut b = checkout("b").await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut **b)
        .await
        .unwrap();
    assert!(rows.iter().all(|(t, _)| t == "b") && !rows.is_empty());
    assert_eq!(backend.stats().tenant_pools, 2);

    // At the cap with both pools in use: a clear error, at once.
    let started = Instant::now();
    let err = checkout("c").await.unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("tenant pools are in use"), "{chain}");
    assert!(!err.is_endpoint_failure());
    assert!(started.elapsed() < Duration::from_secs(1));

    // Once a is idle (its return runs on a task), c takes its place.
    drop(a);
    let mut c = poll_until("a pool for c", TIMEOUT, || async {
        checkout("c").await.ok()
    })
    .await
    .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(READ_ITEMS)
        .fetch_all(&mut **c)
        .await
        .unwrap();
    assert!(rows.iter().all(|(t, _)| t == "c") && !rows.is_empty());
    assert_eq!(backend.stats().tenant_pools, 2);
    assert_eq!(backend.pg_stats().tenant_pools_evicted, 1);

    // Idle pools are closed by the sweeper.
    drop((b, c));
    wait_until(TIMEOUT, || async { backend.stats().tenant_pools == 0 })
        .await
        .unwrap();
    assert!(backend.pg_stats().tenant_pools_idle_closed >= 2);
}

#[tokio::test]
async fn probes_report_role_lag_and_failures() {
    let fx = Fixture::start(1).await;
    let primary = fx.pg.primary();
    let standby = &fx.pg.standbys()[0];
    let backend_for = |port: u16| {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Arc::new(PgBackend::new(PgBackendConfig::new(format!("pg-{port}"), url)).unwrap())
    };
    let on_primary = backend_for(primary.port());
    let on_standby = backend_for(standby.port());
    let timeout = Duration::from_secs(2);

    let p = on_primary.probe(timeout).await.unwrap();
    assert_eq!(p.role, Role::Primary);
    assert_eq!((p.lag, p.lag_bytes), (None, None));
    assert!(p.version.as_deref().unwrap().starts_with("PostgreSQL "));
    fx.pg.wait_replayed(standby, TIMEOUT).await.unwrap();
    let s = on_standby.probe(timeout).await.unwrap();
    eprintln!("standby probe: {s:?}");
    assert_eq!(s.role, Role::Replica);
    assert!(s.lag.is_some() && s.lag_bytes.is_some(), "{s:?}");
    // The probe needs no pool capacity.
    assert_eq!(on_standby.stats().size, 0);

    // Paused: an error within the timeout, not a hang.
    standby.pause().await.unwrap();
    let short = Duration::from_millis(500);
    let started = Instant::now();
    let err = on_standby.probe(short).await.unwrap_err();
    let took = started.elapsed();
    standby.resume().await.unwrap();
    assert!(matches!(err, Error::ProbeTimeout { .. }), "{err}");
    assert!(
        took < short + Duration::from_millis(400),
        "probe took {took:?}"
    );
    // After resuming, a fresh probe works again.
    wait_until(TIMEOUT, || async {
        on_standby.probe(timeout).await.is_ok()
    })
    .await
    .unwrap();

    // Promoted: the standby now probes as primary.
    standby.promote().await.unwrap();
    let s = on_standby.probe(timeout).await.unwrap();
    assert_eq!(s.role, Role::Primary);

    // Killed: a connect error, fast.
    primary.kill().await.unwrap();
    let started = Instant::now();
    let err = on_primary.probe(timeout).await.unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Connect),
        "{err:?}"
    );
    assert!(err.is_endpoint_failure());
    assert!(started.elapsed() < timeout);

    // A checkout on the killed node fails as refused too, well before its
    // deadline (sqlx alone would retry the refused connect until then).
    let started = Instant::now();
    let err = Checkout::acquire(
        &on_primary,
        CheckoutRequest::with_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Connect),
        "{err:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused checkout took {took:?}"
    );
}

#[tokio::test]
async fn hostile_tenant_input_never_reaches_the_server() {
    let fx = Fixture::start(0).await;
    let mut admin = fx.admin(common::APP_DB).await;
    exec(
        &mut admin,
        "CREATE TABLE victim (id int); INSERT INTO victim VALUES (1), (2), (3); GRANT ALL ON victim TO app",
    )
    .await;
    let proxy = FaultProxy::start(fx.pg.primary().addr()).await.unwrap();
    let mut config = fx.config(2);
    config.url = format!("postgres://app@127.0.0.1:{}/app", proxy.port()).into();
    let backend = fx.backend(config);

    let long = "x".repeat(64);
    for bad in [
        "a'; DROP TABLE victim; --",
        "a\"b",
        "../x",
        long.as_str(),
        "zürich",
        "",
        "a b",
        "a\0b",
    ] {
        let err = TenantId::new(bad).map(|_| ()).unwrap_err();
        eprintln!("rejected {bad:?}: {err}");
        let err = Error::from(err);
        assert!(matches!(err, Error::InvalidTenant(_)));
    }
    assert_eq!(proxy.accepted(), 0, "something connected");
    assert_eq!(backend.stats().size, 0);

    // Scopes built by hand with hostile names are quoted or refused.
    let t = TenantId::new("x").unwrap();
    let schema = TenantScope::new(
        t.clone(),
        Isolation::Schema,
        "x\"; DROP TABLE victim; --",
        "app.tenant_id",
    );
    let err = hand_scoped(&backend, schema).await;
    assert!(
        matches!(err, Error::TenantNotProvisioned { what: "schema", .. }),
        "{err:?}"
    );
    let accepted = proxy.accepted();
    assert!(accepted > 0);
    let row = TenantScope::new(
        t.clone(),
        Isolation::Row,
        "x",
        "app.x'; DROP TABLE victim; --",
    );
    let err = hand_scoped(&backend, row).await;
    assert!(matches!(err, Error::CheckoutRefused { .. }), "{err:?}");
    assert_eq!(proxy.accepted(), accepted, "a bad row setting caused I/O");
    let db = TenantScope::new(
        t,
        Isolation::Database,
        "x\"; DROP TABLE victim; --",
        "app.tenant_id",
    );
    let err = hand_scoped(&backend, db).await;
    assert!(
        matches!(
            err,
            Error::TenantNotProvisioned {
                what: "database",
                ..
            }
        ),
        "{err:?}"
    );

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM victim")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 3, "the victim table changed");
}

/// The owner-change message is converted and lexed as a whole with the
/// settings the previous owner left, before its `RESET ALL` runs. A session
/// left in Shift-JIS (where a lead byte swallows the next `\`) must not turn
/// a name in that message into SQL: names reach it as hex digits only.
#[tokio::test]
async fn a_hostile_session_cannot_turn_a_name_into_sql() {
    let fx = Fixture::start(0).await;
    let mut admin = fx.admin(common::APP_DB).await;
    exec(
        &mut admin,
        "CREATE TABLE victim (id int); INSERT INTO victim VALUES (1), (2), (3); GRANT ALL ON victim TO app",
    )
    .await;
    let backend = fx.backend(fx.config(1));
    let mut conn = checkout(&backend, None).await;
    exec(
        &mut conn,
        "SET client_encoding = 'SJIS'; SET standard_conforming_strings = off; SET backslash_quote = on",
    )
    .await;
    drop(conn);

    // "Á" is C3 81 in UTF-8; 0x81 starts a two-byte Shift-JIS character
    // whose second byte is the `\` of a doubled backslash, leaving `\'` to
    // escape the doubled quote and the next quote to close the literal.
    let target = "\u{c1}\\') IS NULL THEN false ELSE false END; DELETE FROM victim; --";
    let scope = TenantScope::new(
        TenantId::new("x").unwrap(),
        Isolation::Schema,
        target,
        "app.tenant_id",
    );
    let got = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(TIMEOUT).scope(Arc::new(scope)),
    )
    .await;
    eprintln!("hostile schema name after a Shift-JIS session: {got:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM victim")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 3, "the name ran as SQL");
    assert!(
        matches!(got, Err(Error::TenantNotProvisioned { what: "schema", .. })),
        "{got:?}"
    );
}
