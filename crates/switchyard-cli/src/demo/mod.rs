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
use switchyard_router::{Cluster, ClusterStatus, Health};

use workload::{Counters, Stats};

type DynError = Box<dyn std::error::Error + Send + Sync>;

const PHASES: [&str; 4] = [
    "baseline",
    "replica killed",
    "replica paused",
    "primary killed, standby promoted",
];

/// One fault and how fast the router handled it.
#[derive(Debug, Serialize)]
struct Fault {
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
    faults: Vec<Fault>,
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
    let mut workers = Vec::new();
    for i in 0..6 {
        workers.push(tokio::spawn(workload::pg_worker(
            pg.clone(),
            stats.clone(),
            i * 7,
        )));
    }
    for i in 0..2 {
        workers.push(tokio::spawn(workload::redis_worker(
            cache.clone(),
            stats.clone(),
            i * 5,
        )));
    }
    let progress = (!json).then(|| tokio::spawn(progress(stats.clone(), Instant::now())));

    let mut faults = Vec::new();
    let mut phase_start = Instant::now();
    let mut durations = Vec::new();
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The last standby is killed, the first one paused and later promoted;
    // with a single standby, the killed one is brought back in between.
    let (killed, paused) = (pg_nodes.replicas(), 1);
    let redis_killed = redis_nodes.replicas();

    // Phase 1: a PostgreSQL standby and a Redis replica die.
    next_phase(&stats, 1, &mut phase_start, &mut durations);
    let t0 = Instant::now();
    pg_nodes.kill(killed).await?;
    redis_nodes.kill(redis_killed).await?;
    faults.push(
        watch_fault(
            &stats,
            1,
            &format!("kill {}", pg_nodes.name(killed)),
            t0,
            started,
            || down(&pg.status(), pg_nodes.name(killed)),
            true,
        )
        .await,
    );
    faults.push(
        watch_fault(
            &stats,
            1,
            &format!("kill {}", redis_nodes.name(redis_killed)),
            t0,
            started,
            || down(&cache.status(), redis_nodes.name(redis_killed)),
            true,
        )
        .await,
    );
    sleep_until(t0 + Duration::from_secs(5)).await;
    if killed == paused {
        pg_nodes.restore(killed).await?;
        poll(Duration::from_secs(10), || {
            !down(&pg.status(), pg_nodes.name(killed))
        })
        .await;
    }

    // Phase 2: a standby hangs (SIGSTOP), then comes back.
    next_phase(&stats, 2, &mut phase_start, &mut durations);
    let t0 = Instant::now();
    pg_nodes.pause(paused).await?;
    faults.push(
        watch_fault(
            &stats,
            2,
            &format!("pause {}", pg_nodes.name(paused)),
            t0,
            started,
            || down(&pg.status(), pg_nodes.name(paused)),
            true,
        )
        .await,
    );
    sleep_until(t0 + Duration::from_secs(4)).await;
    pg_nodes.resume(paused).await?;
    poll(Duration::from_secs(10), || {
        !down(&pg.status(), pg_nodes.name(paused))
    })
    .await;

    // Phase 3: the primary dies and the standby is promoted.
    next_phase(&stats, 3, &mut phase_start, &mut durations);
    let t0 = Instant::now();
    pg_nodes.kill(0).await?;
    let what = format!(
        "kill {}, promote {}",
        pg_nodes.name(0),
        pg_nodes.name(paused)
    );
    let (promoted, mut fault) = tokio::join!(
        pg_nodes.promote(paused),
        watch_fault(
            &stats,
            3,
            &what,
            t0,
            started,
            || down(&pg.status(), pg_nodes.name(0)),
            false
        )
    );
    promoted?;
    // Recovered: writes go to the promoted standby and one has succeeded there.
    let moved = || {
        pg.status()
            .writer
            .as_ref()
            .is_some_and(|w| w.as_str() == pg_nodes.name(paused))
    };
    let mut recovered = poll(Duration::from_secs(20), moved).await;
    if recovered {
        let writes_before = stats.phases[3].writes_ok.load(Ordering::Relaxed);
        recovered = poll(Duration::from_secs(10), || {
            stats.phases[3].writes_ok.load(Ordering::Relaxed) > writes_before
        })
        .await;
    }
    fault.recover_ms = recovered.then(|| ms(t0.elapsed()));
    faults.push(fault);
    sleep_until(t0 + Duration::from_secs(6)).await;

    stats.stop.store(true, Ordering::Relaxed);
    durations.push(ms(phase_start.elapsed()));
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let phases = PHASES
        .iter()
        .zip(&stats.phases)
        .zip(durations)
        .map(|((name, c), duration_ms)| phase_summary(name, c, duration_ms))
        .collect();
    Ok(Summary {
        duration_ms: ms(started.elapsed()),
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
        notes: pg_nodes.aftermath(Some(paused)).into_iter().collect(),
        tenants: serde_json::json!({
            "postgres": { "schema": &workload::PG_TENANTS[..2], "row": &workload::PG_TENANTS[2..] },
            "redis": { "key_prefix": workload::REDIS_TENANTS },
        }),
    })
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

fn next_phase(stats: &Stats, phase: usize, phase_start: &mut Instant, durations: &mut Vec<u64>) {
    durations.push(ms(phase_start.elapsed()));
    *phase_start = Instant::now();
    stats.current.store(phase, Ordering::Relaxed);
}

/// Whether `endpoint` is out of rotation.
fn down(status: &ClusterStatus, endpoint: &str) -> bool {
    status
        .endpoint(endpoint)
        .is_none_or(|e| e.health != Health::Up || (!e.serves_reads && !e.serves_writes))
}

/// A check that turns true once reads succeed again in `phase` after it is created.
fn read_progress(stats: &Stats, phase: usize) -> impl Fn() -> bool + '_ {
    let before = stats.phases[phase].reads_ok.load(Ordering::Relaxed);
    move || stats.phases[phase].reads_ok.load(Ordering::Relaxed) > before
}

/// Measures detection (the router takes the endpoint out) and recovery (work
/// of the affected kind succeeds again after detection).
async fn watch_fault(
    stats: &Stats,
    phase: usize,
    what: &str,
    t0: Instant,
    started: Instant,
    detected: impl Fn() -> bool,
    measure_recovery: bool,
) -> Fault {
    let detect = poll(Duration::from_secs(10), &detected)
        .await
        .then(|| ms(t0.elapsed()));
    let recovered = read_progress(stats, phase);
    let recover = match detect {
        Some(_) if measure_recovery => poll(Duration::from_secs(10), recovered)
            .await
            .then(|| ms(t0.elapsed())),
        _ => None,
    };
    Fault {
        fault: what.to_owned(),
        phase,
        at_ms: ms(t0.duration_since(started)),
        detect_ms: detect,
        recover_ms: recover,
    }
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
            PHASES[phase],
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
