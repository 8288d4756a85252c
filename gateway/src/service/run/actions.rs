//! What people do: acknowledgements and answers (from the dashboard, a link or the command line), a
//! hand clear, a drill, a care plan saved; each refused with a clear reason while the store refuses
//! writes.

use super::*;

impl Service {
    /// Apply an acknowledgement.
    pub(super) fn acknowledge(
        &mut self,
        alert_id: &str,
        role: mqtt::Role,
        by: &str,
        note: Option<String>,
        now: Time,
    ) -> Result<Vec<(HomeId, mqtt::Ack)>, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let input = Input::Ack { alert_id: alert_id.to_string(), role, by: by.to_string(), note };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, ?role, by, "acknowledged");
        self.transaction(now, |s, tx| s.persist(tx, now)).map_err(|e| e.to_string())
    }

    /// Record a family's or a facility's answer.
    pub(super) fn answer(
        &mut self,
        alert_id: &str,
        by: &str,
        answer: crate::domain::engine::Answer,
        now: Time,
    ) -> Result<(Vec<(HomeId, mqtt::Ack)>, web::Told), String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let told = web::record_answer(&mut self.engine, alert_id, by, answer, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, answer = answer.as_str(), by, told = %told.query(), "answered");
        let acks = self.transaction(now, |s, tx| s.persist(tx, now)).map_err(|e| e.to_string())?;
        Ok((acks, told))
    }

    /// A request from the web, answered.
    pub(super) fn on_web(&mut self, req: WebRequest, now: Time) {
        let (r, reply) = match req {
            WebRequest::Ack { alert_id, role, by, note, reply } => {
                (self.acknowledge(&alert_id, role, &by, note, now), reply)
            }
            WebRequest::Answer { alert_id, by, answer, reply } => {
                let r = self.answer(&alert_id, &by, answer, now).map(|(acks, told)| {
                    self.publish_acks(acks);
                    told
                });
                let _ = reply.send(r);
                return;
            }
            WebRequest::Clear { alert_id, by, reply } => (self.clear(&alert_id, &by, now), reply),
            WebRequest::Drill { home, by, reply } => {
                let _ = reply.send(self.drill(&home, &by, now));
                return;
            }
            WebRequest::SavePlan { home, by, based_on, reply } => {
                let _ = reply.send(self.save_plan(*home, &by, based_on));
                return;
            }
        };
        let r = match r {
            Ok(acks) => {
                self.publish_acks(acks);
                Ok(())
            }
            Err(e) => Err(e),
        };
        let _ = reply.send(r);
    }

    /// Store a care plan changed (or created) in the dashboard, already validated there, and
    /// use it from now on; its new version number (the same as before when nothing changed).
    /// `based_on` is the version the editor started from (0: a new home); when another
    /// version was stored meanwhile, nothing is stored.
    pub(super) fn save_plan(
        &mut self,
        home: crate::domain::homes::Home,
        by: &str,
        based_on: u32,
    ) -> Result<u32, SaveRefusal> {
        if let Some(why) = self.degraded_refusal() {
            return Err(SaveRefusal::Failed(why));
        }
        if !self.leased() {
            return Err(SaveRefusal::Failed("this gateway is not the active one any more".into()));
        }
        let id = home.id.clone();
        let known = self.engine.plan(&id).is_some();
        let version = web::plan::store_plan(self.store.as_mut(), known, &home, by, based_on)?;
        tracing::info!(home = %id.as_str(), by, version, "care plan saved");
        self.engine.upsert_home(home);
        self.changed_homes.insert(id);
        self.snapshot_dirty = true;
        Ok(version)
    }

    /// Start a drill at a home: every contact gets a labelled test message. The drill's id.
    pub(super) fn drill(&mut self, home: &HomeId, by: &str, now: Time) -> Result<String, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        self.engine.handle(Input::Drill { home: home.clone(), by: by.to_string() }, now).map_err(|e| e.to_string())?;
        let id = self
            .engine
            .home_state(home)
            .and_then(|s| s.alerts.get(&crate::domain::engine::AlertKind::Drill))
            .map(|a| a.id.clone())
            .ok_or_else(|| "the drill did not start".to_string())?;
        tracing::info!(home = %home.as_str(), by, drill = %id, "drill started");
        self.transaction(now, |s, tx| s.persist(tx, now)).map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Clear an alert by hand.
    pub(super) fn clear(&mut self, alert_id: &str, by: &str, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let input = Input::Clear { alert_id: alert_id.to_string(), by: by.to_string() };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, by, "cleared by hand");
        self.transaction(now, |s, tx| s.persist(tx, now)).map_err(|e| e.to_string())
    }

    pub(super) fn apply_cli_acks(&mut self, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut all = Vec::new();
        for req in self.store.pending_acks()? {
            let result = match req.role {
                Ok(role) => self.acknowledge(&req.alert_id, role, &req.by, req.note.clone(), now),
                Err(unknown) => Err(format!("refused: `{unknown}` is not a role")),
            };
            if self.degraded.is_some() {
                // The store refused the acknowledgement's writes: the request stays pending and
                // is applied once writes work again (not answered "try again").
                break;
            }
            let text = match result {
                Ok(acks) => {
                    all.extend(acks);
                    "ok".to_string()
                }
                Err(e) => e,
            };
            // In a transaction of its own, so on a shared store it is fenced like the
            // acknowledgement: a deposed gateway cannot mark a request done that it could not
            // apply, and the gateway holding the lease applies it. When it fails the gateway is
            // degraded (told and logged there); the agents still hear of what was applied.
            if self.transaction(now, |s, tx| s.store.finish_ack(tx, req.id, &text)).is_err() {
                break;
            }
        }
        Ok(all)
    }
}
