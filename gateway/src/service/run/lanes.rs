//! The runner's send slots: each send's task waits here for a slot of its destination and one
//! of all, so a send that ends gives its slot straight to the next row waiting, whatever the
//! service is doing ([`crate::service::dispatch`] hands rows out ahead of the slots).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::edge::clock;
use crate::edge::delivery::{Failure, Sender};
use crate::edge::store::OutboxRow;

/// The send slots: one semaphore for all sends and one per destination, taken by each send's
/// task before it goes and given back when it ends, so the next row waiting for that
/// destination goes at once ([`crate::service::dispatch`] hands rows out ahead of the slots).
/// Each destination also counts its failed attempts in a row, so that rows already waiting
/// are not sent into a destination that has just failed `breaker_failures` times (the
/// dispatcher's breaker stops handing more out).
pub(super) struct Lanes {
    pub(super) all: Arc<tokio::sync::Semaphore>,
    per_destination: usize,
    pub(super) breaker_failures: u32,
    lanes: HashMap<String, Arc<Lane>>,
}

/// One destination's slots and its failures in a row.
pub(super) struct Lane {
    slots: Arc<tokio::sync::Semaphore>,
    failures: std::sync::atomic::AtomicU32,
}

impl Lanes {
    pub(super) fn new(all: usize, per_destination: usize, breaker_failures: u32) -> Lanes {
        Lanes {
            all: Arc::new(tokio::sync::Semaphore::new(all.max(1))),
            per_destination: per_destination.max(1),
            breaker_failures: breaker_failures.max(1),
            lanes: HashMap::new(),
        }
    }

    pub(super) fn lane(&mut self, destination: String) -> Arc<Lane> {
        let n = self.per_destination;
        self.lanes
            .entry(destination)
            .or_insert_with(|| {
                Arc::new(Lane { slots: Arc::new(tokio::sync::Semaphore::new(n)), failures: Default::default() })
            })
            .clone()
    }
}

impl Lane {
    /// What an attempt's result says about the destination.
    fn attempted(&self, result: &Result<(), Failure>) {
        match result {
            Err(f) if f.destination => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
            // It answered (a refusal of this row alone is an answer).
            _ => self.failures.store(0, Ordering::Relaxed),
        }
    }
}

/// Where a send's result goes back to the service.
pub(super) type ResultsTx = mpsc::Sender<(OutboxRow, Result<(), Failure>)>;

/// Carry out one send: wait for a slot of its destination and one of all, then (the lease
/// still held, the destination not failing) send it under the delivery deadline, and give
/// the result back. Waiting for a slot is bounded by the sends ahead of it, each of which is.
pub(super) async fn send_one(
    row: OutboxRow,
    link: String,
    probe: bool,
    lane: Arc<Lane>,
    all: Arc<tokio::sync::Semaphore>,
    breaker_failures: u32,
    ctx: (Sender, ResultsTx, Option<Arc<crate::service::lease::Lease>>),
) {
    let (sender, tx, lease) = ctx;
    let result = {
        // Never closed: the semaphores live as long as the runner. Both are given back as soon
        // as the attempt ends, before its result is handed over.
        let (Ok(_mine), Ok(_any)) = (lane.slots.clone().acquire_owned().await, all.acquire_owned().await) else {
            return;
        };
        let failures = lane.failures.load(Ordering::Relaxed);
        if lease.is_some_and(|l| !l.valid()) {
            // Checked again just before it goes (crate::service::lease).
            Err(Failure::destination("not sent: the lease ended"))
        } else if !probe && failures >= breaker_failures {
            Err(Failure::destination(format!(
                "{}: not tried, it failed {failures} times in a row",
                row.channel.destination()
            )))
        } else {
            let result = sender.send(&row, clock::now(), &link).await;
            lane.attempted(&result);
            result
        }
    };
    let _ = tx.send((row, result)).await;
}
