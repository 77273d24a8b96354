//! `source: patroni | sentinel | static`: validation, and a router set that
//! follows a real Redis Sentinel from the test bed, reloaded live.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use switchyard_config::{ConfigError, ConfigSource, LiveConfig, SourceSettings};
use switchyard_core::Intent;
use switchyard_router::SourceState;
use switchyard_testkit::{free_port, poll_until, SentinelCluster, SENTINEL_MASTER};

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn sources_are_validated_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        r#"
clusters:
  orders:
    engine: postgres
    source: patroni
    patroni: { urls: ["http://10.0.0.1:8008"], interval: 500ms }
    member_url: "postgres://app:s3cret@patroni/orders"
  wrong_engine:
    engine: postgres
    source: sentinel
    sentinel: { urls: ["redis://10.0.0.1:26379"], master: cache }
    member_url: "postgres://app@x/app"
  both:
    engine: redis
    source: sentinel
    sentinel: { urls: ["ftp://10.0.0.1:26379"], master: cache, interval: 0s }
    member_url: "redis://sentinel/0"
    endpoints:
      - { name: r-1, url: "redis://127.0.0.1:6379/0", role: primary }
  nowhere:
    engine: redis
    source: zookeeper
  no_settings:
    engine: postgres
    source: patroni
"#,
    );
    let err = ConfigSource::new(dir.path(), "development")
        .load()
        .unwrap_err();
    let text = err.to_string();
    for expected in [
        "clusters.wrong_engine.source: source sentinel follows redis clusters only",
        "clusters.both.endpoints: a cluster with a topology source has no endpoints list",
        "clusters.both.sentinel.interval: must be more than 0",
        "clusters.both.sentinel: sentinel URL",
        r#"clusters.nowhere.source: unknown source "zookeeper""#,
        "clusters.no_settings.patroni: missing",
        "clusters.no_settings.member_url: missing",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains("orders"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn a_patroni_cluster_loads() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        r#"
clusters:
  orders:
    engine: postgres
    source: patroni
    patroni: { urls: ["http://10.0.0.1:8008", "http://10.0.0.2:8008"], interval: 500ms }
    member_url: "postgres://app:s3cret@patroni/orders"
"#,
    );
    let s = ConfigSource::new(dir.path(), "development").load().unwrap();
    let orders = &s.clusters["orders"];
    assert!(orders.endpoints.is_empty());
    match &orders.source {
        SourceSettings::Patroni { config, .. } => {
            assert_eq!(config.urls.len(), 2);
            assert_eq!(config.interval, Duration::from_millis(500));
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{s:?}").contains("s3cret"));
}

fn sentinel_yaml(urls: &[String], interval: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"
clusters:
  cache:
    engine: redis
    source: sentinel
    sentinel: {{ urls: [{}], master: {SENTINEL_MASTER}, interval: {interval}, timeout: 300ms }}
    member_url: "redis://sentinel/0"
    health: {{ interval: 200ms, timeout: 200ms }}
"#,
        urls.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_set_follows_sentinel_and_reloads() {
    // Unreachable at start: a clear error naming the cluster and the source.
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("redis://127.0.0.1:{}", free_port().unwrap());
    write(
        dir.path(),
        "base.yaml",
        &sentinel_yaml(std::slice::from_ref(&nobody), "1s"),
    );
    let live = LiveConfig::start(ConfigSource::new(dir.path(), "development")).unwrap();
    let err = live
        .routers()
        .wait_sources(Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::SourceUnreachable { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("cluster cache") && text.contains("127.0.0.1"),
        "{text}"
    );

    // A real sentinel bed, configured by a reload: the cluster is rebuilt
    // to follow it.
    let bed = SentinelCluster::start(2).await.unwrap();
    write(
        dir.path(),
        "base.yaml",
        &sentinel_yaml(&bed.sentinel_urls(), "1s"),
    );
    let report = live.reload().unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("cluster cache rebuilt")),
        "{report:?}"
    );
    live.routers()
        .wait_sources(Duration::from_secs(5))
        .await
        .unwrap();
    let cache = live.routers().redis("cache").unwrap();
    let master = format!("127.0.0.1:{}", bed.redis().master().port());
    poll_until(
        "writes to the sentinel's master",
        Duration::from_secs(5),
        || async {
            let conn = cache.checkout(Intent::Write, None).await.ok()?;
            (conn.endpoint().as_str() == master).then_some(())
        },
    )
    .await
    .unwrap();
    let status = cache.status();
    assert_eq!(status.endpoints.len(), 3);
    assert_eq!(status.source.unwrap().state, SourceState::Following);

    // Router settings reload in place: the cluster keeps following.
    write(
        dir.path(),
        "base.yaml",
        &sentinel_yaml(&bed.sentinel_urls(), "1s").replace("interval: 200ms", "interval: 300ms"),
    );
    let report = live.reload().unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("router settings changed")),
        "{report:?}"
    );
    assert!(live
        .routers()
        .redis("cache")
        .unwrap()
        .status()
        .source
        .is_some());
}
