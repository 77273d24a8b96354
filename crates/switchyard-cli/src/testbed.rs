//! `switchyard testbed`: the PostgreSQL and Redis engines a configuration
//! names, started on loopback at the ports of its URLs, until Ctrl-C. With it,
//! `config/` works as shipped: `check` and `watch` find every endpoint up.

use std::path::Path;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use switchyard_config::{ClusterSettings, ConfigSource, Engine, Settings};
use switchyard_core::{Role, SecretUrl};
use switchyard_postgres::quote_ident;
use switchyard_testkit::{PgCluster, RedisCluster};

type DynError = Box<dyn std::error::Error + Send + Sync>;

/// What the test bed runs; dropping it stops every server.
#[derive(Default)]
struct Running {
    _postgres: Vec<PgCluster>,
    _redis: Vec<RedisCluster>,
    clusters: usize,
}

/// Starts the engines, prints them, and waits for Ctrl-C or SIGTERM. Exit
/// codes: 0 after a clean stop, 1 when an engine could not start, 2 for an
/// invalid configuration.
pub async fn run(config: &Path, env: &str) -> u8 {
    let settings = match ConfigSource::new(config, env).load() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("switchyard testbed: {e}");
            return 2;
        }
    };
    let running = match start(&settings).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("switchyard testbed: {e}");
            return 1;
        }
    };
    println!(
        "ready: {} cluster(s) up; try `switchyard check --config {} --env {env}`. Ctrl-C stops them.",
        running.clusters,
        config.display()
    );
    stopped().await;
    println!("stopping");
    drop(running);
    0
}

async fn start(settings: &Settings) -> Result<Running, DynError> {
    let mut running = Running::default();
    let mut rows = Vec::new();
    for (name, cluster) in &settings.clusters {
        let (ports, order) = ports(name, cluster)?;
        match cluster.engine {
            Engine::Postgres => {
                let pg = PgCluster::start_on(&ports).await?;
                create_roles(&pg, cluster).await?;
                running._postgres.push(pg);
            }
            Engine::Redis => running._redis.push(RedisCluster::start_on(&ports).await?),
            other => {
                println!(
                    "clusters.{name}: {} is not started by the test bed (docker-compose.yml has it)",
                    other.as_str()
                );
                continue;
            }
        }
        running.clusters += 1;
        for (i, &ep) in order.iter().enumerate() {
            let endpoint = &cluster.endpoints[ep];
            rows.push(vec![
                name.clone(),
                endpoint.name.clone(),
                cluster.engine.as_str().to_owned(),
                format!("127.0.0.1:{}", ports[i]),
                if i == 0 { "primary" } else { "replica" }.to_owned(),
            ]);
        }
    }
    print!(
        "{}",
        crate::table::render(&["CLUSTER", "ENDPOINT", "ENGINE", "ADDRESS", "ROLE"], &rows)
    );
    Ok(running)
}

/// The loopback ports of a cluster's endpoints, the primary's first, and the
/// endpoints' indexes in that order.
fn ports(name: &str, cluster: &ClusterSettings) -> Result<(Vec<u16>, Vec<usize>), DynError> {
    let mut order: Vec<usize> = (0..cluster.endpoints.len()).collect();
    // The configured primary first (a stable sort keeps the others in order).
    order.sort_by_key(|&i| cluster.endpoints[i].role != Role::Primary);
    let mut ports = Vec::new();
    for &i in &order {
        let url = &cluster.endpoints[i].url;
        let parsed = url::Url::parse(url.expose())
            .map_err(|e| format!("clusters.{name}.endpoints[{i}].url: {e}"))?;
        let host = parsed.host_str().unwrap_or_default();
        if !["127.0.0.1", "localhost", "[::1]"].contains(&host) {
            return Err(format!(
                "clusters.{name}.endpoints[{i}].url: {url} is not on loopback; the test bed starts engines on 127.0.0.1 only"
            )
            .into());
        }
        let default = match cluster.engine {
            Engine::Postgres => 5432,
            _ => 6379,
        };
        ports.push(parsed.port().unwrap_or(default));
    }
    Ok((ports, order))
}

/// Every role and database the cluster's URLs log in as, created on the
/// primary (the standbys replicate them). The test bed trusts loopback, so
/// no password is set.
async fn create_roles(pg: &PgCluster, cluster: &ClusterSettings) -> Result<(), DynError> {
    let mut admin = PgConnection::connect(pg.primary().url()).await?;
    for endpoint in &cluster.endpoints {
        let (user, database) = login(&endpoint.url)?;
        if user != "postgres" {
            let create = format!("CREATE ROLE {} LOGIN", quote_ident(&user));
            ensure(&mut admin, "pg_roles WHERE rolname", &user, create).await?;
        }
        let create = format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(&database),
            quote_ident(&user)
        );
        ensure(&mut admin, "pg_database WHERE datname", &database, create).await?;
    }
    for standby in pg.standbys() {
        pg.wait_replayed(standby, std::time::Duration::from_secs(15))
            .await?;
    }
    Ok(())
}

/// Runs `create` unless `SELECT FROM {catalog} = name` finds a row.
async fn ensure(
    admin: &mut PgConnection,
    catalog: &'static str,
    name: &str,
    create: String,
) -> Result<(), DynError> {
    let exists: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT FROM {catalog} = $1)"
    )))
    .bind(name)
    .fetch_one(&mut *admin)
    .await?;
    if !exists {
        sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&mut *admin)
            .await?;
    }
    Ok(())
}

/// The user and database a PostgreSQL URL logs in as (libpq's defaults: the
/// user `postgres` when none is given, the database named like the user).
fn login(url: &SecretUrl) -> Result<(String, String), DynError> {
    let parsed = url::Url::parse(url.expose()).map_err(|e| format!("{url}: {e}"))?;
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        u => switchyard_core::percent_decode(u),
    };
    let database = match parsed.path().trim_start_matches('/') {
        "" => user.clone(),
        d => switchyard_core::percent_decode(d),
    };
    Ok((user, database))
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
