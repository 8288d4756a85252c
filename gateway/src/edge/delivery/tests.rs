use super::*;
use crate::domain::engine::Content;
use crate::domain::homes::{Contact, Lang};
use chrono::{DateTime, FixedOffset};
use mamori_protocol::mqtt::Role;

fn t(s: i64) -> Time {
    DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
}

fn style() -> Style {
    Style { public_url: "http://x".into(), link_secret: b"k".to_vec(), offset: FixedOffset::east_opt(0).unwrap() }
}

fn line_row(body: String) -> OutboxRow {
    let n = Notification {
        key: "a1:s0:r0".into(),
        alert_id: "a1".into(),
        home: None,
        recipients: vec![(
            Role::Family,
            Contact {
                role: Role::Family,
                name: "母".into(),
                language: Lang::Ja,
                channels: vec![ChannelRef::Line(format!("U{}", "a".repeat(32)))],
                quiet_hours: None,
                phone: None,
                consent: None,
                then: vec![],
            },
        )],
        content: Content::Cleared {
            label: "K".into(),
            kind: crate::domain::engine::AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost),
            since: t(0),
            at: t(60),
        },
        at: t(60),
        critical: true,
    };
    let mut row = expand(&n, &style()).remove(0);
    row.body = body;
    row
}

#[test]
fn a_line_push_is_the_text_and_a_button_that_opens_the_acknowledgement_link() {
    let link = "http://x/ack/a1/family/00";
    let row = line_row(format!("K: 停電。\nお願い: 確認してください。\n確認（既読）: {link}"));
    let req = line_request("Uaaaa", &row, link);
    assert_eq!(req["to"], "Uaaaa");
    let text = req["messages"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(&row.subject) && text.contains("お願い: 確認してください。"), "{text}");
    assert!(!text.contains("/ack/"), "the link is a button, not text: {text}");
    let button = &req["messages"][1];
    assert_eq!(button["type"], "template");
    assert_eq!(button["template"]["actions"][0]["uri"], link);
    assert!(button["template"]["actions"][0]["label"].as_str().unwrap().chars().count() <= 20);
    assert!(button["template"]["text"].as_str().unwrap().chars().count() <= 160);
    // A cleared message has no link: text only. An enormous body is cut to LINE's limits.
    let long = line_row("停".repeat(9000));
    let req = line_request("Uaaaa", &long, link);
    assert_eq!(req["messages"].as_array().unwrap().len(), 1);
    assert_eq!(req["messages"][0]["text"].as_str().unwrap().chars().count(), LINE_TEXT_MAX);
}

#[test]
fn a_call_speaks_the_message_escaped_and_asks_for_1_only_when_it_can_be_acknowledged() {
    let link = "http://x/ack/a1/family/00";
    let row = line_row(format!("K: 停電 <&>。\nお願い: 確認してください。\n確認（既読）: {link}"));
    let twiml = voice_twiml(&row, link);
    assert!(twiml.contains("<Say language=\"ja-JP\">") && twiml.contains("停電 &lt;&amp;&gt;"), "{twiml}");
    assert!(
        !twiml.contains("/ack/a1/family/00<") && !twiml.contains("確認（既読）"),
        "the link is not read out: {twiml}"
    );
    assert_eq!(twiml.matches("action=\"http://x/voice/ack/a1/family/00?lang=ja\"").count(), 2, "{twiml}");
    assert!(twiml.contains("1を押してください"));
    // Without a link (a cleared message): spoken once, nothing to press.
    let plain = voice_twiml(&line_row("K: 電源が復旧しました。".into()), link);
    assert!(!plain.contains("<Gather") && plain.contains("電源が復旧しました"), "{plain}");
    assert_eq!(
        voice_ack_url("https://m.example/base/ack/a/b/c").as_deref(),
        Some("https://m.example/base/voice/ack/a/b/c")
    );
}

#[test]
fn call_outcomes_and_refusals_are_classified() {
    assert!(call_outcome("completed").is_ok());
    for o in ["busy", "no-answer", "failed", "canceled"] {
        assert!(!call_outcome(o).unwrap_err().destination, "{o}: one person's line");
    }
    assert!(voice_created(201, "{}").is_ok());
    assert!(!voice_created(400, r#"{"code":21211,"message":"not a valid phone number"}"#).unwrap_err().destination);
    for status in [401, 403, 429, 500] {
        assert!(voice_created(status, "").unwrap_err().destination, "{status}");
    }
}

#[test]
fn later_channels_wait_their_turn_and_quiet_hours_hold_only_what_is_not_critical() {
    use crate::domain::homes::ChannelStep;
    let family = Contact {
        role: Role::Family,
        name: "母".into(),
        language: Lang::Ja,
        channels: vec![ChannelRef::Line(format!("U{}", "a".repeat(32)))],
        then: vec![ChannelStep { after_min: 5, channels: vec![ChannelRef::Voice("+819012345678".into())] }],
        quiet_hours: Some("22:00-07:00".into()),
        phone: None,
        consent: None,
    };
    let alert = |critical: bool, at: Time| Notification {
        key: "a1:s0:r0".into(),
        alert_id: "a1".into(),
        home: None,
        recipients: vec![(Role::Family, family.clone())],
        content: Content::Cleared { label: "K".into(), kind: crate::domain::engine::AlertKind::Drill, since: at, at },
        at,
        critical,
    };
    // An alert (not a clearance); the style's offset is UTC here.
    let mut n = alert(true, t(0));
    n.content = serde_json::from_value(serde_json::json!({"type": "alert", "label": "K", "kind": "device_lost",
            "since": t(0), "tier": "T0", "repeat": 0, "forecast": null, "time_left_s": null, "silent": false,
            "evacuation": null, "data": {}}))
    .unwrap();
    let rows = expand(&n, &style());
    let when: Vec<(bool, i64)> =
        rows.iter().map(|r| (r.conditional, (r.next_attempt_at - t(0)).num_minutes())).collect();
    assert_eq!(when, [(false, 0), (true, 5)], "LINE at once, the call 5 min later if still unacknowledged");
    // At 23:00 local, not critical: held until 07:00, and then sent only if still needed.
    let late = DateTime::parse_from_rfc3339("2026-11-30T23:00:00Z").unwrap().to_utc();
    let mut quiet = n.clone();
    (quiet.at, quiet.critical) = (late, false);
    let rows = expand(&quiet, &style());
    assert_eq!((rows[0].next_attempt_at - late).num_minutes(), 8 * 60);
    assert!(rows[0].conditional && rows[1].next_attempt_at > rows[0].next_attempt_at);
    // Critical: never held.
    quiet.critical = true;
    assert_eq!(expand(&quiet, &style())[0].next_attempt_at, late);
    // An all-clear is not chased by a call.
    let cleared = expand(&alert(false, t(0)), &style());
    assert_eq!(cleared.len(), 1);
    assert!(!cleared[0].conditional);
}

#[test]
fn quiet_hours_over_midnight_end_at_their_end() {
    let utc = FixedOffset::east_opt(0).unwrap();
    let at = |h: u32, m: u32| DateTime::from_timestamp(i64::from(h * 3600 + m * 60), 0).unwrap();
    assert_eq!(after_quiet_hours(at(23, 30), (22 * 60, 7 * 60), utc), at(31, 0));
    assert_eq!(after_quiet_hours(at(3, 0), (22 * 60, 7 * 60), utc), at(7, 0));
    assert_eq!(after_quiet_hours(at(7, 0), (22 * 60, 7 * 60), utc), at(7, 0), "the end is not inside");
    assert_eq!(after_quiet_hours(at(12, 0), (13 * 60, 14 * 60), utc), at(12, 0));
    assert_eq!(after_quiet_hours(at(13, 10), (13 * 60, 14 * 60), utc), at(14, 0));
}

#[test]
fn a_line_retry_key_is_a_uuid_fixed_per_row() {
    let k = line_retry_key("a1:s0:r0:family:母:line:U0");
    assert_eq!(k, line_retry_key("a1:s0:r0:family:母:line:U0"));
    assert_ne!(k, line_retry_key("a1:s0:r1:family:母:line:U0"));
    let parts: Vec<usize> = k.split('-').map(str::len).collect();
    assert_eq!(parts, [8, 4, 4, 4, 12], "{k}");
    assert!(k.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{k}");
    assert_eq!(&k[14..15], "4", "version 4: {k}");
}

#[test]
fn lines_answers_are_classified_for_the_breaker() {
    assert!(line_outcome(200, "{}").is_ok());
    assert!(line_outcome(409, r#"{"message":"The retry key is already accepted"}"#).is_ok(), "landed before");
    let e = line_outcome(400, r#"{"message":"The property, 'to', in the request body is invalid"}"#).unwrap_err();
    assert!(!e.destination && e.text.contains("'to'"), "{e:?}");
    for status in [401, 403, 429, 500, 503] {
        assert!(line_outcome(status, "").unwrap_err().destination, "{status}");
    }
    assert!(line_outcome(401, "{}").unwrap_err().text.contains("access token"));
}

#[test]
fn one_row_per_recipient_and_channel_in_their_language_with_stable_keys() {
    let n = Notification {
        key: "a1:s0:r0".into(),
        alert_id: "a1".into(),
        home: None,
        recipients: vec![
            (
                Role::Family,
                Contact {
                    role: Role::Family,
                    name: "母".into(),
                    language: Lang::Ja,
                    channels: vec![ChannelRef::Sms("+819000000000".into()), ChannelRef::Webhook("f".into())],
                    quiet_hours: None,
                    phone: None,
                    consent: None,
                    then: vec![],
                },
            ),
            (
                Role::Coordinator,
                Contact {
                    role: Role::Coordinator,
                    name: "Sato".into(),
                    language: Lang::En,
                    channels: vec![ChannelRef::Webhook("c".into())],
                    quiet_hours: None,
                    phone: None,
                    consent: None,
                    then: vec![],
                },
            ),
        ],
        content: Content::Cleared {
            label: "K".into(),
            kind: crate::domain::engine::AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost),
            since: t(0),
            at: t(60),
        },
        at: t(60),
        critical: true,
    };
    let rows = expand(&n, &style());
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        ["a1:s0:r0:family:母:sms:+819000000000", "a1:s0:r0:family:母:webhook:f", "a1:s0:r0:coordinator:Sato:webhook:c"]
    );
    assert!(rows[0].subject.contains("解消") && rows[0].body.contains("電源が復旧しました"), "{:?}", rows[0]);
    assert!(rows[2].subject.contains("resolved") && rows[2].body.contains("mains power is back"), "{:?}", rows[2]);
    assert_eq!(expand(&n, &style()), rows, "the same notification gives the same rows");
}

#[test]
fn failures_back_off_fall_back_once_and_are_abandoned_when_too_old() {
    let cfg = DeliveryConfig::default();
    let n = Notification {
        key: "k".into(),
        alert_id: "a".into(),
        home: None,
        recipients: vec![(
            Role::Family,
            Contact {
                role: Role::Family,
                name: "m".into(),
                language: Lang::En,
                channels: vec![ChannelRef::Console("c".into())],
                quiet_hours: None,
                phone: None,
                consent: None,
                then: vec![],
            },
        )],
        content: Content::Cleared {
            label: "K".into(),
            kind: crate::domain::engine::AlertKind::Drill,
            since: t(0),
            at: t(0),
        },
        at: t(0),
        critical: true,
    };
    let mut row = expand(&n, &style()).remove(0);
    let mut fallbacks = 0;
    let mut delays = vec![];
    for i in 0..5 {
        let next = after_attempt(row, Err("down".into()), t(i * 10), &cfg, 0.5);
        fallbacks += usize::from(next.fallback);
        delays.push((next.row.next_attempt_at - t(i * 10)).num_milliseconds());
        row = next.row;
    }
    assert_eq!(fallbacks, 1, "the next recipient is told once");
    assert_eq!(delays, [1000, 2000, 4000, 8000, 16000]);
    assert_eq!(row.status, OutboxStatus::Pending);
    let done = after_attempt(row.clone(), Ok(()), t(100), &cfg, 0.5).row;
    assert_eq!((done.status, done.delivered_at, done.attempts), (OutboxStatus::Delivered, Some(t(100)), 6));
    let old = after_attempt(row, Err("down".into()), t(24 * 3600), &cfg, 0.5).row;
    assert_eq!(old.status, OutboxStatus::Abandoned);
}

#[test]
fn backoff_is_capped_and_jittered() {
    let cfg = DeliveryConfig::default();
    assert_eq!(backoff(30, &cfg, 0.5), Duration::from_millis(60_000));
    assert_eq!(backoff(1, &cfg, 0.0), Duration::from_millis(750));
    assert_eq!(backoff(1, &cfg, 1.0), Duration::from_millis(1250));
}

#[test]
fn signatures_are_hmac_sha256_of_the_body() {
    // RFC 4231 test case 2.
    assert_eq!(
        signature(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(json_escape("a\"b\n"), "a\\\"b\\n");
}
