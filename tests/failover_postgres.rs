#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault tolerance of the router over real PostgreSQL: a primary and two
//! streaming standbys from the test bed, a dozen tasks reading and writing
//! through one `Cluster` throughout, and one fault per test.
//!
//! Run with `cargo test -p switchyard --test failover_postgres -- --nocapture`
//! to see each test's timeline: detection times, promotion follow time and
//! failed operations per phase.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sqlx::{Connection, PgConnection};
use switchyard_core::{EndpointId, Error, Intent, PoolSettings, Role};
use switchyard_postgres::{pg_error, PgBackend, PgBackendConfig};
use switchyard_router::{CheckoutOptions, Cluster, EndpointConfig, Health, StrategyKind};
use switchyard_testkit::{poll_until, PgCluster, PgNode};
use tokio::time::Instant;

type Pg = Counted<PgBackend>;

const READERS: usize = 8;
const WRITERS: usize = 4;

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

/// Starts a primary and two standbys with the `ledger` table replayed on both.
async fn start(tl: &Timeline) -> PgCluster {
    let pg = PgCluster::start(2).await.unwrap_or_else(|e| panic!("{e}"));
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
    pg
}

/// A backend for `node`, 8 connections, 1 s to get one. Its pool keeps the
/// connections that die with a killed node: the restart test shows they are
/// never handed out once the node is back.
fn backend(id: &str, node: &PgNode) -> Arc<Pg> {
    let mut config = PgBackendConfig::new(id, node.url());
    config.pool = PoolSettings::default()
        .with_max_size(8)
        .with_acquire_timeout(Duration::from_secs(1));
    Counted::new(PgBackend::new(config).unwrap())
}

/// `pg-0` (the primary as started), `pg-1`, `pg-2`, each first assumed to be
/// what it was started as; probes confirm it.
fn cluster(pg: &PgCluster, failover_timeout: Duration) -> (Cluster<Pg>, Vec<Arc<Pg>>) {
    let backends: Vec<Arc<Pg>> = pg
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, node)| backend(&format!("pg-{i}"), node))
        .collect();
    let mut builder = Cluster::builder("failover")
        .engine("postgres")
        .config(fast_config(failover_timeout));
    for (i, b) in backends.iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(b.clone(), EndpointConfig::new(role));
    }
    (builder.build().unwrap(), backends)
}

/// A read through `Cluster::run`: retried on another endpoint when the
/// checkout or the query fails with a retryable error, or overruns the
/// router's attempt timeout (which bounds the query too).
fn reader(cluster: &Cluster<Pg>) -> ReadFn {
    let cluster = cluster.clone();
    Arc::new(move |deadline| Box::pin(read(cluster.clone(), deadline)))
}

async fn read(cluster: Cluster<Pg>, deadline: Instant) -> Result<String, Error> {
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

/// A write of `id`, not idempotent, so never retried by the router: it is
/// acknowledged (Ok) only when its commit returned.
fn writer(cluster: &Cluster<Pg>) -> WriteFn {
    let cluster = cluster.clone();
    Arc::new(move |id, deadline| Box::pin(write(cluster.clone(), id, deadline)))
}

async fn write(cluster: Cluster<Pg>, id: i64, deadline: Instant) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    cluster
        .run(Intent::Write, None, opts, async move |conn| {
            // A write's one attempt runs to the whole deadline; this test
            // wants a hung primary seen sooner.
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

fn not_serving(id: &'static str) -> impl Fn(&switchyard_router::ClusterStatus) -> bool {
    move |st| !endpoint(st, id).serves_reads
}

fn is_down(id: &'static str) -> impl Fn(&switchyard_router::ClusterStatus) -> bool {
    move |st| endpoint(st, id).health == Health::Down
}

fn readmitted(id: &'static str) -> impl Fn(&switchyard_router::ClusterStatus) -> bool {
    move |st| {
        let e = endpoint(st, id);
        e.health == Health::Up && e.serves_reads
    }
}

/// Kill a standby under load: retries absorb it (no failed read), once it is
/// detected no checkout reaches it, and after a restart it serves reads again
/// without touching the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_standby_is_routed_around_and_readmitted() {
    let tl = Timeline::new("postgres: kill a standby");
    let pg = start(&tl).await;
    let (cluster, backends) = cluster(&pg, Duration::from_millis(2500));
    wait_ready(&cluster, "pg-0").await;
    let victim = &pg.standbys()[0];
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster));
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {WRITERS} writers"
    ));
    load.settle(warm, 200, 50).await;

    let kill = tl.mark("kill pg-1 (SIGKILL)");
    victim.kill().await.unwrap();
    let out = wait_status(&cluster, "pg-1 out of rotation", not_serving("pg-1")).await;
    tl.at(
        out,
        format!("pg-1 out of rotation ({} ms after kill)", ms(kill, out)),
    );
    let down = wait_status(&cluster, "pg-1 marked down", is_down("pg-1")).await;
    tl.at(
        down,
        format!(
            "pg-1 marked down by probes ({} ms after kill)",
            ms(kill, down)
        ),
    );
    load.settle(down, 200, 50).await;

    let restart = tl.mark("restart pg-1");
    victim.restart().await.unwrap();
    let restarted = tl.mark("pg-1 accepts connections again");
    let back = wait_status(&cluster, "pg-1 re-admitted", readmitted("pg-1")).await;
    tl.at(
        back,
        format!(
            "pg-1 up and serving reads ({} ms after restart returned)",
            ms(restarted, back)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a read served by pg-1 again", WAIT, || async {
        log.first_ok_on(Intent::Read, "pg-1", restarted)
    })
    .await
    .unwrap();
    tl.at(
        first,
        format!(
            "first read on pg-1 again ({} ms after restart returned)",
            ms(restarted, first)
        ),
    );
    load.settle(first, 200, 50).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let samples = monitor.stop().await;
    phase_report(
        &tl,
        &ops,
        &[
            ("warm-up", warm),
            ("kill -> down", kill),
            ("down", down),
            ("restart -> end", restart),
        ],
        end,
    );

    let reads: Vec<&Op> = ops.iter().filter(|o| o.intent == Intent::Read).collect();
    let writes: Vec<&Op> = ops.iter().filter(|o| o.intent == Intent::Write).collect();
    assert!(
        reads.iter().all(|o| o.ok()),
        "reads failed: {:?} {:?}",
        error_counts(reads.iter().copied()),
        first_failures(reads.iter().copied())
    );
    assert!(
        writes.iter().all(|o| o.ok()),
        "writes failed with the primary untouched: {:?}",
        first_failures(writes.iter().copied())
    );
    // Routing: from detection until the restart, nothing went to pg-1.
    let drained = assert_out_of_rotation(&samples, "pg-1", down, restart);
    tl.note(format!(
        "pg-1 in-flight drained {} ms after it was marked down",
        ms(down, drained)
    ));
    assert_eq!(
        backends[1].attempts_between(down + GRACE, restart),
        0,
        "checkouts routed to pg-1 while down"
    );
    let served: usize = ops
        .iter()
        .filter(|o| o.ok() && o.on("pg-1") && o.start >= down + GRACE && o.start < restart)
        .count();
    assert_eq!(served, 0);
    let after = ops
        .iter()
        .filter(|o| o.ok() && o.intent == Intent::Read && o.on("pg-1") && o.start >= restarted)
        .count();
    assert!(after > 0, "pg-1 served no reads after its restart");
}

/// Pause a standby (SIGSTOP: connections hang): every read still succeeds
/// within its deadline, the standby is taken out, and resuming brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_standby_costs_no_read_beyond_its_deadline() {
    let tl = Timeline::new("postgres: pause a standby");
    let pg = start(&tl).await;
    let (cluster, backends) = cluster(&pg, Duration::from_millis(2500));
    wait_ready(&cluster, "pg-0").await;
    let victim = &pg.standbys()[0];
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster));
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {WRITERS} writers"
    ));
    load.settle(warm, 200, 50).await;

    let pause = tl.mark("pause pg-1 (SIGSTOP)");
    victim.pause().await.unwrap();
    let out = wait_status(&cluster, "pg-1 out of rotation", not_serving("pg-1")).await;
    tl.at(
        out,
        format!("pg-1 out of rotation ({} ms after pause)", ms(pause, out)),
    );
    let down = wait_status(&cluster, "pg-1 marked down", is_down("pg-1")).await;
    tl.at(
        down,
        format!(
            "pg-1 marked down by probes ({} ms after pause)",
            ms(pause, down)
        ),
    );
    load.settle(down, 200, 50).await;

    let resume = tl.mark("resume pg-1 (SIGCONT)");
    victim.resume().await.unwrap();
    let back = wait_status(&cluster, "pg-1 re-admitted", readmitted("pg-1")).await;
    tl.at(
        back,
        format!(
            "pg-1 up and serving reads ({} ms after resume)",
            ms(resume, back)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a read served by pg-1 again", WAIT, || async {
        log.first_ok_on(Intent::Read, "pg-1", resume)
    })
    .await
    .unwrap();
    tl.at(
        first,
        format!(
            "first read on pg-1 again ({} ms after resume)",
            ms(resume, first)
        ),
    );
    load.settle(first, 200, 50).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let samples = monitor.stop().await;
    phase_report(
        &tl,
        &ops,
        &[
            ("warm-up", warm),
            ("pause -> down", pause),
            ("down", down),
            ("resume -> end", resume),
        ],
        end,
    );

    let reads: Vec<&Op> = ops.iter().filter(|o| o.intent == Intent::Read).collect();
    assert!(
        reads.iter().all(|o| o.ok()),
        "reads failed: {:?} {:?}",
        error_counts(reads.iter().copied()),
        first_failures(reads.iter().copied())
    );
    let slowest = reads.iter().map(|o| o.latency()).max().unwrap();
    tl.note(format!(
        "slowest read {} ms (deadline {} ms; attempt timeout 500 ms, query timeout {} ms)",
        slowest.as_millis(),
        OP_DEADLINE.as_millis(),
        QUERY_TIMEOUT.as_millis()
    ));
    assert!(slowest <= OP_DEADLINE + SLACK, "a read took {slowest:?}");
    let writes: Vec<&Op> = ops.iter().filter(|o| o.intent == Intent::Write).collect();
    assert!(
        writes.iter().all(|o| o.ok()),
        "writes failed: {:?}",
        first_failures(writes.iter().copied())
    );
    let drained = assert_out_of_rotation(&samples, "pg-1", down, resume);
    tl.note(format!(
        "pg-1 in-flight drained {} ms after it was marked down",
        ms(down, drained)
    ));
    assert_eq!(
        backends[1].attempts_between(down + GRACE, resume),
        0,
        "checkouts routed to pg-1 while down"
    );
}

/// Kill the primary and promote a standby under write load. Writes resume on
/// the promoted standby with no reconfiguration; writes in the gap fail with
/// a clear error; and no acknowledged write is lost.
///
/// Which guarantee this tests: the test bed streams WAL asynchronously
/// (`synchronous_commit = on` but no `synchronous_standby_names`), so a commit
/// acknowledged by the old primary just before SIGKILL may never reach a
/// standby; that loss would be PostgreSQL's, not the router's. So the primary
/// is first made to wait for both standbys (`ALTER SYSTEM SET
/// synchronous_standby_names = 'ANY 2 (*)'` + reload, checked in
/// `pg_stat_replication`): a commit is acknowledged only once both standbys
/// have flushed it, and a promoted standby replays everything it flushed. With
/// that, "every write the router acknowledged is on the new primary" is the
/// router's guarantee: it never acknowledged a write from a node other than
/// the real primary (a standby refuses writes; a stale primary must not get
/// them), and followed the promotion by probes alone.
///
/// Last, the old primary is restarted: PostgreSQL brings it back as an
/// independent primary (split brain), and it is made writable
/// (`synchronous_standby_names` reset) so that any write routed to it would be
/// acknowledged and missing from the new primary. The router sees two
/// primaries and keeps writes on the one that has been primary longest (the
/// promoted standby); the old one is probed up but serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_takes_writes_and_no_acknowledged_write_is_lost() {
    let tl = Timeline::new("postgres: kill the primary, promote a standby");
    let pg = start(&tl).await;
    exec(
        pg.primary().url(),
        "ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (*)'",
    )
    .await;
    exec(pg.primary().url(), "SELECT pg_reload_conf()").await;
    let url = pg.primary().url().to_owned();
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

    let (cluster, backends) = cluster(&pg, Duration::from_secs(1));
    wait_ready(&cluster, "pg-0").await;
    let (old, new) = (pg.primary(), &pg.standbys()[0]);
    let monitor = Monitor::start(&cluster);
    let writers = 6;
    let load = Load::start(READERS, writers, reader(&cluster), writer(&cluster));
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {writers} writers"
    ));
    load.settle(warm, 200, 100).await;

    let kill = tl.mark("kill pg-0, the primary (SIGKILL)");
    old.kill().await.unwrap();
    let killed = Instant::now();
    let no_writer = wait_status(&cluster, "no writer", |st| st.writer.is_none()).await;
    tl.at(
        no_writer,
        format!("router: no primary ({} ms after kill)", ms(kill, no_writer)),
    );

    let promote = tl.mark("promote pg-1");
    new.promote().await.unwrap();
    let promoted = tl.mark(format!(
        "pg-1 promoted: leaves recovery ({} ms)",
        ms(promote, Instant::now())
    ));
    let follows = wait_status(&cluster, "writes follow pg-1", |st| {
        st.writer.as_ref().map(EndpointId::as_str) == Some("pg-1")
    })
    .await;
    tl.at(
        follows,
        format!(
            "router: writes go to pg-1 ({} ms after promote returned)",
            ms(promoted, follows)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a write acknowledged by pg-1", WAIT, || async {
        log.first_ok_on(Intent::Write, "pg-1", kill)
    })
    .await
    .unwrap();
    tl.at(first, format!(
        "first write acknowledged by pg-1: follow time {} ms after promote() returned, {} ms after it was called",
        ms(promoted, first),
        ms(promote, first)
    ));
    load.settle(first, 200, 100).await;

    let restart = tl.mark("restart pg-0: back as an independent primary (split brain)");
    old.restart().await.unwrap();
    exec(old.url(), "ALTER SYSTEM RESET synchronous_standby_names").await;
    exec(old.url(), "SELECT pg_reload_conf()").await;
    assert!(
        !old.is_in_recovery().await.unwrap(),
        "pg-0 should be a primary again"
    );
    let old_up = wait_status(&cluster, "pg-0 probed up as a primary", |st| {
        let e = endpoint(st, "pg-0");
        e.health != Health::Down && e.role == Role::Primary
    })
    .await;
    let health = endpoint(&cluster.status(), "pg-0").health;
    tl.at(
        old_up,
        format!("router: pg-0 probed up, role primary, {health}, serves nothing"),
    );
    load.settle(old_up, 200, 100).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let samples = monitor.stop().await;
    phase_report(
        &tl,
        &ops,
        &[
            ("warm-up", warm),
            ("kill -> promoted", kill),
            ("promoted -> 1st write", promoted),
            ("on new primary", first),
            ("old primary back", restart),
        ],
        end,
    );

    // The gap: writes that ended after the kill and started before writes
    // were flowing on pg-1 again.
    let gap: Vec<&Op> = ops
        .iter()
        .filter(|o| o.intent == Intent::Write && o.end >= kill && o.start < first)
        .collect();
    tl.note(format!(
        "writes in the gap: {} acknowledged, {} failed: {:?}",
        gap.iter().filter(|o| o.ok()).count(),
        gap.iter().filter(|o| !o.ok()).count(),
        error_counts(gap.iter().copied())
    ));
    let clear = [
        "no-primary",
        "timeout@pg-0",
        "connect@pg-0",
        "i/o@pg-0",
        "read-only@pg-1",
    ];
    for o in gap.iter().filter(|o| !o.ok()) {
        let k = o.error.as_deref().unwrap();
        assert!(
            clear.contains(&k),
            "unclear failure in the gap: {k}: {:?}",
            o.message
        );
    }
    let before: Vec<&Op> = ops.iter().filter(|o| o.end < kill).collect();
    assert!(
        before.iter().all(|o| o.ok()),
        "failures before the kill: {:?}",
        first_failures(before.iter().copied())
    );
    let after: Vec<&Op> = ops
        .iter()
        .filter(|o| o.intent == Intent::Write && o.start >= first)
        .collect();
    assert!(
        after.iter().all(|o| o.ok()),
        "writes failed once pg-1 took them: {:?}",
        first_failures(after.iter().copied())
    );
    let reads: Vec<&Op> = ops.iter().filter(|o| o.intent == Intent::Read).collect();
    assert!(
        reads.iter().all(|o| o.ok()),
        "reads failed: {:?} {:?}",
        error_counts(reads.iter().copied()),
        first_failures(reads.iter().copied())
    );

    // Who acknowledged what.
    let mut acked_by: BTreeMap<&str, usize> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.intent == Intent::Write && o.ok()) {
        *acked_by.entry(o.endpoint.as_deref().unwrap()).or_default() += 1;
    }
    tl.note(format!("acknowledged writes by endpoint: {acked_by:?}"));
    let stray: Vec<&Op> = ops
        .iter()
        .filter(|o| {
            o.intent == Intent::Write
                && o.ok()
                && !o.on("pg-1")
                && !(o.on("pg-0") && o.end < killed)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "writes acknowledged by a node that was not the primary: {stray:?}"
    );
    for s in samples.iter().filter(|s| s.at >= follows) {
        assert_eq!(
            s.writer.as_deref(),
            Some("pg-1"),
            "writes left the promoted standby at {:?}",
            s.at
        );
        let e = s.endpoint("pg-0").unwrap();
        assert!(
            !e.serves_reads && !e.serves_writes,
            "the old primary was routed to: {e:?}"
        );
    }
    assert_eq!(
        backends[0].attempts_between(old_up + GRACE, end),
        0,
        "checkouts routed to the old primary after it came back"
    );

    // No acknowledged write lost: read every id back from the new primary.
    let mut conn = connect(new.url()).await;
    let present: HashSet<i64> = sqlx::query_scalar::<_, i64>("SELECT id FROM ledger")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let acked: Vec<i64> = ops
        .iter()
        .filter(|o| o.intent == Intent::Write && o.ok())
        .filter_map(|o| o.id)
        .collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    let in_doubt = ops
        .iter()
        .filter(|o| o.intent == Intent::Write && !o.ok())
        .filter(|o| o.id.is_some_and(|id| present.contains(&id)))
        .count();
    tl.note(format!(
        "{} acknowledged writes, {} on pg-1, {} lost; {} failed writes were committed anyway (ack lost with the primary)",
        acked.len(),
        acked.len() - lost.len(),
        lost.len(),
        in_doubt
    ));
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new primary: {lost:?}"
    );
}

/// Endpoints join and leave, a weight and the strategy change, all under
/// load: no checkout fails, and each change shows in where reads go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reconfiguration_under_load_fails_no_checkout() {
    let tl = Timeline::new("postgres: live reconfiguration");
    let pg = start(&tl).await;
    let primary = backend("pg-0", pg.primary());
    let first_pg1 = backend("pg-1", &pg.standbys()[0]);
    let cluster = Cluster::builder("live")
        .engine("postgres")
        .config(fast_config(Duration::from_millis(2500)))
        .endpoint(primary, EndpointConfig::new(Role::Primary))
        .endpoint(first_pg1.clone(), EndpointConfig::new(Role::Replica))
        .build()
        .unwrap();
    wait_ready(&cluster, "pg-0").await;
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster));
    let t0 = tl.mark("load started on pg-0 + pg-1 (least_conn)");
    load.settle(t0, 200, 50).await;

    let added = tl.mark("add pg-2 (replica, weight 1)");
    cluster
        .add_endpoint(
            backend("pg-2", &pg.standbys()[1]),
            EndpointConfig::new(Role::Replica),
        )
        .unwrap();
    load.settle(added, 300, 50).await;

    let weighted = tl.mark("weighted_round_robin, pg-2 weight 4");
    cluster.set_strategy(StrategyKind::WeightedRoundRobin);
    cluster.set_weight(&EndpointId::new("pg-2"), 4).unwrap();
    load.settle(weighted, 500, 50).await;

    let removed = tl.mark("remove pg-1");
    assert!(cluster.remove_endpoint(&EndpointId::new("pg-1")));
    let removed_done = Instant::now();
    load.settle(removed_done, 300, 50).await;
    let quiet_from = removed_done + GRACE;

    let readded = tl.mark("add pg-1 back (new backend), latency strategy");
    let quiet_to = readded;
    cluster
        .add_endpoint(
            backend("pg-1", &pg.standbys()[0]),
            EndpointConfig::new(Role::Replica).weight(2),
        )
        .unwrap();
    cluster.set_strategy(StrategyKind::Latency);
    load.settle(readded, 300, 50).await;

    let churn = tl.mark("churn: add and remove pg-2-alias 10 times, round_robin");
    cluster.set_strategy(StrategyKind::RoundRobin);
    for _ in 0..10 {
        cluster
            .add_endpoint(
                backend("pg-2-alias", &pg.standbys()[1]),
                EndpointConfig::new(Role::Replica),
            )
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(cluster.remove_endpoint(&EndpointId::new("pg-2-alias")));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.settle(Instant::now(), 200, 50).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let phases = [
        ("pg-0 + pg-1", t0),
        ("+ pg-2", added),
        ("wrr, pg-2 weight 4", weighted),
        ("- pg-1", removed),
        ("+ pg-1 again, latency", readded),
        ("churn, round robin", churn),
    ];
    phase_report(&tl, &ops, &phases, end);

    assert!(
        ops.iter().all(|o| o.ok()),
        "failed checkouts: {:?} {:?}",
        error_counts(&ops),
        first_failures(&ops)
    );
    let reads_on = |ep: &str, from: Instant, to: Instant| {
        ops.iter()
            .filter(|o| o.intent == Intent::Read && o.on(ep) && o.start >= from && o.start < to)
            .count()
    };
    assert!(
        reads_on("pg-2", added, weighted) > 0,
        "pg-2 got no reads once added"
    );
    let (w1, w4) = (
        reads_on("pg-1", weighted, removed),
        reads_on("pg-2", weighted, removed),
    );
    tl.note(format!(
        "weighted phase: pg-1 (weight 1) {w1} reads, pg-2 (weight 4) {w4} reads"
    ));
    assert!(w4 >= 2 * w1, "weights not followed: pg-1 {w1}, pg-2 {w4}");
    // The removed backend got nothing once remove_endpoint returned.
    assert_eq!(
        first_pg1.attempts_between(quiet_from, quiet_to),
        0,
        "checkouts reached a removed endpoint"
    );
    assert_eq!(reads_on("pg-1", quiet_from, quiet_to), 0);
    assert!(
        reads_on("pg-1", readded, churn) > 0,
        "pg-1 got no reads once re-added"
    );
    assert_eq!(cluster.status().endpoints.len(), 3);
}
