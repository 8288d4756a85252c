//! What comes from the broker: validated, stored (deduplicated, history thinned) and applied in one
//! transaction, then acknowledged; held while the store refuses writes; and the broker session's
//! record.

use super::*;

impl Service {
    /// What the broker link reported, in order.
    pub(super) fn on_broker(&mut self, items: Vec<FromMqtt>, now: Time) -> Result<(), RunError> {
        let mut batch = Vec::new();
        for item in items {
            match item {
                FromMqtt::Message(p) => batch.push(p),
                FromMqtt::Connected { session_present } => {
                    if !batch.is_empty() {
                        self.on_batch(std::mem::take(&mut batch), now);
                    }
                    self.check_session(session_present, now)?;
                    // Up once the broker has taken every subscription (`Subscribed`).
                    self.broker_up = false;
                }
                FromMqtt::Subscribed { refused } => {
                    // Silence is judged from the homes' status and telemetry: with those taken
                    // the link is up for it, even with the events refused (the alerts their
                    // conditions say hold are then raised from the telemetry). Any refusal
                    // leaves the gateway unhealthy, so the operators hear of it.
                    let hears = |c: Channel| !refused.contains(&c.filter());
                    self.broker_up = hears(Channel::Status) && hears(Channel::Telemetry);
                    if self.broker_up && self.degraded.is_none() {
                        self.engine.set_uplink(true, now);
                    } else if !self.broker_up {
                        self.engine.set_uplink(false, now);
                    }
                    self.health.set_broker(refused.is_empty(), now);
                    self.health.set_refused(refused, now);
                }
                FromMqtt::Disconnected => {
                    if !batch.is_empty() {
                        self.on_batch(std::mem::take(&mut batch), now);
                    }
                    self.broker_up = false;
                    self.engine.set_uplink(false, now);
                    self.health.set_broker(false, now);
                    self.health.set_refused(Vec::new(), now);
                }
            }
        }
        if !batch.is_empty() {
            self.on_batch(batch, now);
        }
        Ok(())
    }

    /// A batch from the broker: store and apply it, then acknowledge it; or hold it.
    pub(super) fn on_batch(&mut self, batch: Vec<Publish>, now: Time) {
        if !self.leased() {
            // Not acknowledged: the broker gives them to the gateway that holds the lease.
            return;
        }
        if self.engine.home_count() == 0 {
            // A store without homes is not the deployment's: do not acknowledge (and so drop)
            // the homes' messages; the broker keeps them for the right store.
            self.health.set_no_homes(true);
            if self.log_budget > 0 {
                self.log_budget -= 1;
                tracing::error!(messages = batch.len(), "no homes in the store: messages not acknowledged");
            }
            return;
        }
        if self.degraded.is_some() || !self.held.is_empty() {
            self.hold(batch);
            return;
        }
        match self.ingest(&batch, now) {
            Ok(acks) => {
                // Stored: now the broker may forget them.
                self.ack_to_broker(batch);
                self.publish_acks(acks);
            }
            Err(_) => self.hold(batch),
        }
    }

    pub(super) fn hold(&mut self, batch: Vec<Publish>) {
        for p in batch {
            if p.qos == QoS::AtMostOnce {
                self.counters.dropped_degraded.fetch_add(1, Ordering::Relaxed);
            } else if self.held.len() < HELD_MAX {
                self.held.push_back(p);
            }
            // Beyond that: not acknowledged, so the broker sends it again at the next connection.
        }
        self.health.held_messages.store(self.held.len() as u64, Ordering::Relaxed);
    }

    pub(super) fn reject(&mut self, topic: &str, why: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        if self.log_budget > 0 {
            self.log_budget -= 1;
            tracing::warn!(topic = %topic.chars().take(120).collect::<String>(), reason = why, "message refused");
        }
    }

    /// Store and apply one batch of messages in one transaction.
    pub(super) fn ingest(&mut self, batch: &[Publish], now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let (acks, stored) = self.transaction(now, |s, tx| s.ingest_tx(tx, batch, now))?;
        self.first_message_stored |= stored;
        Ok(acks)
    }

    /// Whether a telemetry snapshot goes into the history (at most one per home per
    /// `telemetry_history_every_s`, and every change of mains).
    pub(super) fn keep_history(&mut self, home: &HomeId, t: &Telemetry, now: Time) -> bool {
        let every = chrono::Duration::seconds(i64::from(self.config.telemetry_history_every_s));
        match self.history.get(home) {
            Some((at, mains)) if now - *at < every && *mains == t.mains_present => false,
            _ => {
                self.history.insert(home.clone(), (now, t.mains_present));
                true
            }
        }
    }

    /// The acknowledgements for agents, and whether anything was stored.
    pub(super) fn ingest_tx(
        &mut self,
        tx: &Tx,
        batch: &[Publish],
        now: Time,
    ) -> Result<(Vec<(HomeId, mqtt::Ack)>, bool), StoreError> {
        let mut stored = false;
        // The batch's events are stored first, all at once, to know which are new (one
        // statement, not one per event); a duplicate is not applied.
        let events: Vec<(usize, HomeId, Event)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let t = Topic::parse(p.topic.as_str()).ok()?;
                if t.channel != Channel::Event || !self.engine.knows(&t.home) {
                    return None;
                }
                mqtt::decode::<Event>(&p.payload).ok().map(|e| (i, t.home, e))
            })
            .collect();
        let pairs: Vec<(HomeId, Event)> = events.iter().map(|(_, h, e)| (h.clone(), e.clone())).collect();
        let new: HashMap<usize, bool> =
            events.iter().map(|(i, _, _)| *i).zip(self.store.insert_events(tx, &pairs, now)?).collect();
        let (mut statuses, mut telemetry) = (Vec::new(), Vec::new());
        for (i, p) in batch.iter().enumerate() {
            let topic = p.topic.as_str();
            let parsed = match Topic::parse(topic) {
                Ok(t) => t,
                Err(e) => {
                    self.reject(topic, &e.to_string());
                    continue;
                }
            };
            if !self.engine.knows(&parsed.home) {
                self.counters.unknown_home.fetch_add(1, Ordering::Relaxed);
                if self.log_budget > 0 {
                    self.log_budget -= 1;
                    tracing::warn!(home = parsed.home.as_str(), "message from a home that is not registered");
                }
                continue;
            }
            let input = match parsed.channel {
                Channel::Status => match mqtt::decode::<Status>(&p.payload) {
                    Ok(s) => {
                        statuses.push((parsed.home.clone(), s.clone()));
                        if p.retain {
                            Input::RetainedStatus(parsed.home, s)
                        } else {
                            Input::Status(parsed.home, s)
                        }
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Telemetry => match mqtt::decode::<Telemetry>(&p.payload) {
                    Ok(t) => {
                        if self.keep_history(&parsed.home, &t, now) {
                            telemetry.push((parsed.home.clone(), t.clone()));
                        }
                        Input::Telemetry(parsed.home, t)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Event => match mqtt::decode::<Event>(&p.payload) {
                    Ok(e) => {
                        if !new.get(&i).copied().unwrap_or(false) {
                            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Input::Event(parsed.home, e)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Ack => continue, // our own acknowledgements, if a filter ever matches them
            };
            stored = true;
            self.counters.ingested.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.engine.handle(input, now) {
                tracing::warn!(error = %e, "not applied");
            }
        }
        self.store.insert_statuses(tx, &statuses, now)?;
        self.store.insert_telemetry_many(tx, &telemetry, now)?;
        if stored && !self.first_message_stored {
            self.store.set_meta(crate::edge::store::META_FIRST_MESSAGE_AT, &now.to_rfc3339())?;
        }
        Ok((self.persist(tx, now)?, stored))
    }

    /// Write the engine's outputs and dirty state (inside a transaction).
    pub(super) fn persist(&mut self, tx: &Tx, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut acks = Vec::new();
        let outputs = self.engine.take_outputs();
        let dirty = self.engine.take_dirty();
        if !outputs.is_empty() || !dirty.is_empty() {
            self.snapshot_dirty = true;
        }
        // Written a table at a time (one statement each where the store can), each alert once
        // as it is last, and only when it is not stored as it is already.
        let alerts = self.stored_alerts.to_write(&outputs, &dirty);
        let mut rows = Vec::new();
        let mut incidents: Vec<crate::domain::engine::Incident> = Vec::new();
        let mut incident_at: HashMap<String, usize> = HashMap::new();
        for out in outputs {
            match out {
                Output::Alert(a) => {
                    self.changed_homes.insert(a.home);
                }
                Output::Incident(i) => {
                    self.changed_incidents.insert(i.municipality.clone());
                    // Each incident once, as it is last.
                    match incident_at.get(&i.id) {
                        Some(&n) => incidents[n] = i,
                        None => {
                            incident_at.insert(i.id.clone(), incidents.len());
                            incidents.push(i);
                        }
                    }
                }
                Output::AgentAck(h, a) => acks.push((h, a)),
                Output::Notify(n) => rows.extend(expand(&n, &self.style)),
                // Not stored: told at once (if the transaction then fails, the engine is
                // reloaded and decides again; a notice twice is better than none).
                Output::Notice(notice) => self.tell_operators(notice, now),
            }
        }
        for i in &incidents {
            self.store.save_incident(tx, i)?;
        }
        self.store.save_alerts(tx, &alerts)?;
        self.store.enqueue_many(tx, &rows)?;
        self.store.save_states(tx, &dirty)?;
        self.changed_homes.extend(dirty.into_iter().map(|(h, _)| h));
        Ok(acks)
    }

    /// The broker says whether it holds a session for this gateway's client id. A store that
    /// has no record of that session (never connected with it, never stored a message) is not
    /// the store the session belongs to.
    pub(super) fn check_session(&mut self, session_present: bool, now: Time) -> Result<(), RunError> {
        let known = self.first_message_stored || self.adopt_session || self.session_recorded;
        if session_present && !known {
            return Err(RunError::WrongStore {
                path: self.store.location(),
                client_id: self.config.broker.client_id.clone(),
            });
        }
        // This store now owns the session the broker keeps for it (known at once; written as
        // soon as the store takes it).
        self.session_recorded = true;
        self.write_session_record(now);
        Ok(())
    }

    pub(super) fn write_session_record(&mut self, now: Time) {
        if self.session_recorded && !self.session_written {
            match self.store.set_meta(crate::edge::store::META_BROKER_SESSION_AT, &now.to_rfc3339()) {
                Ok(()) => self.session_written = true,
                Err(e) => tracing::warn!(error = %e, "recording the broker session (will try again)"),
            }
        }
    }
}
