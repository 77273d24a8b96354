//! Walks the merged configuration tree, collecting every problem with its path.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use switchyard_core::{
    PoolSettings, Role, SecretUrl, TenantId, TierPolicy, TlsSettings, Transport,
};
use switchyard_postgres::PgBackendConfig;
use switchyard_redis::RedisBackendConfig;
use switchyard_router::{ClusterConfig, EndpointConfig};

use crate::error::Problem;
use crate::secrets::{file_references, resolve_references, with_password_file};
use crate::settings::{ClusterSettings, EndpointSettings, Settings};
use crate::source::dotted;
use crate::topology::SourceSettings;
use crate::Engine;

/// One endpoint as written in a file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: String,
    url: String,
    #[serde(default = "default_role")]
    role: Role,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls: Option<TlsSettings>,
}

/// Cluster keys that are not router settings.
const NOT_ROUTER: [&str; 10] = [
    "tls",
    "engine",
    "writes",
    "pool",
    "postgres",
    "endpoints",
    "source",
    "patroni",
    "sentinel",
    "member_url",
];

fn default_role() -> Role {
    Role::Replica
}

fn default_weight() -> u32 {
    1
}

pub(crate) fn push(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem::new(path, message));
}

pub(crate) fn from_core(problems: &mut Vec<Problem>, errors: Vec<switchyard_core::Error>) {
    for e in errors {
        match e {
            switchyard_core::Error::Config { path, message } => push(problems, &path, message),
            other => push(problems, "", other.to_string()),
        }
    }
}

pub(crate) fn de<T: DeserializeOwned>(
    value: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match value.deserialize::<T>() {
        Ok(v) => Some(v),
        Err(errors) => {
            for e in errors {
                let sub = dotted(&e.path);
                let full = match (path.is_empty(), sub.is_empty()) {
                    (_, true) => path.to_owned(),
                    (true, false) => sub,
                    (false, false) if sub.starts_with('[') => format!("{path}{sub}"),
                    (false, false) => format!("{path}.{sub}"),
                };
                push(problems, &full, e.kind.to_string());
            }
            None
        }
    }
}

fn dict<'a>(value: &'a Value, path: &str, problems: &mut Vec<Problem>) -> Option<&'a Dict> {
    match value {
        Value::Dict(_, d) => Some(d),
        _ => {
            push(problems, path, "expected a map");
            None
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Every problem in `root`, and the settings when there are none.
pub(crate) fn walk(root: &Dict, problems: &mut Vec<Problem>) -> Option<Settings> {
    for key in root.keys() {
        if !["clusters", "tiers", "default_tier", "tenants"].contains(&key.as_str()) {
            push(
                problems,
                key,
                "unknown key (expected clusters, tiers, default_tier or tenants)",
            );
        }
    }
    let mut clusters = BTreeMap::new();
    match root.get("clusters").map(|v| dict(v, "clusters", problems)) {
        Some(Some(d)) => {
            for (name, value) in d {
                if let Some(c) = cluster(name, value, problems) {
                    clusters.insert(name.clone(), c);
                }
            }
        }
        Some(None) => {}
        None => push(problems, "clusters", "no clusters are configured"),
    }
    let (tiers, default_tier, tenants) = tenancy(root, problems);
    problems.is_empty().then_some(Settings {
        clusters,
        tiers,
        default_tier,
        tenants,
    })
}

type Tenancy = (
    BTreeMap<String, TierPolicy>,
    Option<String>,
    BTreeMap<TenantId, String>,
);

fn tenancy(root: &Dict, problems: &mut Vec<Problem>) -> Tenancy {
    let mut tiers = BTreeMap::new();
    if let Some(Some(d)) = root.get("tiers").map(|v| dict(v, "tiers", problems)) {
        for (name, value) in d {
            let path = format!("tiers.{name}");
            if !valid_name(name) {
                push(
                    problems,
                    &path,
                    "tier names allow ASCII letters, digits, '_' and '-'",
                );
            }
            if let Some(policy) = de::<TierPolicy>(value, &path, problems) {
                if policy.max_connections == Some(0) {
                    push(
                        problems,
                        &format!("{path}.max_connections"),
                        "must be at least 1",
                    );
                }
                tiers.insert(name.clone(), policy);
            }
        }
    }
    let default_tier = root
        .get("default_tier")
        .and_then(|v| de::<String>(v, "default_tier", problems));
    if let Some(t) = &default_tier {
        if !tiers.contains_key(t) {
            push(problems, "default_tier", format!("unknown tier {t:?}"));
        }
    }
    let mut tenants = BTreeMap::new();
    if let Some(v) = root.get("tenants") {
        if let Some(map) = de::<BTreeMap<String, String>>(v, "tenants", problems) {
            for (id, tier) in map {
                let path = format!("tenants.{id}");
                match TenantId::new(&id) {
                    Ok(tenant) => {
                        if !tiers.contains_key(&tier) {
                            push(problems, &path, format!("unknown tier {tier:?}"));
                        }
                        tenants.insert(tenant, tier);
                    }
                    Err(e) => push(problems, &path, e.to_string()),
                }
            }
        }
    }
    let mut sorted: Vec<_> = tiers.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (i, (name_a, a)) in sorted.iter().enumerate() {
        for (name_b, b) in &sorted[i + 1..] {
            if a.name_template.may_collide_with(&b.name_template) {
                push(
                    problems,
                    &format!("tiers.{name_b}.name_template"),
                    format!(
                        "{} can render the same name as tier {name_a}'s {} for another tenant",
                        b.name_template, a.name_template
                    ),
                );
            }
        }
    }
    (tiers, default_tier, tenants)
}

fn cluster(name: &str, value: &Value, problems: &mut Vec<Problem>) -> Option<ClusterSettings> {
    let path = format!("clusters.{name}");
    let before = problems.len();
    if !valid_name(name) {
        push(
            problems,
            &path,
            "cluster names allow ASCII letters, digits, '_' and '-'",
        );
    }
    let d = dict(value, &path, problems)?;
    let engine = match d
        .get("engine")
        .map(|v| de::<String>(v, &format!("{path}.engine"), problems))
    {
        None => {
            push(
                problems,
                &format!("{path}.engine"),
                "missing (one of postgres, redis, mongodb, clickhouse, elasticsearch)",
            );
            None
        }
        Some(None) => None,
        Some(Some(e)) => {
            let parsed = Engine::parse(&e);
            if parsed.is_none() {
                let all: Vec<&str> = Engine::ALL.iter().map(|e| e.as_str()).collect();
                push(
                    problems,
                    &format!("{path}.engine"),
                    format!("unknown engine {e:?} (expected one of {})", all.join(", ")),
                );
            }
            parsed
        }
    };
    let writes = d
        .get("writes")
        .map_or(Some(true), |v| {
            de::<bool>(v, &format!("{path}.writes"), problems)
        })
        .unwrap_or(true);
    let pool = match d.get("pool") {
        Some(v) => de::<PoolSettings>(v, &format!("{path}.pool"), problems).unwrap_or_default(),
        None => PoolSettings::default(),
    };
    from_core(problems, pool.validate(&format!("{path}.pool")));
    let postgres = match (d.get("postgres"), engine) {
        (None, _) => None,
        (Some(v), Some(Engine::Postgres)) => {
            crate::engine_block::postgres_block(v, &format!("{path}.postgres"), problems)
        }
        (Some(_), Some(other)) => {
            push(
                problems,
                &format!("{path}.postgres"),
                format!("a {other} cluster takes no postgres block"),
            );
            None
        }
        (Some(_), None) => None,
    };
    let rest: Dict = d
        .iter()
        .filter(|(k, _)| !NOT_ROUTER.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let router = de::<ClusterConfig>(&Value::from(rest), &path, problems).unwrap_or_default();
    from_core(problems, router.validate(&path));
    let source = crate::topology::settings(&path, engine, d, problems);
    let tls = d
        .get("tls")
        .and_then(|v| de::<TlsSettings>(v, &format!("{path}.tls"), problems))
        .map(|t| (t, format!("{path}.tls")));
    // With a source, the block is for the members it reports.
    let (member_tls, member_tls_digest) = match &source {
        Some(SourceSettings::Static) | None => (None, 0),
        Some(_) => tls_files(tls.clone(), problems).unwrap_or((None, 0)),
    };
    let endpoints = match (&source, d.get("endpoints")) {
        (Some(SourceSettings::Static), value) => {
            endpoints(&path, engine, writes, value, tls, problems)
        }
        (_, Some(_)) => {
            push(
                problems,
                &format!("{path}.endpoints"),
                "a cluster with a topology source has no endpoints list: its members are the endpoints",
            );
            Vec::new()
        }
        (_, None) => Vec::new(),
    };
    if let (Some(engine), Some(url)) = (engine, source.as_ref().and_then(|s| s.member_url())) {
        check_url(
            engine,
            "member",
            url,
            member_tls.as_ref(),
            &format!("{path}.member_url"),
            problems,
        );
    }
    (problems.len() == before).then_some(ClusterSettings {
        engine: engine?,
        writes,
        router,
        pool,
        endpoints,
        source: source?,
        member_tls,
        member_tls_digest,
        postgres,
    })
}

/// The cluster's endpoints, each through the steps of [`endpoint`]; then
/// the list as a whole: not empty, and a primary when the cluster takes writes.
fn endpoints(
    path: &str,
    engine: Option<Engine>,
    writes: bool,
    value: Option<&Value>,
    cluster_tls: Option<(TlsSettings, String)>,
    problems: &mut Vec<Problem>,
) -> Vec<EndpointSettings> {
    let list_path = format!("{path}.endpoints");
    let raw = match value {
        Some(Value::Array(_, items)) if !items.is_empty() => items,
        Some(Value::Array(..)) | None => {
            push(
                problems,
                &list_path,
                "a cluster needs at least one endpoint",
            );
            return Vec::new();
        }
        Some(_) => {
            push(problems, &list_path, "expected a list of endpoints");
            return Vec::new();
        }
    };
    let mut out: Vec<EndpointSettings> = Vec::new();
    let mut has_primary = false;
    for (i, item) in raw.iter().enumerate() {
        let ep_path = format!("{list_path}[{i}]");
        let Some(ep) = de::<RawEndpoint>(item, &ep_path, problems) else {
            continue;
        };
        has_primary |= ep.role == Role::Primary;
        let settled = endpoint(&ep_path, engine, ep, &cluster_tls, problems);
        if let Some(ep) = settled {
            unique(&ep, &out, &ep_path, problems);
            out.push(ep);
        }
    }
    if writes && !has_primary {
        push(
            problems,
            &list_path,
            "no endpoint has role primary, but the cluster takes writes (set `writes: false` for a read-only cluster)",
        );
    }
    out
}

/// One endpoint's steps: its name and router settings, its URL with the
/// references resolved, its TLS files (the cluster's when it names none),
/// and what the engine says of the URL; `None` when a step left nothing to
/// build on.
fn endpoint(
    ep_path: &str,
    engine: Option<Engine>,
    mut ep: RawEndpoint,
    cluster_tls: &Option<(TlsSettings, String)>,
    problems: &mut Vec<Problem>,
) -> Option<EndpointSettings> {
    if !valid_name(&ep.name) {
        push(
            problems,
            &format!("{ep_path}.name"),
            format!(
                "{:?}: endpoint names allow ASCII letters, digits, '_' and '-'",
                ep.name
            ),
        );
    }
    from_core(
        problems,
        EndpointConfig::new(ep.role)
            .weight(ep.weight)
            .validate(ep_path),
    );
    let url = endpoint_url(ep_path, &ep, problems)?;
    let tls = match ep.tls.take() {
        Some(t) => Some((t, format!("{ep_path}.tls"))),
        None => cluster_tls.clone(),
    };
    let (tls, tls_digest) = tls_files(tls, problems)?;
    if let Some(engine) = engine {
        check_url(engine, &ep.name, &url, tls.as_ref(), ep_path, problems);
    }
    let mut secret_files = file_references(&ep.url);
    secret_files.extend(ep.password_file);
    secret_files.extend(tls.iter().flat_map(|t| t.files().map(PathBuf::from)));
    Some(EndpointSettings {
        name: ep.name,
        url,
        role: ep.role,
        weight: ep.weight,
        secret_files,
        tls,
        tls_digest,
    })
}

/// The endpoint's URL with `${VAR}` and `${file:…}` references resolved and
/// its `password_file` read in; `None` after pushing the problems.
fn endpoint_url(ep_path: &str, ep: &RawEndpoint, problems: &mut Vec<Problem>) -> Option<SecretUrl> {
    let resolved = match resolve_references(&ep.url) {
        Ok(resolved) => resolved,
        Err(missing) => {
            for m in missing {
                push(problems, &format!("{ep_path}.url"), m);
            }
            return None;
        }
    };
    let Some(file) = &ep.password_file else {
        return Some(SecretUrl::new(resolved));
    };
    with_password_file(&resolved, file)
        .map_err(|m| push(problems, &format!("{ep_path}.password_file"), m))
        .ok()
}

/// Pushes a problem for each endpoint before `ep` with the same name or URL.
fn unique(
    ep: &EndpointSettings,
    before: &[EndpointSettings],
    ep_path: &str,
    problems: &mut Vec<Problem>,
) {
    if let Some(j) = before.iter().position(|o| o.name == ep.name) {
        push(
            problems,
            &format!("{ep_path}.name"),
            format!(
                "duplicate endpoint name {:?} (also endpoints[{j}])",
                ep.name
            ),
        );
    }
    if let Some(j) = before.iter().position(|o| o.url == ep.url) {
        push(
            problems,
            &format!("{ep_path}.url"),
            format!(
                "duplicate endpoint url {} (also endpoints[{j}])",
                ep.url.redacted()
            ),
        );
    }
}

/// `tls` (written at the path it carries) with `${VAR}` and `${file:…}`
/// references in its paths resolved and its files read and checked, plus a
/// hash of their contents; `None` after pushing the problems.
fn tls_files(
    tls: Option<(TlsSettings, String)>,
    problems: &mut Vec<Problem>,
) -> Option<(Option<TlsSettings>, u64)> {
    use std::hash::{Hash, Hasher};
    let Some((mut tls, path)) = tls else {
        return Some((None, 0));
    };
    let before = problems.len();
    for (field, file) in [
        ("ca_file", &mut tls.ca_file),
        ("cert_file", &mut tls.cert_file),
        ("key_file", &mut tls.key_file),
    ] {
        let Some(raw) = file.as_ref().map(|f| f.to_string_lossy().into_owned()) else {
            continue;
        };
        match resolve_references(&raw) {
            Ok(resolved) => *file = Some(PathBuf::from(resolved)),
            Err(missing) => {
                for m in missing {
                    push(problems, &format!("{path}.{field}"), m);
                }
            }
        }
    }
    if problems.len() > before {
        return None;
    }
    match tls.load(&path) {
        Ok(material) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            material.ca.hash(&mut h);
            material
                .identity
                .as_ref()
                .map(|i| (&i.cert, &i.key))
                .hash(&mut h);
            Some((Some(tls), h.finish()))
        }
        Err(e) => {
            from_core(problems, vec![e]);
            None
        }
    }
}

fn check_url(
    engine: Engine,
    name: &str,
    url: &SecretUrl,
    tls: Option<&TlsSettings>,
    ep_path: &str,
    problems: &mut Vec<Problem>,
) {
    let url_path = format!("{ep_path}.url");
    let scheme = url.scheme().unwrap_or_default();
    if !engine.schemes().contains(&scheme.as_str()) {
        push(
            problems,
            &url_path,
            format!(
                "unknown scheme {scheme:?} for engine {engine} (expected {})",
                engine.schemes().join(" or ")
            ),
        );
        return;
    }
    match engine {
        Engine::Postgres => {
            let mut config = PgBackendConfig::new(name.to_owned(), url.clone());
            config.tls = tls.cloned();
            let errors = config.validate(ep_path);
            let errors = errors
                .into_iter()
                .filter(|e| !matches!(e, switchyard_core::Error::Config { path, .. } if path.starts_with(&format!("{ep_path}.pool"))))
                .collect();
            from_core(problems, errors);
        }
        Engine::Redis => {
            let prefix = format!("redis.{name}");
            let mut config = RedisBackendConfig::new(name.to_owned(), url.clone());
            config.tls = tls.cloned();
            for e in config.validate() {
                if let switchyard_core::Error::Config { path, message } = e {
                    if path.starts_with(&format!("{prefix}.pool")) {
                        continue;
                    }
                    let rest = path.strip_prefix(&prefix).unwrap_or("");
                    push(problems, &format!("{ep_path}{rest}"), message);
                }
            }
        }
        Engine::Mongodb | Engine::Clickhouse | Engine::Elasticsearch => {
            if let Some(errors) = engine_problems(engine, name, url, tls, ep_path) {
                let pool = format!("{ep_path}.pool");
                let errors = errors
                    .into_iter()
                    .filter(|e| !matches!(e, switchyard_core::Error::Config { path, .. } if path.starts_with(&pool)))
                    .collect();
                from_core(problems, errors);
                return;
            }
            if url.authority().is_empty() {
                push(problems, &url_path, format!("{url} has no host"));
            }
            if tls.is_some()
                && crate::tls_check::url_transport(engine, name, url, None) == Transport::Plaintext
            {
                push(
                    problems,
                    &format!("{ep_path}.tls"),
                    format!(
                        "tls settings are given but the url does not turn TLS on; {}",
                        if engine == Engine::Mongodb {
                            "add tls=true"
                        } else {
                            "use https://"
                        }
                    ),
                );
            }
        }
    }
}

/// What the engine crate finds wrong with the endpoint, when the crate is
/// built in (each has rules of its own for the url next to a tls block).
fn engine_problems(
    engine: Engine,
    name: &str,
    url: &SecretUrl,
    tls: Option<&TlsSettings>,
    ep_path: &str,
) -> Option<Vec<switchyard_core::Error>> {
    let _ = (name, url, tls, ep_path);
    match engine {
        #[cfg(feature = "mongodb")]
        Engine::Mongodb => {
            let mut config = switchyard_mongodb::MongoBackendConfig::new(name, url.clone());
            config.tls = tls.cloned();
            Some(config.validate(ep_path))
        }
        #[cfg(feature = "clickhouse")]
        Engine::Clickhouse => {
            let mut config = switchyard_clickhouse::ChBackendConfig::new(name, url.clone());
            config.tls = tls.cloned();
            Some(config.validate(ep_path))
        }
        #[cfg(feature = "elasticsearch")]
        Engine::Elasticsearch => {
            let mut config = switchyard_elasticsearch::EsBackendConfig::new(name, url.clone());
            config.tls = tls.cloned();
            Some(config.validate(ep_path))
        }
        _ => None,
    }
}
