//! The `switchyard` binary end to end, against the test bed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use switchyard_testkit::{free_port, PgCluster, RedisCluster};

fn switchyard(args: &[&str]) -> Output {
    switchyard_with(args, &[])
}

/// Runs the binary with `env` set and the demo's engine URL variables unset
/// unless `env` sets them.
fn switchyard_with(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("SWITCHYARD_POSTGRES_URLS")
        .env_remove("SWITCHYARD_REDIS_URLS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run switchyard")
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

/// Runs `demo --json` and checks the summary every run must have.
fn demo_summary(env: &[(&str, String)]) -> serde_json::Value {
    let out = switchyard_with(&["demo", "--json"], env);
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
    assert!(v["verified_reads"].as_u64().unwrap() > 100);
    let faults = v["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 4);
    for f in faults {
        assert!(f["detect_ms"].is_u64(), "{f}");
        assert!(f["recover_ms"].is_u64(), "{f}");
    }
    assert_eq!(v["phases"].as_array().unwrap().len(), 4);
    v
}

#[test]
fn demo_json_reports_no_leaks() {
    let v = demo_summary(&[]);
    assert_eq!(v["engines"]["postgres"], "local test bed");
    assert_eq!(v["engines"]["redis"], "local test bed");
    assert_eq!(v["notes"].as_array().unwrap().len(), 0);
}

/// With the URL variables set the demo uses those engines (here started by
/// the test kit, as docker-compose would), breaks them through fault proxies
/// and promotes the standby with `pg_promote()`.
#[tokio::test(flavor = "multi_thread")]
async fn demo_uses_external_engines_when_their_urls_are_set() {
    let (pg, redis) = tokio::join!(PgCluster::start(1), RedisCluster::start(1));
    let (pg, redis) = (pg.unwrap(), redis.unwrap());
    let pg_urls = pg
        .nodes()
        .iter()
        .rev() // standby first: the demo finds the primary by probing
        .map(|n| format!("postgres://postgres@{}/postgres", n.addr()))
        .collect::<Vec<_>>()
        .join(",");
    let redis_urls = redis
        .nodes()
        .iter()
        .map(|n| n.url())
        .collect::<Vec<_>>()
        .join(", ");
    let env = [
        ("SWITCHYARD_POSTGRES_URLS", pg_urls.clone()),
        ("SWITCHYARD_REDIS_URLS", redis_urls),
    ];
    let v = tokio::task::block_in_place(|| demo_summary(&env));
    assert_eq!(
        v["engines"]["postgres"],
        "external (SWITCHYARD_POSTGRES_URLS)"
    );
    assert_eq!(v["engines"]["redis"], "external (SWITCHYARD_REDIS_URLS)");
    let faults = v["faults"].as_array().unwrap();
    assert_eq!(faults[0]["fault"], "kill pg-standby-1");
    assert_eq!(faults[2]["fault"], "pause pg-standby-1");
    assert_eq!(faults[3]["fault"], "kill pg-primary, promote pg-standby-1");
    // The processes were never touched: the standby was promoted for real,
    // and the old primary is still up (the note says how to reset).
    assert!(!pg.standbys()[0].is_in_recovery().await.unwrap());
    assert!(!pg.primary().is_in_recovery().await.unwrap());
    assert!(v["notes"][0]
        .as_str()
        .unwrap()
        .contains("pg-standby-1 was promoted"));

    // Run again on what is left: two primaries is refused with the remedy.
    let out = tokio::task::block_in_place(|| {
        switchyard_with(
            &["demo", "--json"],
            &[("SWITCHYARD_POSTGRES_URLS", pg_urls)],
        )
    });
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("exactly one primary") && stderr.contains("docker compose down -v"),
        "{stderr}"
    );
}

/// `testbed` starts what a configuration names on the ports of its URLs (roles
/// and databases included), `check` then finds every endpoint up, and Ctrl-C
/// stops every server.
#[test]
fn testbed_serves_the_config_it_is_given_until_interrupted() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let ports: Vec<u16> = (0..4).map(|_| free_port().unwrap()).collect();
    let dir = config_dir(&format!(
        "clusters:\n  main:\n    engine: postgres\n    endpoints:\n      - {{ name: pg-standby, url: \"postgres://app@127.0.0.1:{}/app\" }}\n      - {{ name: pg-primary, url: \"postgres://app@127.0.0.1:{}/app\", role: primary }}\n  cache:\n    engine: redis\n    endpoints:\n      - {{ name: r-1, url: \"redis://127.0.0.1:{}/0\", role: primary }}\n      - {{ name: r-2, url: \"redis://127.0.0.1:{}/0\" }}\n",
        ports[0], ports[1], ports[2], ports[3]
    ));
    let config = dir.path().to_str().unwrap();
    let mut bed = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["testbed", "--config", config, "--env", "testing"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(bed.stdout.take().unwrap()).lines();
    let mut shown = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        shown.push_str(&line);
        shown.push('\n');
        if line.starts_with("ready:") {
            break;
        }
    }
    assert!(shown.contains("ready: 2 cluster(s) up"), "{shown}");
    // The configured primary is started as the primary, whatever its place.
    assert!(
        shown.contains(&format!("127.0.0.1:{}  primary", ports[1])),
        "{shown}"
    );

    let out = check(dir.path(), true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", text(&out.stderr));
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 4, "{v}");

    let interrupted = Command::new("kill")
        .args(["-INT", &bed.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    assert_eq!(bed.wait().unwrap().code(), Some(0));
    for port in ports {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after the test bed stopped"
        );
    }

    // A port that is taken is named, and nothing is left running.
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = config_dir(&format!(
        "clusters:\n  cache:\n    engine: redis\n    endpoints:\n      - {{ name: r-1, url: \"redis://127.0.0.1:{port}/0\", role: primary }}\n"
    ));
    let out = switchyard(&[
        "testbed",
        "--config",
        busy.path().to_str().unwrap(),
        "--env",
        "testing",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("127.0.0.1:{port} is not free")),
        "{}",
        text(&out.stderr)
    );
}

/// `GET /metrics` on `port`, the body when it answers 200.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

#[tokio::test]
async fn watch_serves_the_routers_metrics_for_prometheus() {
    let redis = RedisCluster::start(0).await.unwrap();
    let dir = config_dir(&format!(
        "clusters:\n  cache:\n    engine: redis\n    health: {{ interval: 200ms, timeout: 200ms }}\n    endpoints:\n      - {{ name: r-1, url: \"{}/0\", role: primary }}\n",
        redis.master().url()
    ));
    let port = free_port().unwrap();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "watch",
            "--config",
            dir.path().to_str().unwrap(),
            "--env",
            "testing",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        match scrape(port) {
            Some(body) if body.contains("switchyard_probe_rtt_seconds") => break body,
            _ if std::time::Instant::now() > deadline => {
                let _ = watch.kill();
                panic!("no probe metrics at 127.0.0.1:{port}/metrics");
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        body.contains(r#"switchyard_endpoint_up{engine="redis",cluster="cache",endpoint="r-1"} 1"#),
        "{body}"
    );
}
