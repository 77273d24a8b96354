//! The isolation conformance suite (switchyard-testkit) for MongoDB: a
//! database, a collection prefix, and a tenant field per tenant. Runs on the
//! nx-27017 stand-in, or on a real server when `SWITCHYARD_MONGODB_URL` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{backend, server, unique};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_mongodb::mongodb::bson::{doc, Document};
use switchyard_mongodb::mongodb::options::{Collation, CollationStrength, FindOptions};
use switchyard_mongodb::MongoBackend;
use switchyard_testkit::conformance::{self, error_chain, Attempt, Category, Fixture};
use switchyard_testkit::{MongoServer, ServerKind};

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// A case-insensitive collation applies to the injected tenant condition.
    CaseInsensitiveCollation,
    /// `$or` naming another tenant in the filter.
    OrFilter,
    /// A document that names another tenant.
    ForgedTenantField,
    /// An update that rewrites the tenant field.
    UpdateTenantField,
    /// `$lookup` into another database's collection.
    LookupOtherDatabase,
    /// `$out` / `$merge` writing outside the scope.
    OutStage,
    /// A collection-prefix tenant's collection by its real name.
    PrefixedCollectionName,
    /// `system.users` and friends.
    SystemCollection,
    /// The driver client of a scoped checkout.
    RawClient,
}

const ESCAPES: &[(Category, Escape)] = &[
    (Category::HostileValue, Escape::CaseInsensitiveCollation),
    (Category::CrossData, Escape::OrFilter),
    (Category::CrossData, Escape::ForgedTenantField),
    (Category::CrossData, Escape::UpdateTenantField),
    (Category::EngineCommand, Escape::LookupOtherDatabase),
    (Category::EngineCommand, Escape::OutStage),
    (Category::Reserved, Escape::PrefixedCollectionName),
    (Category::Reserved, Escape::SystemCollection),
    (Category::EngineCommand, Escape::RawClient),
];

struct MongoFixture {
    level: Isolation,
    server: MongoServer,
    backend: Arc<MongoBackend>,
    registry: TenantRegistry,
    tag: String,
}

impl MongoFixture {
    async fn new(level: Isolation) -> Self {
        let server = server().await;
        let tag = unique("c");
        let backend = backend(server.url(), &format!("{tag}shared"), 4);
        let template = NameTemplate::new(&format!("{tag}_{{id}}")).unwrap();
        let registry = TenantRegistry::new()
            .with_tier("t", TierPolicy::new(level).with_name_template(template))
            .with_default_tier("t");
        Self {
            level,
            server,
            backend,
            registry,
            tag,
        }
    }

    fn is_real(&self) -> bool {
        self.server.kind() == ServerKind::Real
    }

    async fn scoped(&self, tenant: &str) -> Result<Checkout<MongoBackend>, String> {
        let id = TenantId::new(tenant).map_err(|e| e.to_string())?;
        let entry = self.registry.resolve(&id).map_err(|e| error_chain(&e))?;
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)).tenant(&entry),
        )
        .await
        .map_err(|e| error_chain(&e))
    }

    async fn find(
        &self,
        tenant: &str,
        collection: &str,
        filter: Document,
        options: Option<FindOptions>,
    ) -> Result<Vec<Document>, String> {
        let conn = self.scoped(tenant).await?;
        let coll = conn.collection(collection).map_err(|e| error_chain(&e))?;
        coll.find(filter, options)
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn collation(&self, attacker: &str) -> Attempt {
        let collation = Collation::builder()
            .locale("en")
            .strength(CollationStrength::Secondary)
            .build();
        let options = FindOptions::builder().collation(collation).build();
        match self
            .find(attacker, "kv", doc! { "key": "marker" }, Some(options))
            .await
        {
            Err(e) => Attempt::Refused(e),
            Ok(docs) => {
                let values: Vec<String> = docs
                    .iter()
                    .filter_map(|d| d.get_str("value").ok().map(str::to_owned))
                    .collect();
                let own = conformance::marker(attacker);
                if values.iter().any(|v| *v != own) {
                    Attempt::Breached(format!(
                        "a case-insensitive collation let {attacker} read {values:?}"
                    ))
                } else if !self.is_real() && self.level == Isolation::Row {
                    Attempt::Skipped(
                        "needs a real MongoDB: the stand-in ignores collations, and the handle let this one through"
                            .into(),
                    )
                } else {
                    Attempt::Ran(format!("{values:?}"))
                }
            }
        }
    }
}

impl Fixture for MongoFixture {
    type Escape = Escape;

    fn label(&self) -> String {
        let server = if self.is_real() {
            "real server"
        } else {
            "stand-in"
        };
        format!("mongodb/{} ({server})", self.level)
    }

    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String> {
        let conn = self.scoped(tenant).await?;
        let coll = conn.collection("kv").map_err(|e| error_chain(&e))?;
        coll.insert_one(doc! { "key": key, "value": value }, None)
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }

    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String> {
        let docs = self.find(tenant, "kv", doc! { "key": key }, None).await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("value").ok().map(str::to_owned))
            .collect())
    }

    async fn names(&self, tenant: &str) -> Result<Vec<String>, String> {
        let docs = self.find(tenant, "kv", doc! {}, None).await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("key").ok().map(str::to_owned))
            .collect())
    }

    async fn checkout(&self, tenant: &str) -> Result<(), String> {
        self.scoped(tenant).await.map(drop)
    }

    fn reserved_templates(&self) -> Vec<(String, &'static str)> {
        match self.level {
            Isolation::Database => vec![
                (
                    "{id}".into(),
                    "admin, local, config and the shared database",
                ),
                (
                    "ADM{id}".into(),
                    "admin (tenant `in`, names compared ignoring case)",
                ),
                (
                    format!("{}shar{{id}}", self.tag),
                    "the shared database (tenant `ed`)",
                ),
            ],
            _ => Vec::new(),
        }
    }

    async fn configure(&self, template: &str) -> Result<(), String> {
        let template = NameTemplate::new(template).map_err(|e| e.to_string())?;
        let policy = TierPolicy::new(self.level).with_name_template(template);
        self.backend
            .validate_tier("t", &policy)
            .map_err(|e| error_chain(&e))
    }

    fn cannot_serve(&self, tenant: &str) -> Option<String> {
        (tenant == "ACME" && self.level == Isolation::Schema && !self.is_real()).then(|| {
            "needs a real MongoDB: the stand-in's collection names ignore case (SQLite tables), \
             so `..._ACME__kv` and `..._acme__kv` are one collection there"
                .into()
        })
    }

    fn escapes(&self) -> Vec<(Category, Escape)> {
        ESCAPES.to_vec()
    }

    async fn attempt(&self, escape: Escape, attacker: &str, victim: &str) -> Attempt {
        if let Escape::CaseInsensitiveCollation = escape {
            return self.collation(attacker).await;
        }
        let conn = match self.scoped(attacker).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(e),
        };
        let coll = |name: &str| conn.collection(name);
        match escape {
            Escape::CaseInsensitiveCollation => unreachable!(),
            Escape::OrFilter => match coll("kv") {
                Ok(c) => Attempt::of(
                    c.find(
                        doc! { "$or": [ { "tenant_id": victim }, { "key": "marker" } ] },
                        None,
                    )
                    .await,
                ),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::ForgedTenantField => match coll("kv") {
                Ok(c) => Attempt::of(
                    c.insert_one(
                        doc! { "tenant_id": victim, "key": "forged", "value": "planted" },
                        None,
                    )
                    .await,
                ),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::UpdateTenantField => match coll("kv") {
                Ok(c) => Attempt::of(
                    c.update_many(
                        doc! { "key": "nothing" },
                        doc! { "$set": { "tenant_id": victim } },
                        None,
                    )
                    .await,
                ),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::LookupOtherDatabase => match coll("kv") {
                Ok(c) => Attempt::of(
                    c.aggregate(
                        [doc! { "$lookup": {
                            "from": { "db": format!("{}_{victim}", self.tag), "coll": "kv" },
                            "pipeline": [], "as": "stolen"
                        } }],
                        None,
                    )
                    .await,
                ),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::OutStage => match coll("kv") {
                Ok(c) => Attempt::of(
                    c.aggregate(
                        [doc! { "$out": { "db": format!("{}_{victim}", self.tag), "coll": "kv" } }],
                        None,
                    )
                    .await,
                ),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::PrefixedCollectionName => {
                let name = format!("{}_{victim}__kv", self.tag);
                match coll(&name) {
                    Ok(c) => Attempt::of(c.find(doc! {}, None).await),
                    Err(e) => Attempt::Refused(error_chain(&e)),
                }
            }
            Escape::SystemCollection => match coll("system.users") {
                Ok(c) => Attempt::of(c.find(doc! {}, None).await),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
            Escape::RawClient => match conn.client() {
                Ok(_) => Attempt::Breached("a scoped checkout handed out its client".into()),
                Err(e) => Attempt::Refused(error_chain(&e)),
            },
        }
    }
}

#[tokio::test]
async fn database_isolation_conforms() {
    conformance::run(&MongoFixture::new(Isolation::Database).await).await;
}

#[tokio::test]
async fn prefix_isolation_conforms() {
    conformance::run(&MongoFixture::new(Isolation::Schema).await).await;
}

#[tokio::test]
async fn row_isolation_conforms() {
    conformance::run(&MongoFixture::new(Isolation::Row).await).await;
}
