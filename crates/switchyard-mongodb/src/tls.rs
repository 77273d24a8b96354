//! TLS for MongoDB: a URL with `tls=true` (or `mongodb+srv://`, where TLS is
//! on by default) through the driver's rustls, with the endpoint's
//! [`TlsSettings`] as the driver's `tlsCAFile` / `tlsCertificateKeyFile` /
//! `tlsAllowInvalidCertificates`.
//!
//! | URL | without `tls` | with `tls` |
//! |---|---|---|
//! | no TLS | plaintext | refused: add `tls=true` |
//! | `tls=true` | verified against Mozilla's roots | verified against `ca_file` only, client certificate if given; `insecure_skip_verify` turns verification off |
//! | `tlsInsecure` / `tlsAllowInvalidCertificates` | refused: set `insecure_skip_verify` | refused likewise |
//! | `tlsCAFile` / `tlsCertificateKeyFile` | as the driver reads them | refused: files go in the block |
//!
//! The driver reads the client certificate and its key from one PEM file, so
//! `cert_file` and `key_file` must name the same (combined) file.
//!
//! The driver reports a refused certificate only as "no server selected"
//! once its server selection timeout has passed, with the cause in a string.
//! So a direct-mode backend checks the certificate itself, with a handshake
//! of its own under the same trust ([`Handshake`]): at its first checkout, and
//! in the probe's reachability check. A refused certificate is then
//! [`Error::Tls`] at once, as for the other engines.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mongodb::options::{ClientOptions, ServerAddress, Tls};
use rustls::pki_types::ServerName;
use switchyard_core::{EndpointId, Error, TlsFailure, TlsMaterial, TlsSettings, Transport};
use tokio::net::TcpStream;

/// Whether TLS is on for a URL whose parsed `tls` option is `tls`.
fn is_on(tls: Option<&Tls>, srv: bool) -> bool {
    match tls {
        Some(Tls::Enabled(_)) => true,
        Some(Tls::Disabled) => false,
        None => srv,
    }
}

/// What is wrong with `settings` next to the URL's own TLS options, or `None`.
pub(crate) fn problem(
    tls: Option<&Tls>,
    srv: bool,
    settings: Option<&TlsSettings>,
) -> Option<String> {
    if !is_on(tls, srv) {
        return settings.map(|_| {
            "tls settings are given but the url does not turn TLS on; add tls=true".into()
        });
    }
    let url = match tls {
        Some(Tls::Enabled(options)) => options.clone(),
        _ => Default::default(),
    };
    let loud = settings.is_some_and(|s| s.insecure_skip_verify);
    if url.allow_invalid_certificates == Some(true) && !loud {
        return Some(
            "the url's tlsInsecure / tlsAllowInvalidCertificates turns verification off \
             silently; set tls.insecure_skip_verify: true instead"
                .into(),
        );
    }
    let settings = settings?;
    if url.ca_file_path.is_some() || url.cert_key_file_path.is_some() {
        return Some(
            "the url names TLS files (tlsCAFile, tlsCertificateKeyFile) next to a tls block; \
             give them in the block only"
                .into(),
        );
    }
    match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) if cert != key => Some(format!(
            "the MongoDB driver reads the client certificate and its key from one PEM file: \
             put both in one file and name it as cert_file and key_file (now {} and {})",
            cert.display(),
            key.display()
        )),
        _ => None,
    }
}

/// How connections are protected with the URL's `tls` and `settings`.
pub(crate) fn transport(tls: Option<&Tls>, srv: bool, settings: Option<&TlsSettings>) -> Transport {
    let url_insecure =
        matches!(tls, Some(Tls::Enabled(o)) if o.allow_invalid_certificates == Some(true));
    match Transport::of(is_on(tls, srv), settings) {
        Transport::Verified if url_insecure => Transport::Unverified,
        transport => transport,
    }
}

/// `options` with `settings` as the driver's TLS options.
pub(crate) fn apply(options: &mut ClientOptions, settings: Option<&TlsSettings>) {
    if let (Some(Tls::Enabled(tls)), Some(settings)) = (&mut options.tls, settings) {
        tls.ca_file_path = settings.ca_file.clone();
        tls.cert_key_file_path = settings.cert_file.clone();
        tls.allow_invalid_certificates = Some(settings.insecure_skip_verify);
    }
}

/// The certificate check of a direct-mode backend with TLS: a handshake with
/// the endpoint under the same trust and identity as the driver's.
pub(crate) struct Handshake {
    host: String,
    port: u16,
    connector: tokio_rustls::TlsConnector,
    /// Whether a handshake with the server's current certificate succeeded;
    /// cleared when one fails.
    verified: AtomicBool,
}

impl Handshake {
    /// The check for `host` with the TLS in `options` (files read now), or
    /// `None` without TLS or without a single TCP host.
    pub(crate) fn new(
        options: &ClientOptions,
        host: Option<&ServerAddress>,
        path: &str,
    ) -> Result<Option<Self>, Error> {
        let (Some(Tls::Enabled(tls)), Some(ServerAddress::Tcp { host, port })) =
            (&options.tls, host)
        else {
            return Ok(None);
        };
        let file = |path: &Option<std::path::PathBuf>| path.as_deref().map(Path::to_path_buf);
        let settings = TlsSettings {
            ca_file: file(&tls.ca_file_path),
            cert_file: file(&tls.cert_key_file_path),
            key_file: file(&tls.cert_key_file_path),
            insecure_skip_verify: tls.allow_invalid_certificates == Some(true),
        };
        let path = format!("{path}.tls");
        let material: TlsMaterial = settings.load(&path)?;
        let config = material.client_config().map_err(|message| Error::Config {
            path: path.clone(),
            message,
        })?;
        Ok(Some(Self {
            host: host.clone(),
            port: port.unwrap_or(27017),
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            verified: AtomicBool::new(false),
        }))
    }

    /// Whether a handshake succeeded since the last refused one.
    pub(crate) fn verified(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
    }

    /// Connects and shakes hands. A refused certificate is [`Error::Tls`];
    /// a refused or broken connection is `Ok(Err(io))`, for the caller to
    /// judge (the driver reports those itself).
    pub(crate) async fn check(
        &self,
        endpoint: &EndpointId,
    ) -> Result<Result<(), std::io::Error>, Error> {
        let tcp = match TcpStream::connect((self.host.as_str(), self.port)).await {
            Ok(tcp) => tcp,
            Err(io) => return Ok(Err(io)),
        };
        let name = match ServerName::try_from(self.host.clone()) {
            Ok(name) => name,
            Err(e) => {
                return Ok(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    e,
                )))
            }
        };
        match self.connector.connect(name, tcp).await {
            Ok(_) => {
                self.verified.store(true, Ordering::Relaxed);
                Ok(Ok(()))
            }
            Err(io) => match TlsFailure::find(&io) {
                Some(failure) => {
                    self.verified.store(false, Ordering::Relaxed);
                    Err(Error::Tls {
                        endpoint: endpoint.clone(),
                        failure,
                        source: Box::new(io),
                    })
                }
                None => Ok(Err(io)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use mongodb::options::ConnectionString;

    use super::*;

    fn parsed(url: &str) -> Option<Tls> {
        ConnectionString::parse(url).unwrap().tls
    }

    #[test]
    fn the_url_and_the_settings_agree() {
        let block = TlsSettings::with_ca_file("/etc/ca.pem");
        let plain = parsed("mongodb://db:27017");
        assert!(problem(plain.as_ref(), false, Some(&block))
            .unwrap()
            .contains("add tls=true"));
        assert_eq!(problem(plain.as_ref(), false, None), None);
        assert_eq!(transport(plain.as_ref(), false, None), Transport::Plaintext);
        let on = parsed("mongodb://db:27017/?tls=true");
        assert_eq!(problem(on.as_ref(), false, Some(&block)), None);
        assert_eq!(
            transport(on.as_ref(), false, Some(&block)),
            Transport::Verified
        );
        assert_eq!(transport(None, true, None), Transport::Verified);

        let silent = parsed("mongodb://db:27017/?tls=true&tlsInsecure=true");
        assert!(problem(silent.as_ref(), false, None)
            .unwrap()
            .contains("insecure_skip_verify"));
        let loud = TlsSettings {
            insecure_skip_verify: true,
            ..TlsSettings::default()
        };
        assert_eq!(problem(silent.as_ref(), false, Some(&loud)), None);
        assert_eq!(
            transport(on.as_ref(), false, Some(&loud)),
            Transport::Unverified
        );

        let files = parsed("mongodb://db:27017/?tls=true&tlsCAFile=/x.pem");
        assert!(problem(files.as_ref(), false, Some(&block)).is_some());
        let split = block.clone().client_cert("/c.pem", "/k.pem");
        assert!(problem(on.as_ref(), false, Some(&split))
            .unwrap()
            .contains("one PEM file"));
        let combined = block.client_cert("/ck.pem", "/ck.pem");
        assert_eq!(problem(on.as_ref(), false, Some(&combined)), None);

        let mut options = ClientOptions::default();
        options.tls = on;
        apply(&mut options, Some(&combined));
        match options.tls {
            Some(Tls::Enabled(tls)) => {
                assert_eq!(tls.ca_file_path.as_deref(), Some(Path::new("/etc/ca.pem")));
                assert_eq!(
                    tls.cert_key_file_path.as_deref(),
                    Some(Path::new("/ck.pem"))
                );
                assert_eq!(tls.allow_invalid_certificates, Some(false));
            }
            other => panic!("{other:?}"),
        }
    }
}
