#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant checkouts through the router are scoped by the real PostgreSQL
//! backend: schema isolation (`search_path`) and row isolation (RLS on a
//! session setting), on the primary for writes and the standby for reads.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_ready, Timeline};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use switchyard_core::{
    Intent, Isolation, PoolSettings, Role, TenantId, TenantRegistry, TierPolicy,
};
use switchyard_postgres::{enable_row_level_security, PgBackend, PgBackendConfig};
use switchyard_router::{Cluster, ClusterConfig, EndpointConfig};
use switchyard_testkit::PgCluster;

const SCHEMA_TENANTS: [&str; 2] = ["alpha", "bravo"];
const ROW_TENANTS: [&str; 2] = ["charlie", "delta"];
const TASKS: usize = 8;
const ROUNDS: usize = 50;

async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn exec(conn: &mut PgConnection, sql: String) {
    sqlx::raw_sql(AssertSqlSafe(sql.clone()))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Role `app` (not a superuser: RLS binds it), database `app`, a schema per
/// schema tenant and one RLS table for the row tenants, each holding a marker
/// row per tenant; plus a decoy row no tenant may see.
async fn provision(pg: &PgCluster) -> String {
    let mut admin = connect(pg.primary().url()).await;
    exec(
        &mut admin,
        "CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS".into(),
    )
    .await;
    exec(&mut admin, "CREATE DATABASE app OWNER app".into()).await;
    let url = format!("postgres://app@127.0.0.1:{}/app", pg.primary().port());
    let mut app = connect(&url).await;
    for t in SCHEMA_TENANTS {
        exec(
            &mut app,
            format!(
                "CREATE SCHEMA tenant_{t}; \
                 CREATE TABLE tenant_{t}.items (tenant text NOT NULL, val text NOT NULL); \
                 INSERT INTO tenant_{t}.items VALUES ('{t}', 'marker-{t}')"
            ),
        )
        .await;
    }
    exec(
        &mut app,
        "CREATE TABLE public.items (tenant text NOT NULL, val text NOT NULL); \
         INSERT INTO public.items VALUES ('charlie', 'marker-charlie'), \
         ('delta', 'marker-delta'), ('nobody', 'decoy')"
            .into(),
    )
    .await;
    enable_row_level_security(&mut app, "public.items", "tenant", "app.tenant_id")
        .await
        .unwrap();
    pg.wait_replayed(&pg.standbys()[0], Duration::from_secs(10))
        .await
        .unwrap();
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_checkouts_through_the_router_see_only_their_own_rows() {
    let tl = Timeline::new("tenancy through the router");
    let pg = PgCluster::start(1).await.unwrap_or_else(|e| panic!("{e}"));
    provision(&pg).await;
    tl.mark(format!(
        "real PostgreSQL primary {} + standby {}, as role app (RLS applies)",
        pg.primary().addr(),
        pg.standbys()[0].addr()
    ));

    let mut tenants = TenantRegistry::new()
        .with_tier(
            "schema",
            TierPolicy::new(Isolation::Schema).with_max_connections(4),
        )
        .with_tier(
            "row",
            TierPolicy::new(Isolation::Row).with_max_connections(4),
        );
    for t in SCHEMA_TENANTS {
        tenants = tenants.with_tenant(TenantId::new(t).unwrap(), "schema");
    }
    for t in ROW_TENANTS {
        tenants = tenants.with_tenant(TenantId::new(t).unwrap(), "row");
    }
    let mut builder = Cluster::builder("tenancy")
        .engine("postgres")
        .config(ClusterConfig::default())
        .tenants(tenants);
    for (i, node) in pg.nodes().iter().enumerate() {
        let url = format!("postgres://app@127.0.0.1:{}/app", node.port());
        let mut config = PgBackendConfig::new(format!("pg-{i}"), url);
        config.pool = PoolSettings::default().with_max_size(6);
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(
            Arc::new(PgBackend::new(config).unwrap()),
            EndpointConfig::new(role),
        );
    }
    let cluster = builder.build().unwrap();
    wait_ready(&cluster, "pg-0").await;

    let all: Vec<TenantId> = SCHEMA_TENANTS
        .iter()
        .chain(ROW_TENANTS.iter())
        .map(|t| TenantId::new(t).unwrap())
        .collect();
    let served: Arc<Mutex<BTreeMap<(String, String), usize>>> = Arc::default();
    let started = tl.mark(format!(
        "{TASKS} tasks x {ROUNDS} tenant checkouts (every 5th a write)"
    ));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (cluster, all, served) = (cluster.clone(), all.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let tenant = &all[(task + round) % all.len()];
                let intent = if round % 5 == 0 {
                    Intent::Write
                } else {
                    Intent::Read
                };
                let mut conn = cluster.checkout(intent, Some(tenant)).await.unwrap();
                assert_eq!(conn.tenant(), Some(tenant));
                if intent == Intent::Write {
                    sqlx::query("INSERT INTO items (tenant, val) VALUES ($1, $2)")
                        .bind(tenant.as_str())
                        .bind(format!("w-{task}-{round}"))
                        .execute(&mut *conn)
                        .await
                        .unwrap_or_else(|e| panic!("{tenant} write on {}: {e}", conn.endpoint()));
                }
                // The same text for every tenant, so one cached statement
                // serves them all: the scope alone decides what it reads.
                let rows: Vec<(String, String)> = sqlx::query_as("SELECT tenant, val FROM items")
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap_or_else(|e| panic!("{tenant} read on {}: {e}", conn.endpoint()));
                let leaked: Vec<&(String, String)> =
                    rows.iter().filter(|(t, _)| t != tenant.as_str()).collect();
                assert!(
                    leaked.is_empty(),
                    "{tenant} on {} saw {leaked:?}",
                    conn.endpoint()
                );
                let marker = format!("marker-{tenant}");
                assert!(
                    rows.iter().any(|(_, v)| *v == marker),
                    "{tenant} missed its own rows"
                );
                let key = (conn.endpoint().to_string(), format!("{intent}"));
                *served.lock().unwrap().entry(key).or_default() += 1;
                drop(conn);
                if round % 7 == 3 {
                    // A connection that served a tenant comes back unscoped.
                    let mut bare = cluster.checkout(Intent::Read, None).await.unwrap();
                    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
                        .fetch_one(&mut *bare)
                        .await
                        .unwrap();
                    assert_eq!(
                        n,
                        0,
                        "an unscoped checkout on {} saw tenant rows",
                        bare.endpoint()
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tl.mark(format!(
        "{} tenant checkouts in {} ms, 0 leaks; by endpoint and intent: {:?}",
        TASKS * ROUNDS,
        started.elapsed().as_millis(),
        served.lock().unwrap()
    ));

    // Every write landed in its own tenant's place, on the primary.
    let mut admin = connect(&format!(
        "postgres://postgres@127.0.0.1:{}/app",
        pg.primary().port()
    ))
    .await;
    let writes_per_tenant = TASKS * ROUNDS / 5 / all.len();
    for t in SCHEMA_TENANTS {
        let (mine, others): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE tenant = '{t}'), count(*) FILTER (WHERE tenant <> '{t}') \
             FROM tenant_{t}.items"
        )))
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(
            (mine, others),
            (1 + writes_per_tenant as i64, 0),
            "tenant_{t}.items"
        );
    }
    let by_tenant: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant, count(*) FROM public.items GROUP BY tenant ORDER BY tenant")
            .fetch_all(&mut admin)
            .await
            .unwrap();
    let expected: Vec<(String, i64)> = vec![
        ("charlie".into(), 1 + writes_per_tenant as i64),
        ("delta".into(), 1 + writes_per_tenant as i64),
        ("nobody".into(), 1),
    ];
    assert_eq!(by_tenant, expected, "public.items");
    let reads: usize = served
        .lock()
        .unwrap()
        .iter()
        .filter(|((ep, intent), _)| ep == "pg-1" && intent == "read")
        .map(|(_, n)| n)
        .sum();
    assert!(reads > 0, "no tenant read went to the standby");
}

/// A tier whose template can render a reserved namespace is refused by the
/// router wherever tiers or backends change: when the cluster is built, when
/// its tenants are replaced, and when an endpoint is added. Nothing connects.
#[tokio::test]
async fn reserved_templates_are_refused_when_the_cluster_changes() {
    let backend = |name: &str| {
        Arc::new(
            PgBackend::new(PgBackendConfig::new(name, "postgres://app@127.0.0.1:1/app")).unwrap(),
        )
    };
    let bare = || {
        TenantRegistry::new().with_tier(
            "bare",
            TierPolicy::new(Isolation::Database)
                .with_name_template(switchyard_core::NameTemplate::new("{id}").unwrap()),
        )
    };
    let err = Cluster::builder("reserved")
        .tenants(bare())
        .endpoint(backend("pg-1"), EndpointConfig::new(Role::Primary))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("tiers.bare.name_template"),
        "{err}"
    );
    assert!(err.to_string().contains("postgres"), "{err}");

    let cluster = Cluster::builder("reserved")
        .tenants(TenantRegistry::new().with_tier("ok", TierPolicy::new(Isolation::Database)))
        .endpoint(backend("pg-1"), EndpointConfig::new(Role::Primary))
        .build()
        .unwrap();
    let err = cluster.set_tenants(bare()).unwrap_err();
    assert!(
        err.to_string().contains("tiers.bare.name_template"),
        "{err}"
    );
    cluster
        .add_endpoint(backend("pg-2"), EndpointConfig::new(Role::Replica))
        .unwrap();
}
