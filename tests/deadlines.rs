#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bounded operations and slowness told from death, on real engines: a
//! PostgreSQL primary and standby, a Redis master and replica, each node
//! behind a testkit `FaultProxy`, and a router in front through the proxies.
//!
//! - A replica SIGSTOPped or blackholed for 3 s while 8 readers run through
//!   `Cluster::run` with a 500 ms attempt timeout: every read moves to the
//!   primary within the attempt deadline (it used to wait for the driver or
//!   for the node to resume, ~2.9 s).
//! - 106 ms of round-trip latency on the primary while probes run every
//!   100 ms with a 100 ms timeout: writes keep flowing (the primary used to
//!   be marked down, and writes stalled for the failover timeout).
//! - A Redis replica restarted (its tenant ACL users gone): row-isolated
//!   tenant reads keep working, and reach the replica again.
//!
//! Run with `--nocapture` to see the figures of each scenario. The tests run
//! one at a time, each running its scenarios in turn on one test bed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::Connection as _;
use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::redis::{provision_acl_users, remove_acl_users, RedisBackend, StaticPasswords};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Error, Intent, Isolation, PoolSettings, Role, TenantId,
    TenantRegistry, TierPolicy,
};
use switchyard_router::{CheckoutOptions, Cluster, ClusterConfig, EndpointConfig, Health};
use switchyard_testkit::{poll_until, FaultProxy, Node, PgCluster, RedisCluster, RedisNode};
use tokio::time::Instant;

/// Each attempt of a read; the figures before the fix are dominated by the
/// fault's length instead.
const ATTEMPT: Duration = Duration::from_millis(500);
/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(3);
/// Longest a read may take while the replica hangs: one attempt, then the
/// primary, plus room for a machine whose two cores are shared by the
/// engines and other tests; still well under the fault (before the fix,
/// reads waited the whole fault out).
const READ_BOUND: Duration = Duration::from_secs(2);
/// Round-trip latency added to the primary (half each way through the proxy).
const LATENCY: Duration = Duration::from_millis(106);
const READERS: usize = 8;
const WRITERS: usize = 4;

/// One finished operation: when it started and ended, and where it was
/// served or why it failed.
type Done = (Instant, Instant, Result<String, String>);

/// The scenarios share two cores with their engines: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Op<B> = Arc<dyn Fn(Cluster<B>) -> BoxFuture<'static, Result<String, Error>> + Send + Sync>;

/// Probes every 250 ms with a 250 ms timeout, falls after 2, attempts of 500 ms.
fn config() -> ClusterConfig {
    let mut c = ClusterConfig {
        checkout_timeout: Duration::from_secs(5),
        failover_timeout: Duration::from_secs(3),
        ..ClusterConfig::default()
    };
    c.health.interval = Duration::from_millis(250);
    c.health.timeout = Duration::from_millis(250);
    c.health.fall = 2;
    c.health.rise = 2;
    c.health.eject_base = Duration::from_millis(500);
    c.health.eject_max = Duration::from_secs(2);
    c.retry.max_attempts = 3;
    c.retry.attempt_timeout = ATTEMPT;
    c
}

/// The chaos run's probes: every 100 ms, timing out at 100 ms.
fn fast_probes() -> ClusterConfig {
    let mut c = config();
    c.health.interval = Duration::from_millis(100);
    c.health.timeout = Duration::from_millis(100);
    c
}

/// `url` with its port moved to `proxy`'s.
fn through(url: &str, port: u16, proxy: &FaultProxy) -> String {
    let from = format!("127.0.0.1:{port}");
    assert!(url.contains(&from), "{url}");
    url.replace(&from, &format!("127.0.0.1:{}", proxy.port()))
}

fn cluster<B: Backend>(
    name: &str,
    engine: &'static str,
    config: ClusterConfig,
    backends: [Arc<B>; 2],
) -> Cluster<B> {
    let [primary, replica] = backends;
    Cluster::builder(name)
        .engine(engine)
        .config(config)
        .endpoint(primary, EndpointConfig::new(Role::Primary))
        .endpoint(replica, EndpointConfig::new(Role::Replica))
        .build()
        .unwrap()
}

/// What the operations started while a fault was on did.
#[derive(Debug, Default)]
struct Figures {
    ops: usize,
    failed: usize,
    max: Duration,
    /// Served by each endpoint, by name.
    served: std::collections::BTreeMap<String, usize>,
    /// Served by each endpoint before the fault, by name.
    served_before: std::collections::BTreeMap<String, usize>,
    /// The longest time without an operation finishing well.
    longest_gap: Duration,
    first_error: Option<String>,
}

impl Figures {
    fn served_by(&self, id: &str) -> usize {
        self.served.get(id).copied().unwrap_or(0)
    }
}

/// Runs `tasks` copies of `op` in a loop; `fault` starts after 500 ms, `heal`
/// after `FAULT` more, and the load stops 500 ms later. Returns the figures
/// of the operations that overlapped the fault.
async fn under_fault<B: Backend>(
    label: &str,
    cluster: &Cluster<B>,
    op: Op<B>,
    tasks: usize,
    fault: impl Future<Output = ()>,
    heal: impl Future<Output = ()>,
) -> Figures {
    // Both endpoints probed and up: the fault hits a router in steady state.
    poll_until("both endpoints up", Duration::from_secs(10), || async {
        let status = cluster.status();
        let up =
            |e: &switchyard_router::EndpointStatus| e.health == Health::Up && e.probe_rtt.is_some();
        (status.writer.is_some() && status.endpoints.iter().all(up)).then_some(())
    })
    .await
    .unwrap();
    let log: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (cluster, op, log, stop) = (cluster.clone(), op.clone(), log.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = op(cluster.clone()).await.map_err(|e| e.to_string());
                    log.lock().unwrap().push((started, Instant::now(), result));
                    // No pause between operations: a fault finds them in flight.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = Instant::now();
    fault.await;
    tokio::time::sleep(FAULT).await;
    heal.await;
    let to = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("an operation hung")
            .unwrap();
    }
    let log = log.lock().unwrap();
    let mut figures = Figures::default();
    let mut done: Vec<Instant> = vec![from];
    for (started, ended, result) in log.iter() {
        // Every operation the fault could touch: those in flight when it
        // began count as much as those started during it.
        if *ended <= from {
            if let Ok(endpoint) = result {
                *figures.served_before.entry(endpoint.clone()).or_default() += 1;
            }
            continue;
        }
        if *started >= to {
            continue;
        }
        figures.ops += 1;
        figures.max = figures.max.max(*ended - *started);
        match result {
            Ok(endpoint) => {
                *figures.served.entry(endpoint.clone()).or_default() += 1;
                done.push(*ended);
            }
            Err(e) => {
                figures.failed += 1;
                figures.first_error.get_or_insert_with(|| e.clone());
            }
        }
    }
    done.push(to);
    done.sort();
    figures.longest_gap = done
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    println!("{label}: {figures:?}");
    figures
}

/// Reads during a hung replica all finish within the bound, none fails, and
/// they were served by the primary.
fn assert_reads_moved(label: &str, f: &Figures, primary: &str) {
    assert!(f.ops > 0, "{label}: no reads ran");
    assert_eq!(f.failed, 0, "{label}: {f:?}");
    assert!(
        f.max <= READ_BOUND,
        "{label}: a read took {:?}: {f:?}",
        f.max
    );
    assert!(f.served_by(primary) > 0, "{label}: {f:?}");
}

/// Writes during the primary's latency keep flowing: none fails and none
/// waits for a failover that is not coming.
fn assert_writes_flowed(label: &str, f: &Figures) {
    assert!(f.ops > 0, "{label}: no writes ran");
    assert_eq!(f.failed, 0, "{label}: {f:?}");
    assert!(
        f.longest_gap < Duration::from_secs(1),
        "{label}: writes stalled: {f:?}"
    );
}

/// The three faults in turn, each under a new router over `backends` (the
/// primary first): the replica SIGSTOPped, then blackholed (reads move to
/// `primary` within the bound), then latency on the primary under 100 ms
/// probes (writes keep flowing, and the primary stays up).
async fn hung_replica_and_slow_primary<B: Backend>(
    engine: &'static str,
    primary: &str,
    replica: &impl Node,
    proxies: &[FaultProxy; 2],
    backends: impl Fn() -> [Arc<B>; 2],
    read: Op<B>,
    write: Op<B>,
) {
    let routed = cluster("paused", engine, config(), backends());
    let paused = under_fault(
        &format!("{engine}: the only replica SIGSTOPped"),
        &routed,
        read.clone(),
        READERS,
        async { replica.pause().await.unwrap() },
        async { replica.resume().await.unwrap() },
    )
    .await;
    assert_reads_moved(&format!("{engine} pause"), &paused, primary);
    drop(routed);

    let routed = cluster("blackholed", engine, config(), backends());
    let blackholed = under_fault(
        &format!("{engine}: the only replica blackholed"),
        &routed,
        read,
        READERS,
        async { proxies[1].stall_all(true) },
        async { proxies[1].stall_all(false) },
    )
    .await;
    assert_reads_moved(&format!("{engine} blackhole"), &blackholed, primary);
    drop(routed);

    let routed = cluster("slow", engine, fast_probes(), backends());
    let slow = under_fault(
        &format!("{engine}: +106ms on the primary, 100ms probes"),
        &routed,
        write,
        WRITERS,
        async { proxies[0].set_latency(LATENCY / 2) },
        async { proxies[0].set_latency(Duration::ZERO) },
    )
    .await;
    assert_writes_flowed(&format!("{engine} latency"), &slow);
    assert_eq!(
        routed.status().endpoint(primary).unwrap().health,
        Health::Up
    );
}

fn pg_backend(id: &str, url: String) -> Arc<PgBackend> {
    let mut config = PgBackendConfig::new(id, url);
    config.pool = PoolSettings::default()
        .with_max_size(8)
        .with_acquire_timeout(Duration::from_secs(2));
    Arc::new(PgBackend::new(config).unwrap())
}

fn pg_read() -> Op<PgBackend> {
    Arc::new(|cluster| {
        Box::pin(async move {
            cluster
                .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
                    // 20 ms of work, so most readers are mid-query when
                    // the fault strikes.
                    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_sleep(0.02)")
                        .fetch_one(&mut **conn)
                        .await?;
                    Ok::<_, sqlx::Error>(conn.endpoint().to_string())
                })
                .await
        })
    })
}

fn pg_write() -> Op<PgBackend> {
    Arc::new(|cluster| {
        Box::pin(async move {
            cluster
                .run(Intent::Write, None, CheckoutOptions::new(), async |conn| {
                    sqlx::query("INSERT INTO deadline_log (at) VALUES (now())")
                        .execute(&mut **conn)
                        .await?;
                    Ok::<_, sqlx::Error>(conn.endpoint().to_string())
                })
                .await
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hung_replica_and_slow_primary() {
    let _serial = SERIAL.lock().await;
    let pg = PgCluster::start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let (primary, standby) = (pg.primary(), &pg.standbys()[0]);
    let proxies = [
        FaultProxy::start(primary.addr()).await.unwrap(),
        FaultProxy::start(standby.addr()).await.unwrap(),
    ];
    let mut admin = sqlx::PgConnection::connect(primary.url()).await.unwrap();
    sqlx::raw_sql("CREATE TABLE deadline_log (id bigserial PRIMARY KEY, at timestamptz)")
        .execute(&mut admin)
        .await
        .unwrap();
    let backends = || {
        [
            pg_backend("pg-0", through(primary.url(), primary.port(), &proxies[0])),
            pg_backend("pg-1", through(standby.url(), standby.port(), &proxies[1])),
        ]
    };

    hung_replica_and_slow_primary(
        "postgres",
        "pg-0",
        standby,
        &proxies,
        backends,
        pg_read(),
        pg_write(),
    )
    .await;
}

fn redis_backend(id: &str, url: String, passwords: Option<StaticPasswords>) -> Arc<RedisBackend> {
    let mut builder = RedisBackend::builder(id, url)
        .max_size(8)
        .connect_timeout(Duration::from_millis(500));
    if let Some(passwords) = passwords {
        builder = builder.acl_passwords(passwords);
    }
    Arc::new(builder.build().unwrap())
}

fn redis_read(tenant: Option<TenantId>) -> Op<RedisBackend> {
    Arc::new(move |cluster| {
        let tenant = tenant.clone();
        Box::pin(async move {
            cluster
                .run(
                    Intent::Read,
                    tenant.as_ref(),
                    CheckoutOptions::new(),
                    async |conn| {
                        let value: Option<String> = conn.get("hot").await?;
                        match value {
                            Some(_) => Ok(conn.endpoint().to_string()),
                            None => Err(Error::backend(
                                conn.endpoint(),
                                conn.tenant(),
                                switchyard_core::BackendErrorKind::Rejected,
                                std::io::Error::other("the key is missing"),
                            )),
                        }
                    },
                )
                .await
        })
    })
}

fn redis_write() -> Op<RedisBackend> {
    Arc::new(|cluster| {
        Box::pin(async move {
            cluster
                .run(Intent::Write, None, CheckoutOptions::new(), async |conn| {
                    conn.set("w", "1").await?;
                    Ok::<_, Error>(conn.endpoint().to_string())
                })
                .await
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_replica_and_slow_primary() {
    let _serial = SERIAL.lock().await;
    let rc = RedisCluster::start(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (master, replica) = (rc.master(), &rc.replicas()[0]);
    let proxies = [
        FaultProxy::start(master.addr()).await.unwrap(),
        FaultProxy::start(replica.addr()).await.unwrap(),
    ];
    let backends = || {
        [
            redis_backend(
                "redis-0",
                through(&master.url(), master.port(), &proxies[0]),
                None,
            ),
            redis_backend(
                "redis-1",
                through(&replica.url(), replica.port(), &proxies[1]),
                None,
            ),
        ]
    };
    let routed = cluster("seed", "redis", config(), backends());
    routed
        .run(Intent::Write, None, CheckoutOptions::new(), async |conn| {
            conn.set("hot", "1").await
        })
        .await
        .unwrap();
    drop(routed);
    let replica_has_it = redis_backend("check", replica.url(), None);
    poll_until(
        "the hot key on the replica",
        Duration::from_secs(10),
        || async {
            let mut conn = Checkout::acquire(
                &replica_has_it,
                CheckoutRequest::with_timeout(Duration::from_secs(1)),
            )
            .await
            .ok()?;
            conn.get::<Option<String>>("hot")
                .await
                .ok()
                .flatten()
                .map(drop)
        },
    )
    .await
    .unwrap();

    hung_replica_and_slow_primary(
        "redis",
        "redis-0",
        replica,
        &proxies,
        backends,
        redis_read(None),
        redis_write(),
    )
    .await;
}

/// A restarted replica has lost its tenant ACL users; tenant reads keep
/// working and come back to it once it has resynced. Only users provisioned
/// and not removed come back; one revoked by hand on a running node stays
/// revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tenant_reads_survive_a_replica_restart() {
    let _serial = SERIAL.lock().await;
    let rc = RedisCluster::start(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (master, replica) = (rc.master(), &rc.replicas()[0]);
    let (tenant, gone) = (
        TenantId::new("acme").unwrap(),
        TenantId::new("globex").unwrap(),
    );
    let tenants = TenantRegistry::new()
        .with_tier(
            "strict",
            TierPolicy::new(Isolation::Row).with_max_connections(16),
        )
        .with_default_tier("strict");
    let passwords = StaticPasswords::generate([&tenant, &gone]).unwrap();
    let backends = [
        redis_backend("redis-0", master.url(), Some(passwords.clone())),
        redis_backend("redis-1", replica.url(), Some(passwords.clone())),
    ];
    // Provisioned on every node, as an operator does (ACLs do not
    // replicate); globex is offboarded again before the restart.
    let entry = tenants.resolve(&tenant).unwrap();
    let offboarded = tenants.resolve(&gone).unwrap();
    for backend in &backends {
        let mut admin = Checkout::acquire(
            backend,
            CheckoutRequest::with_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        let scopes = [&**entry.scope(), &**offboarded.scope()];
        provision_acl_users(&mut admin, scopes, &passwords)
            .await
            .unwrap();
        remove_acl_users(&mut admin, [&**offboarded.scope()])
            .await
            .unwrap();
    }
    let routed = Cluster::builder("acl")
        .engine("redis")
        .config(config())
        .tenants(tenants)
        .endpoint(backends[0].clone(), EndpointConfig::new(Role::Primary))
        .endpoint(backends[1].clone(), EndpointConfig::new(Role::Replica))
        .build()
        .unwrap();
    routed
        .run(
            Intent::Write,
            Some(&tenant),
            CheckoutOptions::new(),
            async |conn| conn.set("hot", "1").await,
        )
        .await
        .unwrap();
    let served_by_replica = || async {
        let served = redis_read(Some(tenant.clone()))(routed.clone())
            .await
            .ok()?;
        (served == "redis-1").then_some(())
    };
    // Let a probe see the replica's first run before it restarts.
    poll_until(
        "the replica to serve the tenant",
        Duration::from_secs(10),
        served_by_replica,
    )
    .await
    .unwrap();

    let restarted = under_fault(
        "redis: a replica restarted (tenant ACL users lost)",
        &routed,
        redis_read(Some(tenant.clone())),
        READERS,
        async { replica.restart().await.unwrap() },
        async {},
    )
    .await;
    assert_eq!(restarted.failed, 0, "{restarted:?}");
    poll_until(
        "tenant reads back on the restarted replica",
        Duration::from_secs(15),
        served_by_replica,
    )
    .await
    .unwrap();

    // Only what was provisioned and not removed came back.
    assert_eq!(acl_users(replica).await, ["default", "tenant_acme"]);
    let offboarded_read = redis_read(Some(gone.clone()))(routed.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(offboarded_read, Error::TenantNotProvisioned { .. }),
        "{offboarded_read}"
    );

    // A user revoked by hand on a running server stays revoked.
    let deleted: i64 = admin_command(
        master,
        switchyard::redis::redis::cmd("ACL")
            .arg("DELUSER")
            .arg("tenant_acme"),
    )
    .await;
    assert_eq!(deleted, 1);
    let revoked = routed
        .run(
            Intent::Write,
            Some(&tenant),
            CheckoutOptions::new(),
            async |conn| conn.set("hot", "2").await,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(revoked, Error::TenantNotProvisioned { .. }),
        "{revoked}"
    );
    assert_eq!(acl_users(master).await, ["default"]);
}

/// `cmd` sent to `node` as its default user, outside the router.
async fn admin_command<T: switchyard::redis::redis::FromRedisValue>(
    node: &RedisNode,
    cmd: &switchyard::redis::redis::Cmd,
) -> T {
    let client = switchyard::redis::redis::Client::open(node.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// The ACL users `node` has, sorted.
async fn acl_users(node: &RedisNode) -> Vec<String> {
    let mut users: Vec<String> =
        admin_command(node, switchyard::redis::redis::cmd("ACL").arg("USERS")).await;
    users.sort();
    users
}
