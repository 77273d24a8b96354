//! TLS for PostgreSQL: [`TlsSettings`] turned into sqlx's connect options.
//!
//! sqlx speaks TLS through rustls. The URL's `sslmode` keeps libpq's meaning;
//! a `tls` block on the endpoint switches verification on for good:
//!
//! | URL `sslmode` | without `tls` | with `tls` |
//! |---|---|---|
//! | absent | `prefer` (libpq's default: TLS if offered, unverified) | `verify-full`, or `require` with `insecure_skip_verify` |
//! | `verify-full`, `verify-ca` | as written | as written, with the `tls` files |
//! | `require`, `prefer`, `allow` | as written (unverified) | refused unless `insecure_skip_verify` |
//! | `disable` | plaintext | refused: the two contradict |
//!
//! The CA, certificate and key are read when the backend is built and handed
//! to sqlx as PEM, so every connection of one backend uses the same trust,
//! and a rotated file takes effect through a new backend (the config crate
//! builds one when it sees the file change).

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use switchyard_core::{TlsMaterial, TlsSettings, Transport};

/// Whether `url` sets `sslmode` (or sqlx's spelling `ssl-mode`) itself.
fn url_sets_sslmode(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| pair.starts_with("sslmode=") || pair.starts_with("ssl-mode="))
    })
}

/// `options` (parsed from `url`) with the endpoint's TLS settings applied, or
/// what is wrong with the combination.
pub(crate) fn apply(
    mut options: PgConnectOptions,
    url: &str,
    tls: Option<&TlsSettings>,
    path: &str,
) -> Result<PgConnectOptions, switchyard_core::Error> {
    let Some(settings) = tls else {
        return Ok(options);
    };
    let problem = |message: String| switchyard_core::Error::Config {
        path: format!("{path}.tls"),
        message,
    };
    let TlsMaterial {
        ca,
        identity,
        insecure_skip_verify,
    } = settings.load(&format!("{path}.tls"))?;
    let mode = options.get_ssl_mode();
    let explicit = url_sets_sslmode(url);
    let mode = match (explicit, mode, insecure_skip_verify) {
        (false, _, false) => PgSslMode::VerifyFull,
        (false, _, true) => PgSslMode::Require,
        (true, PgSslMode::Disable, _) => {
            return Err(problem(
                "tls settings are given but the url says sslmode=disable".into(),
            ))
        }
        (true, PgSslMode::VerifyCa | PgSslMode::VerifyFull, true) => {
            return Err(problem(
                "insecure_skip_verify contradicts the url's sslmode=verify-ca/verify-full".into(),
            ))
        }
        (true, PgSslMode::Allow | PgSslMode::Prefer | PgSslMode::Require, false) => {
            return Err(problem(format!(
                "the url's sslmode={} does not verify the server; remove it (tls verifies by \
                 default) or set insecure_skip_verify: true",
                mode_name(mode)
            )))
        }
        (true, mode, _) => mode,
    };
    options = options.ssl_mode(mode);
    if let Some(ca) = ca {
        options = options.ssl_root_cert_from_pem(ca);
    }
    if let Some(identity) = identity {
        options = options
            .ssl_client_cert_from_pem(&identity.cert)
            .ssl_client_key_from_pem(&identity.key);
    }
    Ok(options)
}

/// How connections made with `options` are protected.
pub(crate) fn transport(options: &PgConnectOptions) -> Transport {
    match options.get_ssl_mode() {
        PgSslMode::Disable => Transport::Plaintext,
        PgSslMode::Allow | PgSslMode::Prefer => Transport::Opportunistic,
        PgSslMode::Require => Transport::Unverified,
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => Transport::Verified,
    }
}

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn applied(url: &str, tls: &TlsSettings) -> Result<&'static str, String> {
        let options = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
        apply(options, url, Some(tls), "pg")
            .map(|o| mode_name(o.get_ssl_mode()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_tls_block_verifies_unless_told_loudly() {
        let tls = TlsSettings::default();
        let url = "postgres://app@db/app";
        assert_eq!(applied(url, &tls), Ok("verify-full"));
        let insecure = TlsSettings {
            insecure_skip_verify: true,
            ..TlsSettings::default()
        };
        assert_eq!(applied(url, &insecure), Ok("require"));
        let weak = applied("postgres://app@db/app?sslmode=require", &tls).unwrap_err();
        assert!(
            weak.starts_with("pg.tls: the url's sslmode=require"),
            "{weak}"
        );
        let off = applied("postgres://app@db/app?sslmode=disable", &tls).unwrap_err();
        assert!(off.contains("sslmode=disable"), "{off}");
        assert_eq!(
            applied("postgres://app@db/app?sslmode=verify-ca", &tls),
            Ok("verify-ca")
        );
    }

    #[test]
    fn without_a_tls_block_the_url_decides() {
        let url = "postgres://app@db/app?application_name=x&sslmode=require";
        assert!(url_sets_sslmode(url));
        assert!(!url_sets_sslmode("postgres://app@db/sslmode=x"));
        let options = PgConnectOptions::from_str(url).unwrap();
        let options = apply(options, url, None, "pg").unwrap();
        assert_eq!(transport(&options), Transport::Unverified);
    }
}
