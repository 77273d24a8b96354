//! Passwords (the pool's, the default user's, tenant ACL users') never show up
//! in `Debug`, in error messages, or in anything traced, including on the
//! failure paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cluster, direct, run, scoped, unscoped, Tenants, TIMEOUT};
use switchyard_core::{Backend, Checkout, CheckoutRequest, Error};
use switchyard_redis::{acl_user, AclPassword, RedisBackend, RedisBackendConfig, StaticPasswords};
use switchyard_testkit::wait_until;
use tracing_subscriber::fmt::MakeWriter;

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

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

const APP: &str = "AppSecret-7f3a";
const DEFAULT: &str = "DefaultSecret-91c2";
const WRONG: &str = "WrongSecret-0b1d";
const TENANT_WRONG: &str = "TenantWrong-55aa";
const IN_BAD_URL: &str = "BadUrlSecret-1e";

#[tokio::test]
async fn secrets_never_reach_debug_errors_or_logs() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .try_init()
        .unwrap();

    let cluster = cluster(0).await;
    let addr = cluster.master().addr();
    let mut admin = direct(cluster.master()).await;
    let _: () = run(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            "app",
            "on",
            &format!(">{APP}"),
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let _: () = run(&mut admin, &["CONFIG", "SET", "requirepass", DEFAULT]).await;

    let tenants = Tenants::new(1, None);
    let mut secrets: Vec<String> = [APP, DEFAULT, WRONG, TENANT_WRONG, IN_BAD_URL]
        .map(str::to_owned)
        .to_vec();
    secrets.push(
        tenants
            .passwords
            .get(&tenants.acl[0])
            .unwrap()
            .expose()
            .to_owned(),
    );
    let mut shown: Vec<String> = Vec::new();
    let mut show = |label: &str, text: String| shown.push(format!("{label}: {text}"));

    // The working pool, as the ACL user `app`.
    let url = format!("redis://app:{APP}@{addr}");
    let builder = tenants.backend("secret", &url);
    show("builder", format!("{builder:?}"));
    show("config", format!("{:?}", builder.config()));
    let backend = Arc::new(builder.build().unwrap());
    tenants.seed(&backend).await;
    show("backend", format!("{backend:?} {}", backend.url()));
    show("passwords", format!("{:?}", tenants.passwords));
    for t in tenants.all() {
        let conn = scoped(&backend, &tenants.entry(&t)).await;
        show("checkout", format!("{conn:?} {:?}", *conn));
    }
    show(
        "probe",
        format!("{:?}", backend.probe(TIMEOUT).await.unwrap()),
    );

    // The default user's password in the URL works too, and stays hidden.
    let by_default = Arc::new(
        RedisBackend::builder("default", format!("redis://:{DEFAULT}@{addr}"))
            .build()
            .unwrap(),
    );
    let conn = unscoped(&by_default).await;
    show("default checkout", format!("{conn:?} {by_default:?}"));
    drop(conn);

    // A wrong pool password: connect errors and probe errors.
    let wrong = Arc::new(
        RedisBackend::builder("wrong", format!("redis://app:{WRONG}@{addr}"))
            .build()
            .unwrap(),
    );
    let err = Checkout::acquire(&wrong, CheckoutRequest::with_timeout(TIMEOUT))
        .await
        .unwrap_err();
    assert!(err.is_endpoint_failure(), "{err}");
    show(
        "auth error",
        format!("{err} / {err:?} / {:?}", std::error::Error::source(&err)),
    );
    let err = wrong.probe(TIMEOUT).await.unwrap_err();
    show("probe error", format!("{err} / {err:?}"));
    show("wrong backend", format!("{wrong:?}"));

    // A wrong tenant password: the scope fails, the connection is discarded.
    let mut bad = StaticPasswords::new();
    bad.insert(tenants.acl[0].clone(), AclPassword::new(TENANT_WRONG));
    let tenant_wrong = Arc::new(
        RedisBackend::builder("tenant-wrong", url.clone())
            .acl_passwords(bad.clone())
            .build()
            .unwrap(),
    );
    let err = Checkout::acquire(
        &tenant_wrong,
        CheckoutRequest::with_timeout(TIMEOUT).tenant(&tenants.entry(&tenants.acl[0])),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::TenantNotProvisioned { .. }), "{err}");
    show("tenant auth error", format!("{err} / {err:?} / {bad:?}"));

    // A URL the driver cannot parse.
    let config = RedisBackendConfig::new("bad", format!("nosuch://u:{IN_BAD_URL}@host"));
    show("bad config", format!("{config:?}"));
    let err = RedisBackend::new(config).unwrap_err();
    show("config error", format!("{err} / {err:?}"));

    // A reset that fails is logged: the log line must not carry the password
    // the reset re-authenticates with.
    let a0 = tenants.entry(&tenants.acl[0]);
    let conn = scoped(&backend, &a0).await;
    let user = acl_user(a0.scope());
    let killed: u64 = run(&mut admin, &["CLIENT", "KILL", "USER", user]).await;
    assert_eq!(killed, 1);
    let before = backend.counters().reset_failures;
    drop(conn);
    wait_until(TIMEOUT, || async {
        backend.counters().reset_failures > before
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("checkout"), "tracing captured nothing");
    assert!(logs.contains("reset failed"), "{logs}");
    for s in &secrets {
        for line in &shown {
            assert!(!line.contains(s.as_str()), "{s} leaked in {line}");
        }
        assert!(!logs.contains(s.as_str()), "{s} leaked in the logs");
    }
    println!(
        "checked {} Debug/Display renderings and {} bytes of TRACE logs for {} secrets",
        shown.len(),
        logs.len(),
        secrets.len()
    );
}
