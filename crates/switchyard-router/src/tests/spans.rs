//! What a tracing subscriber sees of a checkout: the router's and core's
//! spans with their fields when it asks for debug, nothing when it does not
//! (the spans are then never built, which keeps them off the checkout path).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use switchyard_core::Intent;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

use super::{cluster, config};

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
    let (c, _backends) = cluster(2, config()).await;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    {
        let _default = tracing::subscriber::set_default(subscriber);
        // Callsites first seen by tests running at the same time, with no
        // subscriber, may have cached "never": ask them again.
        tracing::callsite::rebuild_interest_cache();
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

    // One test, not two: subscribers set at once on two test threads change
    // the process-wide level hint under each other.
    let text = one_checkout_at(tracing::Level::INFO).await;
    assert!(!text.contains("checkout{"), "{text}");
}
