#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What a tracing subscriber sees of a checkout: the router's and core's
//! spans with their fields when it asks for debug, nothing when it does not
//! (the spans are then never built, which keeps them off the checkout path).
//!
//! A test binary of its own: tracing caches whether a callsite is wanted
//! when it is first hit, and a test on another thread hitting the checkout's
//! callsites for the first time while this one sets its subscriber can
//! cache "never" for them.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use switchyard_core::noop::NoopBackend;
use switchyard_core::{Intent, Role};
use switchyard_router::{Cluster, EndpointConfig};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

/// A primary and two replicas, probed once.
async fn cluster() -> Cluster<NoopBackend> {
    let mut b = Cluster::builder("test").endpoint(
        Arc::new(NoopBackend::with_role("p", Role::Primary)),
        EndpointConfig::new(Role::Primary),
    );
    for i in 1..=2 {
        b = b.endpoint(
            Arc::new(NoopBackend::with_role(format!("r{i}"), Role::Replica)),
            EndpointConfig::new(Role::Replica),
        );
    }
    let cluster = b.build().unwrap();
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    cluster
}

/// Everything the subscriber wrote, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The text a subscriber at `level` writes while one read checks out and
/// is returned (spans are written when they close).
async fn one_checkout_at(level: tracing::Level) -> String {
    let c = cluster().await;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    {
        let _default = tracing::subscriber::set_default(subscriber);
        let conn = c.checkout(Intent::Read, None).await.unwrap();
        drop(conn);
    }
    captured.text()
}

#[tokio::test(start_paused = true)]
async fn a_debug_subscriber_sees_the_checkout_spans_with_their_fields_and_an_info_one_none() {
    let text = one_checkout_at(tracing::Level::DEBUG).await;
    let routed = text
        .lines()
        .find(|l| l.contains("switchyard_router::checkout: close"))
        .unwrap_or_else(|| panic!("no routed checkout span in:\n{text}"));
    for field in ["intent=read", "endpoint=\"r", "attempts=1", "wait_us=0"] {
        assert!(routed.contains(field), "{field} missing from {routed}");
    }
    let core = text
        .lines()
        .find(|l| l.contains("switchyard_core::checkout: close"))
        .unwrap_or_else(|| panic!("no core checkout span in:\n{text}"));
    assert!(core.contains("checkout{endpoint=r"), "{core}");
    assert!(core.contains("wait_us=0"), "{core}");

    // One test, not two: subscribers set at once on two test threads race
    // on the same caches.
    let text = one_checkout_at(tracing::Level::INFO).await;
    assert!(!text.contains("checkout{"), "{text}");
}
