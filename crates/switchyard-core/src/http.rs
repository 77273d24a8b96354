//! What the HTTP engines (ClickHouse, Elasticsearch) share: the endpoint URL
//! split into address and credentials, checked with its TLS settings.

use std::fmt;

use crate::{SecretUrl, TlsSettings, Transport};

/// An HTTP engine's URL split into the address, without credentials, and the
/// credentials, percent-decoded. `Debug` never shows the password.
///
/// ```
/// use switchyard_core::{HttpUrl, SecretUrl};
///
/// let split = HttpUrl::parse(&SecretUrl::new("http://app:p%40ss@127.0.0.1:8123/")).unwrap();
/// assert_eq!(split.base(), "http://127.0.0.1:8123");
/// assert_eq!(split.user.as_deref(), Some("app"));
/// assert_eq!(split.password.as_deref(), Some("p@ss"));
/// assert!(!format!("{split:?}").contains("p@ss"));
/// let plain = HttpUrl::parse(&SecretUrl::new("https://127.0.0.1:9200")).unwrap();
/// assert_eq!((plain.user, plain.password), (None, None));
/// assert!(HttpUrl::parse(&SecretUrl::new("tcp://app:hunter2@db:9000"))
///     .is_err_and(|e| !e.contains("hunter2")));
/// ```
#[derive(Clone)]
pub struct HttpUrl {
    /// The URL without credentials.
    pub url: url::Url,
    /// The user, when the URL names one.
    pub user: Option<String>,
    /// The password, when the URL has one.
    pub password: Option<String>,
}

impl HttpUrl {
    /// Splits `url`, which must be `http://` or `https://` with a host;
    /// errors show the URL redacted.
    pub fn parse(url: &SecretUrl) -> Result<Self, String> {
        let mut parsed =
            url::Url::parse(url.expose()).map_err(|e| format!("{url} is not a valid url: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "{url} has scheme {:?}; use http:// or https://",
                parsed.scheme()
            ));
        }
        if parsed.host_str().is_none() {
            return Err(format!("{url} has no host"));
        }
        let user = Some(parsed.username())
            .filter(|u| !u.is_empty())
            .map(crate::percent_decode);
        let password = parsed.password().map(crate::percent_decode);
        // Cannot fail for a URL with a host.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        Ok(Self {
            url: parsed,
            user,
            password,
        })
    }

    /// The address as text, without the `/` of an empty path.
    pub fn base(&self) -> String {
        let mut base = self.url.to_string();
        if base.ends_with('/') && self.url.path() == "/" && self.url.query().is_none() {
            base.pop();
        }
        base
    }

    /// The first problem with `url` and its TLS `settings`: the field it
    /// belongs to (`url` or `tls`) and the message.
    pub fn problem(
        url: &SecretUrl,
        settings: Option<&TlsSettings>,
    ) -> Option<(&'static str, String)> {
        match Self::parse(url) {
            Ok(split) => Transport::http_problem(split.url.scheme(), settings).map(|m| ("tls", m)),
            Err(message) => Some(("url", message)),
        }
    }

    /// How requests to `url` are protected with TLS `settings`, as
    /// configured (no I/O).
    pub fn transport(url: &SecretUrl, settings: Option<&TlsSettings>) -> Transport {
        match url::Url::parse(url.expose()) {
            Ok(url) => Transport::of_http(url.scheme(), settings),
            Err(_) => Transport::Plaintext,
        }
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUrl")
            .field("url", &self.url.as_str())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}
