//! Placing a home's messages in time when its clock may be wrong. Pure.
//!
//! A home's wall clock can be anything: a Raspberry Pi has no real-time clock and boots with a
//! stale time until NTP answers, which in a regional outage may be never, and an installer may
//! set it by hand an hour off. Ordering by it can discard a real outage as "older than what is
//! known", and a time a day in the past makes a fresh outage look a day old ("0 min left").
//! So every message is *placed* on the gateway's own timeline, and that time is what the
//! engine orders and forecasts by:
//!
//! - **Fresh messages** (telemetry, sent when written and never spooled) are placed at their
//!   arrival when the agent reports its clocks ([`ClockInfo`]), and at their own time when it
//!   does not and that time is within `clock_skew_s` of the arrival (else at the arrival).
//!   Each one also updates the home's *reference*: its boot, its uptime (a clock that never
//!   steps) and the arrival, and the home's measured skew.
//! - **Events** (spooled, so possibly replays) are placed by their uptime against the
//!   reference when they come from the same boot: `reference arrival + (event uptime −
//!   reference uptime)`. That is right for a replay (old uptime, old placed time) and for a
//!   wrong wall clock alike. From another boot (or an older agent) their own time is used,
//!   corrected by the home's measured skew when that is beyond `clock_skew_s`, and an event
//!   whose clock says it was not synchronised is placed at its arrival. Nothing is ever placed
//!   after its arrival.

use chrono::Duration;
use mamori_protocol::mqtt::ClockInfo;
use serde::{Deserialize, Serialize};

use crate::forecast::Time;

/// A fresh message from the agent: its boot, its uptime then, and when it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Reference {
    /// The agent's boot.
    pub boot: String,
    /// Its uptime in that message, ms.
    pub uptime_ms: u64,
    /// When the message arrived.
    pub at: Time,
}

/// What the gateway knows of a home's clocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HomeClock {
    /// The latest fresh message with the agent's clocks.
    pub reference: Option<Reference>,
    /// The home's wall clock minus the gateway's at the latest fresh message, s.
    pub skew_s: i64,
    /// Whether the agent says its clock is synchronised.
    pub synced: Option<bool>,
}

impl HomeClock {
    /// Whether the home's clock is further off than `limit`.
    pub fn skewed(&self, limit: Duration) -> bool {
        self.skew_s.abs() > limit.num_seconds()
    }

    /// Place a fresh message written at `ts` (its own clock) that arrived at `arrival`.
    pub fn place_fresh(&mut self, ts: Time, info: Option<&ClockInfo>, arrival: Time, limit: Duration) -> Time {
        self.skew_s = (ts - arrival).num_seconds();
        if let Some(i) = info {
            self.synced = i.synced;
            self.reference = Some(Reference { boot: i.boot.clone(), uptime_ms: i.uptime_ms, at: arrival });
            return arrival;
        }
        if (ts - arrival).abs() <= limit {
            ts.min(arrival)
        } else {
            arrival
        }
    }

    /// Place an event written at `ts` (its own clock) that arrived at `arrival`.
    pub fn place_event(&self, ts: Time, info: Option<&ClockInfo>, arrival: Time, limit: Duration) -> Time {
        if let (Some(i), Some(r)) = (info, &self.reference) {
            if i.boot == r.boot {
                let delta_ms =
                    i64::try_from(i.uptime_ms).unwrap_or(i64::MAX) - i64::try_from(r.uptime_ms).unwrap_or(i64::MAX);
                let placed =
                    Duration::try_milliseconds(delta_ms).and_then(|d| r.at.checked_add_signed(d)).unwrap_or(arrival);
                return placed.min(arrival);
            }
        }
        if info.is_some_and(|i| i.synced == Some(false)) {
            return arrival;
        }
        let corrected = if self.skewed(limit) {
            Duration::try_seconds(self.skew_s).and_then(|d| ts.checked_sub_signed(d)).unwrap_or(arrival)
        } else {
            ts
        };
        if corrected > arrival + limit {
            arrival
        } else {
            corrected.min(arrival)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn info(uptime_s: u64, synced: Option<bool>) -> ClockInfo {
        ClockInfo { boot: "b1".into(), uptime_ms: uptime_s * 1000, synced }
    }

    const LIMIT: i64 = 120;

    #[test]
    fn fresh_messages_with_clocks_are_placed_at_arrival_and_set_the_reference() {
        let mut c = HomeClock::default();
        // The home is an hour ahead.
        let placed = c.place_fresh(t(3600), Some(&info(500, Some(true))), t(0), Duration::seconds(LIMIT));
        assert_eq!(placed, t(0));
        assert_eq!(c.skew_s, 3600);
        assert!(c.skewed(Duration::seconds(LIMIT)));
        assert_eq!(c.reference.as_ref().map(|r| (r.uptime_ms, r.at)), Some((500_000, t(0))));
    }

    #[test]
    fn events_from_the_same_boot_are_placed_by_uptime_whatever_their_wall_clock() {
        let mut c = HomeClock::default();
        c.place_fresh(t(-86_400), Some(&info(1000, Some(false))), t(0), Duration::seconds(LIMIT));
        // A day behind, written 5 s after the reference, arriving at once: now, not a day ago.
        assert_eq!(c.place_event(t(-86_395), Some(&info(1005, Some(false))), t(5), Duration::seconds(LIMIT)), t(5));
        // A replay from the spool, written 10 min before the reference: 10 min ago.
        assert_eq!(c.place_event(t(-87_000), Some(&info(400, Some(false))), t(60), Duration::seconds(LIMIT)), t(-600));
        // Never after its arrival.
        assert_eq!(c.place_event(t(0), Some(&info(9000, None)), t(10), Duration::seconds(LIMIT)), t(10));
    }

    #[test]
    fn without_a_usable_reference_the_measured_skew_corrects_and_the_future_is_refused() {
        let mut c = HomeClock::default();
        // An older agent, an hour ahead.
        assert_eq!(c.place_fresh(t(3600), None, t(0), Duration::seconds(LIMIT)), t(0));
        assert_eq!(c.place_event(t(3610), None, t(10), Duration::seconds(LIMIT)), t(10));
        // Corrected: a replay from ten minutes ago by its clock is ten minutes ago.
        assert_eq!(c.place_event(t(3000), None, t(10), Duration::seconds(LIMIT)), t(-600));
        // Right again.
        assert_eq!(c.place_fresh(t(20), None, t(20), Duration::seconds(LIMIT)), t(20));
        assert_eq!(c.place_event(t(15), None, t(21), Duration::seconds(LIMIT)), t(15), "a small skew is kept");
        assert_eq!(c.place_event(t(900), None, t(22), Duration::seconds(LIMIT)), t(22), "the future is now");
        // An event from another boot whose clock was not synchronised: its arrival.
        let other = ClockInfo { boot: "b0".into(), uptime_ms: 5, synced: Some(false) };
        assert_eq!(c.place_event(t(-99_999), Some(&other), t(30), Duration::seconds(LIMIT)), t(30));
    }

    #[test]
    fn absurd_uptimes_do_not_panic() {
        let mut c = HomeClock::default();
        let huge = ClockInfo { boot: "b1".into(), uptime_ms: u64::MAX, synced: None };
        c.place_fresh(t(0), Some(&huge), t(0), Duration::seconds(LIMIT));
        let zero = ClockInfo { boot: "b1".into(), uptime_ms: 0, synced: None };
        let _ = c.place_event(t(0), Some(&zero), t(1), Duration::seconds(LIMIT));
        let _ = c.place_event(Time::MIN_UTC, None, t(1), Duration::seconds(LIMIT));
        c.skew_s = i64::MAX;
        let _ = c.place_event(Time::MAX_UTC, None, t(1), Duration::seconds(LIMIT));
    }
}
