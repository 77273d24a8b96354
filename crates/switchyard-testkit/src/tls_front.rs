//! A TLS listener in front of a plaintext server: for the MongoDB and
//! Elasticsearch stand-ins, which speak no TLS themselves, so the drivers'
//! TLS (trust, host name, client certificate) still runs against a real
//! handshake on loopback. The listener is rustls with a [`TestCa`]'s server
//! certificate; it asks for a client certificate signed by the same CA,
//! accepts a client without one, and counts both, so a test can tell that
//! its client presented one.
//!
//! What it proves is the client side (the driver's handshake and its
//! verification of the server); the engine behind it still speaks plaintext.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, TestkitError};
use crate::port::loopback;
use crate::tls::{TestCa, SERVER_NAME};

#[derive(Debug, Default)]
struct Counts {
    handshakes: AtomicU64,
    with_client_cert: AtomicU64,
    refused: AtomicU64,
}

/// A TLS listener on a loopback port that forwards every session to one
/// plaintext upstream. Dropping it stops accepting; open sessions end when
/// either side closes.
#[derive(Debug)]
pub struct TlsFront {
    addr: SocketAddr,
    counts: Arc<Counts>,
    stop: CancellationToken,
}

fn environment(what: &str) -> impl FnOnce(rustls::Error) -> TestkitError + '_ {
    move |e| TestkitError::Environment(format!("{what}: {e}"))
}

fn server_config(ca: &TestCa) -> Result<ServerConfig> {
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).map_err(TestkitError::io(format!("reading {}", path.display())))
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(ca.server_cert_file())?)
            .flatten()
            .collect();
    let key = PrivateKeyDer::from_pem_slice(&read(ca.server_key_file())?)
        .map_err(|e| TestkitError::Environment(format!("the test server key: {e}")))?;
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&read(ca.ca_file())?).flatten());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TestkitError::Environment(format!("the client verifier: {e}")))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(environment("the TLS versions"))?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(environment("the test server certificate"))
}

impl TlsFront {
    /// Listens on a free loopback port with `ca`'s server certificate (for
    /// [`SERVER_NAME`]) and forwards each session to `upstream`.
    pub async fn start(upstream: SocketAddr, ca: &TestCa) -> Result<Self> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(ca)?));
        let listener = TcpListener::bind(loopback(0))
            .await
            .map_err(TestkitError::io("binding the TLS front"))?;
        let addr = listener
            .local_addr()
            .map_err(TestkitError::io("the TLS front's address"))?;
        let counts = Arc::new(Counts::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept(
            listener,
            acceptor,
            upstream,
            counts.clone(),
            stop.clone(),
        ));
        Ok(Self { addr, counts, stop })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `localhost:PORT`: the name the server certificate is issued for.
    pub fn host_port(&self) -> String {
        format!("{SERVER_NAME}:{}", self.addr.port())
    }

    /// Handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.counts.handshakes.load(Ordering::Relaxed)
    }

    /// Handshakes in which the client presented a certificate the CA signed.
    pub fn with_client_cert(&self) -> u64 {
        self.counts.with_client_cert.load(Ordering::Relaxed)
    }

    /// Handshakes that failed (the client refused the certificate, or spoke
    /// no TLS).
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    counts: Arc<Counts>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let (acceptor, counts, stop) = (acceptor.clone(), counts.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve(client, acceptor, upstream, counts) => {}
            }
        });
    }
}

async fn serve(
    client: TcpStream,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    counts: Arc<Counts>,
) {
    let mut tls = match acceptor.accept(client).await {
        Ok(tls) => tls,
        Err(_) => {
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    counts.handshakes.fetch_add(1, Ordering::Relaxed);
    if tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty())
    {
        counts.with_client_cert.fetch_add(1, Ordering::Relaxed);
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
}
