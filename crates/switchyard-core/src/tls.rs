//! TLS settings every engine shares: which certificate authorities to trust,
//! which client certificate to present, and whether the server is verified at
//! all; and how a refused handshake is told apart from a dead server.
//!
//! Verification is on unless [`TlsSettings::insecure_skip_verify`] says
//! otherwise, the same default as libpq's `verify-full` and every browser:
//! the server's certificate must chain to a trusted authority (the
//! [`ca_file`](TlsSettings::ca_file), or the system's roots without one) and
//! name the host the URL dials.
//!
//! A handshake that fails on the certificate is a configuration problem (a
//! trust store without the server's CA, a URL naming a host the certificate
//! does not), not a dead endpoint: it surfaces as [`Error::Tls`], which is
//! neither retried on another endpoint nor counted towards ejection, since
//! retrying would fail the same way and ejecting would hide the real cause
//! behind `NoHealthyEndpoint`.
//!
//! ```
//! use switchyard_core::TlsSettings;
//!
//! let tls: TlsSettings = serde_json::from_str(r#"{ "ca_file": "/etc/switchyard/ca.pem" }"#).unwrap();
//! assert!(!tls.insecure_skip_verify);
//! // A file that is missing is a config error naming it.
//! let err = tls.load("clusters.main.tls").unwrap_err();
//! assert!(err.to_string().starts_with("clusters.main.tls.ca_file: cannot read /etc/switchyard/ca.pem"));
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Where an endpoint's TLS trust and identity come from. Paths only: the
/// files are read by [`load`](Self::load) when a backend is built, so a
/// rotated file reaches new backends (the config crate rebuilds them when it
/// sees a file change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities to trust. Without it the
    /// system's (or the driver's built-in) roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate chain, for servers that ask for one.
    /// Needs [`key_file`](Self::key_file).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate for any host name. The traffic is
    /// encrypted but the server is not authenticated: anyone on the path can
    /// read and change it. Off by default; `switchyard check` reports every
    /// endpoint that sets it.
    pub insecure_skip_verify: bool,
}

impl TlsSettings {
    /// Settings that trust the CAs in `ca_file`.
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: Some(ca_file.into()),
            ..Self::default()
        }
    }

    /// Adds a client certificate and key.
    pub fn client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.cert_file = Some(cert_file.into());
        self.key_file = Some(key_file.into());
        self
    }

    /// Every file these settings read.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// Reads and checks every file, each problem an [`Error::Config`] at
    /// `path.<field>` naming the file (never its content).
    pub fn load(&self, path: &str) -> Result<TlsMaterial, Error> {
        let problem = |field: &str, message: String| Error::Config {
            path: format!("{path}.{field}"),
            message,
        };
        let ca = match &self.ca_file {
            Some(file) => {
                let pem = read(file).map_err(|m| problem("ca_file", m))?;
                let count = certificates(&pem, file).map_err(|m| problem("ca_file", m))?;
                let mut store = rustls::RootCertStore::empty();
                let (added, _ignored) =
                    store.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).flatten());
                if added == 0 {
                    return Err(problem(
                        "ca_file",
                        format!(
                            "{}: none of its {count} certificate(s) is a usable CA",
                            file.display()
                        ),
                    ));
                }
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(problem("key_file", "cert_file needs a key_file".into()))
            }
            (None, Some(_)) => {
                return Err(problem("cert_file", "key_file needs a cert_file".into()))
            }
            (Some(cert_file), Some(key_file)) => {
                let cert = read(cert_file).map_err(|m| problem("cert_file", m))?;
                certificates(&cert, cert_file).map_err(|m| problem("cert_file", m))?;
                let key = read(key_file).map_err(|m| problem("key_file", m))?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
                    problem(
                        "key_file",
                        format!("{}: no PEM private key in it", key_file.display()),
                    )
                })?;
                Some(ClientIdentity { cert, key })
            }
        };
        Ok(TlsMaterial {
            ca,
            identity,
            insecure_skip_verify: self.insecure_skip_verify,
        })
    }
}

fn read(file: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
}

/// How many PEM certificates `pem` holds; an error naming `file` for none or a bad one.
fn certificates(pem: &[u8], file: &Path) -> Result<usize, String> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("{}: not a PEM certificate: {e}", file.display()))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!("{}: no PEM certificate in it", file.display()));
    }
    Ok(count)
}

/// The files of a [`TlsSettings`], read and checked: what a driver is given.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// PEM certificates of the trusted CAs, when not the system's roots.
    pub ca: Option<Vec<u8>>,
    /// The client certificate and key, when configured.
    pub identity: Option<ClientIdentity>,
    /// See [`TlsSettings::insecure_skip_verify`].
    pub insecure_skip_verify: bool,
}

/// A client certificate chain and its private key, both PEM. `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|_| "<pem>"))
            .field("identity", &self.identity)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIdentity(<redacted>)")
    }
}

/// How an endpoint's connections are protected, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// No TLS.
    Plaintext,
    /// TLS when the server offers it, plaintext otherwise, the server not
    /// verified (PostgreSQL's `sslmode=prefer`, its default, and `allow`).
    Opportunistic,
    /// TLS, but the server is not verified (`insecure_skip_verify`, or
    /// PostgreSQL's `sslmode=require`): encrypted, not authenticated.
    Unverified,
    /// TLS, and the server's certificate verified against the trusted CAs.
    Verified,
}

impl Transport {
    /// How connections are protected when the URL asks for TLS (`tls_on`)
    /// with `settings`: verified unless they say `insecure_skip_verify`.
    pub fn of(tls_on: bool, settings: Option<&TlsSettings>) -> Self {
        match (tls_on, settings.is_some_and(|s| s.insecure_skip_verify)) {
            (false, _) => Transport::Plaintext,
            (true, true) => Transport::Unverified,
            (true, false) => Transport::Verified,
        }
    }

    /// How requests to an HTTP engine (ClickHouse, Elasticsearch) are
    /// protected: TLS when the URL's `scheme` is `https`.
    pub fn of_http(scheme: &str, settings: Option<&TlsSettings>) -> Self {
        Self::of(scheme == "https", settings)
    }

    /// What is wrong with TLS `settings` next to an HTTP engine's URL
    /// `scheme`, or `None`.
    pub fn http_problem(scheme: &str, settings: Option<&TlsSettings>) -> Option<String> {
        (settings.is_some() && scheme != "https")
            .then(|| "tls settings are given but the url is http://; use https://".into())
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Plaintext => "plaintext",
            Transport::Opportunistic => "tls if offered, UNVERIFIED",
            Transport::Unverified => "tls, UNVERIFIED",
            Transport::Verified => "tls, verified",
        })
    }
}

/// Why a TLS handshake was refused. Each is a configuration problem on one
/// side or the other, never a sign that the server is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate does not chain to a trusted CA (the
    /// `ca_file`, or the system's roots).
    UnknownIssuer,
    /// The server's certificate does not name the host the URL dials.
    HostnameMismatch,
    /// The server's certificate has expired or is not valid yet.
    Expired,
    /// The server's certificate is otherwise unacceptable (bad encoding,
    /// wrong usage, revoked, bad signature).
    BadCertificate,
    /// The server refused the handshake (an alert: often a client certificate
    /// it does not accept, or none given where one is required).
    RefusedByServer,
    /// The handshake failed otherwise (no common protocol version or cipher,
    /// or the port does not speak TLS).
    Handshake,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownIssuer => {
                "the server's certificate is not signed by a trusted CA (check ca_file)"
            }
            TlsFailure::HostnameMismatch => {
                "the server's certificate does not name the host in the URL"
            }
            TlsFailure::Expired => "the server's certificate has expired or is not valid yet",
            TlsFailure::BadCertificate => "the server's certificate is not acceptable",
            TlsFailure::RefusedByServer => {
                "the server refused the handshake (check cert_file and key_file)"
            }
            TlsFailure::Handshake => "the TLS handshake failed",
        })
    }
}

impl TlsFailure {
    /// The TLS failure somewhere in `error`'s source chain, if it is one.
    ///
    /// Looks through `std::io::Error` and `Arc` wrappers too: their
    /// `source()` skips the error they wrap, which is where drivers keep
    /// rustls' error.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::of(tls));
            }
            // Wrappers whose `source()` skips what they wrap: an `io::Error`
            // (tokio-rustls puts rustls' error in one) and an `Arc` (the redis
            // crate keeps its io errors in one).
            let wrapped: Option<&(dyn std::error::Error + 'static)> =
                match e.downcast_ref::<std::io::Error>() {
                    Some(io) => io.get_ref().map(|inner| inner as _),
                    None => e
                        .downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()
                        .map(|inner| &**inner as _),
                };
            if let Some(found) = wrapped.and_then(Self::find) {
                return Some(found);
            }
            next = e.source();
        }
        None
    }

    fn of(error: &rustls::Error) -> TlsFailure {
        use rustls::CertificateError as C;
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                C::UnknownIssuer => TlsFailure::UnknownIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    TlsFailure::HostnameMismatch
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsFailure::Expired,
                _ => TlsFailure::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => TlsFailure::RefusedByServer,
            _ => TlsFailure::Handshake,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The https rule for HTTP engines (ClickHouse, Elasticsearch): a `tls`
    /// block needs an `https://` URL, and the URL's scheme and the block say
    /// together whether and how the transport is encrypted.
    #[test]
    fn the_url_and_the_settings_agree() {
        let tls = TlsSettings::default();
        assert!(Transport::http_problem("http", Some(&tls)).is_some());
        assert_eq!(Transport::http_problem("https", Some(&tls)), None);
        assert_eq!(Transport::http_problem("http", None), None);
        assert_eq!(Transport::of_http("http", None), Transport::Plaintext);
        assert_eq!(Transport::of_http("https", None), Transport::Verified);
        let insecure = TlsSettings {
            insecure_skip_verify: true,
            ..TlsSettings::default()
        };
        assert_eq!(
            Transport::of_http("https", Some(&insecure)),
            Transport::Unverified
        );
    }

    /// An error whose source is an `Arc`, as the redis crate's errors are.
    #[derive(Debug)]
    struct Outer(std::sync::Arc<dyn std::error::Error + Send + Sync>);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_rustls_errors_behind_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(TlsFailure::find(&io), Some(TlsFailure::UnknownIssuer));
        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert_eq!(TlsFailure::find(&name), Some(TlsFailure::HostnameMismatch));
        let shared: std::sync::Arc<dyn std::error::Error + Send + Sync> = std::sync::Arc::new(
            std::io::Error::new(std::io::ErrorKind::InvalidData, name.clone()),
        );
        assert_eq!(
            TlsFailure::find(&Outer(shared)),
            Some(TlsFailure::HostnameMismatch)
        );
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(TlsFailure::find(&refused), None);
    }

    #[test]
    fn load_names_the_file_and_never_its_content() {
        let dir = std::env::temp_dir().join(format!("sy-core-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hunter2, not a certificate\n").unwrap();
        let err = TlsSettings::with_ca_file(&junk)
            .load("tls")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tls.ca_file: "), "{err}");
        assert!(
            err.contains("junk.pem") && !err.contains("hunter2"),
            "{err}"
        );
        let half = TlsSettings {
            cert_file: Some(junk.clone()),
            ..TlsSettings::default()
        };
        let err = half.load("tls").unwrap_err().to_string();
        assert_eq!(err, "tls.key_file: cert_file needs a key_file");
        assert!(TlsSettings::default().load("tls").unwrap().ca.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
