#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault tolerance of the router over real Redis: a master and two replicas
//! from the test bed, a dozen tasks reading and writing through one `Cluster`
//! throughout, and one fault per test.
//!
//! Run with `cargo test -p switchyard --test failover_redis -- --nocapture`
//! to see each test's timeline: detection times, promotion follow time and
//! failed operations per phase.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard_core::{BackendErrorKind, EndpointId, Error, Intent, Role};
use switchyard_redis::{redis, redis_error, RedisBackend};
use switchyard_router::{
    CheckoutOptions, Cluster, ClusterStatus, EndpointConfig, Health, StrategyKind,
};
use switchyard_testkit::{poll_until, RedisCluster, RedisNode};
use tokio::time::Instant;

type Rd = Counted<RedisBackend>;

const READERS: usize = 8;
const WRITERS: usize = 4;

/// A direct connection to `node`, outside the router.
async fn direct(node: &RedisNode) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(node.url()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect timed out")
    .unwrap()
}

/// Starts a master and two replicas, with the key `hot` on every node.
async fn start(tl: &Timeline) -> RedisCluster {
    let rc = RedisCluster::start(2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut master = direct(rc.master()).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut master)
        .await
        .unwrap();
    let version = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))
        .unwrap_or("?")
        .to_owned();
    tl.mark(format!(
        "real Redis {version} master {} + replicas {}, {} started",
        rc.master().addr(),
        rc.replicas()[0].addr(),
        rc.replicas()[1].addr()
    ));
    let () = redis::cmd("SET")
        .arg("hot")
        .arg("1")
        .query_async(&mut master)
        .await
        .unwrap();
    for replica in rc.replicas() {
        let conn = direct(replica).await;
        poll_until("the hot key on a replica", WAIT, || {
            let mut conn = conn.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("hot")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                v.map(drop)
            }
        })
        .await
        .unwrap();
    }
    rc
}

/// A backend for `node`: 8 connections; connecting, recycling and each reply
/// bounded well under the router's attempt timeout.
fn backend(id: &str, node: &RedisNode) -> Arc<Rd> {
    Counted::new(
        RedisBackend::builder(id, node.url())
            .max_size(8)
            .acquire_timeout(Duration::from_secs(1))
            .connect_timeout(Duration::from_millis(300))
            .recycle_timeout(Duration::from_millis(300))
            .response_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
}

/// `redis-0` (the master as started), `redis-1`, `redis-2`.
fn cluster(rc: &RedisCluster, failover_timeout: Duration) -> (Cluster<Rd>, Vec<Arc<Rd>>) {
    let backends: Vec<Arc<Rd>> = rc
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, node)| backend(&format!("redis-{i}"), node))
        .collect();
    let mut builder = Cluster::builder("failover")
        .engine("redis")
        .config(fast_config(failover_timeout));
    for (i, b) in backends.iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(b.clone(), EndpointConfig::new(role));
    }
    (builder.build().unwrap(), backends)
}

/// `GET hot` through `Cluster::run`, retried on another endpoint when the
/// checkout or the command fails with a retryable error, or overruns the
/// router's attempt timeout (which bounds the command too).
fn reader(cluster: &Cluster<Rd>) -> ReadFn {
    let cluster = cluster.clone();
    Arc::new(move |deadline| Box::pin(read(cluster.clone(), deadline)))
}

async fn read(cluster: Cluster<Rd>, deadline: Instant) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    cluster
        .run(Intent::Read, None, opts, async |conn| {
            conn.get::<Option<String>>("hot").await?;
            Ok::<_, Error>(conn.endpoint().to_string())
        })
        .await
}

/// `SET w:<id> <id>`, not idempotent, so never retried by the router.
///
/// With `confirm_on` naming an endpoint, a write served there is
/// acknowledged only once `WAIT 2` says both replicas have it (see the
/// promotion test).
fn writer(cluster: &Cluster<Rd>, confirm_on: Option<&'static str>) -> WriteFn {
    let cluster = cluster.clone();
    Arc::new(move |id, deadline| Box::pin(write(cluster.clone(), confirm_on, id, deadline)))
}

async fn write(
    cluster: Cluster<Rd>,
    confirm_on: Option<&'static str>,
    id: i64,
    deadline: Instant,
) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    // Owned captures only: a captured reference, even `&'static`, makes the
    // future not provably `Send` (a rustc limitation with async closures).
    let confirm_on = confirm_on.map(EndpointId::new);
    // The closure's one attempt (a write) runs to `deadline`, which the
    // router enforces: a cancelled write is an `OperationTimeout`.
    cluster
        .run(Intent::Write, None, opts, async move |conn| {
            let ep = conn.endpoint().clone();
            let confirm = confirm_on.as_ref() == Some(&ep);
            let mut raw = conn.raw()?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(format!("w:{id}")).arg(id);
            if !confirm {
                let ((),): ((),) = pipe
                    .query_async(&mut raw)
                    .await
                    .map_err(|e| redis_error(&ep, None, e))?;
                return Ok(ep.to_string());
            }
            pipe.cmd("WAIT").arg(2).arg(1000);
            let ((), replicas): ((), i64) = pipe
                .query_async(&mut raw)
                .await
                .map_err(|e| redis_error(&ep, None, e))?;
            if replicas < 2 {
                return Err(Error::backend(
                    &ep,
                    None,
                    BackendErrorKind::Rejected,
                    std::io::Error::other(format!(
                        "unconfirmed: WAIT saw {replicas} of 2 replicas"
                    )),
                ));
            }
            Ok(ep.to_string())
        })
        .await
}

fn not_serving(id: &'static str) -> impl Fn(&ClusterStatus) -> bool {
    move |st| !endpoint(st, id).serves_reads
}

fn is_down(id: &'static str) -> impl Fn(&ClusterStatus) -> bool {
    move |st| endpoint(st, id).health == Health::Down
}

fn readmitted(id: &'static str) -> impl Fn(&ClusterStatus) -> bool {
    move |st| {
        let e = endpoint(st, id);
        e.health == Health::Up && e.serves_reads
    }
}

fn all_ok(ops: &[Op], intent: Intent, what: &str) {
    let of: Vec<&Op> = ops.iter().filter(|o| o.intent == intent).collect();
    assert!(
        of.iter().all(|o| o.ok()),
        "{what}: {:?} {:?}",
        error_counts(of.iter().copied()),
        first_failures(of.iter().copied())
    );
}

/// Kill a replica under load: retries absorb it (no failed read), once it is
/// detected no checkout reaches it, and after a restart (it resyncs from the
/// master) it serves reads again without touching the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_routed_around_and_readmitted() {
    let tl = Timeline::new("redis: kill a replica");
    let rc = start(&tl).await;
    let (cluster, backends) = cluster(&rc, Duration::from_millis(2500));
    wait_ready(&cluster, "redis-0").await;
    let victim = &rc.replicas()[0];
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster, None));
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {WRITERS} writers"
    ));
    load.settle(warm, 300, 100).await;

    let kill = tl.mark("kill redis-1 (SIGKILL)");
    victim.kill().await.unwrap();
    let out = wait_status(&cluster, "redis-1 out of rotation", not_serving("redis-1")).await;
    tl.at(
        out,
        format!("redis-1 out of rotation ({} ms after kill)", ms(kill, out)),
    );
    let down = wait_status(&cluster, "redis-1 marked down", is_down("redis-1")).await;
    tl.at(
        down,
        format!(
            "redis-1 marked down by probes ({} ms after kill)",
            ms(kill, down)
        ),
    );
    load.settle(down, 300, 100).await;

    let restart = tl.mark("restart redis-1");
    victim.restart().await.unwrap();
    let restarted = tl.mark("redis-1 back, linked to its master");
    let back = wait_status(&cluster, "redis-1 re-admitted", readmitted("redis-1")).await;
    tl.at(
        back,
        format!(
            "redis-1 up and serving reads ({} ms after restart returned)",
            ms(restarted, back)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a read served by redis-1 again", WAIT, || async {
        log.first_ok_on(Intent::Read, "redis-1", restarted)
    })
    .await
    .unwrap();
    tl.at(
        first,
        format!(
            "first read on redis-1 again ({} ms after restart returned)",
            ms(restarted, first)
        ),
    );
    load.settle(first, 300, 100).await;

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
    all_ok(&ops, Intent::Read, "reads failed");
    all_ok(
        &ops,
        Intent::Write,
        "writes failed with the master untouched",
    );
    let drained = assert_out_of_rotation(&samples, "redis-1", down, restart);
    tl.note(format!(
        "redis-1 in-flight drained {} ms after it was marked down",
        ms(down, drained)
    ));
    assert_eq!(
        backends[1].attempts_between(down + GRACE, restart),
        0,
        "checkouts routed to redis-1 while down"
    );
    let after = ops
        .iter()
        .filter(|o| o.ok() && o.intent == Intent::Read && o.on("redis-1") && o.start >= restarted)
        .count();
    assert!(after > 0, "redis-1 served no reads after its restart");
}

/// Pause a replica (SIGSTOP: it accepts TCP but never answers): every read
/// still succeeds within its deadline, the replica is taken out, and resuming
/// brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replica_costs_no_read_beyond_its_deadline() {
    let tl = Timeline::new("redis: pause a replica");
    let rc = start(&tl).await;
    let (cluster, backends) = cluster(&rc, Duration::from_millis(2500));
    wait_ready(&cluster, "redis-0").await;
    let victim = &rc.replicas()[0];
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster, None));
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {WRITERS} writers"
    ));
    load.settle(warm, 300, 100).await;

    let pause = tl.mark("pause redis-1 (SIGSTOP)");
    victim.pause().await.unwrap();
    let out = wait_status(&cluster, "redis-1 out of rotation", not_serving("redis-1")).await;
    tl.at(
        out,
        format!(
            "redis-1 out of rotation ({} ms after pause)",
            ms(pause, out)
        ),
    );
    let down = wait_status(&cluster, "redis-1 marked down", is_down("redis-1")).await;
    tl.at(
        down,
        format!(
            "redis-1 marked down by probes ({} ms after pause)",
            ms(pause, down)
        ),
    );
    load.settle(down, 300, 100).await;

    let resume = tl.mark("resume redis-1 (SIGCONT)");
    victim.resume().await.unwrap();
    let back = wait_status(&cluster, "redis-1 re-admitted", readmitted("redis-1")).await;
    tl.at(
        back,
        format!(
            "redis-1 up and serving reads ({} ms after resume)",
            ms(resume, back)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a read served by redis-1 again", WAIT, || async {
        log.first_ok_on(Intent::Read, "redis-1", resume)
    })
    .await
    .unwrap();
    tl.at(
        first,
        format!(
            "first read on redis-1 again ({} ms after resume)",
            ms(resume, first)
        ),
    );
    load.settle(first, 300, 100).await;

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
    all_ok(&ops, Intent::Read, "reads failed");
    let slowest = ops
        .iter()
        .filter(|o| o.intent == Intent::Read)
        .map(Op::latency)
        .max()
        .unwrap();
    tl.note(format!(
        "slowest read {} ms (deadline {} ms; attempt timeout 500 ms, reply timeout 500 ms)",
        slowest.as_millis(),
        OP_DEADLINE.as_millis()
    ));
    assert!(slowest <= OP_DEADLINE + SLACK, "a read took {slowest:?}");
    all_ok(
        &ops,
        Intent::Write,
        "writes failed with the master untouched",
    );
    let drained = assert_out_of_rotation(&samples, "redis-1", down, resume);
    tl.note(format!(
        "redis-1 in-flight drained {} ms after it was marked down",
        ms(down, drained)
    ));
    assert_eq!(
        backends[1].attempts_between(down + GRACE, resume),
        0,
        "checkouts routed to redis-1 while down"
    );
}

/// Kill the master and promote a replica (`REPLICAOF NO ONE`) under write
/// load. Writes resume on the promoted replica with no reconfiguration;
/// writes in the gap fail with a clear error; no acknowledged write is lost.
///
/// Which guarantee this tests: Redis replicates asynchronously, so a `SET`
/// the master answered just before SIGKILL may never reach a replica. A
/// write served by the original master is therefore acknowledged only when
/// `WAIT 2 1000` (same round trip) reports both replicas have applied it; the
/// promoted replica keeps what it had, so every such write must be on it.
/// Writes served by the promoted replica are acknowledged on its reply (the
/// other replica still follows the dead master, so there is nothing to wait
/// for) and are read back from that same node. What the router guarantees is
/// that no write is acknowledged by a node that is not the primary.
///
/// Last, the old master is restarted: the test bed brings it back empty, as
/// a master (split brain), and the other replica resyncs from it. The router
/// sees two primaries and keeps writes on the one that has been primary
/// longest (the promoted replica); the old one serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_takes_writes_and_no_acknowledged_write_is_lost() {
    let tl = Timeline::new("redis: kill the master, promote a replica");
    let rc = start(&tl).await;
    let (cluster, backends) = cluster(&rc, Duration::from_secs(1));
    wait_ready(&cluster, "redis-0").await;
    let (old, new) = (rc.master(), &rc.replicas()[0]);
    let monitor = Monitor::start(&cluster);
    let writers = 6;
    let load = Load::start(
        READERS,
        writers,
        reader(&cluster),
        writer(&cluster, Some("redis-0")),
    );
    let warm = tl.mark(format!(
        "load started: {READERS} readers, {writers} writers (SET + WAIT 2 on redis-0)"
    ));
    load.settle(warm, 300, 100).await;

    let kill = tl.mark("kill redis-0, the master (SIGKILL)");
    old.kill().await.unwrap();
    let killed = Instant::now();
    let no_writer = wait_status(&cluster, "no writer", |st| st.writer.is_none()).await;
    tl.at(
        no_writer,
        format!("router: no primary ({} ms after kill)", ms(kill, no_writer)),
    );

    let promote = tl.mark("promote redis-1 (REPLICAOF NO ONE)");
    new.promote().await.unwrap();
    let promoted = tl.mark(format!(
        "redis-1 is a master ({} ms)",
        ms(promote, Instant::now())
    ));
    let follows = wait_status(&cluster, "writes follow redis-1", |st| {
        st.writer.as_ref().map(EndpointId::as_str) == Some("redis-1")
    })
    .await;
    tl.at(
        follows,
        format!(
            "router: writes go to redis-1 ({} ms after promote returned)",
            ms(promoted, follows)
        ),
    );
    let log = load.log.clone();
    let first = poll_until("a write acknowledged by redis-1", WAIT, || async {
        log.first_ok_on(Intent::Write, "redis-1", kill)
    })
    .await
    .unwrap();
    tl.at(first, format!(
        "first write acknowledged by redis-1: follow time {} ms after promote() returned, {} ms after it was called",
        ms(promoted, first),
        ms(promote, first)
    ));
    load.settle(first, 300, 100).await;

    let restart = tl.mark("restart redis-0: back empty, as a master (split brain)");
    old.restart().await.unwrap();
    assert_eq!(old.role().await.unwrap(), "master");
    let old_up = wait_status(&cluster, "redis-0 probed up as a primary", |st| {
        let e = endpoint(st, "redis-0");
        e.health != Health::Down && e.role == Role::Primary
    })
    .await;
    let health = endpoint(&cluster.status(), "redis-0").health;
    tl.at(
        old_up,
        format!("router: redis-0 probed up, role primary, {health}, serves nothing"),
    );
    load.settle(old_up, 300, 100).await;

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
            ("on new master", first),
            ("old master back", restart),
        ],
        end,
    );

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
        "timeout@redis-0",
        "connect@redis-0",
        "i/o@redis-0",
        "read-only@redis-1",
    ];
    for o in gap.iter().filter(|o| !o.ok()) {
        let k = o.error.as_deref().unwrap();
        let unconfirmed = k == "server@redis-0"
            && o.message
                .as_deref()
                .is_some_and(|m| m.contains("unconfirmed"));
        assert!(
            clear.contains(&k) || unconfirmed,
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
        "writes failed once redis-1 took them: {:?}",
        first_failures(after.iter().copied())
    );
    all_ok(&ops, Intent::Read, "reads failed");

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
                && !o.on("redis-1")
                // Sent before the kill: its reply may be read just after.
                && !(o.on("redis-0") && o.start < killed)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "writes acknowledged by a node that was not the primary: {stray:?}"
    );
    for s in samples.iter().filter(|s| s.at >= follows) {
        assert_eq!(
            s.writer.as_deref(),
            Some("redis-1"),
            "writes left the promoted replica at {:?}",
            s.at
        );
        let e = s.endpoint("redis-0").unwrap();
        assert!(
            !e.serves_reads && !e.serves_writes,
            "the old master was routed to: {e:?}"
        );
    }
    assert_eq!(
        backends[0].attempts_between(old_up + GRACE, end),
        0,
        "checkouts routed to the old master after it came back"
    );

    let mut conn = direct(new).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("w:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let present: HashSet<i64> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("w:")?.parse().ok())
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
        "{} acknowledged writes, {} on redis-1, {} lost; {} failed writes were applied anyway",
        acked.len(),
        acked.len() - lost.len(),
        lost.len(),
        in_doubt
    ));
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new master: {lost:?}"
    );
}

/// Endpoints join and leave, a weight and the strategy change, all under
/// load: no checkout fails, and each change shows in where reads go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reconfiguration_under_load_fails_no_checkout() {
    let tl = Timeline::new("redis: live reconfiguration");
    let rc = start(&tl).await;
    let first_r1 = backend("redis-1", &rc.replicas()[0]);
    let cluster = Cluster::builder("live")
        .engine("redis")
        .config(fast_config(Duration::from_millis(2500)))
        .endpoint(
            backend("redis-0", rc.master()),
            EndpointConfig::new(Role::Primary),
        )
        .endpoint(first_r1.clone(), EndpointConfig::new(Role::Replica))
        .build()
        .unwrap();
    wait_ready(&cluster, "redis-0").await;
    let load = Load::start(READERS, WRITERS, reader(&cluster), writer(&cluster, None));
    let t0 = tl.mark("load started on redis-0 + redis-1 (least_conn)");
    load.settle(t0, 300, 100).await;

    let added = tl.mark("add redis-2 (replica, weight 1)");
    cluster
        .add_endpoint(
            backend("redis-2", &rc.replicas()[1]),
            EndpointConfig::new(Role::Replica),
        )
        .unwrap();
    load.settle(added, 300, 100).await;

    let weighted = tl.mark("weighted_round_robin, redis-2 weight 4");
    cluster.set_strategy(StrategyKind::WeightedRoundRobin);
    cluster.set_weight(&EndpointId::new("redis-2"), 4).unwrap();
    load.settle(weighted, 500, 100).await;

    let removed = tl.mark("remove redis-1");
    assert!(cluster.remove_endpoint(&EndpointId::new("redis-1")));
    let quiet_from = Instant::now() + GRACE;
    load.settle(quiet_from, 300, 100).await;

    let readded = tl.mark("add redis-1 back (new backend), latency strategy");
    let quiet_to = readded;
    cluster
        .add_endpoint(
            backend("redis-1", &rc.replicas()[0]),
            EndpointConfig::new(Role::Replica).weight(2),
        )
        .unwrap();
    cluster.set_strategy(StrategyKind::Latency);
    load.settle(readded, 300, 100).await;

    let churn = tl.mark("churn: add and remove redis-2-alias 10 times, round_robin");
    cluster.set_strategy(StrategyKind::RoundRobin);
    for _ in 0..10 {
        cluster
            .add_endpoint(
                backend("redis-2-alias", &rc.replicas()[1]),
                EndpointConfig::new(Role::Replica),
            )
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(cluster.remove_endpoint(&EndpointId::new("redis-2-alias")));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.settle(Instant::now(), 300, 100).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let phases = [
        ("redis-0 + redis-1", t0),
        ("+ redis-2", added),
        ("wrr, redis-2 weight 4", weighted),
        ("- redis-1", removed),
        ("+ redis-1 again, latency", readded),
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
        reads_on("redis-2", added, weighted) > 0,
        "redis-2 got no reads once added"
    );
    let (w1, w4) = (
        reads_on("redis-1", weighted, removed),
        reads_on("redis-2", weighted, removed),
    );
    tl.note(format!(
        "weighted phase: redis-1 (weight 1) {w1} reads, redis-2 (weight 4) {w4} reads"
    ));
    assert!(
        w4 >= 2 * w1,
        "weights not followed: redis-1 {w1}, redis-2 {w4}"
    );
    assert_eq!(
        first_r1.attempts_between(quiet_from, quiet_to),
        0,
        "checkouts reached a removed endpoint"
    );
    assert_eq!(reads_on("redis-1", quiet_from, quiet_to), 0);
    assert!(
        reads_on("redis-1", readded, churn) > 0,
        "redis-1 got no reads once re-added"
    );
    assert_eq!(cluster.status().endpoints.len(), 3);
}
