//! TLS for Elasticsearch: an `https://` URL through the elasticsearch crate's
//! rustls transport (reqwest), with the endpoint's [`TlsSettings`].
//!
//! | URL | without `tls` | with `tls` |
//! |---|---|---|
//! | `http://` | plaintext | refused: the two contradict |
//! | `https://` | verified against Mozilla's roots | verified against `ca_file` *and* Mozilla's roots (reqwest adds a CA to its built-in roots; the crate exposes no way to drop them), client certificate if given; `insecure_skip_verify` turns verification off |
//!
//! The crate takes one credential: basic authentication or a client
//! certificate. With both, the certificate is the credential it knows of and
//! the basic credentials travel as a default `Authorization` header (marked
//! sensitive), so a cluster that demands both still gets both.

use base64::Engine as _;
use elasticsearch::auth::{ClientCertificate, Credentials};
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{HeaderValue, AUTHORIZATION};
use elasticsearch::http::transport::TransportBuilder;
use switchyard_core::{Error, HttpUrl, TlsSettings};

/// `builder` with the credentials and `tls` applied (its files read now).
pub(crate) fn apply(
    mut builder: TransportBuilder,
    connect: &HttpUrl,
    tls: Option<&TlsSettings>,
    path: &str,
) -> Result<TransportBuilder, Error> {
    // Basic authentication when the URL names a user.
    let basic = connect
        .user
        .as_ref()
        .map(|user| (user, connect.password.clone().unwrap_or_default()));
    let path = format!("{path}.tls");
    let material = tls.map(|t| t.load(&path)).transpose()?;
    let problem = |field: &str, message: String| Error::Config {
        path: format!("{path}.{field}"),
        message,
    };
    let identity = material.as_ref().and_then(|m| m.identity.as_ref());
    match (basic, identity) {
        (Some((user, password)), None) => {
            builder = builder.auth(Credentials::Basic(user.clone(), password));
        }
        (basic, Some(identity)) => {
            // reqwest's rustls identity: the key and the chain in one PEM.
            let mut pem = identity.key.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&identity.cert);
            builder = builder.auth(Credentials::Certificate(ClientCertificate::Pem(pem)));
            if let Some((user, password)) = basic {
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                let mut value = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
                    problem(
                        "cert_file",
                        "the url's credentials cannot be sent as a header".into(),
                    )
                })?;
                value.set_sensitive(true);
                builder = builder.header(AUTHORIZATION, value);
            }
        }
        (None, None) => {}
    }
    let Some(material) = material else {
        return Ok(builder);
    };
    if material.insecure_skip_verify {
        return Ok(builder.cert_validation(CertificateValidation::None));
    }
    if let Some(ca) = &material.ca {
        let chain = Certificate::from_pem(ca).map_err(|e| problem("ca_file", e.to_string()))?;
        builder = builder.cert_validation(CertificateValidation::Full(chain));
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The https rule itself (`Transport::of_http`, `Transport::http_problem`)
    /// is core's and tested there; here, that the client names a bad file.
    #[test]
    fn a_bad_tls_file_is_named() {
        let missing = TlsSettings::with_ca_file("/nonexistent/ca.pem");
        let builder = TransportBuilder::default();
        let url = HttpUrl::parse(&"http://127.0.0.1:9200".into()).unwrap();
        let err = apply(builder, &url, Some(&missing), "es").err().unwrap();
        assert!(err.to_string().starts_with("es.tls.ca_file: "), "{err}");
    }
}
