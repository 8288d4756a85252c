//! Delivery statistics per channel and role: how many messages were delivered, are still
//! pending or were abandoned, how many attempts failed, and how long each role takes to
//! acknowledge. Pure: the store hands over the few fields it needs ([`Sent`], [`Acked`]), no
//! message text. Shown in `/metrics` and on the dashboard's `/admin/delivery`.
//!
//! The time to acknowledge is measured per (alert, role) from the first message delivered to
//! that role to that role's first acknowledgement, so an escalation that told the coordinator
//! an hour after the family does not count that hour against the coordinator. Statistics cover
//! what the store keeps: the outbox and alerts within the retention.

use std::collections::BTreeMap;

use mamori_protocol::mqtt::Role;

use crate::domain::engine::Time;

/// The channels, as named in statistics.
pub const CHANNELS: &[&str] = &["webhook", "sms", "email", "line", "voice", "console"];

/// A channel's name from an outbox row's destination (`webhook:coord`, `sms`, `smtp`, …).
pub fn channel_of(destination: &str) -> &'static str {
    match destination.split(':').next().unwrap_or("") {
        "webhook" => "webhook",
        "sms" => "sms",
        "smtp" => "email",
        "line" => "line",
        "voice" => "voice",
        "console" => "console",
        _ => "other",
    }
}

/// What the store knows of one outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The alert or incident.
    pub alert_id: String,
    /// The channel's name ([`channel_of`]).
    pub channel: &'static str,
    /// To whom.
    pub role: Role,
    /// `pending`, `delivered` or `abandoned`.
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was accepted.
    pub delivered_at: Option<Time>,
}

/// An acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Acked {
    /// The alert or incident.
    pub alert_id: String,
    /// By which role.
    pub role: Role,
    /// When.
    pub at: Time,
}

/// Counts for one channel and role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Accepted by the receiver.
    pub delivered: u64,
    /// Not yet.
    pub pending: u64,
    /// Given up.
    pub abandoned: u64,
    /// Not sent: a later channel or a quiet-held message whose role had acknowledged.
    pub not_needed: u64,
    /// Failed attempts, whatever became of the row.
    pub failed_attempts: u64,
}

/// Acknowledgements by one role.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AckTimes {
    /// Alerts this role acknowledged after a message reached it.
    pub acknowledged: u64,
    /// The median time from the first delivered message to the acknowledgement, s.
    pub median_s: Option<f64>,
}

/// The statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryStats {
    /// By (channel, role).
    pub by: BTreeMap<(&'static str, Role), Counts>,
    /// By role.
    pub acks: BTreeMap<Role, AckTimes>,
}

/// Compute the statistics.
pub fn compute(sent: &[Sent], acked: &[Acked]) -> DeliveryStats {
    let mut stats = DeliveryStats::default();
    let mut first_delivered: BTreeMap<(&str, Role), Time> = BTreeMap::new();
    for s in sent {
        let c = stats.by.entry((s.channel, s.role)).or_default();
        match s.status.as_str() {
            "delivered" => c.delivered += 1,
            "abandoned" => c.abandoned += 1,
            "not_needed" => c.not_needed += 1,
            _ => c.pending += 1,
        }
        c.failed_attempts += u64::from(s.attempts.saturating_sub(u32::from(s.status == "delivered")));
        if let Some(at) = s.delivered_at {
            let e = first_delivered.entry((s.alert_id.as_str(), s.role)).or_insert(at);
            *e = (*e).min(at);
        }
    }
    let mut first_ack: BTreeMap<(&str, Role), Time> = BTreeMap::new();
    for a in acked {
        let e = first_ack.entry((a.alert_id.as_str(), a.role)).or_insert(a.at);
        *e = (*e).min(a.at);
    }
    let mut waits: BTreeMap<Role, Vec<f64>> = BTreeMap::new();
    for (key, at) in &first_ack {
        if let Some(told) = first_delivered.get(key) {
            let s = (*at - *told).num_milliseconds().max(0) as f64 / 1000.0;
            waits.entry(key.1).or_default().push(s);
        }
    }
    for (role, mut w) in waits {
        w.sort_by(f64::total_cmp);
        let median = match w.len() {
            0 => None,
            n if n % 2 == 1 => Some(w[n / 2]),
            n => Some((w[n / 2 - 1] + w[n / 2]) / 2.0),
        };
        stats.acks.insert(role, AckTimes { acknowledged: w.len() as u64, median_s: median });
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn sent(alert: &str, channel: &'static str, role: Role, status: &str, attempts: u32, at: Option<i64>) -> Sent {
        Sent { alert_id: alert.into(), channel, role, status: status.into(), attempts, delivered_at: at.map(t) }
    }

    #[test]
    fn counts_by_channel_and_role_and_the_median_wait_from_the_first_delivery() {
        let s = compute(
            &[
                sent("a", "line", Role::Family, "delivered", 3, Some(10)),
                sent("a", "voice", Role::Family, "delivered", 1, Some(40)),
                sent("a", "webhook", Role::Coordinator, "delivered", 1, Some(600)),
                sent("b", "line", Role::Family, "pending", 2, None),
                sent("c", "line", Role::Family, "abandoned", 9, None),
                sent("c", "line", Role::Family, "delivered", 1, Some(1000)),
            ],
            &[
                Acked { alert_id: "a".into(), role: Role::Family, at: t(70) },
                Acked { alert_id: "a".into(), role: Role::Family, at: t(90) },
                Acked { alert_id: "a".into(), role: Role::Coordinator, at: t(660) },
                Acked { alert_id: "c".into(), role: Role::Family, at: t(1100) },
                // Acknowledged without a delivered message (the dashboard): not a wait.
                Acked { alert_id: "b".into(), role: Role::Family, at: t(5) },
            ],
        );
        assert_eq!(
            s.by[&("line", Role::Family)],
            Counts { delivered: 2, pending: 1, abandoned: 1, not_needed: 0, failed_attempts: 2 + 2 + 9 }
        );
        assert_eq!(s.by[&("voice", Role::Family)].delivered, 1);
        // Family: 60 s (a: from 10 to 70) and 100 s (c): median 80 s. Coordinator: 60 s from
        // its own message, not 650 s from the family's.
        assert_eq!(s.acks[&Role::Family], AckTimes { acknowledged: 2, median_s: Some(80.0) });
        assert_eq!(s.acks[&Role::Coordinator], AckTimes { acknowledged: 1, median_s: Some(60.0) });
        assert_eq!(channel_of("smtp"), "email");
        assert_eq!(channel_of("webhook:coord-431001"), "webhook");
    }
}
