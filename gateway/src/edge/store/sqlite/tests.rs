use super::*;
use crate::domain::homes::ChannelRef;
use crate::edge::store::contract::{ev, row, t};
use crate::edge::store::OutboxStatus;

#[test]
fn keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    crate::edge::store::contract::check(&mut s);
}

#[test]
fn plans_stored_before_versions_were_kept_become_version_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(SqliteStore::file(dir.path())).unwrap();
        let before = MIGRATIONS.iter().position(|m| m.contains("CREATE TABLE home_versions")).unwrap();
        for m in &MIGRATIONS[..before] {
            c.execute_batch(m).unwrap();
        }
        c.pragma_update(None, "user_version", before as i64).unwrap();
        let plan = r#"{"id":"h","municipality":"431001","label":"K","devices":[],"backup":[],"contacts":[]}"#;
        c.execute(
            "INSERT INTO homes (id, municipality, plan, updated_at) VALUES ('h', '431001', ?1, '2026-01-01T00:00:00Z')",
            params![plan],
        )
        .unwrap();
    }
    let s = SqliteStore::open(dir.path()).unwrap();
    let v = s.home_versions(&HomeId::new("h").unwrap()).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].version, v[0].by.as_str(), v[0].plan.label.as_str()), (1, "", "K"));
}

#[test]
fn two_connections_appending_at_once_never_fork_the_audit_chain() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut s = SqliteStore::open_existing(&dir).unwrap();
                for i in 0..150 {
                    crate::admin::audit::append(&mut s, t(i), &format!("w{w}"), "-", "view_home", "h", "").unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let s = SqliteStore::open_existing(dir.path()).unwrap();
    assert!(matches!(
        crate::admin::audit::verify(&s).unwrap(),
        crate::admin::audit::Verdict::Intact { entries: 300, .. }
    ));
}

#[test]
fn the_database_and_its_journal_are_private_even_when_made_before_that_rule() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    s.set_meta("probe", "1").unwrap();
    for f in ["mamori.db", "mamori.db-wal", "mamori.db-shm"] {
        assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
    }
    drop(s);
    // An older installation's world-readable database.
    let db = dir.path().join("mamori.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(SqliteStore::open_existing(dir.path()).unwrap());
    assert_eq!(mode(&db), 0o600);
}

/// A write of the engine's record, as the service makes it: in a transaction of its own.
fn w<T>(s: &mut SqliteStore, write: impl FnOnce(&mut SqliteStore, &Tx) -> T) -> T {
    let tx = s.begin().unwrap();
    let v = write(s, &tx);
    s.commit(tx).unwrap();
    v
}

#[test]
fn events_are_unique_by_home_and_seq_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let home = HomeId::new("h").unwrap();
    {
        let mut s = SqliteStore::open(dir.path()).unwrap();
        assert!(w(&mut s, |s, tx| s.insert_event(tx, &home, &ev(1), t(0)).unwrap()));
        assert!(!w(&mut s, |s, tx| s.insert_event(tx, &home, &ev(1), t(1)).unwrap()));
        assert!(w(&mut s, |s, tx| s.insert_event(tx, &HomeId::new("g").unwrap(), &ev(1), t(1)).unwrap()));
    }
    let mut s = SqliteStore::open(dir.path()).unwrap();
    assert!(!w(&mut s, |s, tx| s.insert_event(tx, &home, &ev(1), t(2)).unwrap()), "dedup survives a restart");
    assert!(w(&mut s, |s, tx| s.insert_event(tx, &home, &ev(2), t(2)).unwrap()));
}

#[test]
fn the_delivery_statistics_read_only_what_they_need_from_the_outbox_and_the_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let mut r = row("k", 0);
    r.channel = ChannelRef::Line(format!("U{}", "a".repeat(32)));
    w(&mut s, |s, tx| s.enqueue(tx, &r).unwrap());
    r.attempts = 2;
    r.status = OutboxStatus::Delivered;
    r.delivered_at = Some(t(30));
    w(&mut s, |s, tx| s.record_attempt(tx, &r).unwrap());
    w(&mut s, |s, tx| s.enqueue(tx, &row("k2", 0)).unwrap());
    s.conn
        .execute(
            "INSERT INTO alerts (id, home, kind, raised_at, body) VALUES ('a1', 'h', 'mains_lost', 'x', ?1)",
            [serde_json::json!({ "acks": [{ "role": "family", "by": "link", "at": t(90), "note": null }] })
                .to_string()],
        )
        .unwrap();
    let (sent, acked) = s.delivery_inputs().unwrap();
    let line = sent.iter().find(|x| x.channel == "line").unwrap();
    assert_eq!((line.status.as_str(), line.attempts, line.delivered_at), ("delivered", 2, Some(t(30))));
    assert!(sent.iter().any(|x| x.channel == "console" && x.status == "pending"));
    assert_eq!(acked, [crate::domain::stats::Acked { alert_id: "a1".into(), role: Role::Family, at: t(90) }]);
    let stats = crate::domain::stats::compute(&sent, &acked);
    assert_eq!(stats.acks[&Role::Family].median_s, Some(60.0));
}

#[test]
fn a_rolled_back_batch_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = HomeId::new("h").unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let tx = s.begin().unwrap();
    s.insert_event(&tx, &home, &ev(1), t(0)).unwrap();
    s.enqueue(&tx, &row("k", 0)).unwrap();
    s.rollback(tx);
    assert!(w(&mut s, |s, tx| s.insert_event(tx, &home, &ev(1), t(0)).unwrap()));
    assert_eq!(s.outbox_depth().unwrap(), 0);
}

#[test]
fn the_outbox_is_idempotent_by_key_and_orders_by_due_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    assert!(w(&mut s, |s, tx| s.enqueue(tx, &row("k2", 20)).unwrap()));
    assert!(w(&mut s, |s, tx| s.enqueue(tx, &row("k1", 10)).unwrap()));
    assert!(!w(&mut s, |s, tx| s.enqueue(tx, &row("k1", 10)).unwrap()), "same key, no second message");
    assert_eq!(s.due(t(15), 10, &[]).unwrap().iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["k1"]);
    assert_eq!(s.next_due_after(t(0)).unwrap(), Some(t(10)));
    assert_eq!(s.next_due_after(t(10)).unwrap(), Some(t(20)), "what is due now is not a deadline");
    assert!(s.due(t(15), 10, &["console:c".into()]).unwrap().is_empty(), "a full destination is skipped");
    assert_eq!(s.due_only(t(15), 10, &["console:c".into()]).unwrap().len(), 1);
    assert!(s.due_only(t(15), 10, &["webhook:x".into()]).unwrap().is_empty());
    let mut r = s.due(t(30), 10, &[]).unwrap().remove(0);
    r.status = OutboxStatus::Delivered;
    r.delivered_at = Some(t(31));
    w(&mut s, |s, tx| s.record_attempt(tx, &r).unwrap());
    assert_eq!(s.outbox_depth().unwrap(), 1);
    assert_eq!(s.outbox_for("a1").unwrap().len(), 2);
}

#[test]
fn history_keeps_what_the_charts_read_and_drops_the_rest() {
    let sample = br#"{"ts":"2026-11-22T03:04:05.250+09:00","interval_s":10,"mains_present":false,
          "ups":{"on_battery":true,"battery_charge_pct":55.0,"runtime_s":1800,"load_pct":23.0,"temperature_c":31.0,"beeper_on":true},
          "power_meter":{"battery_voltage_v":12.4},"oximeter":{"spo2_pct":97,"pulse_bpm":92,"perfusion_index":3.1},
          "ventilator":{"alarm":"normal"},"devices":[{"id":"ups","kind":"ups","state":"ok"}],
          "conditions":{"mains_lost":true},"clock":{"boot":"b","uptime_ms":5}}"#;
    let t: Telemetry = mamori_protocol::mqtt::decode(sample).unwrap();
    let h = history_json(&t);
    let back: Telemetry = serde_json::from_str(&h).unwrap();
    assert_eq!((back.ts, back.mains_present), (t.ts, Some(false)));
    let ups = back.ups.unwrap();
    assert_eq!((ups.battery_charge_pct, ups.runtime_s, ups.load_pct), (Some(55.0), Some(1800), Some(23.0)));
    assert_eq!(ups.temperature_c, None);
    assert_eq!(back.oximeter.map(|o| (o.spo2_pct, o.pulse_bpm, o.perfusion_index)), Some((Some(97), Some(92), None)));
    assert_eq!(back.power_meter.and_then(|m| m.battery_voltage_v), Some(12.4));
    assert!(back.devices.is_empty() && back.conditions.is_empty() && back.clock.is_none());
    assert!(h.len() * 2 < serde_json::to_string(&t).unwrap().len(), "{h}");
}

#[test]
fn ack_requests_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let id = s.request_ack("a1", Role::Coordinator, "cli:sato", Some("向かっています")).unwrap();
    let p = s.pending_acks().unwrap();
    assert_eq!((p[0].role.clone(), p[0].note.as_deref()), (Ok(Role::Coordinator), Some("向かっています")));
    assert_eq!(s.ack_result(id).unwrap(), None);
    w(&mut s, |s, tx| s.finish_ack(tx, id, "ok").unwrap());
    assert!(s.pending_acks().unwrap().is_empty());
    assert_eq!(s.ack_result(id).unwrap().as_deref(), Some("ok"));
    // A role the gateway does not know (a newer CLI, a hand-edited row) is never taken for
    // another, least of all an administrator.
    s.conn
        .execute("INSERT INTO ack_requests (alert_id, role, by, requested_at) VALUES ('a1', 'mayor', 'cli:x', 0)", [])
        .unwrap();
    assert_eq!(s.pending_acks().unwrap()[0].role, Err("mayor".to_string()));
}

#[test]
fn a_damaged_row_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path()).unwrap();
    s.conn.execute("INSERT INTO home_state (id, state) VALUES ('h', '{not json')", []).unwrap();
    let e = s.states().unwrap_err().to_string();
    assert!(e.contains("mamori.db") && e.contains("home state"), "{e}");
}

#[test]
fn a_transaction_left_open_does_not_stop_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let home = HomeId::new("h").unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    // As after a ROLLBACK that itself failed: a transaction holding a write, still open.
    s.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    s.conn.execute("INSERT INTO meta (key, value) VALUES ('left', 'open')", []).unwrap();
    let tx = s.begin().expect("the next batch begins");
    assert!(s.insert_event(&tx, &home, &ev(1), t(0)).unwrap());
    s.commit(tx).unwrap();
    drop(s);
    let s = SqliteStore::open_existing(dir.path()).unwrap();
    assert_eq!(s.events_for(&home, 10).unwrap().len(), 1, "the batch is committed");
    assert_eq!(s.meta("left").unwrap(), None, "what was left open is not");
}
