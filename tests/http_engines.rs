#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The HTTP engines (ClickHouse, Elasticsearch) under faults and at their
//! in-flight bound: each scenario is written once, over a small per-engine
//! fixture. ClickHouse is the real server; Elasticsearch the real one when
//! `SWITCHYARD_ELASTICSEARCH_URL` is set (which the test bed cannot signal:
//! the faults are skipped and the test says so), else the noida-db stand-in.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_clickhouse::{ChBackend, ChBackendConfig};
use switchyard_core::{
    Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, PoolSettings, Role,
};
use switchyard_elasticsearch::{EsBackend, EsBackendConfig, EsCheckoutExt};
use switchyard_testkit::{wait_until, ClickHouse, ElasticServer, ServerKind};

const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// What a scenario needs of one engine's server.
trait Engine: Sized {
    type Backend: Backend;
    /// Starts (or connects to) a server.
    fn start() -> impl Future<Output = Self>;
    /// What it is, for the test output.
    fn describe(&self) -> String;
    /// Whether the test bed can signal the server (a real one it did not start cannot).
    fn signalled(&self) -> bool;
    /// A backend on the server with an in-flight bound of `max_size`.
    fn backend(&self, max_size: u32) -> Arc<Self::Backend>;
    fn kill(&self) -> impl Future<Output = ()>;
    fn pause(&self) -> impl Future<Output = ()>;
    fn resume(&self) -> impl Future<Output = ()>;
    fn restart(&self) -> impl Future<Output = ()>;
    /// One request on the checkout's own client; panics unless it is answered.
    fn ping(conn: &mut Checkout<Self::Backend>) -> impl Future<Output = ()>;
}

/// [`Engine`]'s faults, forwarded to the test bed's server handle `self.0`.
macro_rules! signals {
    () => {
        async fn kill(&self) {
            self.0.kill().await.unwrap();
        }
        async fn pause(&self) {
            self.0.pause().await.unwrap();
        }
        async fn resume(&self) {
            self.0.resume().await.unwrap();
        }
        async fn restart(&self) {
            self.0.restart().await.unwrap();
        }
    };
}

fn pool(max_size: u32) -> PoolSettings {
    PoolSettings::default()
        .with_max_size(max_size)
        .with_acquire_timeout(Duration::from_secs(10))
}

struct Ch(ClickHouse);

impl Engine for Ch {
    type Backend = ChBackend;
    async fn start() -> Self {
        Self(ClickHouse::start().await.unwrap_or_else(|e| panic!("{e}")))
    }
    fn describe(&self) -> String {
        format!("real ClickHouse at {}", self.0.http_url())
    }
    fn signalled(&self) -> bool {
        true
    }
    fn backend(&self, max_size: u32) -> Arc<ChBackend> {
        let config = ChBackendConfig::builder("ch-test", self.0.http_url())
            .pool(pool(max_size))
            .query_timeout(Duration::from_secs(10))
            .config();
        Arc::new(ChBackend::new(config).unwrap())
    }
    signals!();
    async fn ping(conn: &mut Checkout<ChBackend>) {
        let client = conn.client().unwrap();
        let one: u8 = client.query("SELECT 1").fetch_one().await.unwrap();
        assert_eq!(one, 1);
    }
}

struct Es(ElasticServer);

impl Engine for Es {
    type Backend = EsBackend;
    async fn start() -> Self {
        Self(
            ElasticServer::start()
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn signalled(&self) -> bool {
        self.0.kind() != ServerKind::Real
    }
    fn backend(&self, max_size: u32) -> Arc<EsBackend> {
        let config = EsBackendConfig::builder("es-test", self.0.url())
            .pool(pool(max_size))
            .request_timeout(Duration::from_secs(10))
            .config();
        Arc::new(EsBackend::new(config).unwrap())
    }
    signals!();
    async fn ping(conn: &mut Checkout<EsBackend>) {
        let client = conn.client().unwrap().clone();
        let ping = client.ping().send().await.map_err(|e| conn.fail(e));
        assert!(ping.unwrap().status_code().is_success());
    }
}

async fn healthy<B: Backend>(backend: &B, within: Duration) {
    wait_until(within, || async {
        backend.probe(PROBE_TIMEOUT).await.is_ok()
    })
    .await
    .unwrap();
}

/// Probes follow a pause (a timeout within the probe timeout), a kill
/// (refused at once, even with a kept-alive socket from before it in the
/// client's pool) and a restart.
async fn probes_follow_kill_pause_resume_and_restart<E: Engine>() {
    let server = E::start().await;
    let backend = server.backend(4);
    let probe = backend.probe(PROBE_TIMEOUT).await.unwrap();
    eprintln!("{}: {:?}", server.describe(), probe.version);
    assert_eq!(probe.role, Role::Standalone);
    let version = probe.version.as_deref().unwrap_or("");
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );
    assert!(probe.lag.is_none());
    if !server.signalled() {
        eprintln!("SKIPPED kill/pause/restart: the test bed cannot signal this server");
        return;
    }

    server.pause().await;
    let started = Instant::now();
    let err = backend.probe(PROBE_TIMEOUT).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::ProbeTimeout { .. }), "{err}");
    assert!(err.is_endpoint_failure());
    assert!(
        elapsed >= PROBE_TIMEOUT && elapsed < PROBE_TIMEOUT + Duration::from_millis(300),
        "{elapsed:?}"
    );
    eprintln!("paused: {err} after {elapsed:?}");
    server.resume().await;
    healthy(&*backend, Duration::from_secs(10)).await;

    let mut conn = Checkout::acquire(&backend, CheckoutRequest::with_timeout(PROBE_TIMEOUT))
        .await
        .unwrap();
    E::ping(&mut conn).await;
    drop(conn);
    server.kill().await;
    let started = Instant::now();
    let err = backend.probe(PROBE_TIMEOUT).await.unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Connect),
        "{err:?}"
    );
    assert!(err.is_retryable() && err.is_endpoint_failure());
    assert!(started.elapsed() < PROBE_TIMEOUT);
    eprintln!("killed: {err} ({:?})", std::error::Error::source(&err));

    let started = Instant::now();
    server.restart().await;
    healthy(&*backend, Duration::from_secs(30)).await;
    eprintln!("restarted and healthy after {:?}", started.elapsed());
    let again = backend.probe(PROBE_TIMEOUT).await.unwrap();
    assert_eq!(again.version, probe.version);
}

/// A checkout past the bound waits until its deadline, a probe does not
/// queue behind checkouts, and a waiter gets a slot as soon as one is back.
async fn the_in_flight_bound_makes_checkouts_wait_until_their_deadline<E: Engine>() {
    let server = E::start().await;
    let backend = server.backend(2);
    let timeout = Duration::from_secs(2);
    let one = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout))
        .await
        .unwrap();
    let two = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout))
        .await
        .unwrap();
    let stats = backend.stats();
    assert_eq!((stats.in_use(), stats.max_size), (2, 2));

    let short = Duration::from_millis(200);
    let started = Instant::now();
    let err = Checkout::acquire(&backend, CheckoutRequest::with_timeout(short))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() >= short);
    assert!(started.elapsed() < Duration::from_millis(500));

    backend.probe(timeout).await.unwrap();

    let waiter = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(one);
    let mut three = waiter.await.unwrap().unwrap();
    E::ping(&mut three).await;
    drop((two, three));
    assert_eq!(backend.stats().in_use(), 0);
}

#[tokio::test]
async fn clickhouse_probes_follow_kill_pause_resume_and_restart() {
    probes_follow_kill_pause_resume_and_restart::<Ch>().await;
}

#[tokio::test]
async fn elasticsearch_probes_follow_kill_pause_resume_and_restart() {
    probes_follow_kill_pause_resume_and_restart::<Es>().await;
}

#[tokio::test]
async fn clickhouse_in_flight_bound_makes_checkouts_wait_until_their_deadline() {
    the_in_flight_bound_makes_checkouts_wait_until_their_deadline::<Ch>().await;
}

#[tokio::test]
async fn elasticsearch_in_flight_bound_makes_checkouts_wait_until_their_deadline() {
    the_in_flight_bound_makes_checkouts_wait_until_their_deadline::<Es>().await;
}
