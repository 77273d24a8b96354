//! Pool occupancy, counted from the driver's connection-pool (CMAP) events,
//! and what the backend itself has handed out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mongodb::event::cmap::CmapEvent;
use mongodb::event::EventHandler;

/// What a [`MongoBackend`](crate::MongoBackend) and its driver pool have done
/// since the backend was built. Read with
/// [`MongoBackend::mongo_stats`](crate::MongoBackend::mongo_stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MongoStats {
    /// Handles (checkouts) out right now.
    pub handles_out: u32,
    /// Handles handed out in all.
    pub handles_acquired: u64,
    /// Handles given back marked unhealthy (endpoint failures).
    pub handles_discarded: u64,
    /// Driver connections opened (monitoring connections excluded).
    pub connections_created: u64,
    /// Driver connections closed.
    pub connections_closed: u64,
    /// Driver connections in use by an operation right now.
    pub connections_in_use: u32,
    /// Times the driver cleared its pool (it does after a network error).
    pub pool_clears: u64,
}

impl MongoStats {
    /// Driver connections open right now.
    pub fn connections_open(&self) -> u32 {
        u32::try_from(
            self.connections_created
                .saturating_sub(self.connections_closed),
        )
        .unwrap_or(u32::MAX)
    }
}

/// Counters fed by the driver's CMAP events and the backend.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    created: AtomicU64,
    closed: AtomicU64,
    checked_out: AtomicU64,
    checked_in: AtomicU64,
    cleared: AtomicU64,
    pub(crate) acquired: AtomicU64,
    pub(crate) discarded: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Counters {
    /// An event handler for the driver that keeps these counters.
    pub(crate) fn handler(self: &Arc<Self>) -> EventHandler<CmapEvent> {
        let counters = Arc::clone(self);
        EventHandler::callback(move |event| counters.record(&event))
    }

    fn record(&self, event: &CmapEvent) {
        match event {
            CmapEvent::ConnectionCreated(_) => bump(&self.created),
            CmapEvent::ConnectionClosed(_) => bump(&self.closed),
            CmapEvent::ConnectionCheckedOut(_) => bump(&self.checked_out),
            CmapEvent::ConnectionCheckedIn(_) => bump(&self.checked_in),
            CmapEvent::PoolCleared(_) => bump(&self.cleared),
            _ => {}
        }
    }

    /// Driver connections open and in use.
    pub(crate) fn connections(&self) -> (u32, u32) {
        let open = read(&self.created).saturating_sub(read(&self.closed));
        let in_use = read(&self.checked_out)
            .saturating_sub(read(&self.checked_in))
            .min(open);
        (
            u32::try_from(open).unwrap_or(u32::MAX),
            u32::try_from(in_use).unwrap_or(u32::MAX),
        )
    }

    pub(crate) fn snapshot(&self, handles_out: u32) -> MongoStats {
        let (_, in_use) = self.connections();
        MongoStats {
            handles_out,
            handles_acquired: read(&self.acquired),
            handles_discarded: read(&self.discarded),
            connections_created: read(&self.created),
            connections_closed: read(&self.closed),
            connections_in_use: in_use,
            pool_clears: read(&self.cleared),
        }
    }
}
