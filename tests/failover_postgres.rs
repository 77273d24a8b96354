#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault tolerance of the router over real PostgreSQL: the scenarios of
//! `tests/failover/mod.rs` over a primary and two streaming standbys.
//!
//! Run with `cargo test -p switchyard --test failover_postgres -- --nocapture`
//! to see each test's timeline: detection times, promotion follow time and
//! failed operations per phase.

mod common;
#[macro_use]
mod failover;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use failover::{Fixture, Routed};
use sqlx::{Connection, PgConnection};
use switchyard_core::{Error, Intent, PoolSettings};
use switchyard_postgres::{pg_error, PgBackend, PgBackendConfig};
use switchyard_router::CheckoutOptions;
use switchyard_testkit::{poll_until, PgCluster, PgNode};
use tokio::time::Instant;

async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn exec(url: &str, sql: &'static str) {
    let mut conn = connect(url).await;
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// The `ledger` table, its writes' ids.
struct Pg;

impl Fixture for Pg {
    type Backend = PgBackend;
    type Bed = PgCluster;
    const ENGINE: &'static str = "postgres";

    /// The `ledger` table, replayed on both standbys.
    async fn prepare(pg: &PgCluster, tl: &Timeline) {
        let mut admin = connect(pg.primary().url()).await;
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut admin)
            .await
            .unwrap();
        tl.mark(format!(
            "real PostgreSQL primary {} + standbys {}, {} started: {}",
            pg.primary().addr(),
            pg.standbys()[0].addr(),
            pg.standbys()[1].addr(),
            version.split(',').next().unwrap_or(&version)
        ));
        exec(
            pg.primary().url(),
            "CREATE TABLE ledger (id bigint PRIMARY KEY, writer int NOT NULL)",
        )
        .await;
        for standby in pg.standbys() {
            pg.wait_replayed(standby, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }

    /// Its pool keeps the connections that die with a killed node: the
    /// restart test shows they are never handed out once the node is back.
    fn backend(id: &str, node: &PgNode) -> Arc<Counted<PgBackend>> {
        let mut config = PgBackendConfig::new(id, node.url());
        config.pool = PoolSettings::default()
            .with_max_size(8)
            .with_acquire_timeout(Duration::from_secs(1));
        Counted::new(PgBackend::new(config).unwrap())
    }

    /// Retried on another endpoint when the checkout or the query fails with
    /// a retryable error, or overruns the router's attempt timeout (which
    /// bounds the query too).
    fn reader(cluster: &Routed<Self>) -> ReadFn {
        let cluster = cluster.clone();
        Arc::new(move |deadline| Box::pin(read(cluster.clone(), deadline)))
    }

    /// Acknowledged (Ok) only when its commit returned.
    fn writer(cluster: &Routed<Self>) -> WriteFn {
        let cluster = cluster.clone();
        Arc::new(move |id, deadline| Box::pin(write(cluster.clone(), id, deadline)))
    }

    /// The primary waits for both standbys to flush each commit
    /// (`synchronous_standby_names = 'ANY 2 (*)'`, checked in
    /// `pg_stat_replication`), and a promoted standby replays everything it
    /// flushed.
    async fn durable_writer(bed: &PgCluster, cluster: &Routed<Self>, tl: &Timeline) -> WriteFn {
        let url = bed.primary().url().to_owned();
        exec(
            &url,
            "ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (*)'",
        )
        .await;
        exec(&url, "SELECT pg_reload_conf()").await;
        poll_until("both standbys synchronous", WAIT, || {
            let url = url.clone();
            async move {
                let mut conn = connect(&url).await;
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'",
                )
                .fetch_one(&mut conn)
                .await
                .ok()?;
                (n == 2).then_some(())
            }
        })
        .await
        .unwrap();
        tl.mark("primary waits for both standbys to flush each commit (ANY 2)");
        Self::writer(cluster)
    }

    /// PostgreSQL brings it back as a primary; without standbys to wait for
    /// (`synchronous_standby_names` reset) it acknowledges writes.
    async fn reopened(old: &PgNode) {
        exec(old.url(), "ALTER SYSTEM RESET synchronous_standby_names").await;
        exec(old.url(), "SELECT pg_reload_conf()").await;
        assert!(
            !old.is_in_recovery().await.unwrap(),
            "the old primary should be a primary again"
        );
    }

    async fn stored(node: &PgNode) -> HashSet<i64> {
        let mut conn = connect(node.url()).await;
        sqlx::query_scalar::<_, i64>("SELECT id FROM ledger")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

async fn read(cluster: Routed<Pg>, deadline: Instant) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    cluster
        .run(Intent::Read, None, opts, async |conn| {
            sqlx::query_scalar::<_, i64>("SELECT coalesce(max(id), 0)::int8 FROM ledger")
                .fetch_one(&mut **conn)
                .await?;
            Ok::<_, sqlx::Error>(conn.endpoint().to_string())
        })
        .await
}

async fn write(cluster: Routed<Pg>, id: i64, deadline: Instant) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    cluster
        .run(Intent::Write, None, opts, async move |conn| {
            // A write's one attempt runs to the whole deadline; the tests
            // want a hung primary seen sooner.
            let started = Instant::now();
            let insert = sqlx::query("INSERT INTO ledger (id, writer) VALUES ($1, $2)")
                .bind(id)
                .bind(i32::try_from(id / 10_000_000).unwrap())
                .execute(&mut **conn);
            match tokio::time::timeout_at(query_limit(deadline), insert).await {
                Ok(Ok(_)) => Ok(conn.endpoint().to_string()),
                Ok(Err(e)) => Err(pg_error(conn.endpoint(), None, e)),
                Err(_) => Err(query_timeout(conn.endpoint(), started.elapsed())),
            }
        })
        .await
}

failover_tests!(Pg);
