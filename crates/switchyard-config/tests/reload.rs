//! Hot reload: a valid change is applied to the running clusters, an invalid
//! one is rejected and the running configuration stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_config::{ConfigError, ConfigSource, LiveConfig, RouterSet};
use switchyard_core::{Error, Intent};
use switchyard_router::StrategyKind;
use switchyard_testkit::{wait_until, PgCluster};

// Nothing listens on port 1: backends connect lazily, probes just fail.
fn base(endpoints: &str, strategy: &str) -> String {
    format!(
        "clusters:\n  main:\n    engine: postgres\n    strategy: {strategy}\n    endpoints:\n{endpoints}\n"
    )
}

const TWO: &str = "      - { name: pg-1, url: \"postgres://app@127.0.0.1:1/a\", role: primary }\n      - { name: pg-2, url: \"postgres://app@127.0.0.1:1/b\" }";
const THREE: &str = "      - { name: pg-1, url: \"postgres://app@127.0.0.1:1/a\", role: primary }\n      - { name: pg-2, url: \"postgres://app@127.0.0.1:1/b\", weight: 5 }\n      - { name: pg-3, url: \"postgres://app@127.0.0.1:1/c\" }";
const TIERS: &str = "tiers:\n  free: { isolation: row, max_connections: 2 }\ndefault_tier: free\n";

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn names(live: &LiveConfig) -> Vec<String> {
    let status = live.routers().get("main").unwrap().status();
    status.endpoints.iter().map(|e| e.id.to_string()).collect()
}

#[tokio::test]
async fn reload_applies_valid_changes_and_rejects_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", &base(TWO, "least_conn"));
    write(dir.path(), "tiers.yaml", TIERS);
    let live =
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD1__"))
            .unwrap();
    assert_eq!(names(&live), ["pg-1", "pg-2"]);

    // Accept: an endpoint joins, a weight and the strategy change, a quota changes.
    write(
        dir.path(),
        "base.yaml",
        &base(THREE, "weighted_round_robin"),
    );
    write(
        dir.path(),
        "tiers.yaml",
        "tiers:\n  free: { isolation: row, max_connections: 7 }\ndefault_tier: free\n",
    );
    let report = live.reload().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(names(&live), ["pg-1", "pg-2", "pg-3"]);
    let status = live.routers().get("main").unwrap().status();
    assert_eq!(status.strategy, StrategyKind::WeightedRoundRobin);
    assert_eq!(status.endpoint("pg-2").unwrap().weight, 5);
    let tenants = live.routers().postgres("main").unwrap().tenants();
    assert_eq!(tenants.tiers()["free"].max_connections, Some(7));
    assert_eq!(live.settings().clusters["main"].endpoints.len(), 3);

    // Reject: problems are reported, nothing running changes.
    write(
        dir.path(),
        "base.yaml",
        &base(TWO, "fastest").replace("role: primary", "role: primary, weight: 0"),
    );
    let err = live.reload().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Invalid(_)));
    assert!(text.contains("clusters.main.endpoints[0].weight"), "{text}");
    assert!(text.contains("fastest"), "{text}");
    assert_eq!(names(&live), ["pg-1", "pg-2", "pg-3"]);
    assert_eq!(live.settings().clusters["main"].endpoints.len(), 3);
    assert_eq!(live.subscribe().borrow().rejected, 1);

    // Remove an endpoint.
    write(dir.path(), "base.yaml", &base(TWO, "weighted_round_robin"));
    live.reload().unwrap();
    assert_eq!(names(&live), ["pg-1", "pg-2"]);
    assert_eq!(live.subscribe().borrow().accepted, 2);
}

#[tokio::test(start_paused = true)]
async fn watcher_reloads_on_file_change() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", &base(TWO, "least_conn"));
    let live = Arc::new(
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD2__"))
            .unwrap(),
    );
    let mut events = live.subscribe();
    let _watch = live.watch(Duration::from_secs(1));

    write(dir.path(), "base.yaml", &base(THREE, "least_conn"));
    tokio::time::timeout(Duration::from_secs(5), events.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.borrow_and_update().accepted, 1);
    assert_eq!(names(&live), ["pg-1", "pg-2", "pg-3"]);

    write(dir.path(), "base.yaml", "clusters: 3\n");
    tokio::time::timeout(Duration::from_secs(5), events.changed())
        .await
        .unwrap()
        .unwrap();
    let event = events.borrow_and_update().clone();
    assert_eq!(event.rejected, 1);
    assert!(
        event.last_problems[0].starts_with("clusters: "),
        "{event:?}"
    );
    assert_eq!(names(&live), ["pg-1", "pg-2", "pg-3"]);
}

const BEFORE: &str = r#"
clusters:
  main:
    engine: postgres
    checkout_timeout: 10s
    health: { interval: 2s, timeout: 1s }
    pool: { max_size: 4 }
    endpoints:
      - { name: pg-1, url: "postgres://app@127.0.0.1:1/a", role: primary }
      - { name: pg-2, url: "postgres://app@127.0.0.1:1/b" }
  spare:
    engine: postgres
    endpoints:
      - { name: s-1, url: "postgres://app@127.0.0.1:1/s", role: primary }
  flip:
    engine: postgres
    endpoints:
      - { name: f-1, url: "postgres://app@127.0.0.1:1/f", role: primary }
"#;

const AFTER: &str = r#"
clusters:
  main:
    engine: postgres
    checkout_timeout: 7s
    failover_timeout: 5s
    read_preference: any
    health: { interval: 500ms, timeout: 250ms, fall: 5 }
    pool: { max_size: 9 }
    endpoints:
      - { name: pg-1, url: "postgres://app@127.0.0.1:1/a", role: primary, weight: 2 }
      - { name: pg-2, url: "postgres://app@127.0.0.1:1/b2", weight: 4 }
  extra:
    engine: redis
    endpoints:
      - { name: x-1, url: "redis://127.0.0.1:1/0", role: primary }
  flip:
    engine: redis
    endpoints:
      - { name: f-1, url: "redis://127.0.0.1:1/1", role: primary }
"#;

#[tokio::test]
async fn router_pool_and_cluster_changes_apply_live() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", BEFORE);
    let live =
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD3__"))
            .unwrap();
    let routers = live.routers();
    let main = routers.postgres("main").unwrap();
    let spare = routers.postgres("spare").unwrap();
    let flip = routers.postgres("flip").unwrap();
    assert_eq!(routers.names(), ["flip", "main", "spare"]);

    // Nothing changed: nothing to do.
    assert_eq!(live.reload().unwrap(), Default::default());

    write(dir.path(), "base.yaml", AFTER);
    let report = live.reload().unwrap();
    assert!(report.failed.is_empty(), "{report:#?}");
    for change in [
        "cluster spare removed",
        "cluster extra added",
        "cluster flip rebuilt: engine postgres -> redis",
        "cluster main: router settings changed (read_preference, checkout_timeout, failover_timeout, health)",
        "cluster main: endpoint pg-1 given a new pool",
        "cluster main: endpoint pg-1 weight 2",
        "cluster main: endpoint pg-2 re-pointed",
    ] {
        assert!(
            report.changes.iter().any(|c| c == change),
            "{change} missing in {report:#?}"
        );
    }
    assert_eq!(report.changes.len(), 7, "{report:#?}");

    // Router settings: in force on the running cluster, for clones taken before.
    assert!(!main.is_closed());
    let config = main.config();
    assert_eq!(config.checkout_timeout, Duration::from_secs(7));
    assert_eq!(config.health.interval, Duration::from_millis(500));
    assert_eq!(config.health.fall, 5);
    assert_eq!(
        config.read_preference,
        switchyard_router::ReadPreference::Any
    );
    // Pool settings: every endpoint has a new backend; weights moved.
    let status = main.status();
    assert_eq!(names(&live), ["pg-1", "pg-2"]);
    for ep in &status.endpoints {
        assert_eq!(ep.pool.max_size, 9, "{}", ep.id);
    }
    assert_eq!(status.endpoint("pg-1").unwrap().weight, 2);
    assert_eq!(status.endpoint("pg-2").unwrap().weight, 4);

    // Clusters: removed ones closed, even through clones; new ones running.
    assert_eq!(routers.names(), ["extra", "flip", "main"]);
    assert!(spare.is_closed() && flip.is_closed());
    assert!(matches!(
        spare.checkout(Intent::Read, None).await,
        Err(Error::Closed)
    ));
    assert!(routers.get("spare").is_none());
    assert!(routers.postgres("flip").is_none());
    assert_eq!(routers.redis("flip").unwrap().endpoint_ids().len(), 1);
    assert_eq!(routers.redis("extra").unwrap().name(), "extra");
    assert_eq!(routers.statuses().len(), 3);
    assert_eq!(routers.iter().count(), 3);
    assert_eq!(live.settings().clusters.len(), 3);

    // And back: the removed cluster returns as a new one.
    write(dir.path(), "base.yaml", BEFORE);
    let report = live.reload().unwrap();
    assert!(report.failed.is_empty(), "{report:#?}");
    assert_eq!(routers.names(), ["flip", "main", "spare"]);
    assert!(!routers.postgres("spare").unwrap().is_closed());
    assert_eq!(main.config().checkout_timeout, Duration::from_secs(10));
}

#[cfg(not(feature = "mongodb"))]
#[tokio::test]
async fn a_cluster_of_an_engine_not_built_in_rejects_the_reload() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", &base(TWO, "least_conn"));
    let live =
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD4__"))
            .unwrap();
    write(
        dir.path(),
        "base.yaml",
        &format!(
            "{}  docs:\n    engine: mongodb\n    endpoints:\n      - {{ name: m, url: \"mongodb://127.0.0.1:1\", role: primary }}\n",
            base(THREE, "least_conn")
        ),
    );
    let err = live.reload().unwrap_err();
    assert!(matches!(err, ConfigError::EngineNotBuiltIn { .. }), "{err}");
    assert_eq!(names(&live), ["pg-1", "pg-2"], "nothing applied");
    assert!(live.routers().get("docs").is_none());
    assert_eq!(live.settings().clusters.len(), 1);
    let event = live.subscribe().borrow().clone();
    assert_eq!((event.accepted, event.rejected), (0, 1));
    assert!(
        event.last_problems[0].contains("mongodb is not built in"),
        "{event:?}"
    );
}

/// Checkouts and queries through the cluster `main`, counted.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more operations succeeded.
    async fn progress(&self, n: u64) {
        let target = self.ok() + n;
        wait_until(
            Duration::from_secs(30),
            || async move { self.ok() >= target },
        )
        .await
        .unwrap_or_else(|e| panic!("no progress: {e}"));
    }
}

/// Reads or writes through `main` (looked up afresh each time) until `stop`.
async fn workload(live: Arc<LiveConfig>, intent: Intent, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result: Result<(), String> = async {
            let main = live.routers().postgres("main").ok_or("no cluster main")?;
            let mut conn = main
                .checkout(intent, None)
                .await
                .map_err(|e| format!("checkout: {e}"))?;
            let query = match intent {
                Intent::Write => sqlx::query("INSERT INTO reload_t (n) VALUES ($1)")
                    .bind(n)
                    .execute(&mut **conn)
                    .await
                    .map(drop),
                Intent::Read => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM reload_t")
                    .fetch_one(&mut **conn)
                    .await
                    .map(drop),
            };
            query.map_err(|e| format!("query on {}: {e}", conn.endpoint()))
        }
        .await;
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tally.errors.lock().unwrap().push(e);
                tally.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// `main` on the primary and the standby, and optional clusters `spare` and
/// `extra` on the primary.
fn pg_config(
    pg: &PgCluster,
    max_size: u32,
    health: &str,
    checkout: &str,
    clusters: &[&str],
) -> String {
    let mut out = format!(
        "clusters:\n  main:\n    engine: postgres\n    checkout_timeout: {checkout}\n    failover_timeout: 5s\n    health: {health}\n    pool: {{ max_size: {max_size} }}\n    endpoints:\n      - {{ name: pg-1, url: \"{}\", role: primary }}\n      - {{ name: pg-2, url: \"{}\", role: replica }}\n",
        pg.primary().url(),
        pg.standbys()[0].url(),
    );
    for name in clusters {
        out.push_str(&format!(
            "  {name}:\n    engine: postgres\n    pool: {{ max_size: 2 }}\n    endpoints:\n      - {{ name: {name}-1, url: \"{}\", role: primary }}\n",
            pg.primary().url()
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_on_real_postgres() {
    use sqlx::Connection;
    let pg = PgCluster::start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let mut admin = sqlx::PgConnection::connect(pg.primary().url())
        .await
        .unwrap();
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    eprintln!(
        "running against real PostgreSQL primary {} + standby {}: {version}",
        pg.primary().addr(),
        pg.standbys()[0].addr()
    );
    sqlx::raw_sql("CREATE TABLE reload_t (id bigserial PRIMARY KEY, n bigint NOT NULL)")
        .execute(&mut admin)
        .await
        .unwrap();
    pg.wait_replayed(&pg.standbys()[0], Duration::from_secs(10))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let slow = "{ interval: 1s, timeout: 500ms }";
    write(
        dir.path(),
        "base.yaml",
        &pg_config(&pg, 4, slow, "10s", &["spare"]),
    );
    let live = Arc::new(
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD5__"))
            .unwrap(),
    );
    let spare = live.routers().postgres("spare").unwrap();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = [Intent::Write, Intent::Write, Intent::Read, Intent::Read]
        .into_iter()
        .map(|intent| {
            tokio::spawn(workload(
                Arc::clone(&live),
                intent,
                Arc::clone(&tally),
                Arc::clone(&stop),
            ))
        })
        .collect();
    tally.progress(50).await;

    // (a) A bigger pool: every endpoint gets a new backend, health kept.
    write(
        dir.path(),
        "base.yaml",
        &pg_config(&pg, 6, slow, "10s", &["spare"]),
    );
    let report = live.reload().unwrap();
    assert!(report.failed.is_empty(), "{report:#?}");
    let main = live.routers().postgres("main").unwrap();
    for ep in main.status().endpoints {
        assert_eq!(ep.pool.max_size, 6, "{}", ep.id);
        assert_eq!(ep.health, switchyard_router::Health::Up, "{}", ep.id);
    }
    tally.progress(50).await;
    for ep in main.status().endpoints {
        assert!(ep.pool.size > 0, "{} serves from its new pool", ep.id);
    }

    // (b) Faster probes and a shorter checkout timeout.
    let fast = "{ interval: 500ms, timeout: 250ms }";
    write(
        dir.path(),
        "base.yaml",
        &pg_config(&pg, 6, fast, "8s", &["spare"]),
    );
    let report = live.reload().unwrap();
    assert_eq!(
        report.changes,
        ["cluster main: router settings changed (checkout_timeout, health)"]
    );
    let config = main.config();
    assert_eq!(config.health.interval, Duration::from_millis(500));
    assert_eq!(config.health.timeout, Duration::from_millis(250));
    assert_eq!(config.checkout_timeout, Duration::from_secs(8));
    tally.progress(50).await;

    // (c) A cluster joins, usable at once.
    write(
        dir.path(),
        "base.yaml",
        &pg_config(&pg, 6, fast, "8s", &["spare", "extra"]),
    );
    let report = live.reload().unwrap();
    assert_eq!(report.changes, ["cluster extra added"]);
    let extra = live.routers().postgres("extra").unwrap();
    let mut conn = extra.checkout(Intent::Write, None).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut **conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    drop(conn);
    tally.progress(50).await;

    // (d) A cluster leaves: closed, even for the clone held here.
    write(
        dir.path(),
        "base.yaml",
        &pg_config(&pg, 6, fast, "8s", &["extra"]),
    );
    let report = live.reload().unwrap();
    assert_eq!(report.changes, ["cluster spare removed"]);
    assert!(spare.is_closed());
    assert!(matches!(
        spare.checkout(Intent::Read, None).await,
        Err(Error::Closed)
    ));
    assert!(live.routers().get("spare").is_none());
    tally.progress(50).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let errors = tally.errors.lock().unwrap().clone();
    eprintln!(
        "{} operations on main during four reloads, {} failed",
        tally.ok(),
        errors.len()
    );
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{errors:#?}");
    assert!(main.status().endpoints.iter().all(|e| e.pool.max_size == 6));
    assert_eq!(live.subscribe().borrow().accepted, 4);
}

#[cfg(not(feature = "mongodb"))]
#[tokio::test]
async fn engines_not_built_in_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        "clusters:\n  docs:\n    engine: mongodb\n    endpoints:\n      - { name: m, url: \"mongodb://127.0.0.1:27017\", role: primary }\n",
    );
    let settings = ConfigSource::new(dir.path(), "testing").load().unwrap();
    let err = RouterSet::build(&settings).unwrap_err();
    assert!(matches!(err, ConfigError::EngineNotBuiltIn { .. }));
    assert_eq!(
        err.to_string(),
        "clusters.docs.engine: engine mongodb is not built in (enable the switchyard-config feature \"mongodb\")"
    );
}

#[cfg(all(feature = "mongodb", feature = "clickhouse", feature = "elasticsearch"))]
#[tokio::test]
async fn engines_behind_features_build_routers() {
    use switchyard_config::{AnyCluster, Engine};
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        "clusters:\n  docs:\n    engine: mongodb\n    endpoints:\n      - { name: m, url: \"mongodb://127.0.0.1:1\", role: primary }\n  analytics:\n    engine: clickhouse\n    endpoints:\n      - { name: ch, url: \"http://default@127.0.0.1:1\", role: primary }\n  search:\n    engine: elasticsearch\n    endpoints:\n      - { name: es, url: \"http://127.0.0.1:1\", role: primary }\n",
    );
    let settings = ConfigSource::new(dir.path(), "testing").load().unwrap();
    let routers = RouterSet::build(&settings).unwrap();
    assert!(matches!(routers.get("docs"), Some(AnyCluster::Mongodb(_))));
    assert_eq!(
        routers.get("analytics").unwrap().engine(),
        Engine::Clickhouse
    );
    assert_eq!(
        routers.get("search").unwrap().engine(),
        Engine::Elasticsearch
    );
    assert!(Engine::Mongodb.is_built_in());
}

/// A rotated secret file is picked up by the watcher, and the endpoint gets a
/// new backend for the same server (its health is kept), not a fresh one.
#[tokio::test(start_paused = true)]
async fn a_rotated_secret_file_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pg-password");
    std::fs::write(&secret, "first\n").unwrap();
    let endpoint = |url: &str| {
        format!(
            "      - {{ name: pg-1, url: \"{url}\", role: primary }}\n      - {{ name: pg-2, url: \"postgres://app@127.0.0.1:1/b\" }}"
        )
    };
    let with_ref = endpoint(&format!(
        "postgres://app:${{file:{}}}@127.0.0.1:1/a",
        secret.display()
    ));
    write(dir.path(), "base.yaml", &base(&with_ref, "least_conn"));
    let live = Arc::new(
        LiveConfig::start(
            ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD_SECRET__"),
        )
        .unwrap(),
    );
    let url = |live: &LiveConfig| {
        live.settings().clusters["main"].endpoints[0]
            .url
            .expose()
            .to_owned()
    };
    assert_eq!(url(&live), "postgres://app:first@127.0.0.1:1/a");
    let mut events = live.subscribe();
    let _watch = live.watch(Duration::from_secs(1));

    // Only the secret changes; no configuration file does.
    std::fs::write(&secret, "second\n").unwrap();
    tokio::time::timeout(Duration::from_secs(5), events.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.borrow_and_update().accepted, 1);
    assert_eq!(url(&live), "postgres://app:second@127.0.0.1:1/a");
    // Never shown: the settings' Debug and the running cluster's status.
    let shown = format!("{:?} {:?}", live.settings(), live.routers().statuses());
    assert!(
        !shown.contains("second") && !shown.contains("first"),
        "{shown}"
    );

    // The same rotation applied by hand says what it did.
    std::fs::write(&secret, "third\n").unwrap();
    let report = live.reload().unwrap();
    assert_eq!(
        report.changes,
        ["cluster main: endpoint pg-1 given new credentials"],
        "{report:?}"
    );
    assert_eq!(names(&live), ["pg-1", "pg-2"]);
}

/// A cluster's `postgres` block reaches every endpoint's backend (with the
/// endpoint's own URL and the cluster's pool), and a change to it gives the
/// running endpoints new backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_block_reaches_every_backend_and_reloads_live() {
    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let file = |block: &str| {
        format!(
            "clusters:\n  main:\n    engine: postgres\n    pool: {{ max_size: 3 }}\n    postgres: {block}\n    endpoints:\n      - {{ name: pg-1, url: \"{}\", role: primary }}\n",
            pg.primary().url()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        &file("{ reset_timeout: 750ms, affinity: { check: false } }"),
    );
    let live =
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD8__"))
            .unwrap();
    let main = live.routers().postgres("main").unwrap();
    let conn = main.checkout(Intent::Write, None).await.unwrap();
    let config = conn.backend().config();
    assert_eq!(config.endpoint.as_str(), "pg-1");
    assert_eq!(config.url.expose(), pg.primary().url());
    assert_eq!(config.pool.max_size, 3);
    assert_eq!(config.reset_timeout, Duration::from_millis(750));
    assert!(!config.affinity.check);
    // What the block leaves out keeps its default.
    assert!(config.affinity.enabled);
    assert_eq!(config.tenant_pool_max_size, 4);
    drop(conn);

    write(
        dir.path(),
        "base.yaml",
        &file("{ tenant_pool_max_size: 2 }"),
    );
    let report = live.reload().unwrap();
    assert_eq!(
        report.changes,
        ["cluster main: endpoint pg-1 given a new pool"],
        "{report:?}"
    );
    let conn = main.checkout(Intent::Write, None).await.unwrap();
    let config = conn.backend().config();
    assert_eq!(config.tenant_pool_max_size, 2);
    assert_eq!(config.reset_timeout, Duration::from_secs(2));
    assert!(config.affinity.check);
}

/// The attack `tenant_roles` exists for, on a cluster configured by file:
/// tenant acme names tenant globex's schema. With the cluster's `postgres:
/// { tenant_roles: true }` the server refuses it; reloaded without the
/// block, schema isolation is `search_path` only and the same statement
/// reads globex's row (the trust model the README states), so it is the
/// block that turns the refusal on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_roles_from_the_postgres_block_refuse_another_tenants_schema() {
    use sqlx::{Connection, Executor};
    use switchyard_core::TenantId;
    use switchyard_postgres::provision_tenant_role;

    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let port = pg.primary().port();
    let mut admin = sqlx::PgConnection::connect(pg.primary().url())
        .await
        .unwrap();
    for sql in [
        "CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS",
        "CREATE DATABASE appdb OWNER app",
    ] {
        admin.execute(sql).await.unwrap();
    }
    let app_url = format!("postgres://app@127.0.0.1:{port}/appdb");
    let mut app = sqlx::PgConnection::connect(&app_url).await.unwrap();
    for t in ["acme", "globex"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA tenant_{t}; CREATE TABLE tenant_{t}.kv (value text); \
             INSERT INTO tenant_{t}.kv VALUES ('{t}')"
        )))
        .execute(&mut app)
        .await
        .unwrap();
    }
    let file = |block: &str| {
        format!(
            "clusters:\n  main:\n    engine: postgres\n    postgres: {block}\n    endpoints:\n      - {{ name: pg-1, url: \"{app_url}\", role: primary }}\n\
             tiers:\n  t: {{ isolation: schema, name_template: \"tenant_{{id}}\" }}\ndefault_tier: t\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", &file("{ tenant_roles: true }"));
    let live =
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_RELOAD9__"))
            .unwrap();
    let registry = live.settings().tenant_registry();
    let mut admin_app =
        sqlx::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/appdb"))
            .await
            .unwrap();
    for t in ["acme", "globex"] {
        let entry = registry.resolve(&TenantId::new(t).unwrap()).unwrap();
        provision_tenant_role(&mut admin_app, entry.scope(), "app", &[])
            .await
            .unwrap();
    }

    let acme = TenantId::new("acme").unwrap();
    let read = |sql: &'static str| {
        let live = &live;
        let acme = &acme;
        async move {
            let main = live.routers().postgres("main").unwrap();
            let mut conn = main.checkout(Intent::Write, Some(acme)).await.unwrap();
            sqlx::query_scalar::<_, String>(sql)
                .fetch_one(&mut **conn)
                .await
        }
    };
    assert_eq!(read("SELECT value FROM kv").await.unwrap(), "acme");
    let refused = read("SELECT value FROM tenant_globex.kv")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );

    write(dir.path(), "base.yaml", &file("{}"));
    let report = live.reload().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        read("SELECT value FROM tenant_globex.kv").await.unwrap(),
        "globex",
        "without tenant_roles, schema isolation is search_path only"
    );
}
