//! What `switchyard check` shows about encryption: how each endpoint is
//! protected as configured, and the TLS version its server negotiates.
//!
//! The version comes from a handshake of the check's own, with the
//! endpoint's TLS settings (same CA file, same client certificate), since
//! the drivers do not expose the version of their connections. For
//! PostgreSQL the handshake follows the `SSLRequest` message, as libpq's does.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use switchyard_core::{SecretUrl, TlsSettings, Transport};
use switchyard_postgres::PgBackendConfig;
use switchyard_redis::RedisBackendConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::settings::{EndpointSettings, Settings};
use crate::Engine;

/// One endpoint's encryption, as `switchyard check` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTls {
    /// The cluster.
    pub cluster: String,
    /// The endpoint.
    pub endpoint: String,
    /// How its connections are protected, as configured.
    pub transport: Transport,
    /// The TLS version a verified handshake negotiated (`TLSv1_3`), `None`
    /// where nothing was verified (plaintext, or verification off), or why the
    /// handshake failed (never a secret).
    pub version: Result<Option<String>, String>,
}

/// The encryption of every endpoint in `settings`, each handshake bounded by
/// `timeout`.
pub async fn check_tls(settings: &Settings, timeout: Duration) -> Vec<EndpointTls> {
    let mut out = Vec::new();
    for (cluster, c) in &settings.clusters {
        for ep in &c.endpoints {
            let transport = transport(c.engine, ep);
            let version = if transport == Transport::Verified {
                match tokio::time::timeout(timeout, handshake(c.engine, ep)).await {
                    Ok(result) => result.map(Some),
                    Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
                }
            } else {
                Ok(None)
            };
            out.push(EndpointTls {
                cluster: cluster.clone(),
                endpoint: ep.name.clone(),
                transport,
                version,
            });
        }
    }
    out
}

/// How `ep`'s connections are protected, as configured. The engines whose
/// crates are optional features are read from the URL here, so `check`
/// shows them without the feature.
pub fn transport(engine: Engine, ep: &EndpointSettings) -> Transport {
    url_transport(engine, &ep.name, &ep.url, ep.tls.as_ref())
}

/// [`transport`] of an endpoint named `name` at `url` with `tls`.
pub(crate) fn url_transport(
    engine: Engine,
    name: &str,
    url: &SecretUrl,
    tls: Option<&TlsSettings>,
) -> Transport {
    let on = match engine {
        Engine::Postgres => {
            let mut config = PgBackendConfig::new(name.to_owned(), url.clone());
            config.tls = tls.cloned();
            return config.transport();
        }
        Engine::Redis => {
            let mut config = RedisBackendConfig::new(name.to_owned(), url.clone());
            config.tls = tls.cloned();
            return config.transport();
        }
        Engine::Mongodb => {
            let query = url.expose().split_once('?').map_or("", |(_, q)| q);
            let pairs = || query.split('&').map(str::to_ascii_lowercase);
            if pairs()
                .any(|kv| kv == "tlsinsecure=true" || kv == "tlsallowinvalidcertificates=true")
            {
                return Transport::Unverified;
            }
            let on = pairs().any(|kv| kv == "tls=true" || kv == "ssl=true");
            let off = pairs().any(|kv| kv == "tls=false" || kv == "ssl=false");
            on || (url.scheme().as_deref() == Some("mongodb+srv") && !off)
        }
        Engine::Clickhouse | Engine::Elasticsearch => url.scheme().as_deref() == Some("https"),
    };
    Transport::of(on, tls)
}

/// Host, port and TLS server name of `ep`'s URL.
fn address(engine: Engine, ep: &EndpointSettings) -> Result<(String, u16), String> {
    let url = url::Url::parse(ep.url.expose()).map_err(|e| format!("{}: {e}", ep.url))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("{} has no host", ep.url))?;
    let port = url.port().unwrap_or(match engine {
        Engine::Postgres => 5432,
        Engine::Redis => 6379,
        Engine::Mongodb => 27017,
        Engine::Clickhouse | Engine::Elasticsearch => 443,
    });
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

/// A rustls client configuration from `tls`: the one the drivers build.
fn client_config(tls: Option<&TlsSettings>, path: &str) -> Result<rustls::ClientConfig, String> {
    let material = tls
        .cloned()
        .unwrap_or_default()
        .load(path)
        .map_err(|e| e.to_string())?;
    material.client_config()
}

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn handshake(engine: Engine, ep: &EndpointSettings) -> Result<String, String> {
    let (host, port) = address(engine, ep)?;
    let config = client_config(ep.tls.as_ref(), &format!("{}.tls", ep.name))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let mut tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    if engine == Engine::Postgres {
        tcp.write_all(&SSL_REQUEST)
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer[0] != b'S' {
            return Err("the server does not offer TLS".into());
        }
    }
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| match switchyard_core::TlsFailure::find(&e) {
            Some(failure) => failure.to_string(),
            None => e.to_string(),
        })?;
    let version = stream.get_ref().1.protocol_version();
    Ok(version.map_or_else(|| "?".to_owned(), |v| format!("{v:?}")))
}
