//! A real `PING` through switchyard next to a raw deadpool-redis pool, against
//! the testkit's Redis (one master, started by the bench).
//!
//! Rows of one group run at the same concurrency (1 or 64 tasks); the time is
//! wall time per checkout + `PING` + release, the inverse of throughput. Every
//! pool, raw or not, has 16 connections.
//!
//! - `raw_deadpool_redis`: `Pool::get` + `PING` on a separate pool of the same size;
//! - `backend/unscoped`: core `Checkout::acquire` on a `RedisBackend` (no router);
//! - `cluster/unscoped`: `Cluster::checkout` over that backend as the only primary;
//! - `cluster/schema`: key-prefix isolation (no round trip at checkout);
//! - `cluster/row`: ACL isolation (`AUTH` as the tenant's user at checkout).
//!
//! The Redis backend has no tenant affinity stash, so there is no
//! affinity on/off pair here (see the postgres bench).
//!
//! `redis_tls/{plaintext,tls}`: unscoped `Cluster::checkout` + `PING` on one
//! server, over its plaintext and its TLS port: TLS's cost per checkout with
//! connections reused.
//!
//! `cargo bench --bench redis`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::redis::RedisBackendConfig;
use switchyard::redis::{provision_acl_users, RedisBackend, StaticPasswords};
use switchyard::router::EndpointConfig;
use switchyard::{Checkout, CheckoutRequest, Cluster, PoolSettings, Role, TlsSettings};
use switchyard_testkit::{RedisCluster, TestCa};

/// Connections in every pool compared here.
const POOL_SIZE: u32 = 16;
async fn ping(mut conn: Checkout<RedisBackend>) {
    conn.ping().await.unwrap();
    black_box(&conn);
}

fn redis(c: &mut Criterion) {
    let rt = common::runtime();
    let server = rt
        .block_on(RedisCluster::start(0))
        .expect("redis (testkit)");
    let url = server.master().url();
    println!("redis bench against {url}");

    let schema_ids = common::tenant_ids("s");
    let row_ids = common::tenant_ids("r");
    let (raw, backend, cluster) = rt.block_on(async {
        let mut config = deadpool_redis::Config::from_url(url.clone());
        config.pool = Some(deadpool_redis::PoolConfig::new(POOL_SIZE as usize));
        let raw = config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("raw pool");

        let registry = common::tenants();
        let passwords = StaticPasswords::generate(row_ids.iter()).expect("passwords");
        let backend = Arc::new(
            RedisBackend::builder("redis-master", url.as_str())
                .max_size(POOL_SIZE)
                .acl_passwords(passwords.clone())
                .build()
                .expect("redis backend"),
        );
        let scopes: Vec<_> = row_ids
            .iter()
            .map(|id| Arc::clone(registry.resolve(id).unwrap().scope()))
            .collect();
        let mut admin = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(common::CHECKOUT_TIMEOUT),
        )
        .await
        .expect("admin checkout");
        provision_acl_users(&mut admin, scopes.iter().map(|s| &**s), &passwords)
            .await
            .expect("acl users");
        drop(admin);

        let cluster = Cluster::builder("bench-redis")
            .engine("redis")
            .tenants(registry)
            .endpoint(Arc::clone(&backend), EndpointConfig::new(Role::Primary))
            .build()
            .expect("cluster");
        (raw, backend, cluster)
    });

    for tasks in [1, 64] {
        let mut group = c.benchmark_group(format!("redis/{tasks}_tasks"));
        group.bench_function("raw_deadpool_redis", |b| {
            b.iter_custom(|iters| {
                let pool = raw.clone();
                common::concurrent(&rt, iters, tasks, move |_| {
                    let pool = pool.clone();
                    async move {
                        let mut conn = pool.get().await.unwrap();
                        let pong: String = deadpool_redis::redis::cmd("PING")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        black_box(pong);
                    }
                })
            });
        });
        common::backend_row(&mut group, &rt, tasks, &backend, ping);
        common::cluster_row(
            &mut group,
            &rt,
            tasks,
            "cluster/unscoped",
            &cluster,
            None,
            ping,
        );
        for (name, ids) in [("cluster/schema", &schema_ids), ("cluster/row", &row_ids)] {
            common::cluster_row(&mut group, &rt, tasks, name, &cluster, Some(ids), ping);
        }
        group.finish();
    }
    rt.block_on(async move {
        drop((cluster, backend));
        raw.close();
    });
    drop(server);
}

/// `Cluster::checkout` + `PING` on one server, over its plaintext port and
/// over its TLS port (verified, client certificate): what TLS costs per
/// checkout when connections are reused.
fn redis_tls(c: &mut Criterion) {
    let rt = common::runtime();
    let ca = TestCa::generate().expect("test CA");
    let server = rt
        .block_on(RedisCluster::start_tls(0, &ca))
        .expect("redis with TLS (testkit)");
    let tls = TlsSettings::with_ca_file(ca.ca_file())
        .client_cert(ca.client_cert_file(), ca.client_key_file());
    let clusters = rt.block_on(async {
        let build = |name: &str, url: String, tls: Option<TlsSettings>| {
            let mut config = RedisBackendConfig::new(name.to_owned(), url);
            config.pool = PoolSettings::default().with_max_size(POOL_SIZE);
            config.tls = tls;
            let backend = Arc::new(RedisBackend::new(config).expect("redis backend"));
            Cluster::builder(format!("bench-{name}"))
                .engine("redis")
                .endpoint(backend, EndpointConfig::new(Role::Primary))
                .build()
                .expect("cluster")
        };
        [
            (
                "plaintext",
                build("redis-plaintext", server.master().url(), None),
            ),
            (
                "tls",
                build(
                    "redis-tls",
                    server.master().tls_url().expect("tls url"),
                    Some(tls),
                ),
            ),
        ]
    });
    for tasks in [1, 64] {
        let mut group = c.benchmark_group(format!("redis_tls/{tasks}_tasks"));
        for (name, cluster) in &clusters {
            common::cluster_row(&mut group, &rt, tasks, name, cluster, None, ping);
        }
        group.finish();
    }
    rt.block_on(async move { drop(clusters) });
    drop(server);
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = redis, redis_tls
}
criterion_main!(benches);
