//! What a metrics recorder sees of a checkout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use switchyard_core::noop::NoopBackend;
use switchyard_core::{Intent, Role};

use super::{config, settle};
use crate::metrics::CHECKOUT_HELD;
use crate::{Cluster, EndpointConfig};

/// Keeps the samples of `switchyard_checkout_held_seconds`; every other
/// series is a no-op handle, as with no recorder at all.
#[derive(Default)]
struct HeldRecorder {
    held: Arc<Samples>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

impl Recorder for HeldRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == CHECKOUT_HELD {
            Histogram::from_arc(Arc::clone(&self.held))
        } else {
            Histogram::noop()
        }
    }
}

/// The hold time is read from the clock only at the recorder's asking (see
/// `HeldSince`), and it is the time the connection was out, not zero.
#[tokio::test(start_paused = true)]
async fn the_hold_time_reaches_a_recorder() {
    let recorder = HeldRecorder::default();
    let cluster = metrics::with_local_recorder(&recorder, || {
        Cluster::builder("held")
            .config(config())
            .endpoint(
                Arc::new(NoopBackend::with_role("p", Role::Primary)),
                EndpointConfig::new(Role::Primary),
            )
            .build()
            .unwrap()
    });
    settle().await;
    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    tokio::time::advance(Duration::from_millis(1500)).await;
    drop(conn);
    let quick = cluster.checkout(Intent::Write, None).await.unwrap();
    drop(quick);
    assert_eq!(*recorder.held.0.lock().unwrap(), vec![1.5, 0.0]);
}
