//! When the store refuses writes: the transaction rolled back, the engine reloaded from what was
//! committed, the operators told, a small write tried every [`PROBE_EVERY_S`] until it works; then
//! what was held goes in.

use super::*;

impl Service {
    /// Run `f` in a transaction; on a store error roll back, reload the engine from the store
    /// (which holds exactly what was committed) and become degraded.
    pub(super) fn transaction<T>(
        &mut self,
        now: Time,
        f: impl FnOnce(&mut Self, &Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = match self.store.begin() {
            Err(e) => Err(e),
            Ok(tx) => match f(self, &tx) {
                Ok(v) => self.store.commit(tx).map(|()| v),
                Err(e) => {
                    self.store.rollback(tx);
                    Err(e)
                }
            },
        };
        match &result {
            Ok(_) => self.stored_alerts.committed(),
            Err(e) => {
                self.stored_alerts.rolled_back();
                let text = e.to_string();
                self.store_failed(&text, now);
            }
        }
        result
    }

    pub(super) fn store_failed(&mut self, error: &str, now: Time) {
        self.health.store_errors.fetch_add(1, Ordering::Relaxed);
        // Whatever the engine decided in the failed transaction did not happen.
        let _ = self.engine.take_outputs();
        match load_engine(&self.config, self.store.as_ref()) {
            Ok(mut e) => {
                e.carry_uplink(&self.engine);
                self.engine = e;
                self.engine_stale = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the engine from the store; retrying");
                self.engine_stale = true;
            }
        }
        self.next_probe = now + chrono::Duration::seconds(PROBE_EVERY_S);
        // While degraded no message is taken in: that time is the centre's downtime, not the
        // homes' silence.
        self.engine.set_uplink(false, now);
        if self.degraded.is_none() {
            let problem = StoreProblem::of(error);
            tracing::error!(
                error,
                ?problem,
                "the store refuses writes: degraded (sending what is committed, holding new messages at the broker)"
            );
            let d = Degraded { since: now, problem, detail: error.to_string() };
            self.health.set_degraded(Some(d.clone()));
            self.degraded = Some(d);
            self.tell_operators(Notice::StoreDegraded { problem, detail: error.to_string() }, now);
        }
    }

    /// While degraded: try a small write; when it works, store what was held and recover.
    pub(super) fn try_recover(&mut self, now: Time) {
        if self.degraded.is_none() || now < self.next_probe {
            return;
        }
        self.next_probe = now + chrono::Duration::seconds(PROBE_EVERY_S);
        if let Err(e) = self.store.probe_write(now) {
            tracing::debug!(error = %e, "the store still refuses writes");
            return;
        }
        if self.engine_stale {
            match load_engine(&self.config, self.store.as_ref()) {
                Ok(mut e) => {
                    e.carry_uplink(&self.engine);
                    self.engine = e;
                    self.engine_stale = false;
                    self.input_since_poll = true;
                }
                Err(_) => return,
            }
        }
        let since = self.degraded.as_ref().map_or(now, |d| d.since);
        if !self.flush_unrecorded(now) {
            return;
        }
        while !self.held.is_empty() {
            let n = self.held.len().min(1000);
            let batch: Vec<Publish> = self.held.iter().take(n).cloned().collect();
            match self.ingest(&batch, now) {
                Ok(acks) => {
                    self.held.drain(..n);
                    self.ack_to_broker(batch);
                    self.publish_acks(acks);
                }
                Err(_) => return,
            }
        }
        self.degraded = None;
        if self.broker_up {
            self.engine.set_uplink(true, now);
        }
        self.health.held_messages.store(0, Ordering::Relaxed);
        self.health.set_degraded(None);
        tracing::warn!(after_s = (now - since).num_seconds(), "the store takes writes again: recovered");
        self.tell_operators(Notice::StoreRecovered { after_s: (now - since).num_seconds() }, now);
        self.snapshot_dirty = true;
    }

    pub(super) fn degraded_refusal(&self) -> Option<String> {
        self.degraded
            .as_ref()
            .map(|d| format!("the gateway cannot record right now ({}); try again shortly", d.problem.text(Lang::En)))
    }
}
