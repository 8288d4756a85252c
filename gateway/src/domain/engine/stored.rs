//! Which alert rows a transaction writes: those that differ from what the store holds.
//!
//! [`alerts_to_store`] reads every active alert of every home whose state changed, because an
//! alert can change in place without an output of its own. In a storm telemetry touches every
//! home on battery at every batch, while its alerts stay as they were: writing them all made
//! each batch upsert about a thousand unchanged rows (on PostgreSQL a new row version and its
//! WAL each), which lengthened the service's turn and, through it, the storm's pages
//! (`docs/benchmarks.md`, "the PostgreSQL storm's regression").
//!
//! [`StoredAlerts`] remembers the version of each active alert the store last **committed**,
//! and lets through only alerts that differ from it. What a transaction writes is *pending*
//! until the caller says the commit went through ([`StoredAlerts::committed`]); after a
//! rollback ([`StoredAlerts::rolled_back`]) the same alerts are written again next time. So
//! the rows are always what the engine holds, which the restart property test
//! (`tests/restart.rs`) checks through this filter. A gateway that starts knows nothing yet and
//! writes each alert once the first time its home changes.

use std::collections::HashMap;

use super::{alerts_to_store, Alert, HomeState, Output};
use mamori_protocol::mqtt::HomeId;

/// The last committed version of each active alert, and what the open transaction wrote.
#[derive(Debug, Default, Clone)]
pub struct StoredAlerts {
    committed: HashMap<String, Alert>,
    pending: Vec<Alert>,
}

impl StoredAlerts {
    /// Nothing known to be stored yet.
    pub fn new() -> StoredAlerts {
        StoredAlerts::default()
    }

    /// The alerts to write for these outputs and changed homes: each once, as it is now, and
    /// only when it is not already stored as it is. They are pending until
    /// [`StoredAlerts::committed`] or [`StoredAlerts::rolled_back`].
    pub fn to_write(&mut self, outputs: &[Output], dirty: &[(HomeId, HomeState)]) -> Vec<Alert> {
        let changed: Vec<Alert> =
            alerts_to_store(outputs, dirty).into_iter().filter(|a| self.committed.get(&a.id) != Some(a)).collect();
        self.pending.extend(changed.iter().cloned());
        changed
    }

    /// The transaction committed: what it wrote is what the store holds (a cleared alert is
    /// never written again, so it is forgotten).
    pub fn committed(&mut self) {
        for a in self.pending.drain(..) {
            if a.cleared_at.is_some() {
                self.committed.remove(&a.id);
            } else {
                self.committed.insert(a.id.clone(), a);
            }
        }
    }

    /// The transaction was rolled back (or its commit is in doubt): what it wrote is not known
    /// to be stored, and is written again when its home next changes.
    pub fn rolled_back(&mut self) {
        for a in self.pending.drain(..) {
            self.committed.remove(&a.id);
        }
    }

    /// Active alerts known to be stored as they are.
    pub fn len(&self) -> usize {
        self.committed.len()
    }

    /// Nothing known to be stored.
    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }
}
