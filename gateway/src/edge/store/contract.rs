//! What every store backend must do, written once over the traits (`&mut dyn Store`), so
//! a second backend is checked by the same tests as the first: each backend's test module
//! calls [`check`] with a fresh, empty store.

use chrono::Duration;
use mamori_protocol::mqtt::{EventKind, HomeId, Role, Severity};

use super::{OutboxRow, OutboxStatus, Store};
use crate::admin::accounts::{AccountRole, NewUser};
use crate::admin::audit::{self, Verdict};
use crate::domain::engine::Time;
use crate::domain::homes::{ChannelRef, Home, Lang};

/// A time, `s` seconds from a fixed origin (the backends' tests share these fixtures).
pub(super) fn t(s: i64) -> Time {
    chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
}

/// A `mains_lost` event with sequence `seq`, at `t(seq)`.
pub(super) fn ev(seq: u64) -> mamori_protocol::mqtt::Event {
    mamori_protocol::mqtt::Event {
        id: format!("b-{seq}"),
        seq,
        ts: t(seq as i64).fixed_offset(),
        kind: EventKind::MainsLost,
        severity: Severity::Critical,
        source: None,
        data: Default::default(),
        clock: None,
    }
}

fn home(id: &str) -> Home {
    let mut h: Home = serde_json::from_value(serde_json::json!({
        "id": id, "municipality": "431001", "label": id, "devices": [], "backup": [], "contacts": []
    }))
    .unwrap();
    h.id = HomeId::new(id).unwrap();
    h
}

/// A pending console row of alert `a1`, due at `at`.
pub(crate) fn row(key: &str, at: i64) -> OutboxRow {
    OutboxRow {
        key: key.into(),
        alert_id: "a1".into(),
        home: Some(HomeId::new("h").unwrap()),
        role: Role::Family,
        recipient: "母".into(),
        channel: ChannelRef::Console("c".into()),
        lang: Lang::Ja,
        subject: "s".into(),
        body: "b".into(),
        content: serde_json::Value::Null,
        created_at: t(at),
        next_attempt_at: t(at),
        attempts: 0,
        status: OutboxStatus::Pending,
        last_error: None,
        delivered_at: None,
        fallback_done: false,
        conditional: false,
    }
}

/// Every check, on a fresh empty store.
pub(crate) fn check(s: &mut dyn Store) {
    messages_and_outbox(s);
    accounts(s);
    audit_log(s);
    home_states(s);
    batches(s);
}

fn batches(s: &mut dyn Store) {
    let (a, b) = (HomeId::new("ba").unwrap(), HomeId::new("bb").unwrap());
    let tx = s.begin().unwrap();
    assert!(s.insert_event(&tx, &a, &ev(1), t(0)).unwrap());
    let new =
        s.insert_events(&tx, &[(a.clone(), ev(1)), (a.clone(), ev(2)), (b.clone(), ev(2)), (a.clone(), ev(2))], t(1));
    assert_eq!(
        new.unwrap(),
        [false, true, true, false],
        "stored before; new; new for another home; again in the batch"
    );
    assert!(s.insert_events(&tx, &[], t(1)).unwrap().is_empty());
    s.enqueue_many(&tx, &[row("bk1", 0), row("bk2", 0), row("bk1", 0)]).unwrap();
    s.enqueue_many(&tx, &[]).unwrap();
    let telemetry: mamori_protocol::mqtt::Telemetry =
        serde_json::from_str(r#"{"ts":"2026-11-01T09:00:00+09:00","interval_s":60,"mains_present":false}"#).unwrap();
    s.insert_telemetry_many(&tx, &[(a.clone(), telemetry.clone()), (b.clone(), telemetry)], t(2)).unwrap();
    let status: mamori_protocol::mqtt::Status = serde_json::from_str(r#"{"state":"online"}"#).unwrap();
    s.insert_statuses(&tx, &[(a.clone(), status.clone()), (b.clone(), status)], t(2)).unwrap();
    s.commit(tx).unwrap();
    assert_eq!(s.events_for(&a, 10).unwrap().len(), 2);
    assert_eq!(s.events_for(&b, 10).unwrap().len(), 1);
    let due: Vec<String> = s.due(t(100), 100, &[]).unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(due.iter().filter(|k| k.starts_with("bk")).count(), 2, "each key once: {due:?}");
    assert_eq!(s.telemetry_since(&b, t(-3600 * 24 * 400), 10).unwrap().len(), 1);
}

fn home_states(s: &mut dyn Store) {
    use crate::domain::engine::{HomeState, Power};
    let (a, b) = (HomeId::new("sa").unwrap(), HomeId::new("sb").unwrap());
    let on_battery = HomeState { power: Power::Battery { since: t(5) }, ..Default::default() };
    let tx = s.begin().unwrap();
    // Many at once, then one of them again with another state: each home once, the latest.
    s.save_states(&tx, &[(a.clone(), HomeState::default()), (b.clone(), on_battery.clone())]).unwrap();
    s.save_states(&tx, &[(a.clone(), on_battery.clone())]).unwrap();
    s.save_states(&tx, &[]).unwrap();
    s.commit(tx).unwrap();
    let mut got = s.states().unwrap();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(got, [(a.clone(), on_battery.clone()), (b, on_battery)]);
    let tx = s.begin().unwrap();
    s.save_state(&tx, &a, &HomeState::default()).unwrap();
    s.commit(tx).unwrap();
    assert!(s.states().unwrap().contains(&(a, HomeState::default())));
}

fn messages_and_outbox(s: &mut dyn Store) {
    let h = HomeId::new("h").unwrap();
    s.upsert_homes(&[home("h")], "homes import").unwrap();
    assert_eq!(s.homes().unwrap().len(), 1);
    // Every change of a plan is a version with who made it; the same plan again is none.
    s.upsert_homes(&[home("h")], "homes file").unwrap();
    let mut changed = home("h");
    changed.label = "K-01".into();
    s.upsert_homes(&[changed.clone()], "coord-a").unwrap();
    let v = s.home_versions(&h).unwrap();
    assert_eq!(v.iter().map(|v| (v.version, v.by.as_str())).collect::<Vec<_>>(), [(2, "coord-a"), (1, "homes import")]);
    assert_eq!(v[0].plan, changed);
    assert_eq!(v[1].plan, home("h"));
    assert_eq!(s.homes().unwrap(), [changed.clone()]);
    assert!(s.home_versions(&HomeId::new("other").unwrap()).unwrap().is_empty());
    assert_eq!(s.latest_plans_by("homes import").unwrap(), [home("h")]);
    assert_eq!(s.latest_plans_by("coord-a").unwrap(), [changed.clone()]);
    assert!(s.latest_plans_by("homes file").unwrap().is_empty(), "the same plan again made no version");
    // Many at once: only the plans that changed get a version.
    s.upsert_homes(&[changed.clone(), home("h2")], "import 2").unwrap();
    assert_eq!(s.home_versions(&h).unwrap().len(), 2, "h unchanged: no version");
    let h2 = s.home_versions(&HomeId::new("h2").unwrap()).unwrap();
    assert_eq!(h2.iter().map(|v| (v.version, v.by.as_str())).collect::<Vec<_>>(), [(1, "import 2")]);
    assert_eq!(s.homes().unwrap().len(), 2);
    assert!(!s.has_messages().unwrap());
    // A batch rolled back leaves nothing; committed, an event is stored once.
    let tx = s.begin().unwrap();
    assert!(s.insert_event(&tx, &h, &ev(1), t(0)).unwrap());
    assert!(s.enqueue(&tx, &row("k0", 0)).unwrap());
    s.rollback(tx);
    assert_eq!(s.outbox_depth().unwrap(), 0);
    let tx = s.begin().unwrap();
    assert!(s.insert_event(&tx, &h, &ev(1), t(0)).unwrap());
    assert!(!s.insert_event(&tx, &h, &ev(1), t(1)).unwrap(), "(home, seq) is unique");
    s.commit(tx).unwrap();
    assert!(s.has_messages().unwrap());
    assert_eq!(s.events_for(&h, 10).unwrap().len(), 1);
    // The outbox: unique by key, due in order.
    let tx = s.begin().unwrap();
    assert!(s.enqueue(&tx, &row("k2", 20)).unwrap());
    assert!(s.enqueue(&tx, &row("k1", 10)).unwrap());
    assert!(!s.enqueue(&tx, &row("k1", 10)).unwrap(), "same key, no second message");
    s.commit(tx).unwrap();
    assert_eq!(s.due(t(15), 10, &[]).unwrap().iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["k1"]);
    assert!(s.due(t(15), 10, &["console:c".into()]).unwrap().is_empty());
    assert_eq!(s.next_due_after(t(10)).unwrap(), Some(t(20)));
    let mut r = s.due(t(30), 10, &[]).unwrap().remove(0);
    r.status = OutboxStatus::Delivered;
    let tx = s.begin().unwrap();
    s.record_attempt(&tx, &r).unwrap();
    s.commit(tx).unwrap();
    assert_eq!(s.outbox_depth().unwrap(), 1);
    // An incident's after-action notes, in the order written, kept apart per incident.
    s.add_incident_note("inc-431001-1", t(5), "coord-a", "K-03の移動が遅れた").unwrap();
    s.add_incident_note("inc-431001-1", t(6), "admin", "次回は先に電話").unwrap();
    s.add_incident_note("inc-131016-1", t(7), "coord-b", "other").unwrap();
    let notes = s.incident_notes("inc-431001-1").unwrap();
    assert_eq!(
        notes.iter().map(|n| (n.by.as_str(), n.text.as_str())).collect::<Vec<_>>(),
        [("coord-a", "K-03の移動が遅れた"), ("admin", "次回は先に電話")]
    );
    assert_eq!(notes[0].at, t(5));
    // Incidents: open ones are reloaded at start; a closed one is still found by its id (the
    // links in its messages).
    let inc = crate::domain::engine::Incident {
        id: "inc-431001-1".into(),
        municipality: "431001".into(),
        opened_at: t(0),
        closed_at: None,
        members: [h.clone()].into(),
        acks: Vec::new(),
        revision: 1,
        last_sent_at: Some(t(1)),
        changed: false,
        tiers: Default::default(),
    };
    let tx = s.begin().unwrap();
    s.save_incident(&tx, &inc).unwrap();
    s.commit(tx).unwrap();
    assert_eq!(s.open_incidents().unwrap().len(), 1);
    let closed = crate::domain::engine::Incident { closed_at: Some(t(600)), ..inc };
    let tx = s.begin().unwrap();
    s.save_incident(&tx, &closed).unwrap();
    s.commit(tx).unwrap();
    assert!(s.open_incidents().unwrap().is_empty());
    assert_eq!(s.incident("inc-431001-1").unwrap().map(|i| i.closed_at), Some(Some(t(600))));
    assert!(s.incident("inc-nowhere").unwrap().is_none());
    s.set_meta("k", "v").unwrap();
    assert_eq!(s.meta("k").unwrap().as_deref(), Some("v"));
}

fn accounts(s: &mut dyn Store) {
    let new = NewUser {
        username: "sato".into(),
        display_name: "佐藤".into(),
        role: AccountRole::Coordinator,
        municipalities: vec!["431001".into()],
        homes: vec![],
    };
    assert!(s.home_exists("h").unwrap() && !s.home_exists("nowhere").unwrap());
    s.insert_user(&new, "hash-1", None, t(0)).unwrap();
    let u = s.user_by_name("sato").unwrap().unwrap();
    assert_eq!(
        (u.role, u.municipalities.as_slice(), u.totp),
        (AccountRole::Coordinator, &["431001".to_string()][..], false)
    );
    assert_eq!(s.user_by_id(u.id).unwrap().as_ref(), Some(&u));
    assert_eq!(s.users().unwrap(), std::slice::from_ref(&u));
    assert_eq!(s.user_by_name("nobody").unwrap(), None);

    // A second factor's step is used once, even by two logins at once.
    s.enrol_totp("sato", "enc1:x", 100).unwrap();
    assert!(s.user_by_name("sato").unwrap().unwrap().totp);
    assert!(!s.use_totp_step(u.id, 100).unwrap(), "the enrolling code's step is used");
    assert!(s.use_totp_step(u.id, 101).unwrap());
    assert!(!s.use_totp_step(u.id, 101).unwrap());
    assert_eq!(s.login_secrets("sato").unwrap().unwrap().totp_last_step, 101);
    assert_eq!(s.totp_secrets().unwrap(), [(u.id, "enc1:x".to_string())]);
    s.set_totp_secret(u.id, "enc1:y").unwrap();
    assert_eq!(s.login_secrets("sato").unwrap().unwrap().totp_secret.as_deref(), Some("enc1:y"));

    // Sessions and tokens; a new password ends the one and revokes the other.
    s.insert_session("sess", u.id, "csrf", t(0)).unwrap();
    let row = s.session("sess").unwrap().unwrap();
    assert_eq!((row.user_id, row.csrf.as_str(), row.created_at, row.last_seen), (u.id, "csrf", Some(t(0)), Some(t(0))));
    s.touch_session("sess", t(60)).unwrap();
    assert_eq!(s.session("sess").unwrap().unwrap().last_seen, Some(t(60)));
    s.insert_token("tok", u.id, "laptop", t(0)).unwrap();
    assert_eq!(s.token_user("tok").unwrap().map(|u| u.username), Some("sato".into()));
    // One token revoked by its id, the other still works; another account's id does nothing.
    s.insert_token("tok2", u.id, "phone", t(1)).unwrap();
    let listed = s.tokens("sato").unwrap();
    assert_eq!(
        listed.iter().map(|r| (r.name.as_str(), r.revoked)).collect::<Vec<_>>(),
        [("laptop", false), ("phone", false)]
    );
    assert!(!s.revoke_token("nobody", listed[1].id).unwrap());
    let other = NewUser { username: "tanaka".into(), ..new.clone() };
    s.insert_user(&other, "hash-t", None, t(0)).unwrap();
    assert!(!s.revoke_token("tanaka", listed[1].id).unwrap(), "another account's token is not theirs to revoke");
    assert!(s.token_user("tok2").unwrap().is_some());
    assert!(s.revoke_token("sato", listed[1].id).unwrap());
    assert_eq!(s.token_user("tok2").unwrap(), None);
    assert!(!s.revoke_token("sato", listed[1].id).unwrap(), "revoked already");
    assert!(s.token_user("tok").unwrap().is_some());
    assert!(s.tokens("sato").unwrap()[1].revoked);
    assert!(s.replace_password("sato", "hash-2").unwrap());
    assert!(!s.replace_password("nobody", "hash-2").unwrap());
    assert_eq!(s.login_secrets("sato").unwrap().unwrap().password_hash, "hash-2");
    assert_eq!(s.session("sess").unwrap(), None, "a new password ends the sessions");
    assert_eq!(s.token_user("tok").unwrap(), None, "and revokes the tokens");

    s.insert_session("s2", u.id, "c2", t(0)).unwrap();
    assert!(s.set_disabled("sato", true).unwrap());
    assert!(s.user_by_name("sato").unwrap().unwrap().disabled);
    s.end_sessions("sato").unwrap();
    assert_eq!(s.session("s2").unwrap(), None);
    assert!(!s.set_disabled("nobody", true).unwrap());
    assert!(s.set_scope("sato", AccountRole::Facility, &[], &["h-1".to_string()]).unwrap());
    let changed = s.user_by_name("sato").unwrap().unwrap();
    assert_eq!(
        (changed.role, changed.municipalities.len(), changed.homes.clone()),
        (AccountRole::Facility, 0, vec!["h-1".to_string()])
    );
    assert!(s.set_scope("sato", AccountRole::Coordinator, &["431001".to_string()], &[]).unwrap());
    assert!(!s.set_scope("nobody", AccountRole::Coordinator, &[], &[]).unwrap());
    s.insert_session("s3", u.id, "c3", t(0)).unwrap();
    s.delete_session("s3").unwrap();
    assert_eq!(s.session("s3").unwrap(), None);

    // Through the rules: a session older than its limit is ended.
    let mut acc = crate::admin::accounts::Accounts::new(s);
    acc.set_disabled("sato", false).unwrap();
    let token = acc.start_session(&u, t(0)).unwrap();
    let (idle, max_age) = (Duration::minutes(30), Duration::hours(12));
    assert!(acc.session(&token, t(60), idle, max_age).unwrap().is_some());
    assert!(acc.session(&token, t(60) + Duration::minutes(31), idle, max_age).unwrap().is_none());
}

fn audit_log(s: &mut dyn Store) {
    for i in 0..3 {
        audit::append(s, t(i), "sato", "-", "view_home", &format!("home-{i}"), "").unwrap();
    }
    let newest: Vec<i64> = s.audit_before(None, 10).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(newest, [3, 2, 1]);
    assert_eq!(s.audit_before(Some(3), 1).unwrap()[0].seq, 2);
    let oldest: Vec<i64> = s.audit_after(1, 10).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(oldest, [2, 3]);
    assert!(matches!(audit::verify(s).unwrap(), Verdict::Intact { entries: 3, .. }));
}
