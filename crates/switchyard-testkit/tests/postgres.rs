#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PostgreSQL primary + standby against real `postgres` processes.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use switchyard_testkit::{descendants, is_alive, wait_until, PgCluster};
use tokio::net::TcpStream;

const SHORT: Duration = Duration::from_millis(500);

async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

async fn start(standbys: usize) -> PgCluster {
    let started = Instant::now();
    let pg = PgCluster::start(standbys)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "pg primary+{standbys} standby started in {} ms",
        started.elapsed().as_millis()
    );
    pg
}

#[tokio::test]
async fn standby_replays_what_the_primary_writes() {
    let pg = start(1).await;
    let standby = &pg.standbys()[0];
    assert_eq!(pg.nodes().len(), 2);
    assert_ne!(pg.primary().port(), standby.port());
    assert_eq!(
        pg.primary().url(),
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            pg.primary().port()
        )
    );

    let mut primary = connect(pg.primary().url()).await;
    sqlx::query("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .execute(&mut primary)
        .await
        .unwrap();
    sqlx::query("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
        .execute(&mut primary)
        .await
        .unwrap();

    let waited = Instant::now();
    pg.wait_replayed(standby, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("pg standby replayed in {} ms", waited.elapsed().as_millis());

    let mut replica = connect(standby.url()).await;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM items ORDER BY id")
        .fetch_all(&mut replica)
        .await
        .unwrap();
    assert_eq!(names, ["one", "two"]);

    assert!(standby.is_in_recovery().await.unwrap());
    assert!(!pg.primary().is_in_recovery().await.unwrap());
    let err = sqlx::query("INSERT INTO items VALUES (3, 'three')")
        .execute(&mut replica)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[tokio::test]
async fn pause_hangs_kill_refuses_restart_recovers() {
    let pg = start(0).await;
    let node = pg.primary();
    let mut open = connect(node.url()).await;
    sqlx::query("CREATE TABLE kept (v int)")
        .execute(&mut open)
        .await
        .unwrap();
    sqlx::query("INSERT INTO kept VALUES (42)")
        .execute(&mut open)
        .await
        .unwrap();

    node.pause().await.unwrap();
    let attempt = tokio::time::timeout(SHORT, PgConnection::connect(node.url())).await;
    assert!(
        attempt.is_err(),
        "a new connection to a paused node must hang"
    );
    let query = tokio::time::timeout(SHORT, sqlx::query("SELECT 1").execute(&mut open)).await;
    assert!(query.is_err(), "an open session on a paused node must hang");

    node.resume().await.unwrap();
    let mut fresh = connect(node.url()).await;
    sqlx::query("SELECT 1").execute(&mut fresh).await.unwrap();
    drop(fresh);
    drop(open);

    node.kill().await.unwrap();
    assert!(node.pid().is_none());
    let refused = TcpStream::connect(node.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    assert!(PgConnection::connect(node.url()).await.is_err());

    let restarted = Instant::now();
    node.restart().await.unwrap();
    eprintln!(
        "pg restart after kill took {} ms",
        restarted.elapsed().as_millis()
    );
    let mut again = connect(node.url()).await;
    let kept: i32 = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(&mut again)
        .await
        .unwrap();
    assert_eq!(kept, 42);
}

#[tokio::test]
async fn promoted_standby_accepts_writes() {
    let pg = start(1).await;
    let standby = &pg.standbys()[0];
    let mut primary = connect(pg.primary().url()).await;
    sqlx::query("CREATE TABLE t (v int)")
        .execute(&mut primary)
        .await
        .unwrap();
    pg.wait_replayed(standby, Duration::from_secs(10))
        .await
        .unwrap();
    drop(primary);

    pg.primary().kill().await.unwrap();
    let promoted = Instant::now();
    standby.promote().await.unwrap();
    eprintln!("pg promote took {} ms", promoted.elapsed().as_millis());
    assert!(!standby.is_in_recovery().await.unwrap());

    let mut new_primary = connect(standby.url()).await;
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut new_primary)
        .await
        .unwrap();

    // A restarted promoted node stays a primary.
    standby.restart().await.unwrap();
    wait_until(Duration::from_secs(10), || async {
        matches!(standby.is_in_recovery().await, Ok(false))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn drop_stops_paused_nodes_and_removes_folders() {
    let pg = start(1).await;
    let standby = &pg.standbys()[0];
    standby.pause().await.unwrap();
    let mut pids = Vec::new();
    for node in pg.nodes() {
        let pid = node.pid().unwrap();
        pids.push(pid);
        pids.extend(descendants(pid));
    }
    let folders: Vec<_> = pg.nodes().iter().map(|n| n.data_dir().to_owned()).collect();

    let dropped = Instant::now();
    drop(pg);
    eprintln!(
        "pg primary+1 standby (one paused) dropped in {} ms",
        dropped.elapsed().as_millis()
    );
    for pid in pids {
        assert!(!is_alive(pid), "process {pid} outlived the cluster");
    }
    for folder in folders {
        assert!(
            !folder.exists(),
            "{} outlived the cluster",
            folder.display()
        );
    }
}
