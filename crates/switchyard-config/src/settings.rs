//! The validated configuration: what [`ConfigSource::load`](crate::ConfigSource::load) returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use switchyard_core::{
    PoolSettings, Role, SecretUrl, TenantId, TenantRegistry, TierPolicy, TlsSettings,
};
use switchyard_postgres::PgBackendConfig;
use switchyard_router::ClusterConfig;

use crate::topology::SourceSettings;
use crate::Engine;

/// A whole validated router set: clusters and tenant tiers.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Clusters by name.
    pub clusters: BTreeMap<String, ClusterSettings>,
    /// Tenant tiers by name (`free`, `standard`, `premium`, `enterprise`, ...).
    pub tiers: BTreeMap<String, TierPolicy>,
    /// The tier of tenants not listed in `tenants`.
    pub default_tier: Option<String>,
    /// Tenants assigned to a tier explicitly.
    pub tenants: BTreeMap<TenantId, String>,
}

impl Settings {
    /// Every file a secret of some endpoint (or of a source cluster's
    /// members) is read from.
    pub fn secret_files(&self) -> impl Iterator<Item = &Path> {
        let endpoints = self
            .clusters
            .values()
            .flat_map(|c| &c.endpoints)
            .flat_map(|e| &e.secret_files)
            .map(PathBuf::as_path);
        let members = self
            .clusters
            .values()
            .flat_map(|c| &c.member_tls)
            .flat_map(TlsSettings::files);
        endpoints.chain(members)
    }

    /// A fresh tenant registry for these tiers and tenants.
    pub fn tenant_registry(&self) -> TenantRegistry {
        let mut registry = TenantRegistry::new();
        for (name, tier) in &self.tiers {
            registry = registry.with_tier(name.clone(), tier.clone());
        }
        if let Some(default) = &self.default_tier {
            registry = registry.with_default_tier(default.clone());
        }
        for (tenant, tier) in &self.tenants {
            registry = registry.with_tenant(tenant.clone(), tier.clone());
        }
        registry
    }

    /// Whether the tenant part (tiers, default tier, assignments) differs from `other`'s.
    pub fn tenants_differ(&self, other: &Settings) -> bool {
        self.tiers != other.tiers
            || self.default_tier != other.default_tier
            || self.tenants != other.tenants
    }
}

/// One cluster: an engine, router settings, pool settings and endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// The engine.
    pub engine: Engine,
    /// Whether the cluster takes writes, so it needs a primary (default true).
    pub writes: bool,
    /// Balancing, health, failover and retry settings.
    pub router: ClusterConfig,
    /// The pool behind each endpoint.
    pub pool: PoolSettings,
    /// The endpoints, in file order (empty with a topology source).
    pub endpoints: Vec<EndpointSettings>,
    /// Where the endpoints come from: the list above, Patroni or Sentinel.
    pub source: SourceSettings,
    /// With a topology source: the cluster's `tls` block (paths resolved,
    /// files checked), which every member the source reports connects with.
    /// A static cluster's block is in each of its endpoints instead.
    pub member_tls: Option<TlsSettings>,
    /// A hash of the `member_tls` files' contents when loaded, so a rotated
    /// file rebuilds the members.
    pub member_tls_digest: u64,
    /// A PostgreSQL cluster's `postgres` block laid over the defaults: the
    /// configuration each endpoint's backend starts from, taking its own
    /// name, URL and TLS and the cluster's pool (see `engine_block`).
    pub(crate) postgres: Option<PgBackendConfig>,
}

impl ClusterSettings {
    /// Whether the endpoints' backends are built differently here than in
    /// `other`: another pool, or another engine block. A running cluster's
    /// endpoints then get new backends.
    pub(crate) fn backends_differ(&self, other: &ClusterSettings) -> bool {
        self.pool != other.pool || self.postgres != other.postgres
    }
}

/// One endpoint of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    /// Its name in errors, logs and metrics.
    pub name: String,
    /// Its URL, secrets resolved; shown redacted.
    pub url: SecretUrl,
    /// The role assumed until the first probe.
    pub role: Role,
    /// Relative share of traffic.
    pub weight: u32,
    /// The files its secrets are read from (`${file:…}` references and
    /// `password_file`), which a watching [`LiveConfig`](crate::LiveConfig)
    /// watches too, so a rotated secret is picked up. The TLS files are
    /// among them.
    pub secret_files: Vec<PathBuf>,
    /// TLS trust and client certificate: the endpoint's own `tls`, else its
    /// cluster's. Paths with `${VAR}` references resolved.
    pub tls: Option<TlsSettings>,
    /// A hash of the TLS files' contents when loaded, so a rotated CA,
    /// certificate or key makes the endpoint differ and get a new backend.
    pub tls_digest: u64,
}
