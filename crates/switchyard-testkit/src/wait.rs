//! Polling with a deadline, so tests wait for conditions instead of sleeping.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Result, TestkitError};

/// How often conditions are re-checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Re-checks `check` every [`POLL_INTERVAL`] until it answers `true`, or fails with
/// [`TestkitError::Timeout`] once `timeout` has passed. The check always runs at
/// least once.
///
/// ```no_run
/// # async fn demo(replica_has_row: impl Fn() -> bool) -> switchyard_testkit::Result<()> {
/// use std::time::Duration;
/// switchyard_testkit::wait_until(Duration::from_secs(5), || async { replica_has_row() }).await?;
/// # Ok(())
/// # }
/// ```
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until("a condition", timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Like [`wait_until`], but the check yields a value (`Some`) when it succeeds, and
/// `what` names the condition in the timeout error.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(TestkitError::Timeout {
                what: what.to_owned(),
                elapsed: now - started,
            });
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn succeeds_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        wait_until(Duration::from_secs(1), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_the_name_of_the_condition() {
        let err = poll_until::<(), _, _>("the moon", Duration::from_millis(50), || async { None })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("the moon"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn checks_at_least_once() {
        let value = poll_until("now", Duration::ZERO, || async { Some(7) })
            .await
            .unwrap();
        assert_eq!(value, 7);
    }
}
