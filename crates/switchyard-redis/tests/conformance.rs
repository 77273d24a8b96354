//! The isolation conformance suite (switchyard-testkit) at every Redis level:
//! a logical database, a key prefix, and an ACL user per tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cluster, direct_url, run, TIMEOUT};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_redis::{provision_acl_users, Command, RedisBackend, StaticPasswords};
use switchyard_testkit::conformance::{self, Attempt, Category, Fixture, TENANTS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A database no tenant of the fixture owns: where an escape would plant keys.
const OTHER_DB: &str = "9";

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// `EVAL` calling `SCAN`: ACL key patterns do not filter SCAN's reply.
    EvalScan,
    /// `EVAL` calling `KEYS *`.
    EvalKeys,
    /// `EVAL` calling `RANDOMKEY` many times.
    EvalRandomKey,
    /// `EVAL` that selects another database and writes a key there.
    EvalSelectAndWrite,
    /// `EVAL` that moves the tenant's own key into another database.
    EvalMove,
    /// `EVAL` reading another tenant's key by its full name.
    EvalForeignKey,
    /// `EVAL` copying the tenant's own key into another database.
    EvalCopyDb,
    /// `EVAL` publishing on a channel outside the tenant's namespace.
    EvalPublish,
    /// `KEYS *`, `SCAN 0`, `RANDOMKEY` sent through the handle.
    Keys,
    Scan,
    RandomKey,
    /// Commands that leave the database or wipe it.
    Select,
    Move,
    SwapDb,
    FlushAll,
    /// `SORT ... GET <pattern>` addresses keys by pattern.
    SortGet,
    /// `COPY src dst DB n`.
    CopyDb,
    /// `CLIENT LIST` shows other connections (and their databases and users).
    ClientList,
    /// The raw socket behind a scoped checkout.
    Raw,
    /// `PUBLISH news`: does it reach subscribers outside the tenant?
    Publish,
    /// A command cancelled mid-flight leaves a reply in the socket.
    CancelledCommand,
}

const ESCAPES: &[(Category, Escape)] = &[
    (Category::Enumeration, Escape::EvalScan),
    (Category::Enumeration, Escape::EvalKeys),
    (Category::Enumeration, Escape::EvalRandomKey),
    (Category::CrossData, Escape::EvalSelectAndWrite),
    (Category::CrossData, Escape::EvalMove),
    (Category::CrossData, Escape::EvalForeignKey),
    (Category::CrossData, Escape::EvalCopyDb),
    (Category::CrossData, Escape::EvalPublish),
    (Category::Enumeration, Escape::Keys),
    (Category::Enumeration, Escape::Scan),
    (Category::Enumeration, Escape::RandomKey),
    (Category::EngineCommand, Escape::Select),
    (Category::EngineCommand, Escape::Move),
    (Category::EngineCommand, Escape::SwapDb),
    (Category::EngineCommand, Escape::FlushAll),
    (Category::EngineCommand, Escape::SortGet),
    (Category::EngineCommand, Escape::CopyDb),
    (Category::Enumeration, Escape::ClientList),
    (Category::EngineCommand, Escape::Raw),
    (Category::CrossData, Escape::Publish),
    (Category::SessionState, Escape::CancelledCommand),
];

struct RedisFixture {
    level: Isolation,
    registry: TenantRegistry,
    backend: Arc<RedisBackend>,
    admin_url: String,
}

fn tier(level: Isolation) -> TierPolicy {
    TierPolicy::new(level)
}

impl RedisFixture {
    async fn new(level: Isolation, url: &str) -> Self {
        let registry = TenantRegistry::new()
            .with_tier("t", tier(level))
            .with_default_tier("t");
        let ids: Vec<TenantId> = TENANTS.iter().map(|t| TenantId::new(t).unwrap()).collect();
        let passwords = StaticPasswords::generate(&ids).unwrap();
        let mut builder = RedisBackend::builder(format!("redis-{level}"), url)
            .max_size(1)
            .acl_passwords(passwords.clone());
        for (i, t) in TENANTS.iter().enumerate() {
            builder = builder.database(format!("tenant_{t}"), u8::try_from(i + 1).unwrap());
        }
        let backend = Arc::new(builder.build().unwrap());
        let fixture = Self {
            level,
            registry,
            backend,
            admin_url: url.to_owned(),
        };
        if level == Isolation::Row {
            let scopes: Vec<_> = ids
                .iter()
                .map(|t| fixture.registry.resolve(t).unwrap().scope().clone())
                .collect();
            let mut admin = fixture.unscoped().await;
            provision_acl_users(&mut admin, scopes.iter().map(|s| &**s), &passwords)
                .await
                .unwrap();
        }
        fixture
    }

    async fn unscoped(&self) -> Checkout<RedisBackend> {
        Checkout::acquire(&self.backend, CheckoutRequest::with_timeout(TIMEOUT))
            .await
            .unwrap()
    }

    async fn scoped(&self, tenant: &str) -> Result<Checkout<RedisBackend>, String> {
        let id = TenantId::new(tenant).map_err(|e| e.to_string())?;
        let entry = self.registry.resolve(&id).map_err(|e| e.to_string())?;
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(TIMEOUT).tenant(&entry),
        )
        .await
        .map_err(|e| conformance::error_chain(&e))
    }

    async fn send(&self, tenant: &str, command: Command) -> Attempt {
        let mut conn = match self.scoped(tenant).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(format!("checkout: {e}")),
        };
        Attempt::of(conn.query::<redis_value::Value>(&command).await)
    }

    /// Keys in the database no tenant owns, then empties it.
    async fn other_db_keys(&self) -> Vec<String> {
        let mut admin = direct_url(&format!("{}/{OTHER_DB}", self.admin_url)).await;
        let keys: Vec<String> = run(&mut admin, &["KEYS", "*"]).await;
        let _: () = run(&mut admin, &["FLUSHDB"]).await;
        keys
    }

    async fn eval(&self, tenant: &str, script: &str, keys: &[&str]) -> Attempt {
        let mut cmd = Command::new("EVAL").arg(script).arg(keys.len());
        for k in keys {
            cmd = cmd.arg(*k);
        }
        self.send(tenant, cmd).await
    }

    /// Subscribes outside any tenant to `news` (what an application would
    /// subscribe to for a database tenant) and to the victim's namespaced
    /// channel, then publishes `news` as the attacker.
    async fn publish(&self, attacker: &str, victim: &str) -> Attempt {
        let addr = self.admin_url.trim_start_matches("redis://").to_owned();
        let mut subscriber = tokio::net::TcpStream::connect(addr).await.unwrap();
        let victim_channel = format!("tenant_{victim}:news");
        subscriber
            .write_all(format!("SUBSCRIBE news {victim_channel}\r\n").as_bytes())
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&seen).contains(&victim_channel) {
            let n = tokio::time::timeout(TIMEOUT, subscriber.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "subscriber closed");
            seen.extend_from_slice(&buf[..n]);
        }
        let mut conn = match self.scoped(attacker).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(format!("checkout: {e}")),
        };
        match conn.publish("news", "hello").await {
            Ok(0) => Attempt::Ran("PUBLISH reached 0 subscribers".into()),
            Ok(n) => Attempt::Breached(format!(
                "{attacker}'s PUBLISH news reached {n} subscriber(s) outside its namespace"
            )),
            Err(e) => Attempt::Refused(conformance::error_chain(&e)),
        }
    }

    async fn cancelled(&self, attacker: &str) -> Attempt {
        let mut conn = match self.scoped(attacker).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(format!("checkout: {e}")),
        };
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            conn.blpop::<String>(&["queue"], Duration::from_secs(5)),
        )
        .await;
        drop(conn);
        Attempt::Ran(format!(
            "BLPOP cut off ({}); discarded so far: {}",
            cut.is_err(),
            self.backend.counters().discarded
        ))
    }
}

/// The redis crate's reply type, shown with Debug.
mod redis_value {
    pub use switchyard_redis::redis::Value;
}

impl Fixture for RedisFixture {
    type Escape = Escape;

    fn label(&self) -> String {
        format!("redis/{}", self.level)
    }

    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String> {
        let mut conn = self.scoped(tenant).await?;
        conn.set(key, value).await.map_err(|e| e.to_string())
    }

    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String> {
        let mut conn = self.scoped(tenant).await?;
        let value: Option<String> = conn.get(key).await.map_err(|e| e.to_string())?;
        Ok(value.into_iter().collect())
    }

    async fn names(&self, tenant: &str) -> Result<Vec<String>, String> {
        let mut conn = self.scoped(tenant).await?;
        conn.keys("*").await.map_err(|e| e.to_string())
    }

    async fn checkout(&self, tenant: &str) -> Result<(), String> {
        self.scoped(tenant).await.map(drop)
    }

    fn reserved_templates(&self) -> Vec<(String, &'static str)> {
        match self.level {
            // `ACL SETUSER default ...` would rewrite the administrator.
            Isolation::Row => vec![("{id}".into(), "the ACL user `default` (tenant `default`)")],
            _ => Vec::new(),
        }
    }

    async fn configure(&self, template: &str) -> Result<(), String> {
        let template = NameTemplate::new(template).map_err(|e| e.to_string())?;
        let policy = tier(self.level).with_name_template(template);
        self.backend
            .validate_tier("t", &policy)
            .map_err(|e| e.to_string())
    }

    fn escapes(&self) -> Vec<(Category, Escape)> {
        ESCAPES.to_vec()
    }

    async fn attempt(&self, escape: Escape, attacker: &str, victim: &str) -> Attempt {
        let plain = |name: &str| Command::new(name);
        let attempt = match escape {
            Escape::EvalScan => {
                self.eval(
                    attacker,
                    "return redis.call('SCAN', '0', 'COUNT', '1000')",
                    &[],
                )
                .await
            }
            Escape::EvalKeys => {
                self.eval(attacker, "return redis.call('KEYS', '*')", &[])
                    .await
            }
            Escape::EvalRandomKey => {
                let script = "local out = {} for i = 1, 200 do out[i] = redis.call('RANDOMKEY') end return out";
                self.eval(attacker, script, &[]).await
            }
            Escape::EvalSelectAndWrite => {
                let script = format!(
                    "redis.call('SELECT', {OTHER_DB}) return redis.call('SET', KEYS[1], 'planted')"
                );
                self.eval(attacker, &script, &["planted"]).await
            }
            Escape::EvalMove => {
                let script = format!("return redis.call('MOVE', KEYS[1], {OTHER_DB})");
                let owned = conformance::owned_name(attacker);
                self.eval(attacker, &script, &[&owned]).await
            }
            Escape::EvalForeignKey => {
                let script = format!("return redis.call('GET', 'tenant_{victim}:marker')");
                self.eval(attacker, &script, &[]).await
            }
            Escape::EvalCopyDb => {
                let script =
                    format!("return redis.call('COPY', KEYS[1], KEYS[2], 'DB', {OTHER_DB})");
                let owned = conformance::owned_name(attacker);
                self.eval(attacker, &script, &[&owned, "copied"]).await
            }
            Escape::EvalPublish => {
                let script = format!("return redis.call('PUBLISH', 'tenant_{victim}:news', 'x')");
                self.eval(attacker, &script, &[]).await
            }
            Escape::Keys => self.send(attacker, plain("KEYS").arg("*")).await,
            Escape::Scan => {
                self.send(attacker, plain("SCAN").arg(0).arg("COUNT").arg(1000))
                    .await
            }
            Escape::RandomKey => self.send(attacker, plain("RANDOMKEY")).await,
            Escape::Select => self.send(attacker, plain("SELECT").arg(OTHER_DB)).await,
            Escape::Move => {
                let owned = conformance::owned_name(attacker);
                self.send(attacker, plain("MOVE").arg(owned).arg(OTHER_DB))
                    .await
            }
            Escape::SwapDb => {
                self.send(attacker, plain("SWAPDB").arg(0).arg(OTHER_DB))
                    .await
            }
            Escape::FlushAll => self.send(attacker, plain("FLUSHALL")).await,
            Escape::SortGet => {
                let cmd = plain("SORT")
                    .arg("list")
                    .arg("BY")
                    .arg("nosort")
                    .arg("GET")
                    .arg(format!("tenant_{victim}:*"));
                self.send(attacker, cmd).await
            }
            Escape::CopyDb => {
                let owned = conformance::owned_name(attacker);
                let cmd = plain("COPY")
                    .arg(owned)
                    .arg("copied")
                    .arg("DB")
                    .arg(OTHER_DB);
                self.send(attacker, cmd).await
            }
            Escape::ClientList => self.send(attacker, plain("CLIENT").arg("LIST")).await,
            Escape::Raw => match self.scoped(attacker).await {
                Ok(mut conn) => match conn.raw() {
                    Ok(_) => Attempt::Breached("a scoped checkout handed out its socket".into()),
                    Err(e) => Attempt::Refused(conformance::error_chain(&e)),
                },
                Err(e) => Attempt::Refused(e),
            },
            Escape::Publish => self.publish(attacker, victim).await,
            Escape::CancelledCommand => self.cancelled(attacker).await,
        };
        let planted = self.other_db_keys().await;
        if !planted.is_empty() && !matches!(attempt, Attempt::Breached(_)) {
            return Attempt::Breached(format!(
                "{attacker} put {planted:?} in database {OTHER_DB}, which it does not own ({attempt:?})"
            ));
        }
        attempt
    }
}

async fn conformance_at(level: Isolation) {
    let cluster = cluster(0).await;
    let fixture = RedisFixture::new(level, &cluster.master().url()).await;
    conformance::run(&fixture).await;
}

#[tokio::test]
async fn database_isolation_conforms() {
    conformance_at(Isolation::Database).await;
}

#[tokio::test]
async fn prefix_isolation_conforms() {
    conformance_at(Isolation::Schema).await;
}

#[tokio::test]
async fn acl_user_isolation_conforms() {
    conformance_at(Isolation::Row).await;
}
