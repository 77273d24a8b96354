#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The URL's password never shows: not in Debug of the config, backend or
//! checkout, not in any error, not in tracing output (captured at TRACE).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{exec, registry, Fixture};
use switchyard_core::{Backend, Checkout, CheckoutRequest, Error, Isolation, TenantId};
use switchyard_postgres::{pg_error, PgBackend, PgBackendConfig, PgCheckoutExt};

const PASSWORD: &str = "hunter2-Sw1tchyard";

/// Everything every tracing event wrote, from every thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn error_text(err: &Error) -> String {
    let mut text = format!("{err} | {err:?} | {err:#?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(" | {s} | {s:?}"));
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows() {
    let fx = Fixture::start(0).await;
    fx.create_schema_tenant("a").await;
    let mut admin = fx.admin("postgres").await;
    exec(
        &mut admin,
        &format!("CREATE ROLE secretive LOGIN PASSWORD '{PASSWORD}'; GRANT app TO secretive"),
    )
    .await;
    drop(admin);
    // Captured from here on: the role's own CREATE statement above is the
    // test's setup, not the backend's output.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let reg = registry(
        &[("a", Isolation::Schema), ("ghost", Isolation::Schema)],
        None,
    );
    let a = reg.resolve(&TenantId::new("a").unwrap()).unwrap();
    let ghost = reg.resolve(&TenantId::new("ghost").unwrap()).unwrap();
    let mut texts = Vec::new();

    // A working endpoint (trust auth still takes a URL with a password).
    let url = format!(
        "postgres://secretive:{PASSWORD}@127.0.0.1:{}/app",
        fx.port()
    );
    let config = PgBackendConfig::builder("pg-secret", url).config();
    texts.push(format!("{config:?} {config:#?}"));
    texts.push(serde_json::to_string(&config).unwrap());
    let backend = Arc::new(PgBackend::new(config).unwrap());
    let mut conn = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_secs(5)).tenant(&a),
    )
    .await
    .unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(user, "secretive");
    texts.push(format!("{backend:?} {backend:#?} {conn:?} {:?}", *conn));
    let err = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    texts.push(error_text(&conn.fail(err)));
    drop(conn);
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_secs(5)).tenant(&ghost),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::TenantNotProvisioned { .. }), "{err}");
    texts.push(error_text(&err));
    texts.push(format!(
        "{:?}",
        backend.probe(Duration::from_secs(2)).await.unwrap()
    ));

    // An unreachable endpoint: probe and checkout errors.
    let dead_port = switchyard_testkit::free_port().unwrap();
    let url = format!("postgres://secretive:{PASSWORD}@127.0.0.1:{dead_port}/app");
    let mut config = PgBackendConfig::new("pg-dead", url);
    config.pool.acquire_timeout = Duration::from_millis(300);
    let dead = Arc::new(PgBackend::new(config).unwrap());
    texts.push(format!("{dead:?}"));
    let err = dead.probe(Duration::from_secs(1)).await.unwrap_err();
    texts.push(error_text(&err));
    let err = Checkout::acquire(&dead, CheckoutRequest::with_timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    texts.push(error_text(&err));
    let err = pg_error(
        dead.endpoint(),
        None,
        sqlx::Error::Configuration(format!("bad {}", "option").into()),
    );
    texts.push(error_text(&err));

    // A URL sqlx cannot parse.
    let err = PgBackend::new(PgBackendConfig::new(
        "pg-bad",
        format!("postgres://secretive:{PASSWORD}@127.0.0.1:notaport/app"),
    ))
    .unwrap_err();
    texts.push(error_text(&err));

    drop((backend, dead));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let logs = captured.text();
    assert!(
        logs.contains("pg-secret"),
        "tracing captured nothing useful:\n{logs}"
    );
    texts.push(logs);
    for text in &texts {
        assert!(!text.contains(PASSWORD), "the password leaked into: {text}");
        assert!(
            !text.contains("hunter2"),
            "part of the password leaked into: {text}"
        );
    }
    eprintln!(
        "checked {} texts ({} bytes of tracing output) for the password",
        texts.len(),
        texts.last().map_or(0, String::len)
    );
}
