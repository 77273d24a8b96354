//! The failover scenarios, written once over a per-engine [`Fixture`]: a
//! primary and two replicas from the test bed, a dozen tasks reading and
//! writing through one `Cluster` throughout, and one fault per test (the
//! testkit's [`Fault`], or a live reconfiguration). `tests/failover_<engine>.rs`
//! is that engine's fixture and one [`failover_tests!`] line.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Backend, EndpointId, Intent, Role};
use switchyard_router::{Cluster, ClusterStatus, EndpointConfig, Health};
use switchyard_testkit::{poll_until, Fault, Node, ReplicaSet};
use tokio::time::Instant;

use crate::common::*;

mod live;
pub use live::live_reconfiguration;

pub const READERS: usize = 8;
pub const WRITERS: usize = 4;
/// Writers of the promotion scenario, which is about writes.
const PROMOTION_WRITERS: usize = 6;

/// The router a fixture's scenarios run over.
pub type Routed<F> = Cluster<Counted<<F as Fixture>::Backend>>;
/// A fixture's backend, counted.
pub type CountedBackend<F> = Arc<Counted<<F as Fixture>::Backend>>;
/// One server of a fixture's bed.
pub type NodeOf<F> = <<F as Fixture>::Bed as ReplicaSet>::Node;

/// What the scenarios need from one engine, and where it differs.
pub trait Fixture {
    /// The engine's backend.
    type Backend: Backend;
    /// The test bed's primary and replicas, stopped on drop.
    type Bed: ReplicaSet;
    /// The engine's name: `Cluster::engine`, timelines, and endpoint names
    /// `<ENGINE>-<i>` (`-0` the primary as started).
    const ENGINE: &'static str;
    /// Successful reads and writes that make a phase long enough to mean
    /// something, however slow the machine.
    const SETTLE: (usize, usize) = (200, 50);
    /// Whether a write sent to the primary before it was killed may still be
    /// acknowledged just after (its reply read once the kill returned).
    const ACK_AFTER_KILL: bool = false;

    /// Puts on a freshly started bed what the reader reads, replicated, and
    /// marks the engine's version on `tl`.
    fn prepare(bed: &Self::Bed, tl: &Timeline) -> impl Future<Output = ()>;
    /// A backend for `node`, 8 connections, getting one bounded well under
    /// the router's attempt timeout.
    fn backend(id: &str, node: &NodeOf<Self>) -> Arc<Counted<Self::Backend>>;
    /// A read through `Cluster::run`, retried by the router.
    fn reader(cluster: &Routed<Self>) -> ReadFn;
    /// A write of its id, not idempotent, so never retried by the router.
    fn writer(cluster: &Routed<Self>) -> WriteFn;
    /// Writes for the promotion scenario: acknowledged only once both
    /// replicas have them, so that every acknowledged write survives the
    /// primary's death (the engine's own replication is asynchronous).
    fn durable_writer(
        bed: &Self::Bed,
        cluster: &Routed<Self>,
        tl: &Timeline,
    ) -> impl Future<Output = WriteFn>;
    /// After the promotion, the killed primary has been restarted: checks it
    /// came back as an independent primary (split brain) that would
    /// acknowledge a write routed to it.
    fn reopened(old: &NodeOf<Self>) -> impl Future<Output = ()>;
    /// The ids of the writes `node` holds, asked directly.
    fn stored(node: &NodeOf<Self>) -> impl Future<Output = HashSet<i64>>;
    /// A failed write in the promotion gap this engine explains beyond the
    /// shared list (a failure naming the endpoint and the reason).
    fn clear_in_gap(_op: &Op) -> bool {
        false
    }
}

/// Stops the load and the monitor and reports `phases`: the operations, the
/// status samples and when the load was stopped.
async fn finish(
    tl: &Timeline,
    load: Load,
    monitor: Monitor,
    phases: &[(&str, Instant)],
) -> (Vec<Op>, Vec<Sample>, Instant) {
    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let samples = monitor.stop().await;
    phase_report(tl, &ops, phases, end);
    (ops, samples, end)
}

/// A primary and two replicas, prepared.
async fn start<F: Fixture>(tl: &Timeline) -> F::Bed {
    let bed = F::Bed::start(2).await.unwrap_or_else(|e| panic!("{e}"));
    F::prepare(&bed, tl).await;
    bed
}

/// Waits until `check` holds; marks when it was first seen with `say`.
async fn seen<F: Fixture>(
    tl: &Timeline,
    cluster: &Routed<F>,
    what: &str,
    check: impl Fn(&ClusterStatus) -> bool,
    say: impl FnOnce(Instant) -> String,
) -> Instant {
    let at = wait_status(cluster, what, check).await;
    tl.at(at, say(at));
    at
}

/// Waits for the first `intent` acknowledged by `id` that started at or
/// after `since`; marks it with `say`.
async fn first_on(
    tl: &Timeline,
    load: &Load,
    intent: Intent,
    id: &str,
    since: Instant,
    say: impl FnOnce(Instant) -> String,
) -> Instant {
    let log = load.log.clone();
    let at = poll_until(
        &format!("a {intent} acknowledged by {id}"),
        WAIT,
        || async { log.first_ok_on(intent, id, since) },
    )
    .await
    .unwrap();
    tl.at(at, say(at));
    at
}

/// A timeline named `<engine>: <what>`.
fn timeline<F: Fixture>(what: &str) -> Timeline {
    Timeline::new(String::leak(format!("{}: {what}", F::ENGINE)))
}

fn name<F: Fixture>(i: usize) -> String {
    format!("{}-{i}", F::ENGINE)
}

/// `<PREFIX>-0` (the primary as started), `-1`, `-2`, each first assumed to
/// be what it was started as; probes confirm it.
fn cluster<F: Fixture>(
    bed: &F::Bed,
    failover_timeout: Duration,
) -> (Routed<F>, Vec<CountedBackend<F>>) {
    let backends: Vec<_> = bed
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, node)| F::backend(&name::<F>(i), node))
        .collect();
    let mut builder = Cluster::builder("failover")
        .engine(F::ENGINE)
        .config(fast_config(failover_timeout));
    for (i, b) in backends.iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(b.clone(), EndpointConfig::new(role));
    }
    (builder.build().unwrap(), backends)
}

fn not_serving(id: &str) -> impl Fn(&ClusterStatus) -> bool + '_ {
    move |st| !endpoint(st, id).serves_reads
}

fn is_down(id: &str) -> impl Fn(&ClusterStatus) -> bool + '_ {
    move |st| endpoint(st, id).health == Health::Down
}

fn readmitted(id: &str) -> impl Fn(&ClusterStatus) -> bool + '_ {
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

/// Kill or pause a replica under load ([`Fault::KilledReplica`],
/// [`Fault::PausedReplica`]): retries absorb it (no failed read, none beyond
/// its deadline), once it is detected no checkout reaches it, and after a
/// restart or resume it serves reads again without touching the router.
pub async fn replica_fault<F: Fixture>(fault: Fault) {
    assert!(!fault.hits_primary(), "{fault:?} is not a replica fault");
    let tl = timeline::<F>(match fault {
        Fault::KilledReplica => "kill a replica",
        _ => "pause a replica",
    });
    let bed = start::<F>(&tl).await;
    let (cluster, backends) = cluster::<F>(&bed, Duration::from_millis(2500));
    let (primary, victim) = (&bed.nodes()[0], &bed.nodes()[1]);
    let id = name::<F>(1);
    let id = id.as_str();
    wait_ready(&cluster, &name::<F>(0)).await;
    let (reads, writes) = F::SETTLE;
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, WRITERS, F::reader(&cluster), F::writer(&cluster));
    let warm = tl.mark(format!(
        "{} load started: {READERS} readers, {WRITERS} writers",
        F::ENGINE
    ));
    load.settle(warm, reads, writes).await;

    let broken = tl.mark(format!("{} {id}", fault.injection()));
    fault.inject(primary, victim).await.unwrap();
    seen::<F>(&tl, &cluster, "out of rotation", not_serving(id), |at| {
        format!("{id} out of rotation ({} ms)", ms(broken, at))
    })
    .await;
    let down = seen::<F>(&tl, &cluster, "marked down", is_down(id), |at| {
        format!("{id} marked down by probes ({} ms)", ms(broken, at))
    })
    .await;
    load.settle(down, reads, writes).await;

    let recover = tl.mark(format!("{} {id}", fault.recovery()));
    fault.recover(victim).await.unwrap();
    let recovered = tl.mark(format!("{id} accepts connections again"));
    seen::<F>(&tl, &cluster, "re-admitted", readmitted(id), |at| {
        format!("{id} up and serving reads ({} ms after)", ms(recovered, at))
    })
    .await;
    let first = first_on(&tl, &load, Intent::Read, id, recovered, |at| {
        format!("first read on {id} again ({} ms after)", ms(recovered, at))
    })
    .await;
    load.settle(first, reads, writes).await;

    let phases = [
        ("warm-up", warm),
        ("fault -> down", broken),
        ("down", down),
        ("recovery -> end", recover),
    ];
    let (ops, samples, end) = finish(&tl, load, monitor, &phases).await;
    all_ok(&ops, Intent::Read, "reads failed");
    let slowest = ops
        .iter()
        .filter(|o| o.intent == Intent::Read)
        .map(Op::latency)
        .max()
        .unwrap();
    tl.note(format!(
        "slowest read {} ms (deadline {} ms; attempt timeout 500 ms)",
        slowest.as_millis(),
        OP_DEADLINE.as_millis()
    ));
    assert!(slowest <= OP_DEADLINE + SLACK, "a read took {slowest:?}");
    all_ok(
        &ops,
        Intent::Write,
        "writes failed with the primary untouched",
    );
    // Routing: from detection until the recovery, nothing went to the victim.
    let drained = assert_out_of_rotation(&samples, id, down, recover);
    tl.note(format!(
        "{id} in-flight drained {} ms after it was marked down",
        ms(down, drained)
    ));
    assert_eq!(
        backends[1].attempts_between(down + GRACE, recover),
        0,
        "checkouts routed to {id} while down"
    );
    let served_on = |from: Instant, to: Instant| {
        ops.iter()
            .filter(|o| o.ok() && o.on(id) && o.start >= from && o.start < to)
            .count()
    };
    assert_eq!(served_on(down + GRACE, recover), 0);
    assert!(
        served_on(recovered, end) > 0,
        "{id} served nothing after its recovery"
    );
}

/// Kill the primary and promote a replica under write load
/// ([`Fault::KilledPrimary`]). Writes resume on the promoted replica with no
/// reconfiguration; writes in the gap fail with a clear error; and no
/// acknowledged write is lost.
///
/// Which guarantee this tests: the engines replicate asynchronously, so a
/// write acknowledged by the old primary just before SIGKILL may never reach
/// a replica; that loss would be the engine's, not the router's. So the
/// writes are [`Fixture::durable_writer`]'s, acknowledged once both replicas
/// have them. With that, "every write the router acknowledged is on the new
/// primary" is the router's guarantee: it never acknowledged a write from a
/// node other than the real primary (a replica refuses writes; a stale
/// primary must not get them), and followed the promotion by probes alone.
///
/// Last, the old primary is restarted and comes back as an independent
/// primary (split brain) that would acknowledge a write routed to it. The
/// router sees two primaries and keeps writes on the one that has been
/// primary longest (the promoted replica); the old one serves nothing.
pub async fn promotion<F: Fixture>() {
    let tl = timeline::<F>("kill the primary, promote a replica");
    let bed = start::<F>(&tl).await;
    let (cluster, backends) = cluster::<F>(&bed, Duration::from_secs(1));
    let (old, new) = (&bed.nodes()[0], &bed.nodes()[1]);
    let (old_id, new_id) = (name::<F>(0), name::<F>(1));
    let (old_id, new_id) = (old_id.as_str(), new_id.as_str());
    let writer = F::durable_writer(&bed, &cluster, &tl).await;
    wait_ready(&cluster, old_id).await;
    let reads = F::SETTLE.0;
    let monitor = Monitor::start(&cluster);
    let load = Load::start(READERS, PROMOTION_WRITERS, F::reader(&cluster), writer);
    let warm = tl.mark(format!(
        "{} load started: {READERS} readers, {PROMOTION_WRITERS} writers",
        F::ENGINE
    ));
    load.settle(warm, reads, 100).await;

    let kill = tl.mark(format!("kill {old_id}, the primary (SIGKILL)"));
    Fault::KilledPrimary.inject(old, new).await.unwrap();
    let killed = Instant::now();
    let writerless = |st: &ClusterStatus| st.writer.is_none();
    seen::<F>(&tl, &cluster, "no writer", writerless, |at| {
        format!("router: no primary ({} ms after kill)", ms(kill, at))
    })
    .await;

    let promote = tl.mark(format!("promote {new_id}"));
    Fault::KilledPrimary.recover(new).await.unwrap();
    let promoted = tl.mark(format!(
        "{new_id} is a primary ({} ms)",
        ms(promote, Instant::now())
    ));
    let moved = |st: &ClusterStatus| st.writer.as_ref().map(EndpointId::as_str) == Some(new_id);
    let follows = seen::<F>(&tl, &cluster, "writes follow the promoted", moved, |at| {
        format!(
            "router: writes go to {new_id} ({} ms after promote returned)",
            ms(promoted, at)
        )
    })
    .await;
    let first = first_on(&tl, &load, Intent::Write, new_id, kill, |at| {
        format!(
            "first write acknowledged by {new_id}: follow time {} ms after promote() returned, {} ms after it was called",
            ms(promoted, at),
            ms(promote, at)
        )
    })
    .await;
    load.settle(first, reads, 100).await;

    let restart = tl.mark(format!(
        "restart {old_id}: back as an independent primary (split brain)"
    ));
    old.restart().await.unwrap();
    F::reopened(old).await;
    let old_up = wait_status(&cluster, "old primary probed up as a primary", |st| {
        let e = endpoint(st, old_id);
        e.health != Health::Down && e.role == Role::Primary
    })
    .await;
    let health = endpoint(&cluster.status(), old_id).health;
    tl.at(
        old_up,
        format!("router: {old_id} probed up, role primary, {health}, serves nothing"),
    );
    load.settle(old_up, reads, 100).await;

    let phases = [
        ("warm-up", warm),
        ("kill -> promoted", kill),
        ("promoted -> 1st write", promoted),
        ("on new primary", first),
        ("old primary back", restart),
    ];
    let (ops, samples, end) = finish(&tl, load, monitor, &phases).await;

    // The gap: writes that ended after the kill and started before writes
    // were flowing on the promoted replica again.
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
        "no-primary".to_owned(),
        format!("timeout@{old_id}"),
        format!("connect@{old_id}"),
        format!("i/o@{old_id}"),
        format!("read-only@{new_id}"),
    ];
    for o in gap.iter().filter(|o| !o.ok()) {
        let k = o.error.as_deref().unwrap();
        assert!(
            clear.iter().any(|c| c == k) || F::clear_in_gap(o),
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
        "writes failed once {new_id} took them: {:?}",
        first_failures(after.iter().copied())
    );
    all_ok(&ops, Intent::Read, "reads failed");

    // Who acknowledged what.
    let mut acked_by: BTreeMap<&str, usize> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.intent == Intent::Write && o.ok()) {
        *acked_by.entry(o.endpoint.as_deref().unwrap()).or_default() += 1;
    }
    tl.note(format!("acknowledged writes by endpoint: {acked_by:?}"));
    let stray: Vec<&Op> = ops
        .iter()
        .filter(|o| {
            let before_kill = if F::ACK_AFTER_KILL {
                o.start < killed
            } else {
                o.end < killed
            };
            o.intent == Intent::Write && o.ok() && !o.on(new_id) && !(o.on(old_id) && before_kill)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "writes acknowledged by a node that was not the primary: {stray:?}"
    );
    for s in samples.iter().filter(|s| s.at >= follows) {
        assert_eq!(
            s.writer.as_deref(),
            Some(new_id),
            "writes left the promoted replica at {:?}",
            s.at
        );
        let e = s.endpoint(old_id).unwrap();
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

    // No acknowledged write lost: every id is on the new primary.
    let present = F::stored(new).await;
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
        "{} acknowledged writes, {} on {new_id}, {} lost; {} failed writes were applied anyway (ack lost with the primary)",
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

/// The four scenarios as tests of fixture `$fixture`.
macro_rules! failover_tests {
    ($fixture:ty) => {
        /// Kill a replica: routed around, re-admitted after a restart.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn killed_replica_is_routed_around_and_readmitted() {
            failover::replica_fault::<$fixture>(switchyard_testkit::Fault::KilledReplica).await;
        }

        /// Pause a replica: no read beyond its deadline, re-admitted on resume.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn paused_replica_costs_no_read_beyond_its_deadline() {
            failover::replica_fault::<$fixture>(switchyard_testkit::Fault::PausedReplica).await;
        }

        /// Kill the primary, promote a replica: no acknowledged write lost.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn promoted_replica_takes_writes_and_no_acknowledged_write_is_lost() {
            failover::promotion::<$fixture>().await;
        }

        /// Endpoints and strategy change under load: no checkout fails.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn live_reconfiguration_under_load_fails_no_checkout() {
            failover::live_reconfiguration::<$fixture>().await;
        }
    };
}
