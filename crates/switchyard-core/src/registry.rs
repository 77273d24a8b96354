//! The tenant registry: which tier each tenant is on, and what that tier means.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::fair::{QueueOrder, Share};
use crate::tenant::{Isolation, NameTemplate, TenantId, TenantScope};
use crate::Error;

/// The default session setting that carries the tenant for row-level isolation.
pub const DEFAULT_ROW_SETTING: &str = "app.tenant_id";

/// What a tier promises its tenants: how they are isolated and how much they may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPolicy {
    /// How tenants on this tier are separated.
    pub isolation: Isolation,
    /// Template for the database, schema or prefix name (default `tenant_{id}`).
    #[serde(default)]
    pub name_template: NameTemplate,
    /// Session setting that carries the tenant id for row isolation (default `app.tenant_id`).
    #[serde(default = "default_row_setting")]
    pub row_setting: String,
    /// Most concurrent checkouts one tenant of this tier may hold; `None` is unlimited.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Grants per turn each tenant of this tier gets when checkouts wait for
    /// a saturated pool (default 1; see [`FairQueue`](crate::FairQueue)).
    #[serde(default = "default_queue_weight")]
    pub queue_weight: NonZeroU32,
    /// Whether this tier's tenants wait in turn with each other (`fair`, the
    /// default) or together in one first-come, first-served line (`fifo`).
    #[serde(default)]
    pub queue: QueueOrder,
}

fn default_row_setting() -> String {
    DEFAULT_ROW_SETTING.to_owned()
}

fn default_queue_weight() -> NonZeroU32 {
    NonZeroU32::MIN
}

impl TierPolicy {
    /// A tier with the given isolation, default templates and no quota.
    pub fn new(isolation: Isolation) -> Self {
        Self {
            isolation,
            name_template: NameTemplate::default(),
            row_setting: default_row_setting(),
            max_connections: None,
            queue_weight: default_queue_weight(),
            queue: QueueOrder::Fair,
        }
    }

    /// Sets the grants per turn of each tenant in a saturated pool's queue.
    pub fn with_queue_weight(mut self, weight: NonZeroU32) -> Self {
        self.queue_weight = weight;
        self
    }

    /// Sets how the tier's tenants queue for a saturated pool.
    pub fn with_queue(mut self, order: QueueOrder) -> Self {
        self.queue = order;
        self
    }

    /// The place in a saturated pool's queue of the tenants of this tier
    /// (named `tier`).
    pub fn share(&self, tier: &str) -> Share {
        let fifo_tier = (self.queue == QueueOrder::Fifo).then(|| Arc::from(tier));
        Share::new(self.queue_weight, fifo_tier)
    }

    /// Sets the name template.
    pub fn with_name_template(mut self, template: NameTemplate) -> Self {
        self.name_template = template;
        self
    }

    /// Sets the row setting name.
    pub fn with_row_setting(mut self, setting: impl Into<String>) -> Self {
        self.row_setting = setting.into();
        self
    }

    /// Caps the concurrent checkouts of each tenant on this tier.
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// Refuses this tier (named `tier`) when its template can render one of
    /// `reserved` for some tenant: an engine's system namespaces and the
    /// shared namespace of its row tier, which no tenant may be handed.
    /// `fold_case` compares ignoring ASCII case (engines with case-insensitive
    /// names). Engines call it from [`Backend::validate_tier`](crate::Backend::validate_tier).
    pub fn refuse_reserved<'a>(
        &self,
        tier: &str,
        reserved: impl IntoIterator<Item = &'a str>,
        fold_case: bool,
    ) -> Result<(), Error> {
        match reserved
            .into_iter()
            .find(|name| {
                if fold_case {
                    self.name_template.can_render_ignoring_case(name)
                } else {
                    self.name_template.can_render(name)
                }
            })
        {
            Some(name) => Err(Error::Config {
                path: format!("tiers.{tier}.name_template"),
                message: format!(
                    "{} can render {name:?} (a reserved or shared namespace of this engine) for a tenant; \
                     add a fixed prefix such as tenant_{{id}}",
                    self.name_template
                ),
            }),
            None => Ok(()),
        }
    }

    /// Resolves the scope of `tenant` under this tier.
    pub fn scope(&self, tenant: &TenantId) -> Result<TenantScope, Error> {
        let target = self
            .name_template
            .render(tenant)
            .ok_or_else(|| Error::TenantNameTooLong {
                tenant: tenant.clone(),
                template: self.name_template.to_string(),
            })?;
        Ok(TenantScope::new(
            tenant.clone(),
            self.isolation,
            target,
            self.row_setting.as_str(),
        ))
    }
}

/// A tenant's resolved scope and its concurrency quota, shared by all its checkouts.
#[derive(Debug)]
pub struct TenantEntry {
    scope: Arc<TenantScope>,
    quota: Option<Quota>,
}

impl TenantEntry {
    /// The tenant's scope.
    pub fn scope(&self) -> &Arc<TenantScope> {
        &self.scope
    }

    /// The tenant's quota, when its tier has one.
    pub fn quota(&self) -> Option<&Quota> {
        self.quota.as_ref()
    }
}

/// A per-tenant cap on concurrent checkouts.
///
/// Each tenant has a semaphore of its own, taken before a connection is asked of
/// any pool, so a tenant at its cap waits on itself and never holds pool capacity
/// that other tenants need.
#[derive(Debug, Clone)]
pub struct Quota {
    limit: u32,
    permits: Arc<Semaphore>,
}

impl Quota {
    /// A quota of `limit` concurrent checkouts.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            permits: Arc::new(Semaphore::new(limit as usize)),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Checkouts currently held against this quota.
    pub fn in_use(&self) -> u32 {
        self.limit
            .saturating_sub(u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX))
    }

    /// Takes one permit, waiting until `deadline` at most.
    pub async fn acquire(
        &self,
        tenant: &TenantId,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, Error> {
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Error::Closed),
            Err(_elapsed) => Err(Error::QuotaExceeded {
                tenant: tenant.clone(),
                limit: self.limit,
                waited: started.elapsed(),
            }),
        }
    }
}

/// Maps tenants to tiers and resolves each tenant's scope and quota once.
///
/// Tenants may be registered explicitly; any other tenant falls back to the
/// default tier when there is one, and is otherwise rejected with
/// [`Error::UnknownTenant`]. Resolved entries are cached, so a lookup after the
/// first is one read-locked hash probe.
#[derive(Debug, Default)]
pub struct TenantRegistry {
    tiers: HashMap<String, TierPolicy>,
    assigned: HashMap<TenantId, String>,
    default_tier: Option<String>,
    resolved: RwLock<HashMap<TenantId, Arc<TenantEntry>>>,
}

impl TenantRegistry {
    /// An empty registry: no tiers, every tenant unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tier.
    pub fn with_tier(mut self, name: impl Into<String>, policy: TierPolicy) -> Self {
        self.tiers.insert(name.into(), policy);
        self
    }

    /// Sets the tier used for tenants that were not assigned one.
    pub fn with_default_tier(mut self, name: impl Into<String>) -> Self {
        self.default_tier = Some(name.into());
        self
    }

    /// Assigns `tenant` to `tier`.
    pub fn with_tenant(mut self, tenant: TenantId, tier: impl Into<String>) -> Self {
        self.assigned.insert(tenant, tier.into());
        self
    }

    /// Checks that every tier named by a tenant or as the default exists, and
    /// that no two tiers' name templates can render the same database, schema
    /// or prefix for two different tenants.
    pub fn validate(&self) -> Result<(), Error> {
        let unknown = self
            .default_tier
            .iter()
            .chain(self.assigned.values())
            .find(|tier| !self.tiers.contains_key(*tier));
        if let Some(tier) = unknown {
            return Err(Error::Config {
                path: "tenants".into(),
                message: format!("unknown tier {tier:?}"),
            });
        }
        let mut tiers: Vec<_> = self.tiers.iter().collect();
        tiers.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (name_a, a)) in tiers.iter().enumerate() {
            for (name_b, b) in &tiers[i + 1..] {
                if a.name_template.may_collide_with(&b.name_template) {
                    return Err(Error::Config {
                        path: format!("tiers.{name_b}.name_template"),
                        message: format!(
                            "{} can render the same name as tier {name_a}'s {} for another tenant",
                            b.name_template, a.name_template
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Asks `check` about every tier (an engine's
    /// [`Backend::validate_tier`](crate::Backend::validate_tier)), in name order,
    /// and returns every refusal.
    pub fn check_tiers(
        &self,
        mut check: impl FnMut(&str, &TierPolicy) -> Result<(), Error>,
    ) -> Vec<Error> {
        let mut tiers: Vec<_> = self.tiers.iter().collect();
        tiers.sort_by(|a, b| a.0.cmp(b.0));
        tiers
            .into_iter()
            .filter_map(|(name, policy)| check(name, policy).err())
            .collect()
    }

    /// The tiers by name.
    pub fn tiers(&self) -> &HashMap<String, TierPolicy> {
        &self.tiers
    }

    /// The tier `tenant` is on, if any.
    pub fn tier_of(&self, tenant: &TenantId) -> Option<(&str, &TierPolicy)> {
        let name = self.assigned.get(tenant).or(self.default_tier.as_ref())?;
        self.tiers.get(name).map(|p| (name.as_str(), p))
    }

    /// Resolves `tenant` to its scope and quota, caching the result.
    pub fn resolve(&self, tenant: &TenantId) -> Result<Arc<TenantEntry>, Error> {
        if let Some(entry) = self.read_cache(tenant) {
            return Ok(entry);
        }
        let (tier, policy) = self.tier_of(tenant).ok_or_else(|| Error::UnknownTenant {
            tenant: tenant.clone(),
        })?;
        let entry = Arc::new(TenantEntry {
            scope: Arc::new(policy.scope(tenant)?.with_share(policy.share(tier))),
            quota: policy.max_connections.map(Quota::new),
        });
        let mut cache = self
            .resolved
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(Arc::clone(cache.entry(tenant.clone()).or_insert(entry)))
    }

    fn read_cache(&self, tenant: &TenantId) -> Option<Arc<TenantEntry>> {
        self.resolved
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    /// Number of tenants resolved so far.
    pub fn resolved_len(&self) -> usize {
        self.resolved
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// How long to wait for a quota or pool before giving up, as a deadline.
pub fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn registry() -> TenantRegistry {
        TenantRegistry::new()
            .with_tier(
                "free",
                TierPolicy::new(Isolation::Row).with_max_connections(2),
            )
            .with_tier(
                "premium",
                TierPolicy::new(Isolation::Database)
                    .with_name_template(NameTemplate::new("db_{id}").unwrap()),
            )
            .with_default_tier("free")
            .with_tenant(tenant("bigco"), "premium")
    }

    #[test]
    fn resolves_assigned_and_default_tiers() {
        let reg = registry();
        let big = reg.resolve(&tenant("bigco")).unwrap();
        assert_eq!(big.scope().isolation(), Isolation::Database);
        assert_eq!(big.scope().target(), "db_bigco");
        assert!(big.quota().is_none());

        let small = reg.resolve(&tenant("small")).unwrap();
        assert_eq!(small.scope().isolation(), Isolation::Row);
        assert_eq!(small.scope().row_setting(), "app.tenant_id");
        assert_eq!(small.quota().unwrap().limit(), 2);
    }

    #[test]
    fn resolution_is_cached_and_shares_the_quota() {
        let reg = registry();
        let a = reg.resolve(&tenant("small")).unwrap();
        let b = reg.resolve(&tenant("small")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(reg.resolved_len(), 1);
    }

    #[test]
    fn unknown_tenant_without_default_tier_is_an_error() {
        let reg = TenantRegistry::new().with_tier("free", TierPolicy::new(Isolation::Row));
        let err = reg.resolve(&tenant("x")).unwrap_err();
        assert!(matches!(err, Error::UnknownTenant { .. }), "{err}");
    }

    #[test]
    fn validate_finds_unknown_tiers() {
        let reg = TenantRegistry::new().with_tenant(tenant("x"), "gold");
        let err = reg.validate().unwrap_err();
        assert!(err.to_string().contains("gold"), "{err}");
        assert!(registry().validate().is_ok());
    }

    #[test]
    fn validate_rejects_templates_that_can_collide() {
        let reg = TenantRegistry::new()
            .with_tier(
                "a",
                TierPolicy::new(Isolation::Schema)
                    .with_name_template(NameTemplate::new("t_{id}").unwrap()),
            )
            .with_tier(
                "b",
                TierPolicy::new(Isolation::Schema)
                    .with_name_template(NameTemplate::new("t_a_{id}").unwrap()),
            );
        let err = reg.validate().unwrap_err();
        assert!(
            err.to_string().starts_with("tiers.b.name_template: "),
            "{err}"
        );
    }

    #[test]
    fn a_tenant_too_long_for_the_template_is_rejected() {
        let reg = registry();
        let long = tenant(&"x".repeat(60));
        let err = reg.resolve(&long).unwrap_err();
        assert!(matches!(err, Error::TenantNameTooLong { .. }), "{err}");
    }

    #[test]
    fn tier_policy_deserializes_with_defaults() {
        let p: TierPolicy =
            serde_json::from_str(r#"{"isolation":"schema","max_connections":4}"#).unwrap();
        assert_eq!(p.isolation, Isolation::Schema);
        assert_eq!(p.name_template.to_string(), "tenant_{id}");
        assert_eq!(p.row_setting, "app.tenant_id");
        assert_eq!(p.max_connections, Some(4));
        assert_eq!((p.queue_weight.get(), p.queue), (1, QueueOrder::Fair));
        let p: TierPolicy =
            serde_json::from_str(r#"{"isolation":"row","queue_weight":3,"queue":"fifo"}"#).unwrap();
        assert_eq!((p.queue_weight.get(), p.queue), (3, QueueOrder::Fifo));
        let zero = serde_json::from_str::<TierPolicy>(r#"{"isolation":"row","queue_weight":0}"#);
        assert!(zero.unwrap_err().to_string().contains("nonzero"));
        assert!(serde_json::from_str::<TierPolicy>(r#"{"isolation":"row","bogus":1}"#).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn quota_waits_until_the_deadline_then_fails() {
        let q = Quota::new(1);
        let t = tenant("a");
        let held = q
            .acquire(&t, deadline_after(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(q.in_use(), 1);
        let started = Instant::now();
        let err = q
            .acquire(&t, deadline_after(Duration::from_millis(250)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::QuotaExceeded { limit: 1, .. }),
            "{err}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        drop(held);
        assert_eq!(q.in_use(), 0);
        let _again = q
            .acquire(&t, deadline_after(Duration::from_millis(1)))
            .await
            .unwrap();
    }
}
