//! `Cluster::run`'s deadlines cover the operation, not only the checkout.

use std::time::Duration;

use switchyard_core::noop::NoopBackend;
use switchyard_core::{Checkout, Deadline, Error, Intent};
use tokio::time::Instant;

use super::*;
use crate::Health;

/// Hangs forever on the endpoints named in `hung`, answers its name elsewhere.
async fn hang_on(hung: &[&str], conn: &mut Checkout<NoopBackend>) -> Result<String, Error> {
    if hung.contains(&conn.endpoint().as_str()) {
        std::future::pending::<()>().await;
    }
    Ok(conn.endpoint().to_string())
}

#[tokio::test(start_paused = true)]
async fn a_read_hung_on_the_only_replica_moves_to_the_primary_after_one_attempt() {
    let (cluster, b) = cluster(1, config()).await;
    let started = Instant::now();
    let served = cluster
        .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
            hang_on(&["r1"], conn).await
        })
        .await
        .unwrap();
    assert_eq!(served, "p");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "one attempt_timeout, not the whole deadline"
    );
    assert_eq!(status_of(&cluster, "r1").health, Health::Ejected, "charged");
    assert_eq!(status_of(&cluster, "r1").counters.operation_timeouts, 1);
    assert_eq!(status_of(&cluster, "p").counters.operation_timeouts, 0);
    assert_eq!(b[1].counters().discarded, 1, "never pooled");
    assert_eq!(b[1].counters().live, 0);
    assert_eq!(b[0].counters().discarded, 0);
}

#[tokio::test(start_paused = true)]
async fn an_operation_over_the_callers_deadline_is_cancelled_without_blaming_the_endpoint() {
    let (cluster, b) = cluster(2, config()).await;
    let started = Instant::now();
    let opts = CheckoutOptions::new().timeout(Duration::from_millis(300));
    let err = cluster
        .run(Intent::Read, None, opts, async |conn| {
            hang_on(&["r1", "r2", "p"], conn).await
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OperationTimeout {
                deadline: Deadline::Budget,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    let served = err.endpoint().unwrap().as_str().to_owned();
    let node = &b[if served == "p" {
        0
    } else {
        served[1..].parse().unwrap()
    }];
    assert_eq!(node.counters().discarded, 1, "closed, not pooled");
    assert_eq!(status_of(&cluster, &served).counters.operation_timeouts, 1);
    assert_eq!(
        status_of(&cluster, &served).health,
        Health::Up,
        "300ms is the caller's impatience, not the endpoint's fault"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_hung_past_the_attempt_timeout_fails_at_the_whole_deadline_and_is_charged() {
    let (cluster, b) = cluster(1, config()).await;
    let started = Instant::now();
    let opts = CheckoutOptions::new().timeout(Duration::from_secs(2));
    let err = cluster
        .run(Intent::Write, None, opts, async |conn| {
            hang_on(&["p"], conn).await
        })
        .await
        .unwrap_err();
    // A write has no second attempt: its one attempt runs to the deadline.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(
        matches!(
            err,
            Error::OperationTimeout {
                deadline: Deadline::Budget,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(b[0].counters().discarded, 1);
    let p = cluster.status().endpoints[0].clone();
    assert_eq!(p.counters.ejections, 0, "the last writer is never ejected");
}

#[tokio::test(start_paused = true)]
async fn the_closure_borrows_its_captures_and_returns_the_drivers_error() {
    let (cluster, _) = cluster(2, config()).await;
    let wanted = String::from("r");
    let mut tries = Vec::new();
    let served = cluster
        .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
            tries.push(conn.endpoint().to_string());
            if tries.len() == 1 {
                // What a driver's error converts to: a broken connection.
                return Err(Error::backend(
                    conn.endpoint(),
                    None,
                    switchyard_core::BackendErrorKind::Io,
                    std::io::Error::other("reset"),
                ));
            }
            Ok(format!("{wanted}:{}", conn.endpoint()))
        })
        .await
        .unwrap();
    assert_eq!(tries.len(), 2);
    assert_eq!(served, format!("r:{}", tries[1]));
}
