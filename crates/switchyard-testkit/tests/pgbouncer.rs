#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PgBouncer in both pool modes in front of the test bed's PostgreSQL, and
//! the fault proxy counting a PostgreSQL client's round trips on the wire.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use switchyard_testkit::{poll_until, FaultProxy, PgBouncer, PgCluster, PgMessages, PoolMode};

async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn select_one_prepared(conn: &mut PgConnection) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

async fn select_one_simple(conn: &mut PgConnection) {
    sqlx::raw_sql("SELECT 1").execute(&mut *conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_counts_queries_and_syncs_of_a_postgres_client() {
    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start_counting_postgres(pg.primary().addr())
        .await
        .unwrap();
    assert_eq!(proxy.pg_messages(), Some(PgMessages::default()));
    let mut conn = connect(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        proxy.port()
    ))
    .await;
    let connected = proxy.pg_messages().unwrap();
    assert_eq!(connected.startups, 1, "{connected:?}");

    // One simple query: one `Query`, one round trip.
    select_one_simple(&mut conn).await;
    let simple = proxy.pg_messages().unwrap().since(&connected);
    assert_eq!((simple.queries, simple.syncs), (1, 0), "{simple:?}");

    // A statement sqlx has not seen: prepared first (a `Parse`), then run.
    select_one_prepared(&mut conn).await;
    let before = proxy.pg_messages().unwrap();
    let first = before.since(&connected).since(&simple);
    assert_eq!(first.parses, 1, "{first:?}");
    assert!(first.syncs >= 1, "{first:?}");
    // Cached: one `Sync`, one round trip, no `Parse`.
    select_one_prepared(&mut conn).await;
    let cached = proxy.pg_messages().unwrap().since(&before);
    assert_eq!(
        (cached.round_trips(), cached.parses, cached.queries),
        (1, 0, 0),
        "{cached:?}"
    );
    conn.close().await.unwrap();
    // `close` returns once the `Terminate` is written, maybe before the
    // proxy has read it.
    poll_until(
        "the proxy to count the Terminate",
        Duration::from_secs(5),
        || async { (proxy.pg_messages().unwrap().terminates == 1).then_some(()) },
    )
    .await
    .unwrap();
    eprintln!("counted: {:?}", proxy.pg_messages().unwrap());

    // A proxy that was not asked to count does not.
    let plain = FaultProxy::start(pg.primary().addr()).await.unwrap();
    assert_eq!(plain.pg_messages(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_serves_sqlx_in_session_and_simple_queries_in_transaction_mode() {
    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let session = PgBouncer::start(pg.primary().addr(), PoolMode::Session, 2, &["postgres"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let transaction =
        PgBouncer::start(pg.primary().addr(), PoolMode::Transaction, 2, &["postgres"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(session.port(), transaction.port());
    assert_eq!(transaction.mode(), PoolMode::Transaction);

    // Session mode: sqlx as is, prepared statements included, and the
    // session's state stays with the client.
    let mut conn = connect(&session.url("postgres", "postgres")).await;
    sqlx::raw_sql("SET application_name = 'bench'")
        .execute(&mut conn)
        .await
        .unwrap();
    for _ in 0..3 {
        select_one_prepared(&mut conn).await;
    }
    let name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "bench");
    conn.close().await.unwrap();

    // Transaction mode: simple-protocol queries only.
    let mut conn = connect(&transaction.url("postgres", "postgres")).await;
    for _ in 0..3 {
        select_one_simple(&mut conn).await;
    }
    conn.close().await.unwrap();

    // Both really sit in front of the server: it sees their connections.
    let mut admin = connect(pg.primary().url()).await;
    let from_bouncers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(from_bouncers >= 2, "{from_bouncers} server connections");

    let addr = session.addr();
    drop(session);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "pgbouncer still listens after drop"
    );
}
