//! Hot reload: a valid change is applied to the running clusters, an invalid
//! one is rejected and the running configuration stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::{ConfigError, ConfigSource, LiveConfig, RouterSet};
use switchyard_router::StrategyKind;

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
    assert!(report.restart_required.is_empty(), "{report:?}");
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
