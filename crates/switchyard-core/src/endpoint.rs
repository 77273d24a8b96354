//! Endpoint identity, connection URLs that keep their secrets, and pool settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::Error;

/// The name of one endpoint, as shown in errors, logs, metrics and status.
///
/// Cheap to clone. It is a name (`pg-replica-1`) or a redacted address, never a URL
/// with credentials.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(Arc<str>);

impl EndpointId {
    /// Wraps a name.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A connection URL whose password is never shown.
///
/// `Debug` and `Display` print `postgres://app:***@db:5432/app`; only
/// [`SecretUrl::expose`] gives the real string, for handing to a driver.
///
/// ```
/// use switchyard_core::SecretUrl;
///
/// let url = SecretUrl::new("postgres://app:hunter2@db:5432/app?sslmode=require");
/// assert_eq!(url.to_string(), "postgres://app:***@db:5432/app?sslmode=require");
/// assert!(!format!("{url:?}").contains("hunter2"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretUrl {
    raw: Arc<str>,
    redacted: Arc<str>,
}

/// Query parameters whose values are redacted too.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "pwd",
    "secret",
    "token",
    "sslpassword",
    "api_key",
    "apikey",
];

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(raw: impl Into<String>) -> Self {
        let raw: String = raw.into();
        let redacted = redact(&raw);
        Self {
            raw: raw.into(),
            redacted: redacted.into(),
        }
    }

    /// The real URL, password included. Hand it to a driver; never log it.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The URL with secrets replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The scheme before `://`, lowercased, if there is one.
    pub fn scheme(&self) -> Option<String> {
        self.raw
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
    }

    /// The password in the URL's userinfo, as written (percent-encoded).
    pub fn password(&self) -> Option<&str> {
        let rest = self.raw.split_once("://").map_or(&*self.raw, |(_, r)| r);
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        let (userinfo, _) = rest[..end].rsplit_once('@')?;
        userinfo.split_once(':').map(|(_, password)| password)
    }

    /// `text` with the URL and its password (as written and percent-decoded)
    /// replaced, for driver error messages that may echo them.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(&*self.raw, &self.redacted);
        if let Some(password) = self.password().filter(|p| !p.is_empty()) {
            out = out.replace(password, "***");
            out = out.replace(&percent_decode(password), "***");
        }
        out
    }

    /// The `host[:port][,host[:port]…]` part, without credentials.
    pub fn authority(&self) -> &str {
        let rest = self
            .redacted
            .split_once("://")
            .map_or(&*self.redacted, |(_, r)| r);
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host)
    }
}

/// Decodes `%XX` escapes (as in URL userinfo); anything malformed is kept as is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn redact(raw: &str) -> String {
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, raw),
    };
    // A password may hold an unencoded '/', so the userinfo ends at the last '@'
    // before the query, not at the first '/'.
    let query_start = rest.find(['?', '#']).unwrap_or(rest.len());
    let host_start = rest[..query_start].rfind('@').map_or(0, |at| at + 1);
    let auth_end = rest[host_start..]
        .find(['/', '?', '#'])
        .map_or(rest.len(), |i| host_start + i);
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = redact_query(tail);
    match scheme {
        Some(s) => format!("{s}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                format!("{k}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{path}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", &*self.redacted)
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// Serialized redacted, as `Display` shows it: a configuration written back
/// out never carries the password.
impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted)
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// Sizing and timeouts of the connection pool behind one endpoint.
///
/// Every wait is bounded by default; nothing waits forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSettings {
    /// Most connections open at once (default 16).
    pub max_size: u32,
    /// Idle connections kept open ahead of demand (default 0).
    pub min_idle: u32,
    /// Longest wait for a connection before [`Error::Timeout`] (default 5s).
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Idle connections older than this are closed (default 10min; `None` keeps them).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Connections older than this are closed on return (default 30min; `None` keeps them).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Longest a connection (or, in front of a driver's own pool, a permit)
    /// given back while other tenants wait is kept for its tenant's next
    /// checkout, when that tenant has nobody waiting and holds less than an
    /// equal share of the pool (default 1ms, [`DEFAULT_LINGER`](crate::DEFAULT_LINGER);
    /// zero hands every return on at once). A tenant that checks out again
    /// at once keeps its warm connection instead of queueing behind a noisy
    /// one; see [`FairGate`](crate::FairGate). On PostgreSQL it applies with
    /// tenant affinity on.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: 16,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            linger: crate::DEFAULT_LINGER,
        }
    }
}

impl PoolSettings {
    /// Sets `max_size`.
    pub fn with_max_size(mut self, n: u32) -> Self {
        self.max_size = n;
        self
    }

    /// Sets `min_idle`.
    pub fn with_min_idle(mut self, n: u32) -> Self {
        self.min_idle = n;
        self
    }

    /// Sets `acquire_timeout`.
    pub fn with_acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = t;
        self
    }

    /// Sets `idle_timeout`.
    pub fn with_idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Sets `max_lifetime`.
    pub fn with_max_lifetime(mut self, t: Option<Duration>) -> Self {
        self.max_lifetime = t;
        self
    }

    /// Sets `linger`.
    pub fn with_linger(mut self, t: Duration) -> Self {
        self.linger = t;
        self
    }

    /// Every problem with these settings, each as an [`Error::Config`] under `path`.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(Error::Config {
                path: format!("{path}.{field}"),
                message,
            })
        };
        if self.max_size == 0 {
            bad("max_size", "must be at least 1".into());
        }
        if self.min_idle > self.max_size {
            bad(
                "min_idle",
                format!("{} is more than max_size {}", self.min_idle, self.max_size),
            );
        }
        if self.acquire_timeout.is_zero() {
            bad("acquire_timeout", "must be greater than zero".into());
        }
        if let (Some(idle), Some(life)) = (self.idle_timeout, self.max_lifetime) {
            if idle > life {
                bad(
                    "idle_timeout",
                    format!("{idle:?} is longer than max_lifetime {life:?}"),
                );
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_passwords() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/app",
                "postgres://app:***@db:5432/app",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "mongodb://u:p%40ss@h1:27017,h2:27017/db?replicaSet=rs0",
                "mongodb://u:***@h1:27017,h2:27017/db?replicaSet=rs0",
            ),
            ("http://elastic:pw@es:9200", "http://elastic:***@es:9200"),
            ("postgres://app@db/app", "postgres://app@db/app"),
            ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
            ("u:p@@host/x", "u:***@host/x"),
            ("postgres://app:pa/ss@db/app", "postgres://app:***@db/app"),
        ];
        for (raw, want) in cases {
            let url = SecretUrl::new(raw);
            assert_eq!(url.redacted(), want, "{raw}");
            assert_eq!(url.expose(), raw);
        }
    }

    #[test]
    fn redacts_secret_query_parameters() {
        let url = SecretUrl::new("postgres://db/app?user=app&password=s3cret&sslmode=require#x");
        assert_eq!(
            url.redacted(),
            "postgres://db/app?user=app&password=***&sslmode=require#x"
        );
        let url = SecretUrl::new("http://ch:8123/?Token=abc");
        assert_eq!(url.redacted(), "http://ch:8123/?Token=***");
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let url = SecretUrl::new("postgres://app:hunter2@db/app?password=hunter2");
        assert!(!format!("{url}").contains("hunter2"));
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!format!("{:#?}", vec![url.clone()]).contains("hunter2"));
    }

    #[test]
    fn password_and_scrub() {
        let url = SecretUrl::new("postgres://app:p%40ss@db/app");
        assert_eq!(url.password(), Some("p%40ss"));
        assert_eq!(SecretUrl::new("postgres://db/app").password(), None);
        assert_eq!(url.scrub("x p@ss y p%40ss"), "x *** y ***");
        assert_eq!(
            url.scrub("bad url postgres://app:p%40ss@db/app"),
            "bad url postgres://app:***@db/app"
        );
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn authority_and_scheme() {
        let url = SecretUrl::new("Postgres://app:pw@db:5432/app");
        assert_eq!(url.scheme().as_deref(), Some("postgres"));
        assert_eq!(url.authority(), "db:5432");
        let url = SecretUrl::new("mongodb://h1:1,h2:2/?x=1");
        assert_eq!(url.authority(), "h1:1,h2:2");
    }

    #[test]
    fn pool_settings_defaults_are_bounded() {
        let s = PoolSettings::default();
        assert!(s.validate("pool").is_empty());
        assert!(s.acquire_timeout > Duration::ZERO);
    }

    #[test]
    fn pool_settings_parse_human_durations() {
        let s: PoolSettings =
            serde_json::from_str(r#"{"max_size":4,"acquire_timeout":"250ms","idle_timeout":null}"#)
                .unwrap();
        assert_eq!(s.linger, crate::DEFAULT_LINGER);
        let quick: PoolSettings = serde_json::from_str(r#"{"linger":"250us"}"#).unwrap();
        assert_eq!(quick.linger, Duration::from_micros(250));
        assert_eq!(s.max_size, 4);
        assert_eq!(s.acquire_timeout, Duration::from_millis(250));
        assert_eq!(s.idle_timeout, None);
        assert_eq!(s.max_lifetime, Some(Duration::from_secs(1800)));
    }

    #[test]
    fn pool_settings_report_every_problem_with_its_path() {
        let s = PoolSettings {
            max_size: 0,
            min_idle: 3,
            acquire_timeout: Duration::ZERO,
            idle_timeout: Some(Duration::from_secs(60)),
            max_lifetime: Some(Duration::from_secs(10)),
            linger: Duration::ZERO,
        };
        let problems: Vec<String> = s
            .validate("clusters.main.pool")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].starts_with("clusters.main.pool.max_size: "));
        assert!(problems.iter().any(|p| p.contains("min_idle")));
        assert!(problems.iter().any(|p| p.contains("acquire_timeout")));
        assert!(problems.iter().any(|p| p.contains("idle_timeout")));
    }
}
