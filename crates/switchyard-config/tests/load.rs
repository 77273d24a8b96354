//! Loading: layer order, YAML and TOML, secrets, and every validation problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use switchyard_config::{ConfigSource, Engine};
use switchyard_core::{Isolation, Role, TenantId};
use switchyard_router::StrategyKind;

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

const BASE: &str = r#"
clusters:
  main:
    engine: postgres
    strategy: least_conn
    endpoints:
      - { name: pg-1, url: "postgres://app@127.0.0.1:5432/app", role: primary }
      - { name: pg-2, url: "postgres://app@127.0.0.1:5433/app", weight: 3 }
  cache:
    engine: redis
    endpoints:
      - { name: r-1, url: "redis://127.0.0.1:6379/0", role: primary }
"#;

const TIERS: &str = r#"
tiers:
  free:       { isolation: row,      max_connections: 2 }
  standard:   { isolation: schema,   name_template: "tenant_{id}", max_connections: 8 }
  premium:    { isolation: database, name_template: "tenant_{id}", max_connections: 32 }
  enterprise: { isolation: database, name_template: "tenant_{id}", max_connections: 128 }
default_tier: free
tenants: { acme: premium }
"#;

#[test]
fn layers_merge_in_order_and_env_vars_win() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", BASE);
    write(dir.path(), "tiers.yaml", TIERS);
    write(
        dir.path(),
        "environments/staging.yaml",
        "clusters:\n  main:\n    strategy: round_robin\n    failover_timeout: 3s\n",
    );
    let source = ConfigSource::new(dir.path(), "staging").env_prefix("SYTEST_LAYERS__");
    let s = source.load().unwrap();
    let main = &s.clusters["main"];
    assert_eq!(main.engine, Engine::Postgres);
    assert_eq!(
        main.router.strategy,
        StrategyKind::RoundRobin,
        "env file beats base"
    );
    assert_eq!(main.router.failover_timeout.as_secs(), 3);
    assert_eq!(main.endpoints.len(), 2);
    assert_eq!(main.endpoints[0].role, Role::Primary);
    assert_eq!(main.endpoints[1].role, Role::Replica);
    assert_eq!(main.endpoints[1].weight, 3);
    assert_eq!(s.tiers.len(), 4);
    assert_eq!(s.tiers["premium"].isolation, Isolation::Database);
    let reg = s.tenant_registry();
    assert_eq!(
        reg.tier_of(&TenantId::new("acme").unwrap()).unwrap().0,
        "premium"
    );
    assert_eq!(
        reg.tier_of(&TenantId::new("zed").unwrap()).unwrap().0,
        "free"
    );

    // The fair gate's linger: the default, and one a cluster's pool sets.
    assert_eq!(main.pool.linger, switchyard_core::DEFAULT_LINGER);
    let quick = "clusters:\n  cache:\n    pool: { linger: 250us }\n";
    write(dir.path(), "environments/quick.yaml", quick);
    let q = ConfigSource::new(dir.path(), "quick").env_prefix("SYTEST_LAYERS_Q__");
    let q = q.load().unwrap();
    assert_eq!(
        q.clusters["cache"].pool.linger,
        std::time::Duration::from_micros(250)
    );

    // Other environments do not see staging's override.
    let dev = ConfigSource::new(dir.path(), "development").env_prefix("SYTEST_LAYERS__");
    assert_eq!(
        dev.load().unwrap().clusters["main"].router.strategy,
        StrategyKind::LeastConn
    );

    std::env::set_var("SYTEST_LAYERS__CLUSTERS__MAIN__STRATEGY", "latency");
    std::env::set_var("SYTEST_LAYERS__TIERS__FREE__MAX_CONNECTIONS", "5");
    let s = source.load().unwrap();
    assert_eq!(
        s.clusters["main"].router.strategy,
        StrategyKind::Latency,
        "env var beats files"
    );
    assert_eq!(s.tiers["free"].max_connections, Some(5));
    // Only the keys given change.
    assert_eq!(s.clusters["main"].router.failover_timeout.as_secs(), 3);
}

#[test]
fn toml_files_and_mixed_formats() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        r#"
[clusters.main]
engine = "postgres"
strategy = "weighted_round_robin"
[[clusters.main.endpoints]]
name = "pg-1"
url = "postgres://app@127.0.0.1:5432/app"
role = "primary"
"#,
    );
    write(
        dir.path(),
        "environments/production.yaml",
        "clusters:\n  main:\n    checkout_timeout: 20s\n    failover_timeout: 15s\n",
    );
    write(
        dir.path(),
        "tiers.toml",
        "default_tier = \"standard\"\n[tiers.standard]\nisolation = \"schema\"\nname_template = \"t_{id}\"\n",
    );
    let s = ConfigSource::new(dir.path(), "production").load().unwrap();
    let main = &s.clusters["main"];
    assert_eq!(main.router.strategy, StrategyKind::WeightedRoundRobin);
    assert_eq!(main.router.failover_timeout.as_secs(), 15);
    assert_eq!(s.tiers["standard"].name_template.to_string(), "t_{id}");
    assert_eq!(s.default_tier.as_deref(), Some("standard"));

    // TOML problems carry their line too, in whichever layer the value is.
    write(
        dir.path(),
        "base.toml",
        "[clusters.main]\nengine = \"postgres\"\n\n[[clusters.main.endpoints]]\nname = \"pg-1\"\nurl = \"postgres://app@h/app\"\nrole = \"primary\"\n\n[[clusters.main.endpoints]]\nname = \"pg-2\"\nurl = \"postgres://app@h2/app\"\nweight = 0\n",
    );
    write(
        dir.path(),
        "environments/production.yaml",
        "clusters:\n  main:\n    checkout_timeout: 20s\n    failover_timeout: 30s\n",
    );
    let err = ConfigSource::new(dir.path(), "production")
        .load()
        .unwrap_err();
    let text: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("clusters.main.endpoints[1].weight")
                && t.ends_with("base.toml:12)")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("clusters.main.failover_timeout")
                && t.ends_with("production.yaml:4)")),
        "{text:#?}"
    );
}

#[test]
fn secrets_resolve_and_never_show() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("SYTEST_SECRET_PG_PW", "hunter2-env");
    let pw_file = dir.path().join("redis.pw");
    std::fs::write(&pw_file, "hunter3-file\n").unwrap();
    let pw_file2 = dir.path().join("pg2.pw");
    std::fs::write(&pw_file2, "hunter4-ref\n").unwrap();
    write(
        dir.path(),
        "base.yaml",
        &format!(
            r#"
clusters:
  main:
    engine: postgres
    endpoints:
      - {{ name: pg-1, url: "postgres://app:${{SYTEST_SECRET_PG_PW}}@127.0.0.1:5432/app", role: primary }}
      - {{ name: pg-2, url: "postgres://app:${{file:{}}}@127.0.0.1:5433/app" }}
  cache:
    engine: redis
    endpoints:
      - {{ name: r-1, url: "redis://default@127.0.0.1:6379/0", password_file: "{}", role: primary }}
"#,
            pw_file2.display(),
            pw_file.display()
        ),
    );
    let s = ConfigSource::new(dir.path(), "testing").load().unwrap();
    let main = &s.clusters["main"];
    assert_eq!(
        main.endpoints[0].url.expose(),
        "postgres://app:hunter2-env@127.0.0.1:5432/app"
    );
    assert_eq!(
        main.endpoints[1].url.expose(),
        "postgres://app:hunter4-ref@127.0.0.1:5433/app"
    );
    assert_eq!(
        s.clusters["cache"].endpoints[0].url.expose(),
        "redis://default:hunter3-file@127.0.0.1:6379/0"
    );
    let debug = format!("{s:?}");
    for secret in ["hunter2", "hunter3", "hunter4"] {
        assert!(
            !debug.contains(secret),
            "{secret} leaked into Debug: {debug}"
        );
    }

    // An unresolved reference names the variable, and errors carry no secret.
    write(
        dir.path(),
        "environments/testing.yaml",
        "clusters:\n  cache:\n    endpoints:\n      - { name: r-1, url: \"redis://u:${SYTEST_SECRET_MISSING}@h:1/0\", role: primary }\n      - { name: r-2, url: \"redis://u:${SYTEST_SECRET_PG_PW}@h:1/0\" }\n      - { name: r-3, url: \"redis://u:${SYTEST_SECRET_PG_PW}@h:1/0\" }\n",
    );
    let err = ConfigSource::new(dir.path(), "testing").load().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("clusters.cache.endpoints[0].url: unresolved ${SYTEST_SECRET_MISSING}"),
        "{text}"
    );
    assert!(
        text.contains("duplicate endpoint url redis://u:***@h:1/0"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !format!("{err:?}").contains("hunter2"),
        "{text}"
    );
}

#[test]
fn every_problem_is_reported_with_path_and_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        r#"
clusters:
  main:
    engine: postgres
    failover_timeout: 30s
    checkout_timeout: 5s
    health: { interval: 1s, timeout: 0s }
    pool: { max_size: 2, min_idle: 3 }
    endpoints:
      - { name: pg-1, url: "postgres://app@db:5432/app", role: replica }
      - { name: pg-2, url: "postgress://app@db2:5432/app", weight: 0 }
      - { name: pg-1, url: "postgres://app@db:5432/app" }
  cache:
    engine: cassandra
    endpoints:
      - { name: c-1, url: "redis://h:1", role: primary }
  docs:
    engine: mongodb
    endpoints:
      - { name: m-1, url: "mongodb://127.0.0.1:27017", role: primary }
"#,
    );
    write(
        dir.path(),
        "tiers.yaml",
        r#"
tiers:
  free: { isolation: row, name_template: "tenant-{id}" }
  gold: { isolation: schema, name_template: "tenant_{id}" }
default_tier: platinum
tenants: { acme: diamond }
"#,
    );
    let err = ConfigSource::new(dir.path(), "development")
        .load()
        .unwrap_err();
    let problems = err.problems();
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    // Every problem names the file and the line the value is written on (or,
    // for something missing, the line of what should have held it).
    let expect = [
        ("clusters.main.failover_timeout", "base.yaml:5)"),
        ("clusters.main.health.timeout", "base.yaml:7)"),
        ("clusters.main.pool.min_idle", "base.yaml:8)"),
        (
            "clusters.main.endpoints[1].url: unknown scheme \"postgress\"",
            "base.yaml:11)",
        ),
        ("clusters.main.endpoints[1].weight", "base.yaml:11)"),
        (
            "clusters.main.endpoints[2].name: duplicate endpoint name \"pg-1\"",
            "base.yaml:12)",
        ),
        (
            "clusters.main.endpoints[2].url: duplicate endpoint url",
            "base.yaml:12)",
        ),
        (
            "clusters.main.endpoints: no endpoint has role primary",
            "base.yaml:9)",
        ),
        (
            "clusters.cache.engine: unknown engine \"cassandra\"",
            "base.yaml:14)",
        ),
        ("tiers.free", "tiers.yaml:3)"),
        ("default_tier: unknown tier \"platinum\"", "tiers.yaml:5)"),
        ("tenants.acme: unknown tier \"diamond\"", "tiers.yaml:6)"),
    ];
    for (what, file) in expect {
        let hit = text.iter().find(|t| t.starts_with(what));
        let hit = hit.unwrap_or_else(|| panic!("{what} missing in {text:#?}"));
        assert!(hit.ends_with(file), "{hit} should name {file}");
    }
    assert!(text.iter().any(|t| t.contains("tenant-{id}")), "{text:#?}");
    assert_eq!(problems.len(), expect.len(), "{text:#?}");
    // mongodb is a known engine: accepted by validation.
    assert!(
        !text.iter().any(|t| t.starts_with("clusters.docs")),
        "{text:#?}"
    );
}

#[test]
fn env_var_problems_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", BASE);
    std::env::set_var("SYTEST_ORIGIN__CLUSTERS__MAIN__STRATEGY", "fastest");
    let err = ConfigSource::new(dir.path(), "development")
        .env_prefix("SYTEST_ORIGIN__")
        .load()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("clusters.main"), "{text}");
    assert!(text.contains("fastest"), "{text}");
    assert!(
        text.contains("SYTEST_ORIGIN__CLUSTERS__MAIN__STRATEGY"),
        "{text}"
    );
}

#[test]
fn missing_base_and_unknown_environment() {
    let dir = tempfile::tempdir().unwrap();
    let err = ConfigSource::new(dir.path(), "prod").load().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no base.yaml"), "{text}");
    assert!(text.contains("unknown environment \"prod\""), "{text}");
}

#[test]
fn shipped_examples_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    for env in ["development", "testing"] {
        let s = ConfigSource::new(&dir, env)
            .load()
            .unwrap_or_else(|e| panic!("{env}: {e}"));
        assert_eq!(s.clusters.len(), 2);
        assert_eq!(s.tiers.len(), 4);
    }
    std::env::set_var("SWITCHYARD_PG_PASSWORD", "example");
    let s = ConfigSource::new(&dir, "staging").load().unwrap();
    assert!(!format!("{s:?}").contains("example@"));
    // Production reads mounted secret files, absent here: reported, not panicked.
    let err = ConfigSource::new(&dir, "production").load().unwrap_err();
    assert!(
        err.to_string()
            .contains("clusters.main.endpoints[0].password_file"),
        "{err}"
    );
}

#[test]
fn docker_compose_flavour_validates_all_five_engines() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        shipped.join("docker-compose.yaml"),
        dir.path().join("base.yaml"),
    )
    .unwrap();
    std::fs::copy(shipped.join("tiers.yaml"), dir.path().join("tiers.yaml")).unwrap();
    for var in [
        "SWITCHYARD_PG_PASSWORD",
        "SWITCHYARD_REDIS_PASSWORD",
        "SWITCHYARD_CLICKHOUSE_PASSWORD",
    ] {
        std::env::set_var(var, "switchyard");
    }
    let s = ConfigSource::new(dir.path(), "development")
        .env_prefix("SYTEST_COMPOSE__")
        .load()
        .unwrap();
    let engines: Vec<Engine> = s.clusters.values().map(|c| c.engine).collect();
    assert_eq!(s.clusters.len(), 5, "{engines:?}");
    assert_eq!(
        s.clusters["main"].endpoints[1].url.authority(),
        "127.0.0.1:5433"
    );
    assert_eq!(
        s.clusters["cache"].endpoints[0].url.expose(),
        "redis://:switchyard@127.0.0.1:6379/0"
    );
    assert!(!format!("{s:?}").contains(":switchyard@"));
}

#[test]
fn env_vars_address_one_item_of_a_list() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", BASE);
    // The staging file replaces main's list (figment replaces lists); the
    // variables address the list as merged from the files.
    write(
        dir.path(),
        "environments/staging.yaml",
        r#"
clusters:
  main:
    endpoints:
      - { name: pg-1, url: "postgres://app@127.0.0.1:5432/app", role: primary }
      - { name: pg-2, url: "postgres://app@127.0.0.1:5433/app", weight: 3 }
      - { name: pg-3, url: "postgres://app@127.0.0.1:5434/app", weight: 2 }
"#,
    );
    std::env::set_var(
        "SYTEST_INDEX__CLUSTERS__MAIN__ENDPOINTS__1__URL",
        "postgres://app@10.0.0.9:6543/app",
    );
    std::env::set_var("SYTEST_INDEX__CLUSTERS__MAIN__ENDPOINTS__2__WEIGHT", "9");
    std::env::set_var(
        "SYTEST_INDEX__CLUSTERS__CACHE__ENDPOINTS__0__ROLE",
        "replica",
    );
    std::env::set_var("SYTEST_INDEX__CLUSTERS__CACHE__WRITES", "false");
    std::env::set_var("SYTEST_INDEX__CLUSTERS__MAIN__STRATEGY", "round_robin");
    let s = ConfigSource::new(dir.path(), "staging")
        .env_prefix("SYTEST_INDEX__")
        .load()
        .unwrap();
    let main = &s.clusters["main"];
    let names: Vec<&str> = main.endpoints.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["pg-1", "pg-2", "pg-3"], "the other items stay");
    assert_eq!(
        main.endpoints[0].url.expose(),
        "postgres://app@127.0.0.1:5432/app"
    );
    assert_eq!(main.endpoints[0].role, Role::Primary);
    assert_eq!(
        main.endpoints[1].url.expose(),
        "postgres://app@10.0.0.9:6543/app",
        "the variable sets the second endpoint's url"
    );
    assert_eq!(main.endpoints[1].weight, 3, "and leaves its other fields");
    assert_eq!(main.endpoints[1].role, Role::Replica);
    assert_eq!(main.endpoints[2].weight, 9);
    assert_eq!(
        main.endpoints[2].url.expose(),
        "postgres://app@127.0.0.1:5434/app"
    );
    assert_eq!(main.router.strategy, StrategyKind::RoundRobin);
    let cache = &s.clusters["cache"].endpoints;
    assert_eq!(cache.len(), 1);
    assert_eq!(cache[0].role, Role::Replica);
    assert_eq!(cache[0].name, "r-1");

    // Without the staging file, the list has two items: index 2 is past its end.
    let err = ConfigSource::new(dir.path(), "development")
        .env_prefix("SYTEST_INDEX__")
        .load()
        .unwrap_err();
    let text: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "clusters.main.endpoints[2].weight: index 2 is past the end of the list (2 items) \
          (in environment variable SYTEST_INDEX__CLUSTERS__MAIN__ENDPOINTS__2__WEIGHT)"
        ],
    );
}

#[test]
fn env_var_list_problems_name_the_variable_and_file_items_their_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        &BASE.replace(
            "postgres://app@127.0.0.1:5433/app",
            "postgress://app@127.0.0.1:5433/app",
        ),
    );
    std::env::set_var(
        "SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__5__URL",
        "postgres://app@h:1/app",
    );
    std::env::set_var("SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__5__ROLE", "primary");
    std::env::set_var("SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__1__WEIGHT", "0");
    let err = ConfigSource::new(dir.path(), "development")
        .env_prefix("SYTEST_PAST__")
        .load()
        .unwrap_err();
    let text: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    let expect = [
        // Set by a variable: named by it.
        "clusters.main.endpoints[1].weight: 0 is outside 1..=1000 (in environment variable SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__1__WEIGHT)",
        // From the file, in an item the variables touched: still the file.
        "clusters.main.endpoints[1].url: unknown scheme \"postgress\"",
        "clusters.main.endpoints[5].role: index 5 is past the end of the list (2 items) (in environment variable SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__5__ROLE)",
        "clusters.main.endpoints[5].url: index 5 is past the end of the list (2 items) (in environment variable SYTEST_PAST__CLUSTERS__MAIN__ENDPOINTS__5__URL)",
    ];
    for want in expect {
        let hit = text.iter().find(|t| t.starts_with(want));
        assert!(hit.is_some(), "{want} missing in {text:#?}");
    }
    let url = text
        .iter()
        .find(|t| t.starts_with("clusters.main.endpoints[1].url"))
        .unwrap();
    assert!(url.ends_with("base.yaml:8)"), "{url}");
    assert_eq!(text.len(), expect.len(), "{text:#?}");
}

#[test]
fn queue_weights_and_orders_load_and_bad_ones_name_their_tier() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.yaml", BASE);
    write(
        dir.path(),
        "tiers.yaml",
        r#"
tiers:
  free: { isolation: row }
  gold: { isolation: schema, queue_weight: 4 }
  internal: { isolation: schema, name_template: "int_{id}", queue: fifo }
default_tier: free
"#,
    );
    let s = ConfigSource::new(dir.path(), "development").load().unwrap();
    let tiers = &s.tiers;
    assert_eq!(tiers["gold"].queue_weight.get(), 4);
    assert_eq!(tiers["free"].queue_weight.get(), 1);
    assert_eq!(tiers["internal"].queue, switchyard_core::QueueOrder::Fifo);

    write(
        dir.path(),
        "tiers.yaml",
        "tiers:\n  free: { isolation: row, queue_weight: 0 }\n  gold: { isolation: row, queue: sideways }\n",
    );
    let err = ConfigSource::new(dir.path(), "development")
        .load()
        .unwrap_err();
    let text: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("tiers.free") && t.contains("nonzero")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("tiers.gold") && t.contains("sideways")),
        "{text:#?}"
    );
}

#[test]
fn a_postgres_block_is_checked_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.yaml",
        r#"
clusters:
  main:
    engine: postgres
    postgres: { url: "postgres://elsewhere/db", affinty: { check: false } }
    endpoints:
      - { name: pg-1, url: "postgres://app@127.0.0.1:5432/app", role: primary }
  tiny:
    engine: postgres
    postgres: { tenant_pool_max_size: 0, reset_timeout: 0s }
    endpoints:
      - { name: pg-2, url: "postgres://app@127.0.0.1:5432/app", role: primary }
  cache:
    engine: redis
    postgres: { tenant_roles: true }
    endpoints:
      - { name: r-1, url: "redis://127.0.0.1:6379/0", role: primary }
"#,
    );
    let err = ConfigSource::new(dir.path(), "development")
        .load()
        .unwrap_err();
    let text: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
    for (what, says, line) in [
        (
            "clusters.main.postgres.url",
            "each endpoint's `url`",
            "base.yaml:5)",
        ),
        ("clusters.main.postgres", "affinty", "base.yaml:5)"),
        (
            "clusters.tiny.postgres.tenant_pool_max_size",
            "at least 1",
            "base.yaml:10)",
        ),
        (
            "clusters.tiny.postgres.reset_timeout",
            "greater than zero",
            "base.yaml:10)",
        ),
        (
            "clusters.cache.postgres",
            "a redis cluster takes no postgres block",
            "base.yaml:15)",
        ),
    ] {
        let hit = text
            .iter()
            .find(|t| t.starts_with(what) && t.contains(says))
            .unwrap_or_else(|| panic!("{what}: {says} missing in {text:#?}"));
        assert!(hit.ends_with(line), "{hit} should name {line}");
    }
    assert_eq!(text.len(), 5, "{text:#?}");
}
