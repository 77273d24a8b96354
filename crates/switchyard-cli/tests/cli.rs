//! The `switchyard` binary end to end, against the test bed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use switchyard_testkit::{free_port, PgCluster, RedisCluster};

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run switchyard")
}

fn config_dir(base: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), base).unwrap();
    std::fs::write(
        dir.path().join("tiers.yaml"),
        "tiers:\n  free: { isolation: row, max_connections: 2 }\ndefault_tier: free\n",
    )
    .unwrap();
    dir
}

fn check(dir: &Path, json: bool) -> Output {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["check", "--config", dir, "--env", "testing"];
    if json {
        args.push("--json");
    }
    switchyard(&args)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_exit_codes_follow_health_and_validity() {
    let (pg, redis) = tokio::join!(PgCluster::start(1), RedisCluster::start(0));
    let (pg, redis) = (pg.unwrap(), redis.unwrap());
    eprintln!(
        "running against real PostgreSQL at {} (+1 standby) and Redis at {}",
        pg.primary().addr(),
        redis.master().addr()
    );
    let healthy = config_dir(&format!(
        "clusters:\n  main:\n    engine: postgres\n    endpoints:\n      - {{ name: pg-1, url: \"{}\", role: primary }}\n      - {{ name: pg-2, url: \"{}\" }}\n  cache:\n    engine: redis\n    endpoints:\n      - {{ name: r-1, url: \"{}\", role: primary }}\n",
        pg.primary().url(),
        pg.standbys()[0].url(),
        redis.master().url()
    ));
    let out = tokio::task::block_in_place(|| check(healthy.path(), false));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for needle in ["CLUSTER", "pg-1", "pg-2", "r-1", "primary", "replica", "up"] {
        assert!(stdout.contains(needle), "{needle} missing in\n{stdout}");
    }
    let out = tokio::task::block_in_place(|| check(healthy.path(), true));
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3);

    // A cluster whose only endpoint is dead.
    let dead = config_dir(&format!(
        "clusters:\n  main:\n    engine: postgres\n    endpoints:\n      - {{ name: pg-1, url: \"{}\", role: primary }}\n  lonely:\n    engine: redis\n    endpoints:\n      - {{ name: gone, url: \"redis://127.0.0.1:{}/0\", role: primary }}\n",
        pg.primary().url(),
        free_port().unwrap()
    ));
    let out = tokio::task::block_in_place(|| check(dead.path(), false));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("cluster lonely: no healthy endpoint"),
        "{stdout}"
    );
    assert!(stdout.contains("down"), "{stdout}");
}

#[test]
fn invalid_config_exits_2_with_every_problem() {
    std::env::remove_var("SYCLI_UNSET_PASSWORD");
    let dir = config_dir(
        "clusters:\n  main:\n    engine: postgres\n    endpoints:\n      - { name: a, url: \"postgress://x@h/db\", role: primary }\n      - { name: b, url: \"postgres://x:${SYCLI_UNSET_PASSWORD}@h/db\", weight: 0 }\n  other:\n    engine: oracle\n    endpoints: []\n",
    );
    let out = check(dir.path(), false);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in [
        "clusters.main.endpoints[0].url: unknown scheme \"postgress\"",
        "clusters.main.endpoints[1].url: unresolved ${SYCLI_UNSET_PASSWORD}",
        "clusters.main.endpoints[1].weight",
        "clusters.other.engine: unknown engine \"oracle\"",
        "clusters.other.endpoints: a cluster needs at least one endpoint",
        "base.yaml",
    ] {
        assert!(stderr.contains(needle), "{needle} missing in\n{stderr}");
    }
    let missing = switchyard(&[
        "check",
        "--config",
        "/nonexistent-switchyard",
        "--env",
        "testing",
    ]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn demo_json_reports_no_leaks() {
    let out = switchyard(&["demo", "--json"]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("demo summary: {v}");
    for field in [
        "checkouts",
        "leaks",
        "failed_reads",
        "failed_writes",
        "verified_reads",
    ] {
        assert!(v[field].is_u64(), "{field} missing in {v}");
    }
    assert_eq!(v["leaks"], 0);
    assert!(v["checkouts"].as_u64().unwrap() > 100);
    let faults = v["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 4);
    for f in faults {
        assert!(f["detect_ms"].is_u64(), "{f}");
        assert!(f["recover_ms"].is_u64(), "{f}");
    }
    assert_eq!(v["phases"].as_array().unwrap().len(), 4);
}
