//! Quickstart: start a local PostgreSQL primary and standby (the test bed), put a
//! switchyard cluster in front of them, and check out connections through the
//! router: a tenant-scoped write, reads on the standby, and reads that survive the
//! standby being killed.
//!
//! Run with `scripts/demo` (installs PostgreSQL first if needed) or
//! `cargo run --example quickstart`.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::router::config::{EndpointConfig, HealthConfig};
use switchyard::router::ClusterStatus;
use switchyard::{
    Cluster, ClusterConfig, Intent, Isolation, Role, TenantId, TenantRegistry, TierPolicy,
};
use switchyard_testkit::PgCluster;

#[tokio::main]
async fn main() -> Result<(), Box<dyn StdError>> {
    let started = Instant::now();
    let pg = PgCluster::start(1).await?;
    println!(
        "test bed: PostgreSQL primary {} + standby {} up in {} ms",
        pg.primary().addr(),
        pg.standbys()[0].addr(),
        started.elapsed().as_millis()
    );

    // One backend per endpoint (construction never touches the network), one
    // cluster in front of them. Roles given here are only a first guess: probes
    // learn the real ones.
    let primary = Arc::new(PgBackend::new(PgBackendConfig::new(
        "pg-primary",
        pg.primary().url(),
    ))?);
    let standby = Arc::new(PgBackend::new(PgBackendConfig::new(
        "pg-standby",
        pg.standbys()[0].url(),
    ))?);
    let config = ClusterConfig {
        health: HealthConfig {
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(200),
            ..HealthConfig::default()
        },
        ..ClusterConfig::default()
    };
    let tenants = TenantRegistry::new()
        .with_tier(
            "standard",
            TierPolicy::new(Isolation::Schema).with_max_connections(4),
        )
        .with_default_tier("standard");
    let cluster = Cluster::builder("main")
        .engine("postgres")
        .config(config)
        .tenants(tenants)
        .endpoint(primary.clone(), EndpointConfig::new(Role::Primary))
        .endpoint(standby, EndpointConfig::new(Role::Replica))
        .build()?;

    // The tenant's schema, provisioned as an operator would.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(pg.primary().url()).await?;
    for ddl in [
        "CREATE SCHEMA IF NOT EXISTS tenant_acme",
        "CREATE TABLE IF NOT EXISTS tenant_acme.notes (body text)",
    ] {
        sqlx::query(ddl).execute(&mut admin).await?;
    }
    let acme = TenantId::new("acme")?;

    // A write goes to the primary, with search_path confined to acme's schema.
    let mut conn = cluster.checkout(Intent::Write, Some(&acme)).await?;
    sqlx::query("INSERT INTO notes VALUES ('hello from acme')")
        .execute(&mut *conn)
        .await?;
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&mut *conn)
        .await?;
    println!(
        "write as {acme} on {} (search_path {search_path})",
        conn.endpoint()
    );
    drop(conn);
    pg.wait_replayed(&pg.standbys()[0], Duration::from_secs(5))
        .await?;

    // A read goes to the standby and sees the replicated row.
    let mut conn = cluster.checkout(Intent::Read, Some(&acme)).await?;
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut *conn)
        .await?;
    println!("read  as {acme} on {}: {notes} note(s)", conn.endpoint());
    drop(conn);

    // Kill the standby: reads keep working, served by the primary.
    pg.standbys()[0].kill().await?;
    let killed = Instant::now();
    let mut served = Vec::new();
    for _ in 0..20 {
        let conn = cluster.checkout(Intent::Read, None).await?;
        served.push(conn.endpoint().to_string());
    }
    println!(
        "standby killed: 20/20 reads served ({} by pg-primary) in {} ms",
        served.iter().filter(|e| *e == "pg-primary").count(),
        killed.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    print_status(&cluster.status());

    // Bad tenant ids never reach the database.
    let bad = "acme'; DROP SCHEMA tenant_acme; --";
    if let Err(rejected) = TenantId::new(bad) {
        println!("tenant id {bad:?} -> {rejected}");
    }
    Ok(())
}

fn print_status(status: &ClusterStatus) {
    println!(
        "{:<11} {:<8} {:<8} {:>9} {:>10}",
        "endpoint", "role", "health", "in-flight", "latency"
    );
    for e in &status.endpoints {
        println!(
            "{:<11} {:<8} {:<8} {:>9} {:>10.1?}",
            e.id.to_string(),
            e.role.to_string(),
            e.health.to_string(),
            e.in_flight,
            e.latency
        );
    }
}
