//! TLS for Redis: `rediss://` URLs through the redis crate's rustls support,
//! with the endpoint's [`TlsSettings`] (trusted CAs, client certificate).
//!
//! A `rediss://` URL always verifies the server: against the `ca_file` when
//! one is given, else against Mozilla's roots (webpki-roots, as sqlx does). Skipping verification takes
//! `insecure_skip_verify: true` in the settings; the redis crate's own
//! `#insecure` URL fragment is refused, so it cannot hide in a URL.

use deadpool_redis::redis::{self, ConnectionAddr, ConnectionInfo};
use switchyard_core::{Error, TlsSettings, Transport};

/// Whether `info` dials TLS.
fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// What is wrong with `tls` for a connection to `info`, or `None`.
pub(crate) fn problem(
    info: &ConnectionInfo,
    url: &str,
    tls: Option<&TlsSettings>,
) -> Option<String> {
    if !is_tls(info) {
        return tls.map(|_| "tls settings are given but the url is redis://; use rediss://".into());
    }
    let fragment_insecure = matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. });
    let loud = tls.is_some_and(|t| t.insecure_skip_verify);
    (fragment_insecure && !loud).then(|| {
        format!(
            "{url}: the #insecure fragment turns verification off silently; set \
             tls.insecure_skip_verify: true instead"
        )
    })
}

/// How connections to `info` are protected with `tls`.
pub(crate) fn transport(info: &ConnectionInfo, tls: Option<&TlsSettings>) -> Transport {
    Transport::of(is_tls(info), tls)
}

/// A client for `info` with `tls` applied: the files are read now, so every
/// connection of one backend uses the same trust and identity.
pub(crate) fn client(
    info: ConnectionInfo,
    tls: Option<&TlsSettings>,
    path: &str,
) -> Result<redis::Client, Error> {
    let config_error = |message: String| Error::Config {
        path: format!("{path}.tls"),
        message,
    };
    let Some(settings) = tls.filter(|_| is_tls(&info)) else {
        return redis::Client::open(info).map_err(|e| config_error(e.to_string()));
    };
    let material = settings.load(&format!("{path}.tls"))?;
    let info = match info.addr().clone() {
        ConnectionAddr::TcpTls {
            host,
            port,
            tls_params,
            ..
        } => info.set_addr(ConnectionAddr::TcpTls {
            host,
            port,
            insecure: material.insecure_skip_verify,
            tls_params,
        }),
        _ => info,
    };
    let certificates = redis::TlsCertificates {
        client_tls: material.identity.map(|id| redis::ClientTlsConfig {
            client_cert: id.cert,
            client_key: id.key,
        }),
        root_cert: material.ca,
    };
    redis::Client::build_with_tls(info, certificates).map_err(|e| config_error(e.to_string()))
}
