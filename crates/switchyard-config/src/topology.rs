//! `source:` per cluster: where its endpoints come from.
//!
//! ```yaml
//! clusters:
//!   orders:
//!     engine: postgres
//!     source: patroni                  # patroni | sentinel | static (the default)
//!     patroni:
//!       urls: [http://10.0.0.1:8008, http://10.0.0.2:8008]
//!       interval: 500ms                # default 1s
//!       timeout: 1s                    # default 1s
//!     # Credentials, database and options for every member; host and port
//!     # come from Patroni.
//!     member_url: postgres://app:${PG_PASSWORD}@patroni/app
//!   cache:
//!     engine: redis
//!     source: sentinel
//!     sentinel:
//!       urls: [redis://10.0.0.1:26379, redis://10.0.0.2:26379, redis://10.0.0.3:26379]
//!       master: cache
//!     member_url: redis://:${REDIS_PASSWORD}@sentinel/0
//! ```
//!
//! A cluster with a source has no `endpoints:` list (its members are the
//! endpoints); `patroni` needs engine postgres, `sentinel` engine redis.

use std::time::Duration;

use figment::value::Dict;
use serde::Deserialize;
use switchyard_core::SecretUrl;
use switchyard_router::source::Member;
use switchyard_router::TopologySource;
use switchyard_sources::{PatroniConfig, PatroniSource, SentinelConfig, SentinelSource};

use crate::error::Problem;
use crate::secrets::resolve_references;
use crate::validate::{de, push};
use crate::Engine;

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSettings {
    /// The `endpoints:` list of the configuration; roles from probes.
    Static,
    /// Patroni's REST API.
    Patroni {
        /// The REST API and polling settings.
        config: PatroniConfig,
        /// Credentials, database and options for every member.
        member_url: SecretUrl,
    },
    /// Redis Sentinel.
    Sentinel {
        /// The sentinels, master name and polling settings.
        config: SentinelConfig,
        /// Credentials, database and options for every member.
        member_url: SecretUrl,
    },
}

impl SourceSettings {
    /// `static`, `patroni` or `sentinel`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSettings::Static => "static",
            SourceSettings::Patroni { .. } => "patroni",
            SourceSettings::Sentinel { .. } => "sentinel",
        }
    }

    /// The member URL template, for a source other than static.
    pub fn member_url(&self) -> Option<&SecretUrl> {
        match self {
            SourceSettings::Static => None,
            SourceSettings::Patroni { member_url, .. }
            | SourceSettings::Sentinel { member_url, .. } => Some(member_url),
        }
    }

    /// A running client for the source, `None` for static.
    pub(crate) fn client(&self) -> Result<Option<Box<dyn TopologySource>>, String> {
        Ok(match self {
            SourceSettings::Static => None,
            SourceSettings::Patroni { config, .. } => {
                Some(Box::new(PatroniSource::new(config.clone())?))
            }
            SourceSettings::Sentinel { config, .. } => {
                Some(Box::new(SentinelSource::new(config.clone())?))
            }
        })
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}

/// `patroni:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPatroni {
    pub urls: Vec<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `sentinel:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSentinel {
    pub urls: Vec<String>,
    pub master: String,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_millis(500)
}

/// The `source` of the cluster at `path` (`d` is its map), with every problem
/// in `problems`; `None` when there are some.
pub(crate) fn settings(
    path: &str,
    engine: Option<Engine>,
    d: &Dict,
    problems: &mut Vec<Problem>,
) -> Option<SourceSettings> {
    let before = problems.len();
    let kind = match d.get("source") {
        None => "static".to_owned(),
        Some(v) => de::<String>(v, &format!("{path}.source"), problems)?,
    };
    let needs = |wanted: Engine, problems: &mut Vec<Problem>| {
        if engine.is_some_and(|e| e != wanted) {
            push(
                problems,
                &format!("{path}.source"),
                format!("source {kind} follows {wanted} clusters only"),
            );
        }
    };
    let section = |problems: &mut Vec<Problem>| {
        let value = d.get(kind.as_str());
        if value.is_none() {
            push(
                problems,
                &format!("{path}.{kind}"),
                format!("missing: source {kind} needs its settings here"),
            );
        }
        value
    };
    let member_url = |problems: &mut Vec<Problem>| match d.get("member_url") {
        None => {
            push(
                problems,
                &format!("{path}.member_url"),
                "missing: the URL (credentials, database) every member is reached with; its host and port come from the source",
            );
            None
        }
        Some(v) => {
            let raw = de::<String>(v, &format!("{path}.member_url"), problems)?;
            match resolve_references(&raw) {
                Ok(resolved) => Some(SecretUrl::new(resolved)),
                Err(missing) => {
                    for m in missing {
                        push(problems, &format!("{path}.member_url"), m);
                    }
                    None
                }
            }
        }
    };
    for other in ["patroni", "sentinel"] {
        if other != kind && d.contains_key(other) {
            push(
                problems,
                &format!("{path}.{other}"),
                format!("settings for source {other}, but the source is {kind}"),
            );
        }
    }
    let positive = |d: Duration, key: &str, problems: &mut Vec<Problem>| {
        if d.is_zero() {
            push(
                problems,
                &format!("{path}.{kind}.{key}"),
                "must be more than 0",
            );
        }
    };
    let settings = match kind.as_str() {
        "static" => {
            if d.contains_key("member_url") {
                push(
                    problems,
                    &format!("{path}.member_url"),
                    "only for a cluster with a topology source (source: patroni or sentinel)",
                );
            }
            Some(SourceSettings::Static)
        }
        "patroni" => {
            needs(Engine::Postgres, problems);
            let raw = section(problems)
                .and_then(|v| de::<RawPatroni>(v, &format!("{path}.patroni"), problems));
            let url = member_url(problems);
            let raw = raw?;
            positive(raw.interval, "interval", problems);
            positive(raw.timeout, "timeout", problems);
            let config = PatroniConfig {
                urls: raw.urls,
                interval: raw.interval,
                timeout: raw.timeout,
            };
            if let Err(e) = PatroniSource::new(config.clone()) {
                push(problems, &format!("{path}.patroni.urls"), e);
            }
            Some(SourceSettings::Patroni {
                config,
                member_url: url?,
            })
        }
        "sentinel" => {
            needs(Engine::Redis, problems);
            let raw = section(problems)
                .and_then(|v| de::<RawSentinel>(v, &format!("{path}.sentinel"), problems));
            let url = member_url(problems);
            let raw = raw?;
            positive(raw.interval, "interval", problems);
            positive(raw.timeout, "timeout", problems);
            let config = SentinelConfig {
                sentinels: raw.urls,
                master: raw.master,
                interval: raw.interval,
                timeout: raw.timeout,
            };
            if let Err(e) = SentinelSource::new(config.clone()) {
                push(problems, &format!("{path}.sentinel"), e);
            }
            Some(SourceSettings::Sentinel {
                config,
                member_url: url?,
            })
        }
        other => {
            push(
                problems,
                &format!("{path}.source"),
                format!("unknown source {other:?} (expected static, patroni or sentinel)"),
            );
            None
        }
    };
    (problems.len() == before).then_some(settings).flatten()
}

/// `template` with the member's host and port.
pub(crate) fn member_url(template: &SecretUrl, member: &Member) -> Result<SecretUrl, String> {
    let mut url = url::Url::parse(template.expose())
        .map_err(|e| format!("member_url {}: {e}", template.redacted()))?;
    url.set_host(Some(&member.host))
        .map_err(|e| format!("member {} host {:?}: {e}", member.name, member.host))?;
    url.set_port(Some(member.port))
        .map_err(|()| format!("member_url {} takes no port", template.redacted()))?;
    Ok(SecretUrl::new(url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::Role;

    #[test]
    fn member_urls_keep_credentials_and_database() {
        let template = SecretUrl::new("postgres://app:s3cret@patroni/orders?sslmode=disable");
        let url = member_url(
            &template,
            &Member::new("n1", "10.0.0.7", 5433, Role::Replica),
        )
        .unwrap();
        assert_eq!(
            url.expose(),
            "postgres://app:s3cret@10.0.0.7:5433/orders?sslmode=disable"
        );
    }
}
