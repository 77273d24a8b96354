//! `switchyard demo`: engines (the local test bed, or the user's own when
//! their URLs are set), a multi-tenant workload through the router, and faults
//! injected in phases.

mod engines;
mod setup;
mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use switchyard_core::Backend;
use switchyard_postgres::PgBackend;
use switchyard_redis::RedisBackend;
use switchyard_router::{Cluster, ClusterStatus, Health};
use switchyard_testkit::Fault;

use engines::Engine;
use workload::{Counters, Stats};

type DynError = Box<dyn std::error::Error + Send + Sync>;

/// One step of the demo: a fault of the testkit's scenarios (on PostgreSQL,
/// and on Redis too where `redis` says so), held for `hold`. A replica fault
/// is undone at the end of its phase; a killed primary stays down, its
/// standby promoted.
struct Phase {
    name: &'static str,
    fault: Option<Fault>,
    redis: bool,
    hold: Duration,
}

const PHASES: [Phase; 4] = [
    Phase {
        name: "baseline",
        fault: None,
        redis: false,
        hold: Duration::from_secs(4),
    },
    Phase {
        name: "replica killed",
        fault: Some(Fault::KilledReplica),
        redis: true,
        hold: Duration::from_secs(5),
    },
    Phase {
        name: "replica paused",
        fault: Some(Fault::PausedReplica),
        redis: false,
        hold: Duration::from_secs(4),
    },
    Phase {
        name: "primary killed, standby promoted",
        fault: Some(Fault::KilledPrimary),
        redis: false,
        hold: Duration::from_secs(6),
    },
];

/// The replica every fault hits or promotes: the first one.
const REPLICA: usize = 1;

/// One fault and how fast the router handled it.
#[derive(Debug, Serialize)]
struct FaultReport {
    fault: String,
    phase: usize,
    at_ms: u64,
    detect_ms: Option<u64>,
    recover_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct PhaseSummary {
    name: &'static str,
    duration_ms: u64,
    checkouts: u64,
    reads_ok: u64,
    failed_reads: u64,
    writes_ok: u64,
    failed_writes: u64,
    verified_reads: u64,
    leaks: u64,
}

#[derive(Debug, Serialize)]
struct Summary {
    duration_ms: u64,
    checkouts: u64,
    verified_reads: u64,
    leaks: u64,
    failed_reads: u64,
    failed_writes: u64,
    phases: Vec<PhaseSummary>,
    faults: Vec<FaultReport>,
    /// Where each engine's nodes came from.
    engines: serde_json::Value,
    /// What the user should know after the run.
    notes: Vec<String>,
    tenants: serde_json::Value,
}

/// Runs the demo; returns the exit code (non-zero on a leak or a failure to run).
pub async fn run(json: bool) -> u8 {
    match demo(json).await {
        Ok(summary) => {
            if json {
                match serde_json::to_string(&summary) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("switchyard demo: {e}"),
                }
            } else {
                print_summary(&summary);
            }
            u8::from(summary.leaks > 0)
        }
        Err(e) => {
            eprintln!("switchyard demo: {e}");
            1
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn demo(json: bool) -> Result<Summary, DynError> {
    let started = Instant::now();
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    say(format!(
        "starting a local test bed, or reaching the engines in {} / {} where set",
        engines::PG_URLS_VAR,
        engines::REDIS_URLS_VAR
    ));
    let bed = setup::Bed::start().await?;
    let (pg_nodes, redis_nodes) = (&bed.pg, &bed.redis);
    say(format!(
        "PostgreSQL primary + {} standby(s) from the {} and Redis master + {} replica(s) from the {}, ready in {} ms; routers built from {}",
        pg_nodes.replicas(),
        pg_nodes.origin().describe(engines::PG_URLS_VAR),
        redis_nodes.replicas(),
        redis_nodes.origin().describe(engines::REDIS_URLS_VAR),
        ms(started.elapsed()),
        bed.config_dir().display()
    ));
    let pg = bed.pg_cluster()?;
    let cache = bed.redis_cluster()?;
    wait_ready(&pg, &cache).await?;

    let stats = Arc::new(Stats::new(PHASES.len()));
    let workers = start_load(&pg, &cache, &stats);
    let progress = (!json).then(|| tokio::spawn(progress(stats.clone(), Instant::now())));

    let run = Run {
        stats: &stats,
        started,
        pg: Target {
            engine: pg_nodes,
            status: &|| pg.status(),
        },
        redis: Target {
            engine: redis_nodes,
            status: &|| cache.status(),
        },
    };
    let mut faults = Vec::new();
    let mut durations = Vec::new();
    for (i, phase) in PHASES.iter().enumerate() {
        let phase_start = Instant::now();
        stats.current.store(i, Ordering::Relaxed);
        faults.extend(run.phase(i, phase).await?);
        durations.push(ms(phase_start.elapsed()));
    }

    stats.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    Ok(summary(&run, durations, faults))
}

/// The workload: six PostgreSQL and two Redis workers, until `stats` says stop.
fn start_load(
    pg: &Cluster<PgBackend>,
    cache: &Cluster<RedisBackend>,
    stats: &Arc<Stats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let pg_workers =
        (0..6).map(|i| tokio::spawn(workload::pg_worker(pg.clone(), stats.clone(), i * 7)));
    let redis_workers =
        (0..2).map(|i| tokio::spawn(workload::redis_worker(cache.clone(), stats.clone(), i * 5)));
    pg_workers.chain(redis_workers).collect()
}

/// What the run did, phase by phase and in all.
fn summary(run: &Run<'_>, durations: Vec<u64>, faults: Vec<FaultReport>) -> Summary {
    let (stats, pg_nodes, redis_nodes) = (run.stats, run.pg.engine, run.redis.engine);
    let phases = PHASES
        .iter()
        .zip(&stats.phases)
        .zip(durations)
        .map(|((phase, c), duration_ms)| phase_summary(phase.name, c, duration_ms))
        .collect();
    Summary {
        duration_ms: ms(run.started.elapsed()),
        checkouts: stats.total(|c| &c.checkouts),
        verified_reads: stats.total(|c| &c.verified),
        leaks: stats.total(|c| &c.leaks),
        failed_reads: stats.total(|c| &c.reads_failed),
        failed_writes: stats.total(|c| &c.writes_failed),
        phases,
        faults,
        engines: serde_json::json!({
            "postgres": pg_nodes.origin().describe(engines::PG_URLS_VAR),
            "redis": redis_nodes.origin().describe(engines::REDIS_URLS_VAR),
        }),
        notes: pg_nodes.aftermath(Some(REPLICA)).into_iter().collect(),
        tenants: serde_json::json!({
            "postgres": { "schema": &workload::PG_TENANTS[..2], "row": &workload::PG_TENANTS[2..] },
            "redis": { "key_prefix": workload::REDIS_TENANTS },
        }),
    }
}

fn phase_summary(name: &'static str, c: &Counters, duration_ms: u64) -> PhaseSummary {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    PhaseSummary {
        name,
        duration_ms,
        checkouts: get(&c.checkouts),
        reads_ok: get(&c.reads_ok),
        failed_reads: get(&c.reads_failed),
        writes_ok: get(&c.writes_ok),
        failed_writes: get(&c.writes_failed),
        verified_reads: get(&c.verified),
        leaks: get(&c.leaks),
    }
}

/// One engine the phases break, and its router's status.
struct Target<'a> {
    engine: &'a Engine,
    status: &'a (dyn Fn() -> ClusterStatus + Sync),
}

impl Target<'_> {
    /// Whether node `i` is out of rotation.
    fn down(&self, i: usize) -> bool {
        down(&(self.status)(), self.engine.name(i))
    }
}

/// What the phases share.
struct Run<'a> {
    stats: &'a Stats,
    started: Instant,
    pg: Target<'a>,
    redis: Target<'a>,
}

impl Run<'_> {
    /// Runs `phase`: injects its fault on each engine it names, measures how
    /// the router handles it, holds, and undoes a replica fault.
    async fn phase(&self, index: usize, phase: &Phase) -> Result<Vec<FaultReport>, DynError> {
        let t0 = Instant::now();
        let Some(fault) = phase.fault else {
            sleep_until(t0 + phase.hold).await;
            return Ok(Vec::new());
        };
        let targets: Vec<&Target<'_>> = if phase.redis {
            vec![&self.pg, &self.redis]
        } else {
            vec![&self.pg]
        };
        for target in &targets {
            target.engine.inject(fault, REPLICA).await?;
        }
        let mut reports = Vec::new();
        for target in &targets {
            reports.push(self.watch(index, fault, target, t0).await?);
        }
        sleep_until(t0 + phase.hold).await;
        if !fault.hits_primary() {
            for target in &targets {
                target.engine.recover(fault, REPLICA).await?;
                poll(Duration::from_secs(10), || !target.down(REPLICA)).await;
            }
        }
        Ok(reports)
    }

    /// Measures detection (the router takes the victim out) and recovery:
    /// reads succeed again after a replica fault; after the primary's, the
    /// standby is promoted meanwhile, writes go to it and one succeeded.
    async fn watch(
        &self,
        index: usize,
        fault: Fault,
        target: &Target<'_>,
        t0: Instant,
    ) -> Result<FaultReport, DynError> {
        let engine = target.engine;
        let victim = if fault.hits_primary() { 0 } else { REPLICA };
        let what = match fault {
            Fault::KilledReplica => format!("kill {}", engine.name(victim)),
            Fault::PausedReplica => format!("pause {}", engine.name(victim)),
            Fault::KilledPrimary => {
                format!("kill {}, promote {}", engine.name(0), engine.name(REPLICA))
            }
        };
        let detect = async {
            poll(Duration::from_secs(10), || target.down(victim))
                .await
                .then(|| ms(t0.elapsed()))
        };
        let phase = &self.stats.phases[index];
        let (detect_ms, recovered) = if fault.hits_primary() {
            let (promoted, detected) = tokio::join!(engine.recover(fault, REPLICA), detect);
            promoted?;
            let moved = || {
                (target.status)()
                    .writer
                    .is_some_and(|w| w.as_str() == engine.name(REPLICA))
            };
            let mut recovered = poll(Duration::from_secs(20), moved).await;
            if recovered {
                let before = phase.writes_ok.load(Ordering::Relaxed);
                recovered = poll(Duration::from_secs(10), || {
                    phase.writes_ok.load(Ordering::Relaxed) > before
                })
                .await;
            }
            (detected, recovered)
        } else {
            let detected = detect.await;
            let before = phase.reads_ok.load(Ordering::Relaxed);
            let recovered = detected.is_some()
                && poll(Duration::from_secs(10), || {
                    phase.reads_ok.load(Ordering::Relaxed) > before
                })
                .await;
            (detected, recovered)
        };
        Ok(FaultReport {
            fault: what,
            phase: index,
            at_ms: ms(t0.duration_since(self.started)),
            detect_ms,
            recover_ms: recovered.then(|| ms(t0.elapsed())),
        })
    }
}

/// Whether `endpoint` is out of rotation.
fn down(status: &ClusterStatus, endpoint: &str) -> bool {
    status
        .endpoint(endpoint)
        .is_none_or(|e| e.health != Health::Up || (!e.serves_reads && !e.serves_writes))
}

/// Polls `check` every 10 ms until it holds or `timeout` passes.
async fn poll(timeout: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
}

async fn wait_ready<P: Backend, R: Backend>(
    pg: &Cluster<P>,
    cache: &Cluster<R>,
) -> Result<(), DynError> {
    let ready = |s: &ClusterStatus| {
        s.writer.is_some()
            && s.endpoints
                .iter()
                .all(|e| e.health == Health::Up && e.probe_rtt.is_some())
    };
    if poll(Duration::from_secs(15), || {
        ready(&pg.status()) && ready(&cache.status())
    })
    .await
    {
        Ok(())
    } else {
        Err("the routers did not see every endpoint up within 15s".into())
    }
}

async fn progress(stats: Arc<Stats>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let phase = stats.current.load(Ordering::Relaxed).min(PHASES.len() - 1);
        let c = &stats.phases[phase];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        println!(
            "[{:>3}s] {:<34} checkouts {:>6}  reads {:>6} ok {:>4} failed  writes {:>5} ok {:>4} failed  leaks {}",
            started.elapsed().as_secs(),
            PHASES[phase].name,
            get(&c.checkouts),
            get(&c.reads_ok),
            get(&c.reads_failed),
            get(&c.writes_ok),
            get(&c.writes_failed),
            stats.total(|c| &c.leaks),
        );
    }
}

fn print_summary(s: &Summary) {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    println!("\ntimeline");
    for f in &s.faults {
        println!(
            "  +{:>6} ms  {:<40} detected {:>8}  recovered {:>8}",
            f.at_ms,
            f.fault,
            opt(f.detect_ms),
            opt(f.recover_ms)
        );
    }
    println!("\nphases");
    let rows: Vec<Vec<String>> = s
        .phases
        .iter()
        .map(|p| {
            vec![
                p.name.to_owned(),
                format!("{} ms", p.duration_ms),
                p.checkouts.to_string(),
                format!("{}/{}", p.reads_ok, p.failed_reads),
                format!("{}/{}", p.writes_ok, p.failed_writes),
                p.leaks.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::table::render(
            &[
                "PHASE",
                "DURATION",
                "CHECKOUTS",
                "READS OK/FAILED",
                "WRITES OK/FAILED",
                "LEAKS"
            ],
            &rows
        )
    );
    println!(
        "\ntenant isolation audit: {} checkouts, {} reads verified against their tenant, {} leaks found",
        s.checkouts, s.verified_reads, s.leaks
    );
    println!(
        "failed reads {}, failed writes {}, total {} ms",
        s.failed_reads, s.failed_writes, s.duration_ms
    );
    for note in &s.notes {
        println!("\nnote: {note}");
    }
}
