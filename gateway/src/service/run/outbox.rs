//! The outbox: due rows given their slots ([`Effect::Send`]), their results recorded together (one
//! commit for a burst), a failed recipient's fallback raised.

use super::*;

impl Service {
    /// Give due rows their slots. Rows for destinations whose breaker is open are skipped in
    /// bulk first, apart, so that they never take the place of rows that can be sent.
    pub(super) fn dispatch(&mut self, now: Time) {
        // Several gateways: only the holder of a valid lease sends (crate::service::lease), checked
        // here, again after the store's reads and in each send's task just before it goes.
        if !self.leased() {
            return;
        }
        let closed = self.dispatcher.open_breakers(now);
        let mut rows = Vec::new();
        if !closed.is_empty() {
            match self.store.due_only(now, 1000 + self.dispatcher.leased() + self.unrecorded.len(), &closed) {
                Ok(r) => rows = r,
                Err(e) => tracing::warn!(error = %e, "reading due notifications"),
            }
        }
        let room = self.dispatcher.room();
        if room > 0 {
            let mut skip = self.dispatcher.saturated();
            skip.extend(closed);
            // Rows whose latest copy is in `unrecorded` (not yet due again) can fill the
            // window: ask for that many more.
            match self.store.due(now, room + self.dispatcher.leased() + self.unrecorded.len(), &skip) {
                Ok(r) => rows.extend(r),
                Err(e) => tracing::warn!(error = %e, "reading due notifications"),
            }
        }
        if rows.is_empty() {
            return;
        }
        // Rows whose last result is not recorded yet: their latest copy is here.
        let rows: Vec<OutboxRow> = rows
            .into_iter()
            .filter_map(|row| match self.unrecorded.get(&row.key) {
                None => Some(row),
                Some(next) if next.row.status == OutboxStatus::Pending && next.row.next_attempt_at <= now => {
                    Some(next.row.clone())
                }
                Some(_) => None,
            })
            .collect();
        // A contact's later channel, or a message held past quiet hours: not sent when its
        // role has acknowledged meanwhile or the alert is over.
        // And, with consent required, a message whose recipient no longer has a consent in
        // force (withdrawn, or taken out of the plan) since it was queued.
        let (rows, moot): (Vec<OutboxRow>, Vec<OutboxRow>) = rows.into_iter().partition(|row| {
            (!row.conditional || self.engine.still_needed(row.home.as_ref(), &row.alert_id, row.role, row.created_at))
                && self.engine.may_send(row.home.as_ref(), row.role, &row.recipient, &row.channel, now)
        });
        if !moot.is_empty() {
            for mut row in moot {
                let consent = !self.engine.may_send(row.home.as_ref(), row.role, &row.recipient, &row.channel, now);
                let why = if consent {
                    "not sent: no consent in force for this recipient any more"
                } else {
                    "not sent: acknowledged meanwhile, or the alert is over"
                };
                tracing::info!(key = %row.key, why, "not sent");
                row.status = OutboxStatus::NotNeeded;
                row.last_error = Some(why.into());
                self.unrecorded.insert(row.key.clone(), crate::edge::delivery::Next { row, fallback: false });
            }
            if self.degraded.is_none() {
                self.flush_unrecorded(now);
            }
        }
        if !self.leased() {
            return;
        }
        let mut skipped = Vec::new();
        for d in self.dispatcher.choose(rows, now) {
            match d {
                Decision::Send(row) => {
                    let link = self.style.ack_link(&row.alert_id, row.role);
                    let probe = self.dispatcher.is_probe(&row.key);
                    self.effects.push(Effect::Send { row: Box::new(row), link, probe });
                }
                Decision::Skip(row, why) => {
                    self.counters.skipped_attempts.fetch_add(1, Ordering::Relaxed);
                    skipped.push((row, Err(Failure::destination(why))));
                }
            }
        }
        self.health.open_breakers.store(self.dispatcher.open_breakers(now).len() as u64, Ordering::Relaxed);
        if !skipped.is_empty() {
            self.record(skipped, now, false);
        }
    }

    /// Record the results of attempts, all in one transaction (one `fsync` for a whole burst).
    pub(super) fn record(&mut self, results: Vec<(OutboxRow, Result<(), Failure>)>, now: Time, attempted: bool) {
        if !self.leased() {
            // The store is the new active's now: what this one sent last may be sent again
            // (the same idempotency key), never lost.
            return;
        }
        for (row, result) in results {
            if attempted {
                let destination_failed = result.as_ref().is_err_and(|f| f.destination);
                self.dispatcher.finished(&row.key, result.is_ok(), destination_failed, now);
            }
            let result = result.map_err(|f| f.text);
            match &result {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = (now - row.created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                    self.counters.notify_latency.observe(latency);
                    tracing::info!(key = %row.key, "delivered");
                }
                Err(e) if attempted => {
                    self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %row.key, attempt = row.attempts + 1, error = %e, "delivery failed");
                }
                Err(_) => {}
            }
            let jitter = rand::rng().random_range(0.0..1.0);
            let mut next = after_attempt(row, result, now, &self.config.delivery, jitter);
            let key = next.row.key.clone();
            if let Some(prev) = self.unrecorded.get(&key) {
                next.fallback |= prev.fallback; // told once, when it is recorded
            }
            if next.row.status == OutboxStatus::Pending {
                // Retried from the copy kept here until its result can be recorded.
                self.dispatcher.recorded(&key);
            }
            self.unrecorded.insert(key, next);
        }
        if self.degraded.is_none() && self.record_due(now) {
            self.flush_unrecorded(now);
        }
        self.health.unrecorded_results.store(self.unrecorded.len() as u64, Ordering::Relaxed);
    }

    /// Whether the delivery results waiting are to be recorded now.
    pub(super) fn record_due(&self, now: Time) -> bool {
        !self.unrecorded.is_empty()
            && (self.unrecorded.len() >= RECORD_BATCH || passed(now, self.recorded_at, RECORD_EVERY_MS))
    }

    /// Write the results waiting to be recorded; false when the store refused.
    pub(super) fn flush_unrecorded(&mut self, now: Time) -> bool {
        if self.unrecorded.is_empty() {
            return true;
        }
        self.recorded_at = now;
        let rows = std::mem::take(&mut self.unrecorded);
        let result = self.transaction(now, |s, tx| {
            let mut fallback = false;
            for next in rows.values() {
                s.store.record_attempt(tx, &next.row)?;
                if !next.fallback {
                    continue;
                }
                fallback = true;
                if let Ok(content) = serde_json::from_value(next.row.content.clone()) {
                    let input = Input::DeliveryFailed {
                        key: next.row.key.clone(),
                        alert_id: next.row.alert_id.clone(),
                        home: next.row.home.clone(),
                        role: next.row.role,
                        name: next.row.recipient.clone(),
                        content,
                    };
                    let _ = s.engine.handle(input, now);
                }
            }
            if fallback {
                // A later channel was raised: the engine's timers are looked at again soon.
                s.input_since_poll = true;
                s.persist(tx, now)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                for key in rows.keys() {
                    self.dispatcher.recorded(key);
                }
                // After the commit: from here a restart does not send these again.
                tracing::info!(results = rows.len(), "delivery results recorded");
                self.health.unrecorded_results.store(0, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.unrecorded = rows;
                false
            }
        }
    }
}
