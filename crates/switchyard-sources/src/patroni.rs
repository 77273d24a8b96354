//! Patroni: members and roles from Patroni's REST API.
//!
//! Every `interval` the source asks the first Patroni REST endpoint that
//! answers for `GET /cluster` (any member serves the whole cluster's view, as
//! Patroni reads it from its DCS), then asks the member `/cluster` calls
//! `leader` for `GET /primary`: 200 only on the node that holds the leader
//! lock *and* runs PostgreSQL as a primary. Only a leader that passes that
//! check is designated primary; until it does (a promotion under way, a
//! leader whose REST API is down) every member is designated replica and
//! writes wait. Members appear and disappear as Patroni lists them.
//!
//! Patroni's `role` values: `leader` (also `master` before Patroni 3) is the
//! primary; `replica`, `sync_standby` and `standby_leader` (the head of a
//! standby cluster, which is read-only) are replicas.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use switchyard_sources::{PatroniConfig, PatroniSource};
//!
//! let source = PatroniSource::new(PatroniConfig {
//!     urls: vec!["http://10.0.0.1:8008".into(), "http://10.0.0.2:8008".into()],
//!     interval: Duration::from_millis(500),
//!     timeout: Duration::from_secs(1),
//! })?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use switchyard_core::Role;
use switchyard_router::source::{Member, Report, TopologySource, View};
use url::Url;

use crate::redact;

/// Where to find Patroni and how often to ask it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniConfig {
    /// Base URLs of Patroni REST APIs (`http://host:8008`), tried in order;
    /// basic-auth credentials may be in the URL and are never shown.
    pub urls: Vec<String>,
    /// How often `/cluster` is polled.
    pub interval: Duration,
    /// The deadline of each request.
    pub timeout: Duration,
}

/// A [`TopologySource`] that follows Patroni's REST API.
#[derive(Debug)]
pub struct PatroniSource {
    client: reqwest::Client,
    urls: Vec<Url>,
    interval: Duration,
    /// The URL that answered last, tried first next time.
    preferred: usize,
    asked: bool,
}

/// One member of `GET /cluster`.
#[derive(Debug, Deserialize)]
struct RawMember {
    name: String,
    role: String,
    host: Option<String>,
    port: Option<u16>,
    api_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawCluster {
    members: Vec<RawMember>,
}

impl PatroniSource {
    /// A source for `config`; fails with a message naming the bad URL.
    pub fn new(config: PatroniConfig) -> Result<Self, String> {
        if config.urls.is_empty() {
            return Err("patroni: no REST API URL given".into());
        }
        let urls = config
            .urls
            .iter()
            .map(|u| {
                let url = Url::parse(u).map_err(|e| format!("patroni URL {}: {e}", redact(u)))?;
                match url.scheme() {
                    "http" | "https" => Ok(url),
                    other => Err(format!(
                        "patroni URL {}: scheme {other:?} (expected http or https)",
                        redact(u)
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| format!("patroni: HTTP client: {e}"))?;
        Ok(Self {
            client,
            urls,
            interval: config.interval,
            preferred: 0,
            asked: false,
        })
    }

    async fn get(&self, url: &Url) -> Result<reqwest::Response, String> {
        self.client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {}: {}", redact(url.as_str()), chain(&e)))
    }

    /// `/cluster` from the first REST API that answers.
    async fn cluster(&mut self) -> Result<RawCluster, String> {
        let mut errors = Vec::new();
        for k in 0..self.urls.len() {
            let i = (self.preferred + k) % self.urls.len();
            let Ok(url) = self.urls[i].join("cluster") else {
                continue;
            };
            match self.get(&url).await {
                Ok(resp) if resp.status().is_success() => match resp.json::<RawCluster>().await {
                    Ok(cluster) => {
                        self.preferred = i;
                        return Ok(cluster);
                    }
                    Err(e) => errors.push(format!("{}: bad JSON: {e}", redact(url.as_str()))),
                },
                Ok(resp) => {
                    errors.push(format!("{}: HTTP {}", redact(url.as_str()), resp.status()))
                }
                Err(e) => errors.push(e),
            }
        }
        Err(errors.join("; "))
    }

    /// Whether the member whose REST API is at `api_url` answers 200 to `/primary`.
    async fn confirms_primary(&self, api_url: &str) -> bool {
        let base = api_url.trim_end_matches('/').trim_end_matches("/patroni");
        let Ok(mut url) = Url::parse(&format!("{base}/primary")) else {
            return false;
        };
        // Credentials given for the configured URLs apply to every member's API.
        let configured = &self.urls[self.preferred];
        if url.username().is_empty() && !configured.username().is_empty() {
            let _ = url.set_username(configured.username());
            let _ = url.set_password(configured.password());
        }
        matches!(self.get(&url).await, Ok(resp) if resp.status().is_success())
    }

    async fn poll(&mut self) -> Report {
        let cluster = match self.cluster().await {
            Ok(c) => c,
            Err(e) => return Report::Unreachable(e),
        };
        let mut members = Vec::new();
        let mut leader_api = None;
        for m in cluster.members {
            let (Some(host), Some(port)) = (m.host, m.port) else {
                tracing::debug!(member = %m.name, "patroni member without host or port: skipped");
                continue;
            };
            let leader = matches!(m.role.as_str(), "leader" | "master");
            if leader {
                leader_api = m.api_url.map(|api| (members.len(), api));
            }
            members.push(Member::new(m.name, host, port, Role::Replica));
        }
        if let Some((i, api)) = leader_api {
            if self.confirms_primary(&api).await {
                members[i].role = Role::Primary;
            } else {
                tracing::debug!(member = %members[i].name, "patroni leader does not answer /primary yet: no primary designated");
            }
        }
        Report::View(View::new(members))
    }
}

impl TopologySource for PatroniSource {
    fn describe(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(u.as_str())).collect();
        format!("patroni {}", urls.join(","))
    }

    fn next(&mut self) -> BoxFuture<'_, Report> {
        Box::pin(async move {
            if std::mem::replace(&mut self.asked, true) {
                tokio::time::sleep(self.interval).await;
            }
            self.poll().await
        })
    }
}

/// An error and its sources, joined with `: ` (reqwest hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_named_without_their_password() {
        let err = PatroniSource::new(PatroniConfig {
            urls: vec!["ftp://admin:hunter2@db:8008".into()],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        })
        .unwrap_err();
        assert!(err.contains("ftp"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn parses_patroni_3_cluster_json() {
        let raw: RawCluster = serde_json::from_str(
            r#"{"members":[{"name":"n1","role":"leader","state":"running","api_url":"http://127.0.0.1:8008/patroni","host":"127.0.0.1","port":5432,"timeline":2},
            {"name":"n2","role":"replica","state":"running","api_url":"http://127.0.0.1:8009/patroni","host":"127.0.0.1","port":5433,"timeline":2,"lag":0}],"scope":"sy"}"#,
        )
        .unwrap();
        assert_eq!(raw.members.len(), 2);
        assert_eq!(raw.members[1].port, Some(5433));
    }
}
