//! Lifetime counters in `EndpointStatus`: checkouts, waits, timeouts, ejections.

use std::time::Duration;

use switchyard_core::Intent;

use super::*;
use crate::{CheckoutCounters, Health, WAIT_THRESHOLD};

#[tokio::test(start_paused = true)]
async fn checkouts_that_waited_past_the_threshold_count_as_waits() {
    let (cluster, b) = cluster(0, config()).await;
    assert_eq!(
        status_of(&cluster, "p").counters,
        CheckoutCounters::default()
    );
    // Fast acquires, then ones exactly at the threshold: neither is a wait.
    for delay in [Duration::ZERO, WAIT_THRESHOLD] {
        b[0].set_acquire_delay(delay);
        for _ in 0..2 {
            drop(cluster.checkout(Intent::Write, None).await.unwrap());
        }
    }
    // Slow ones are.
    b[0].set_acquire_delay(Duration::from_millis(5));
    for _ in 0..3 {
        let c = cluster.checkout(Intent::Write, None).await.unwrap();
        assert_eq!(c.waited(), Duration::from_millis(5));
    }
    assert_eq!(
        status_of(&cluster, "p").counters,
        CheckoutCounters {
            checkouts: 7,
            waits: 3,
            timeouts: 0,
            ejections: 0,
            operation_timeouts: 0,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_endpoint_counts_a_timeout_and_an_ejection() {
    let (cluster, b) = cluster(1, config()).await;
    b[1].set_acquire_delay(Duration::from_secs(60));
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "p");
    let r1 = status_of(&cluster, "r1");
    assert_eq!(r1.health, Health::Ejected);
    assert_eq!(
        r1.counters,
        CheckoutCounters {
            checkouts: 0,
            waits: 0,
            timeouts: 1,
            ejections: 1,
            operation_timeouts: 0,
        }
    );
    // The fallback to the primary waited for nothing.
    let p = status_of(&cluster, "p").counters;
    assert_eq!((p.checkouts, p.waits, p.timeouts), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn ejections_are_counted_over_the_endpoints_life() {
    fastrand::seed(2);
    let (cluster, b) = cluster(2, config()).await;
    b[1].set_down(true);
    for _ in 0..50 {
        let _ = cluster.checkout(Intent::Read, None).await;
        if status_of(&cluster, "r1").health == Health::Ejected {
            break;
        }
    }
    assert_eq!(status_of(&cluster, "r1").counters.ejections, 1);
    // Half-open after the backoff; the failed trial ejects it again.
    run_for(Duration::from_secs(1)).await;
    drop(cluster.checkout(Intent::Read, None).await.unwrap());
    assert_eq!(status_of(&cluster, "r1").counters.ejections, 2);
    // Recovered and re-admitted: no current ejection, the total stays.
    b[1].set_down(false);
    run_for(Duration::from_secs(2)).await;
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "r1");
    let r1 = status_of(&cluster, "r1");
    assert_eq!((r1.health, r1.ejection), (Health::Up, None));
    assert_eq!(r1.counters.ejections, 2);
    assert_eq!(r1.counters.checkouts, 1);
    assert_eq!(status_of(&cluster, "r2").counters.ejections, 0);
}

#[test]
fn counters_serialize_as_an_object() {
    let c = CheckoutCounters {
        checkouts: 4,
        waits: 3,
        timeouts: 2,
        ejections: 1,
        operation_timeouts: 5,
    };
    assert_eq!(
        serde_json::to_value(c).unwrap(),
        serde_json::json!({"checkouts": 4, "waits": 3, "timeouts": 2, "ejections": 1, "operation_timeouts": 5})
    );
}
