//! A cluster's engine block: the settings of the engine's backend that every
//! endpoint of the cluster shares besides the pool, as
//! `postgres: { tenant_roles: true, affinity: { check: false } }`.
//!
//! The block is the engine's own backend configuration without what each
//! endpoint has of its own (its name, URL and TLS) and without the cluster's
//! `pool`: every key it takes is a field of that configuration, with that
//! field's default and its validation. Only PostgreSQL has one:
//! [`PgBackendConfig`]'s tenant pools, reset timeout, affinity and tenant
//! roles.

use figment::value::{Dict, Value};
use switchyard_core::{EndpointId, PoolSettings, SecretUrl, TlsSettings};
use switchyard_postgres::PgBackendConfig;

use crate::error::Problem;
use crate::validate::{de, from_core, push};

/// Keys of the engine's configuration that have a place of their own in the
/// files, and that place.
const ELSEWHERE: [(&str, &str); 4] = [
    ("endpoint", "each endpoint's `name`"),
    (
        "url",
        "each endpoint's `url`, or the cluster's `member_url`",
    ),
    ("pool", "the cluster's `pool`"),
    ("tls", "the cluster's or the endpoint's `tls`"),
];

/// The cluster's `postgres` block at `path`, as a configuration every
/// endpoint's starts from; each problem with it goes to `problems`.
///
/// The template's `endpoint` and `url` are placeholders: [`postgres_config`]
/// replaces them with the endpoint's own, with the pool and TLS.
pub(crate) fn postgres_block(
    value: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<PgBackendConfig> {
    let Value::Dict(_, block) = value else {
        push(problems, path, "expected a map");
        return None;
    };
    let before = problems.len();
    for (key, place) in ELSEWHERE {
        if block.contains_key(key) {
            push(
                problems,
                &format!("{path}.{key}"),
                format!("not set here: its place is {place}"),
            );
        }
    }
    let mut fields: Dict = block.clone();
    fields.retain(|k, _| !ELSEWHERE.iter().any(|(key, _)| k == key));
    fields.insert("endpoint".into(), Value::from("template"));
    // Never connected to: every endpoint's config takes its own URL.
    fields.insert("url".into(), Value::from("postgres://localhost/template"));
    let template = de::<PgBackendConfig>(&Value::from(fields), path, problems)?;
    from_core(problems, template.validate(path));
    (problems.len() == before).then_some(template)
}

/// Endpoint `name`'s PostgreSQL configuration: the cluster's block (or every
/// default), with the endpoint's name, URL and TLS and the cluster's pool.
pub(crate) fn postgres_config(
    template: Option<&PgBackendConfig>,
    name: &str,
    url: &SecretUrl,
    pool: &PoolSettings,
    tls: Option<&TlsSettings>,
) -> PgBackendConfig {
    let mut config = match template {
        Some(template) => PgBackendConfig {
            endpoint: EndpointId::new(name.to_owned()),
            url: url.clone(),
            ..template.clone()
        },
        None => PgBackendConfig::new(name.to_owned(), url.clone()),
    };
    config.pool = pool.clone();
    config.tls = tls.cloned();
    config
}
