//! `switchyard check` over TLS: per endpoint, whether it is encrypted, the
//! version negotiated, and a loud warning where verification is off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use switchyard_testkit::{PgCluster, RedisCluster, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_encryption_per_endpoint() {
    let ca = TestCa::generate().unwrap();
    let (pg, redis) = tokio::join!(
        PgCluster::start_tls(0, &ca),
        RedisCluster::start_tls(0, &ca)
    );
    let (pg, redis) = (pg.unwrap(), redis.unwrap());
    let tls = format!(
        "{{ ca_file: {}, cert_file: {}, key_file: {} }}",
        ca.ca_file().display(),
        ca.client_cert_file().display(),
        ca.client_key_file().display()
    );
    let base = format!(
        "clusters:
  pg:
    engine: postgres
    tls: {tls}
    endpoints:
      - {{ name: pg-tls, url: \"{}\", role: primary }}
      - {{ name: pg-insecure, url: \"{}?application_name=x\", tls: {{ insecure_skip_verify: true }} }}
  plain:
    engine: postgres
    endpoints:
      - {{ name: pg-plain, url: \"{}?sslmode=disable\", role: primary }}
  cache:
    engine: redis
    tls: {tls}
    endpoints:
      - {{ name: redis-tls, url: \"{}\", role: primary }}
",
        pg.primary().tls_url("postgres").unwrap(),
        pg.primary().url(),
        pg.primary().url(),
        redis.master().tls_url().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), &base).unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args([
            "check",
            "--config",
            dir.path().to_str().unwrap(),
            "--env",
            "testing",
        ]);
        if json {
            cmd.arg("--json");
        }
        cmd.env_remove("RUST_LOG").output().unwrap()
    };
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let endpoint = |name: &str| {
        report["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["endpoint"] == name)
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .clone()
    };
    for name in ["pg-tls", "redis-tls"] {
        let e = endpoint(name);
        assert_eq!(e["transport"], "tls_verified", "{e}");
        assert_eq!(e["tls_version"], "TLSv1_3", "{e}");
        assert_eq!(e["healthy"], true, "{e}");
    }
    assert_eq!(endpoint("pg-plain")["transport"], "plaintext");
    assert_eq!(endpoint("pg-insecure")["transport"], "tls_unverified");

    let out = run(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ENCRYPTION") && text.contains("TLSv1_3, verified"),
        "{text}"
    );
    assert!(
        text.contains(
            "WARNING: cluster pg endpoint pg-insecure: the server's certificate is NOT VERIFIED"
        ),
        "{text}"
    );
}
