//! TLS settings in the configuration files: problems name the file and the
//! line, and a rotated CA file reaches the running cluster without a restart,
//! against a real PostgreSQL with `ssl = on` from the test bed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::{ConfigSource, LiveConfig};
use switchyard_core::{Error, Intent, TlsFailure};
use switchyard_testkit::{PgCluster, TestCa};

fn config(url: &str, ca_file: &Path) -> String {
    format!(
        "clusters:\n  main:\n    engine: postgres\n    tls:\n      ca_file: {}\n    endpoints:\n      - {{ name: pg-1, url: \"{url}\", role: primary }}\n",
        ca_file.display()
    )
}

#[test]
fn tls_problems_name_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    std::fs::write(
        dir.path().join("base.yaml"),
        config("postgres://app@db:5432/app", &missing),
    )
    .unwrap();
    let err = ConfigSource::new(dir.path(), "testing")
        .env_prefix("SYTEST_TLS_PROBLEMS__")
        .load()
        .unwrap_err();
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{err}");
    assert_eq!(problems[0].path, "clusters.main.tls.ca_file");
    assert!(problems[0].message.contains("nope.pem"), "{err}");
    let origin = problems[0].origin.as_deref().unwrap_or_default();
    assert!(origin.ends_with("base.yaml:5"), "{origin}");

    // A URL that asks for unverified TLS next to a tls block.
    let ca = TestCa::generate().unwrap();
    std::fs::write(
        dir.path().join("base.yaml"),
        config("postgres://app@db:5432/app?sslmode=require", &ca.ca_file()),
    )
    .unwrap();
    let err = ConfigSource::new(dir.path(), "testing")
        .env_prefix("SYTEST_TLS_PROBLEMS__")
        .load()
        .unwrap_err();
    assert!(err.to_string().contains("insecure_skip_verify"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_file_is_picked_up_without_a_restart() {
    let ca = TestCa::generate().unwrap();
    let pg = PgCluster::start_tls(0, &ca).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust.pem");
    // The trust store first holds a CA that did not sign the server.
    std::fs::copy(ca.other_ca_file(), &trust).unwrap();
    let url = pg.primary().tls_url("postgres").unwrap();
    std::fs::write(dir.path().join("base.yaml"), config(&url, &trust)).unwrap();
    let live = Arc::new(
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_TLS_ROT__"))
            .unwrap(),
    );
    let cluster = live.routers().postgres("main").unwrap();
    match cluster.checkout(Intent::Write, None).await.unwrap_err() {
        Error::Tls { failure, .. } => assert_eq!(failure, TlsFailure::UnknownIssuer),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    let mut events = live.subscribe();
    let _watch = live.watch(Duration::from_millis(100));
    // Rotated as deployments rotate a secret: the new file is written next
    // to the old one and renamed over it. The watcher may still catch a file
    // half written by a tool that does not; that reload is rejected and the
    // next look accepts the whole file, so wait for the accepted one.
    let staged = dir.path().join("trust.pem.new");
    std::fs::copy(ca.ca_file(), &staged).unwrap();
    std::fs::rename(&staged, &trust).unwrap();
    let event = tokio::time::timeout(
        Duration::from_secs(10),
        events.wait_for(|e| e.accepted >= 1),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(event.accepted, 1, "{event:?}");
    let mut conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut **conn)
        .await
        .unwrap();
    assert!(ssl);
}

fn source_config(member_url: &str, ca_file: &Path, patroni: &str) -> String {
    format!(
        "clusters:\n  orders:\n    engine: postgres\n    source: patroni\n    patroni: {{ urls: [\"{patroni}\"], interval: 1s }}\n    member_url: \"{member_url}\"\n    tls:\n      ca_file: {}\n",
        ca_file.display()
    )
}

/// A `tls` block on a cluster that follows Patroni is for the members the
/// source reports: checked against the member URL, its files watched, and a
/// rotated file rebuilds the members (here with Patroni unreachable, so the
/// cluster has none yet: the rebuild is what the reload reports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cluster_tls_block_is_for_its_members() {
    let ca = TestCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust.pem");
    std::fs::copy(ca.ca_file(), &trust).unwrap();
    let patroni = format!(
        "http://127.0.0.1:{}",
        switchyard_testkit::free_port().unwrap()
    );

    // The member URL asks for unverified TLS next to the block: refused at
    // the member URL's path.
    let weak = source_config(
        "postgres://app@member/orders?sslmode=require",
        &trust,
        &patroni,
    );
    std::fs::write(dir.path().join("base.yaml"), weak).unwrap();
    let err = ConfigSource::new(dir.path(), "testing")
        .env_prefix("SYTEST_TLS_SOURCE__")
        .load()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("clusters.orders.member_url.tls: the url's sslmode=require"),
        "{err}"
    );

    let good = source_config("postgres://app@member/orders", &trust, &patroni);
    std::fs::write(dir.path().join("base.yaml"), good).unwrap();
    let source = ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_TLS_SOURCE__");
    let settings = source.load().unwrap();
    let orders = &settings.clusters["orders"];
    assert_eq!(
        orders
            .member_tls
            .as_ref()
            .and_then(|t| t.ca_file.as_deref()),
        Some(trust.as_path())
    );
    assert!(settings.secret_files().any(|f| f == trust));

    let live = LiveConfig::start(source).unwrap();
    assert!(live.reload().unwrap().changes.is_empty());
    std::fs::copy(ca.other_ca_file(), &trust).unwrap();
    let report = live.reload().unwrap();
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("cluster orders rebuilt")),
        "{report:?}"
    );
}
