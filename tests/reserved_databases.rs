#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A database tier never hands a tenant the shared database, the maintenance
//! database `postgres` or a template database.
//!
//! With database isolation a tenant's connection goes to the database its
//! tier's name template renders. A template such as `{id}` renders `postgres`
//! for tenant `postgres`, `app` (the database every schema and row tenant
//! shares) for tenant `app`, and `template{id}` renders `template1` for tenant
//! `1`. Such a configuration is a mistake, and it is refused when the cluster
//! is built, with a configuration error naming the database, before any tenant
//! gets a connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::router::source::{Member, Report, TopologySource, View};
use switchyard::router::EndpointConfig;
use switchyard::{Cluster, Error, Intent, Isolation, Role, TenantId, TenantRegistry, TierPolicy};
use switchyard_testkit::PgCluster;

/// The database the backend's URL names: every schema and row tenant shares it.
const SHARED: &str = "app";

/// (name template, tenant, the database it renders)
const CASES: [(&str, &str, &str); 6] = [
    ("{id}", SHARED, SHARED),
    ("{id}", "postgres", "postgres"),
    ("{id}", "template1", "template1"),
    ("{id}", "template0", "template0"),
    ("template{id}", "1", "template1"),
    ("{id}gres", "post", "postgres"),
];

fn tier(template: &str) -> TierPolicy {
    TierPolicy::new(Isolation::Database).with_name_template(template.parse().unwrap())
}

fn cluster(url: &str, tenants: TenantRegistry) -> Result<Cluster<PgBackend>, Error> {
    let backend = PgBackend::new(PgBackendConfig::new("pg-0", url))?;
    Cluster::builder("reserved")
        .engine("postgres")
        .tenants(tenants)
        .endpoint(Arc::new(backend), EndpointConfig::new(Role::Primary))
        .build()
}

/// What a refusal must look like: a configuration error that names what to
/// fix (the template, or the database it renders), not a failure of the engine.
fn refusal(err: &Error, names: &[&str]) -> Result<(), String> {
    let engine = matches!(
        err,
        Error::Backend { .. }
            | Error::Timeout { .. }
            | Error::TenantNotProvisioned { .. }
            | Error::NoHealthyEndpoint { .. }
            | Error::NoPrimary { .. }
    );
    let text = err.to_string();
    if engine || !names.iter().any(|name| text.contains(name)) {
        return Err(format!(
            "refused, but not as a configuration error naming any of {names:?}: {err}"
        ));
    }
    Ok(())
}

/// What happened when a tenant of a misconfigured cluster asked for a
/// connection (the cluster should not have been built).
async fn served(cluster: &Cluster<PgBackend>, tenant: &str) -> String {
    let tenant = TenantId::new(tenant).unwrap();
    let checkout = tokio::time::timeout(
        Duration::from_secs(10),
        cluster.checkout(Intent::Write, Some(&tenant)),
    )
    .await;
    match checkout {
        Err(_) => "its checkout hung".into(),
        Ok(Err(e)) => format!("its checkout failed at run time: {e}"),
        Ok(Ok(mut conn)) => {
            let db: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            format!("tenant {tenant} was served a session on database {db:?}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_tiers_that_render_reserved_databases_are_refused_at_build() {
    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let mut admin = PgConnection::connect(pg.primary().url()).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {SHARED}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{SHARED}",
        pg.primary().port()
    );

    let mut failures = Vec::new();
    for (template, tenant, database) in CASES {
        // The tenant assigned by name: the mistake is visible in the registry.
        let assigned = TenantRegistry::new()
            .with_tier("dedicated", tier(template))
            .with_tenant(TenantId::new(tenant).unwrap(), "dedicated");
        let case = format!("template {template:?}, tenant {tenant:?} -> {database:?}");
        match cluster(&url, assigned) {
            Err(e) => {
                eprintln!("refused: {case}: {e}");
                if let Err(why) = refusal(&e, &[template, database]) {
                    failures.push(format!("{case}: {why}"));
                }
            }
            Ok(cluster) => failures.push(format!(
                "{case}: the cluster was built; {}",
                served(&cluster, tenant).await
            )),
        }
    }

    // A default tier can render any tenant's name, so the tenant is not known
    // when the cluster is built: either the template is refused then, or the
    // tenant is refused (typed, not an engine failure) when it asks.
    let open = TenantRegistry::new()
        .with_tier("dedicated", tier("{id}"))
        .with_default_tier("dedicated");
    match cluster(&url, open) {
        Err(e) => eprintln!("refused: default tier {{id}}: {e}"),
        Ok(cluster) => {
            // Ready to serve: an unscoped checkout works.
            drop(cluster.checkout(Intent::Write, None).await.unwrap());
            for tenant in ["postgres", SHARED, "template1"] {
                let id = TenantId::new(tenant).unwrap();
                match cluster.checkout(Intent::Write, Some(&id)).await {
                    Ok(_) => failures.push(format!(
                        "default tier {{id}}: {}",
                        served(&cluster, tenant).await
                    )),
                    Err(e) => {
                        eprintln!("refused at checkout: default tier {{id}}, {tenant}: {e}");
                        if let Err(why) = refusal(&e, &["{id}", tenant]) {
                            failures.push(format!("default tier {{id}}, {tenant}: {why}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Names one member once, then nothing new.
struct Once(Option<Member>);

impl TopologySource for Once {
    fn describe(&self) -> String {
        "once".into()
    }

    fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        let member = self.0.take();
        Box::pin(async move {
            match member {
                Some(member) => Report::View(View::new(vec![member])),
                None => std::future::pending().await,
            }
        })
    }
}

/// An endpoint a topology source adds meets the checks an endpoint given to
/// the builder meets: a cluster built with no endpoints (so nothing refused
/// the tier yet) does not take in a member whose engine refuses the tier, and
/// says so in its source status and in the wait for the first view, instead
/// of handing tenant `postgres` the maintenance database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_a_topology_source_adds_meets_the_tier_checks() {
    let pg = PgCluster::start(0).await.unwrap_or_else(|e| panic!("{e}"));
    let port = pg.primary().port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let tenants = TenantRegistry::new()
        .with_tier("dedicated", tier("{id}"))
        .with_tenant(TenantId::new("postgres").unwrap(), "dedicated");
    let cluster: Cluster<PgBackend> = Cluster::builder("followed")
        .engine("postgres")
        .tenants(tenants)
        .build()
        .unwrap();
    let member = Member::new("pg-0", "127.0.0.1", port, Role::Primary);
    let ready = cluster
        .follow(Once(Some(member)), move |m: &Member| {
            let config = PgBackendConfig::new(m.name.as_str(), url.as_str());
            Ok(Arc::new(PgBackend::new(config)?))
        })
        .ready(Duration::from_secs(10))
        .await;
    // Nothing to serve with: the wait for the first view says so and why.
    let err = ready.expect_err("ready with every member refused");
    assert!(
        err.reason.contains("pg-0") && err.reason.contains("{id}"),
        "not naming the member and the tier: {err}"
    );
    let status = cluster.status();
    assert!(
        status.endpoints.is_empty(),
        "the member was taken in; {}",
        served(&cluster, "postgres").await
    );
    let refused = status.source.unwrap().refused;
    let why = refused.iter().find(|(id, _)| id.as_str() == "pg-0");
    let why = why.map(|(_, why)| why.as_str()).unwrap_or_default();
    assert!(
        why.contains("{id}"),
        "not refused naming the tier: {refused:?}"
    );
}
