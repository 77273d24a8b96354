//! TLS for ClickHouse: an `https://` URL is served by a hyper client of this
//! crate's own (hyper-rustls over the [`TlsMaterial::client_config`] of the
//! endpoint's [`TlsSettings`]), handed to the `clickhouse` crate, whose own
//! TLS features take no CA file or client certificate.
//!
//! | URL | without `tls` | with `tls` |
//! |---|---|---|
//! | `http://` | plaintext | refused: the two contradict |
//! | `https://` | verified against Mozilla's roots | verified against `ca_file` (else Mozilla's roots), client certificate if given; `insecure_skip_verify` turns verification off |
//!
//! The files are read when the backend is built, so every request of one
//! backend uses the same trust; a rotated file takes effect through a new
//! backend (the config crate builds one when it sees the file change).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use switchyard_core::{Error, TlsMaterial, TlsSettings};

/// TCP keep-alive on the client's sockets, as the `clickhouse` crate's own
/// client sets it.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Idle sockets are closed before ClickHouse's own 3 s keep-alive timeout
/// closes them under a request (the `clickhouse` crate's value).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `url` (already parsed) dials TLS.
fn is_https(url: &url::Url) -> bool {
    url.scheme() == "https"
}

/// The `clickhouse` client for `url`: the crate's default one for `http://`,
/// one over hyper-rustls with `tls` (files read now) for `https://`.
pub(crate) fn client(
    url: &url::Url,
    tls: Option<&TlsSettings>,
    path: &str,
) -> Result<clickhouse::Client, Error> {
    if !is_https(url) {
        return Ok(clickhouse::Client::default());
    }
    let path = format!("{path}.tls");
    let material = match tls {
        Some(settings) => settings.load(&path)?,
        None => TlsMaterial {
            ca: None,
            identity: None,
            insecure_skip_verify: false,
        },
    };
    let config = material.client_config().map_err(|message| Error::Config {
        path: path.clone(),
        message,
    })?;
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let hyper = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https);
    Ok(clickhouse::Client::with_http_client(hyper))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The https rule itself (`Transport::of_http`, `Transport::http_problem`)
    /// is core's and tested there; here, that the client names a bad file.
    #[test]
    fn a_bad_tls_file_is_named() {
        let https = url::Url::parse("https://localhost:8443").unwrap();
        assert!(client(&https, None, "ch").is_ok());
        let missing = TlsSettings::with_ca_file("/nonexistent/ca.pem");
        let err = client(&https, Some(&missing), "ch").unwrap_err();
        assert!(err.to_string().starts_with("ch.tls.ca_file: "), "{err}");
    }
}
