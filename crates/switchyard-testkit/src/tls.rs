//! Throwaway certificates for TLS servers in the test bed, made in-process with
//! [rcgen](https://docs.rs/rcgen) (no `openssl` subprocess): a CA, a server
//! certificate it signs, a client certificate it signs, and a second CA that
//! signs nothing, for tests of an untrusted server.
//!
//! The server certificate names only `localhost`, not `127.0.0.1`: a client
//! dialing `localhost` verifies, one dialing `127.0.0.1` sees a certificate
//! for another host, so both the good and the wrong-hostname case run on
//! loopback.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::error::{Result, TestkitError};
use crate::process::RunAs;
use crate::scratch::node_dir;

/// The host name the server certificate is issued for.
pub const SERVER_NAME: &str = "localhost";

/// The common name of the client certificate (PostgreSQL's `cert`
/// authentication maps it to the role of the same name).
pub const CLIENT_NAME: &str = "switchyard";

/// A certificate authority and the certificates it issued, as PEM files in a
/// scratch folder (removed on drop).
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
}

fn tls_error(what: &str) -> impl FnOnce(rcgen::Error) -> TestkitError + '_ {
    move |e| TestkitError::Environment(format!("generating the test {what}: {e}"))
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error("CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(tls_error("CA key"))?;
    CertifiedIssuer::self_signed(params, key).map_err(tls_error("CA"))
}

/// A leaf certificate signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names).map_err(tls_error("certificate"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().map_err(tls_error("key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(tls_error("certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl TestCa {
    /// Generates a CA, a server certificate for [`SERVER_NAME`], a client
    /// certificate for [`CLIENT_NAME`] and an unrelated CA, and writes them to
    /// a scratch folder.
    pub fn generate() -> Result<Self> {
        let dir = node_dir("tls", None)?;
        let trusted = ca("switchyard test CA")?;
        let other = ca("switchyard unknown CA")?;
        let (server_cert, server_key) = leaf(
            &trusted,
            vec![SERVER_NAME.into()],
            SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            &trusted,
            Vec::new(),
            CLIENT_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let files = [
            ("ca.pem", trusted.pem()),
            ("other-ca.pem", other.pem()),
            ("server.crt", server_cert),
            ("server.key", server_key),
            ("client.crt", client_cert),
            ("client.key", client_key),
        ];
        for (name, pem) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, pem)
                .map_err(TestkitError::io(format!("writing {}", path.display())))?;
        }
        Ok(Self { dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The folder holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate that signed the server and client certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// A CA certificate that signed nothing here: trusting only it, a client
    /// must refuse the test servers.
    pub fn other_ca_file(&self) -> PathBuf {
        self.file("other-ca.pem")
    }

    /// The server certificate (for [`SERVER_NAME`] only).
    pub fn server_cert_file(&self) -> PathBuf {
        self.file("server.crt")
    }

    /// The server certificate's private key.
    pub fn server_key_file(&self) -> PathBuf {
        self.file("server.key")
    }

    /// The client certificate (common name [`CLIENT_NAME`]).
    pub fn client_cert_file(&self) -> PathBuf {
        self.file("client.crt")
    }

    /// The client certificate's private key.
    pub fn client_key_file(&self) -> PathBuf {
        self.file("client.key")
    }
}

/// A server's copies of its certificate, key and the CA (to check client
/// certificates), in its own folder.
#[derive(Debug, Clone)]
pub(crate) struct ServerFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
}

impl TestCa {
    /// Copies the server's files into `dir`, owned by `owner` with the key
    /// readable by its owner only (PostgreSQL refuses a key others can read).
    pub(crate) fn install(&self, dir: &Path, owner: Option<RunAs>) -> Result<ServerFiles> {
        use std::os::unix::fs::PermissionsExt;
        let files = ServerFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            ca: dir.join("ca.pem"),
        };
        for (from, to) in [
            (self.server_cert_file(), &files.cert),
            (self.server_key_file(), &files.key),
            (self.ca_file(), &files.ca),
        ] {
            let context = || format!("copying {} to {}", from.display(), to.display());
            std::fs::copy(&from, to).map_err(TestkitError::io(context()))?;
            if let Some(user) = owner {
                nix::unistd::chown(to, Some(user.uid), Some(user.gid)).map_err(|e| {
                    TestkitError::Io {
                        context: context(),
                        source: e.into(),
                    }
                })?;
            }
        }
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).map_err(
            TestkitError::io(format!("restricting {}", files.key.display())),
        )?;
        Ok(files)
    }
}
