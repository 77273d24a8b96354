//! One rustls client configuration from [`TlsMaterial`], for the engines whose
//! driver takes a configuration rather than files (ClickHouse's hyper client),
//! for probes that check a handshake of their own (MongoDB), and for
//! `switchyard check`. Built as the drivers build theirs: ring, the safe
//! default protocol versions (TLS 1.2 and 1.3), the `ca_file` as the only
//! trusted roots when given, else Mozilla's (webpki-roots, as sqlx, the redis
//! crate and the mongodb driver use).
//!
//! ```
//! use switchyard_core::TlsSettings;
//!
//! let material = TlsSettings::default().load("tls").unwrap();
//! let config = material.client_config().unwrap();
//! assert!(config.alpn_protocols.is_empty());
//! ```

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::TlsMaterial;

impl TlsMaterial {
    /// A rustls client configuration with this material: its CAs (else
    /// Mozilla's roots) and client certificate, and no verification of the
    /// server at all with `insecure_skip_verify`. The error never holds the
    /// files' content.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                roots.add_parsable_certificates(CertificateDer::pem_slice_iter(pem).flatten());
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(id) => {
                let chain: Vec<_> = CertificateDer::pem_slice_iter(&id.cert).flatten().collect();
                let key = PrivateKeyDer::from_pem_slice(&id.key)
                    .map_err(|_| "the client key is not a PEM private key".to_owned())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate and key do not fit: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        if self.insecure_skip_verify {
            config
                .dangerous()
                .set_certificate_verifier(Arc::new(AnyServer(provider)));
        }
        Ok(config)
    }
}

/// `insecure_skip_verify`: any certificate for any name is accepted (the
/// handshake's signatures are still checked, so the session is encrypted to
/// whoever holds the key of the certificate shown).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
