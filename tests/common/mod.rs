//! Shared harness for the cross-crate fault tests: a backend wrapper that
//! timestamps every attempt the router routes to an endpoint, a load of
//! reader and writer tasks that log every operation, a status monitor, phase
//! reports and a timeline printed when the test ends (pass or fail).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use switchyard_core::{
    Backend, EndpointId, Error, Intent, PoolStats, Probe, Recycle, Returned, TenantScope,
    TierPolicy,
};
use switchyard_router::{Cluster, ClusterConfig, ClusterStatus, EndpointStatus, Health};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Time between a task's operations, so a dozen tasks load two shared cores
/// without starving the servers' own processes.
pub const PACE: Duration = Duration::from_millis(5);
/// Deadline of every read and write (the router's `checkout_timeout` too).
pub const OP_DEADLINE: Duration = Duration::from_secs(3);
/// Longest one query may run before it counts as an endpoint failure: the
/// backends have no statement timeout, and a SIGSTOPped server never answers.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(750);
/// Scheduling slack allowed on top of a deadline when checking latencies.
pub const SLACK: Duration = Duration::from_millis(250);
/// A pick made on the routing snapshot just before a change may still reach
/// its backend a few microseconds after the change is visible; attempts are
/// checked from this long after it.
pub const GRACE: Duration = Duration::from_millis(20);
/// Upper bound on any wait for the router or a server to change state.
pub const WAIT: Duration = Duration::from_secs(20);
/// Load tasks stop by themselves after this, whatever happens to the test.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds from `a` to `b`, signed.
pub fn ms(a: Instant, b: Instant) -> i64 {
    if b >= a {
        i64::try_from((b - a).as_millis()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from((a - b).as_millis()).unwrap_or(i64::MAX)
    }
}

/// The router configuration every fault test uses: fast probes, fast
/// ejection, short attempts.
pub fn fast_config(failover_timeout: Duration) -> ClusterConfig {
    let mut c = ClusterConfig {
        checkout_timeout: OP_DEADLINE,
        failover_timeout,
        ..ClusterConfig::default()
    };
    c.health.interval = Duration::from_millis(250);
    c.health.timeout = Duration::from_millis(250);
    c.health.fall = 2;
    c.health.rise = 2;
    c.health.eject_base = Duration::from_millis(500);
    c.health.eject_max = Duration::from_secs(2);
    c.retry.max_attempts = 3;
    c.retry.attempt_timeout = Duration::from_millis(500);
    c
}

// ---------------------------------------------------------------------------
// A backend that counts what the router sends it.

/// A transparent [`Backend`] wrapper that timestamps every `acquire` the
/// router makes on its endpoint (each attempt, failed or not), so a test can
/// tell exactly whether a down endpoint still receives checkouts.
pub struct Counted<B> {
    inner: Arc<B>,
    attempts: Mutex<Vec<Instant>>,
}

impl<B: Backend> Counted<B> {
    pub fn new(inner: B) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(inner),
            attempts: Mutex::new(Vec::new()),
        })
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Attempts routed here at or after `from` and before `to`.
    pub fn attempts_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.attempts)
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    }

    pub fn attempts(&self) -> usize {
        lock(&self.attempts).len()
    }
}

impl<B: Backend> Backend for Counted<B> {
    type Connection = B::Connection;

    fn endpoint(&self) -> &EndpointId {
        self.inner.endpoint()
    }

    fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> impl Future<Output = Result<B::Connection, Error>> + Send {
        // Recorded when the router asks, before the future is first polled.
        lock(&self.attempts).push(Instant::now());
        self.inner.acquire(scope, deadline)
    }

    fn scope(
        &self,
        conn: &mut B::Connection,
        scope: &TenantScope,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.inner.scope(conn, scope)
    }

    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<Probe, Error>> + Send {
        self.inner.probe(timeout)
    }

    fn stats(&self) -> PoolStats {
        self.inner.stats()
    }

    // The engine's own return path (resets, affinity), unchanged.
    fn inspect(&self, conn: &mut B::Connection) -> Returned {
        self.inner.inspect(conn)
    }

    fn recycle(&self, conn: &mut B::Connection) -> impl Future<Output = Recycle> + Send {
        self.inner.recycle(conn)
    }

    fn release(&self, conn: B::Connection, recycle: Recycle) {
        self.inner.release(conn, recycle);
    }

    fn validate_tier(&self, name: &str, tier: &TierPolicy) -> Result<(), Error> {
        self.inner.validate_tier(name, tier)
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// A short name for what kind of failure `e` is, with the endpoint when known:
/// `no-primary`, `timeout@pg-0`, `i/o@pg-0`, `connect@redis-1`, ...
pub fn kind(e: &Error) -> String {
    let name = match e {
        Error::Timeout { .. } => "timeout".to_owned(),
        Error::NoPrimary { .. } => "no-primary".to_owned(),
        Error::NoHealthyEndpoint { .. } => "no-healthy-endpoint".to_owned(),
        Error::Backend { kind, .. } => kind.to_string(),
        Error::Scope { .. } => "scope".to_owned(),
        Error::Closed => "closed".to_owned(),
        Error::OperationTimeout { deadline, .. } => format!("operation-timeout({deadline})"),
        Error::SplitBrain { .. } => "split-brain".to_owned(),
        other => format!("other({other})"),
    };
    match e.endpoint() {
        Some(ep) => format!("{name}@{ep}"),
        None => name,
    }
}

/// `e` and its sources, `: `-separated.
pub fn message(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// An endpoint failure on `endpoint` for a query that ran past `elapsed`.
pub fn query_timeout(endpoint: &EndpointId, elapsed: Duration) -> Error {
    Error::Timeout {
        endpoint: endpoint.clone(),
        tenant: None,
        elapsed,
    }
}

/// When a query started now must give up: `QUERY_TIMEOUT`, within `deadline`.
pub fn query_limit(deadline: Instant) -> Instant {
    deadline.min(Instant::now() + QUERY_TIMEOUT)
}

// ---------------------------------------------------------------------------
// Load.

/// One finished operation.
#[derive(Debug, Clone)]
pub struct Op {
    pub intent: Intent,
    /// The write's id (writes only).
    pub id: Option<i64>,
    pub start: Instant,
    pub end: Instant,
    /// Where it was served (success) or where it failed, when known.
    pub endpoint: Option<String>,
    /// `kind()` of the error, for failures.
    pub error: Option<String>,
    /// The error's message, for failures.
    pub message: Option<String>,
}

impl Op {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
    pub fn latency(&self) -> Duration {
        self.end - self.start
    }
    pub fn on(&self, endpoint: &str) -> bool {
        self.endpoint.as_deref() == Some(endpoint)
    }
}

/// Every operation of a load, in completion order.
#[derive(Default)]
pub struct OpLog {
    ops: Mutex<Vec<Op>>,
}

impl OpLog {
    pub fn snapshot(&self) -> Vec<Op> {
        lock(&self.ops).clone()
    }

    /// Successful operations of `intent` started at or after `since`.
    pub fn ok_since(&self, intent: Intent, since: Instant) -> usize {
        lock(&self.ops)
            .iter()
            .filter(|o| o.intent == intent && o.start >= since && o.ok())
            .count()
    }

    /// When the first operation of `intent` that succeeded on `endpoint` and
    /// started at or after `since` ended.
    pub fn first_ok_on(&self, intent: Intent, endpoint: &str, since: Instant) -> Option<Instant> {
        lock(&self.ops)
            .iter()
            .filter(|o| o.intent == intent && o.start >= since && o.ok() && o.on(endpoint))
            .map(|o| o.end)
            .min()
    }
}

/// A read: resolves to the endpoint that served it.
pub type ReadFn = Arc<dyn Fn(Instant) -> BoxFuture<'static, Result<String, Error>> + Send + Sync>;
/// A write of `id`: resolves to the endpoint that acknowledged it.
pub type WriteFn =
    Arc<dyn Fn(i64, Instant) -> BoxFuture<'static, Result<String, Error>> + Send + Sync>;

/// Reader and writer tasks running until stopped (or `LOAD_LIMIT`).
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pub log: Arc<OpLog>,
}

impl Load {
    /// Starts `readers` tasks calling `read` and `writers` tasks calling
    /// `write` with ids unique to the run, each with a deadline of
    /// [`OP_DEADLINE`].
    pub fn start(readers: usize, writers: usize, read: ReadFn, write: WriteFn) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(OpLog::default());
        let mut tasks = Vec::new();
        let limit = Instant::now() + LOAD_LIMIT;
        for _ in 0..readers {
            let (stop, log, read) = (stop.clone(), log.clone(), read.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) && Instant::now() < limit {
                    let start = Instant::now();
                    let result = read(start + OP_DEADLINE).await;
                    log_op(&log, Intent::Read, None, start, result);
                    tokio::time::sleep(PACE).await;
                }
            }));
        }
        for w in 0..writers {
            let (stop, log, write) = (stop.clone(), log.clone(), write.clone());
            let base = i64::try_from(w + 1).unwrap() * 10_000_000;
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Acquire) && Instant::now() < limit {
                    seq += 1;
                    let id = base + seq;
                    let start = Instant::now();
                    let result = write(id, start + OP_DEADLINE).await;
                    log_op(&log, Intent::Write, Some(id), start, result);
                    tokio::time::sleep(PACE).await;
                }
            }));
        }
        Self { stop, tasks, log }
    }

    /// Stops every task, waits for them, and returns the log.
    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Release);
        for task in self.tasks {
            task.await.expect("a load task panicked");
        }
        self.log.snapshot()
    }

    /// Waits until `reads` reads and `writes` writes started at or after
    /// `since` have succeeded: a phase long enough to mean something, however
    /// slow the machine.
    pub async fn settle(&self, since: Instant, reads: usize, writes: usize) {
        let log = &self.log;
        switchyard_testkit::wait_until(WAIT, || async {
            log.ok_since(Intent::Read, since) >= reads
                && log.ok_since(Intent::Write, since) >= writes
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {} reads and {} writes succeeded since the mark (wanted {reads} and {writes})",
                log.ok_since(Intent::Read, since),
                log.ok_since(Intent::Write, since)
            )
        });
    }
}

fn log_op(log: &OpLog, intent: Intent, id: Option<i64>, start: Instant, r: Result<String, Error>) {
    let end = Instant::now();
    let op = match r {
        Ok(endpoint) => Op {
            intent,
            id,
            start,
            end,
            endpoint: Some(endpoint),
            error: None,
            message: None,
        },
        Err(e) => Op {
            intent,
            id,
            start,
            end,
            endpoint: e.endpoint().map(ToString::to_string),
            error: Some(kind(&e)),
            message: Some(message(&e)),
        },
    };
    lock(&log.ops).push(op);
}

// ---------------------------------------------------------------------------
// Status.

/// One endpoint in one status sample.
#[derive(Debug, Clone)]
pub struct EpSample {
    pub id: String,
    pub health: Health,
    pub serves_reads: bool,
    pub serves_writes: bool,
    pub in_flight: u32,
}

/// One `status()` sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub writer: Option<String>,
    pub endpoints: Vec<EpSample>,
}

impl Sample {
    pub fn endpoint(&self, id: &str) -> Option<&EpSample> {
        self.endpoints.iter().find(|e| e.id == id)
    }
}

/// Samples `status()` every 5 ms until stopped.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sample>>,
}

impl Monitor {
    pub fn start<B: Backend>(cluster: &Cluster<B>) -> Self {
        let cluster = cluster.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let limit = Instant::now() + LOAD_LIMIT;
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Acquire) && Instant::now() < limit {
                let st = cluster.status();
                samples.push(Sample {
                    at: Instant::now(),
                    writer: st.writer.map(|w| w.to_string()),
                    endpoints: st
                        .endpoints
                        .iter()
                        .map(|e| EpSample {
                            id: e.id.to_string(),
                            health: e.health,
                            serves_reads: e.serves_reads,
                            serves_writes: e.serves_writes,
                            in_flight: e.in_flight,
                        })
                        .collect(),
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("the monitor panicked")
    }
}

/// The status of endpoint `id`; panics when it is not in the cluster.
pub fn endpoint<'a>(st: &'a ClusterStatus, id: &str) -> &'a EndpointStatus {
    st.endpoint(id)
        .unwrap_or_else(|| panic!("no endpoint {id} in {st:#?}"))
}

/// Polls `status()` until `check` holds; returns when it was first seen.
/// Panics with the last status after [`WAIT`].
pub async fn wait_status<B: Backend>(
    cluster: &Cluster<B>,
    what: &str,
    check: impl Fn(&ClusterStatus) -> bool,
) -> Instant {
    let seen = switchyard_testkit::poll_until(what, WAIT, || {
        let st = cluster.status();
        let hit = check(&st).then(Instant::now);
        async move { hit }
    })
    .await;
    seen.unwrap_or_else(|e| panic!("{e}; last status: {:#?}", cluster.status()))
}

/// Every endpoint probed at least once, the writer is `writer` and every
/// other endpoint serves reads.
pub async fn wait_ready<B: Backend>(cluster: &Cluster<B>, writer: &str) -> Instant {
    wait_status(cluster, "every endpoint probed and serving", |st| {
        st.writer.as_ref().map(EndpointId::as_str) == Some(writer)
            && st.endpoints.iter().all(|e| {
                e.version.is_some()
                    && e.health == Health::Up
                    && (e.id.as_str() == writer || e.serves_reads)
            })
    })
    .await
}

// ---------------------------------------------------------------------------
// Reports.

/// A timeline printed in one piece when the test ends, passed or failed, so
/// parallel tests do not interleave their lines.
pub struct Timeline {
    name: &'static str,
    t0: Instant,
    lines: Mutex<Vec<String>>,
}

impl Timeline {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            t0: Instant::now(),
            lines: Mutex::new(Vec::new()),
        }
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// Records `what` now; returns now.
    pub fn mark(&self, what: impl AsRef<str>) -> Instant {
        let now = Instant::now();
        self.at(now, what);
        now
    }

    /// Records `what` at `at`.
    pub fn at(&self, at: Instant, what: impl AsRef<str>) {
        let line = format!("{:>+8} ms  {}", ms(self.t0, at), what.as_ref());
        lock(&self.lines).push(line);
    }

    /// Records a line without a time.
    pub fn note(&self, what: impl AsRef<str>) {
        lock(&self.lines).push(format!("{:>11}  {}", "", what.as_ref()));
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        let lines = lock(&self.lines);
        let status = if std::thread::panicking() {
            "FAILED"
        } else {
            "ok"
        };
        let mut out = format!("\n=== {} timeline ({status}) ===\n", self.name);
        for line in lines.iter() {
            out.push_str(line);
            out.push('\n');
        }
        eprint!("{out}");
    }
}

/// Per-phase counts: phases are consecutive `[start, next start)` windows,
/// and an operation belongs to the phase in which it started.
pub fn phase_report(tl: &Timeline, ops: &[Op], phases: &[(&str, Instant)], end: Instant) {
    tl.note(format!(
        "{:<26} {:>7} {:>6} {:>7} {:>6} {:>9} {:>9}  reads per endpoint",
        "phase", "reads", "failed", "writes", "failed", "rd max ms", "wr max ms"
    ));
    for (i, (name, from)) in phases.iter().enumerate() {
        let to = phases.get(i + 1).map_or(end, |(_, t)| *t);
        let in_phase: Vec<&Op> = ops
            .iter()
            .filter(|o| o.start >= *from && o.start < to)
            .collect();
        let count = |intent: Intent, ok: bool| {
            in_phase
                .iter()
                .filter(|o| o.intent == intent && o.ok() == ok)
                .count()
        };
        let max = |intent: Intent| {
            in_phase
                .iter()
                .filter(|o| o.intent == intent)
                .map(|o| o.latency().as_millis())
                .max()
                .unwrap_or(0)
        };
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for o in in_phase
            .iter()
            .filter(|o| o.intent == Intent::Read && o.ok())
        {
            *per.entry(o.endpoint.as_deref().unwrap_or("?")).or_default() += 1;
        }
        let mut spread = String::new();
        for (ep, n) in per {
            let _ = write!(spread, "{ep}={n} ");
        }
        tl.note(format!(
            "{name:<26} {:>7} {:>6} {:>7} {:>6} {:>9} {:>9}  {spread}",
            count(Intent::Read, true),
            count(Intent::Read, false),
            count(Intent::Write, true),
            count(Intent::Write, false),
            max(Intent::Read),
            max(Intent::Write),
        ));
    }
}

/// Failure counts by kind for `ops`.
pub fn error_counts<'a>(ops: impl IntoIterator<Item = &'a Op>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in ops {
        if let Some(k) = &o.error {
            *out.entry(k.clone()).or_default() += 1;
        }
    }
    out
}

/// The first failures in `ops`, for assertion messages.
pub fn first_failures<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Vec<String> {
    ops.into_iter()
        .filter(|o| !o.ok())
        .take(5)
        .map(|o| {
            format!(
                "{} {:?}: {}",
                o.intent,
                o.error,
                o.message.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// Checks, on the monitor's samples, that endpoint `id` stayed out of
/// rotation over `[from, to)` and that, once the checkouts it held at `from`
/// had ended, it held none (`in_flight` 0). Returns when it drained.
pub fn assert_out_of_rotation(samples: &[Sample], id: &str, from: Instant, to: Instant) -> Instant {
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .collect();
    assert!(
        window.len() >= 10,
        "too few status samples between detection and recovery"
    );
    for s in &window {
        let e = s.endpoint(id).expect("endpoint in status");
        assert!(
            !e.serves_reads && !e.serves_writes && e.health != Health::Up,
            "{id} back in rotation while still broken: {e:?}"
        );
    }
    let drained = window
        .iter()
        .find(|s| s.endpoint(id).is_some_and(|e| e.in_flight == 0))
        .map(|s| s.at)
        .unwrap_or_else(|| panic!("checkouts held on {id} never drained"));
    for s in window.iter().filter(|s| s.at >= drained) {
        let e = s.endpoint(id).expect("endpoint in status");
        assert_eq!(
            e.in_flight, 0,
            "a checkout reached {id} after it was detected down: {e:?}"
        );
    }
    drained
}
