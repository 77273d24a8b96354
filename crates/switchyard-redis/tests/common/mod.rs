//! Helpers shared by the Redis engine tests: a real server from the test bed,
//! direct connections for checking what the server holds, and a tenant setup
//! with every isolation level.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    Checkout, CheckoutRequest, Isolation, TenantEntry, TenantId, TenantRegistry, TierPolicy,
};
use switchyard_redis::redis::{self, aio::MultiplexedConnection};
use switchyard_redis::{provision_acl_users, RedisBackend, RedisBackendBuilder, StaticPasswords};
use switchyard_testkit::{RedisCluster, RedisNode};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts a master with `replicas` replicas and says where.
pub async fn cluster(replicas: usize) -> RedisCluster {
    let cluster = RedisCluster::start(replicas)
        .await
        .expect("the test bed starts redis-server (apt-get install -y redis-server)");
    let version = cluster.master().role().await.unwrap();
    println!(
        "redis master at {} ({version}), {} replica(s)",
        cluster.master().url(),
        cluster.replicas().len()
    );
    cluster
}

/// A plain connection to `node` as the default user, outside any pool.
pub async fn direct(node: &RedisNode) -> MultiplexedConnection {
    direct_url(&node.url()).await
}

/// A plain connection to `url`, outside any pool.
pub async fn direct_url(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(TIMEOUT))
        .set_connection_timeout(Some(TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Runs one command on `conn`.
pub async fn run<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(conn).await.unwrap()
}

pub fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

/// Tenants on every isolation level: `d*` own a logical database, `p*` a key
/// prefix, `a*` an ACL user.
pub struct Tenants {
    pub registry: TenantRegistry,
    pub database: Vec<TenantId>,
    pub prefix: Vec<TenantId>,
    pub acl: Vec<TenantId>,
    pub passwords: StaticPasswords,
}

impl Tenants {
    pub fn new(per_level: usize, max_connections: Option<u32>) -> Self {
        let policy = |isolation| {
            let p = TierPolicy::new(isolation);
            match max_connections {
                Some(n) => p.with_max_connections(n),
                None => p,
            }
        };
        let mut registry = TenantRegistry::new()
            .with_tier("db", policy(Isolation::Database))
            .with_tier("prefix", policy(Isolation::Schema))
            .with_tier("acl", policy(Isolation::Row));
        let ids = |p: &str| {
            (0..per_level)
                .map(|i| tenant(&format!("{p}{i}")))
                .collect::<Vec<_>>()
        };
        let (database, prefix, acl) = (ids("d"), ids("p"), ids("a"));
        for t in &database {
            registry = registry.with_tenant(t.clone(), "db");
        }
        for t in &prefix {
            registry = registry.with_tenant(t.clone(), "prefix");
        }
        for t in &acl {
            registry = registry.with_tenant(t.clone(), "acl");
        }
        let passwords = StaticPasswords::generate(&acl).unwrap();
        Self {
            registry,
            database,
            prefix,
            acl,
            passwords,
        }
    }

    pub fn all(&self) -> Vec<TenantId> {
        self.database
            .iter()
            .chain(&self.prefix)
            .chain(&self.acl)
            .cloned()
            .collect()
    }

    pub fn entry(&self, t: &TenantId) -> Arc<TenantEntry> {
        self.registry.resolve(t).unwrap()
    }

    /// A builder for `url` that knows these tenants' databases (1, 2, ...) and passwords.
    pub fn backend(&self, name: &str, url: &str) -> RedisBackendBuilder {
        let mut b = RedisBackend::builder(name, url).acl_passwords(self.passwords.clone());
        for (i, t) in self.database.iter().enumerate() {
            b = b.database(format!("tenant_{t}"), u8::try_from(i + 1).unwrap());
        }
        b
    }

    /// Creates the ACL users and gives every tenant an `owner` key holding its
    /// id; the default database's `owner` is `unscoped`.
    pub async fn seed(&self, backend: &Arc<RedisBackend>) {
        let mut admin = unscoped(backend).await;
        let scopes: Vec<_> = self
            .acl
            .iter()
            .map(|t| self.entry(t).scope().clone())
            .collect();
        let n = provision_acl_users(&mut admin, scopes.iter().map(|s| &**s), &self.passwords)
            .await
            .unwrap();
        assert_eq!(n, self.acl.len());
        let mut raw = admin.raw().unwrap();
        let _: () = redis::cmd("SET")
            .arg("owner")
            .arg("unscoped")
            .query_async(&mut raw)
            .await
            .unwrap();
        drop(admin);
        for t in self.all() {
            let mut conn = scoped(backend, &self.entry(&t)).await;
            conn.set("owner", t.as_str()).await.unwrap();
        }
    }
}

pub async fn unscoped(backend: &Arc<RedisBackend>) -> Checkout<RedisBackend> {
    Checkout::acquire(backend, CheckoutRequest::with_timeout(TIMEOUT))
        .await
        .unwrap()
}

pub async fn scoped(backend: &Arc<RedisBackend>, entry: &TenantEntry) -> Checkout<RedisBackend> {
    Checkout::acquire(
        backend,
        CheckoutRequest::with_timeout(TIMEOUT).tenant(entry),
    )
    .await
    .unwrap()
}

/// The redis error behind a switchyard error, if any.
pub fn redis_source(err: &switchyard_core::Error) -> Option<&redis::RedisError> {
    std::error::Error::source(err)?.downcast_ref()
}
