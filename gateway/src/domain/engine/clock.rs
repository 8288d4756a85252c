//! Placing a home's messages in time when its clock may be wrong. Pure.
//!
//! A home's wall clock can be anything: a Raspberry Pi has no real-time clock and boots with a
//! stale time until NTP answers, which in a regional outage may be never, and an installer may
//! set it by hand an hour off. Ordering by it can discard a real outage as "older than what is
//! known", and a time a day in the past makes a fresh outage look a day old ("0 min left").
//! So every message is *placed* on the gateway's own timeline, and that time is what the
//! engine orders and forecasts by:
//!
//! - **Fresh telemetry** (sent as it was written) with the agent's clocks ([`ClockInfo`]) is
//!   placed at its arrival and updates the home's *reference*: its boot, its uptime (a clock
//!   that never steps) and the arrival, and the home's measured skew. Telemetry the agent
//!   *kept* during a network cut (marked `kept`, or whose uptime lags its arrival by more than
//!   [`LAG_TOLERANCE_S`]) is history: placed like an event, and it changes neither.
//!   From an agent that does not send its clocks, a snapshot's skew is believed only when its
//!   time advanced as much as its arrival since the previous one (a burst of kept snapshots
//!   does not), and the snapshot is placed like an event.
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

use crate::domain::forecast::Time;

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

/// A fresh snapshot's uptime may lag its arrival by this much (network, broker queues) and
/// still set the reference; more, and it is history (kept during a network cut).
pub const LAG_TOLERANCE_S: i64 = 5;

/// What the gateway knows of a home's clocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HomeClock {
    /// The latest fresh message with the agent's clocks.
    pub reference: Option<Reference>,
    /// The home's wall clock minus the gateway's, measured on fresh snapshots, s.
    pub skew_s: i64,
    /// The boot the skew was measured in (`None`: an agent that does not send its clocks).
    #[serde(default)]
    pub skew_boot: Option<String>,
    /// Whether the agent says its clock is synchronised.
    pub synced: Option<bool>,
    /// The previous snapshot from an agent that does not send its clocks: its own time and its
    /// arrival. Two in a row whose times advanced as much as their arrivals were sent as they
    /// were written, so their skew can be believed (a burst kept during a network cut cannot).
    #[serde(default)]
    pub last_plain: Option<(Time, Time)>,
    /// The last snapshot that looked late against the reference: its arrival and lag, ms. Two
    /// in a row with the same lag are not late: the reference is what is off (the gateway's
    /// clock stepped, or the agent's drifted over a long cut), and it is taken again.
    #[serde(default)]
    pub late: Option<(Time, i64)>,
}

/// The milliseconds from `a` to `b` on an agent's uptime (`b − a`), saturating.
fn uptime_delta_ms(a: u64, b: u64) -> i64 {
    let d = i128::from(b) - i128::from(a);
    i64::try_from(d.clamp(i128::from(i64::MIN / 2), i128::from(i64::MAX / 2))).unwrap_or(0)
}

/// `a − b` in ms, saturating (times from a home can be anything chrono holds).
fn diff_ms(a: Time, b: Time) -> i64 {
    a.signed_duration_since(b).num_milliseconds()
}

impl HomeClock {
    /// Whether the home's clock is further off than `limit`.
    pub fn skewed(&self, limit: Duration) -> bool {
        self.skew_s.saturating_abs() > limit.num_seconds()
    }

    fn measure(&mut self, ts: Time, arrival: Time, boot: Option<&str>) {
        self.skew_s = diff_ms(ts, arrival) / 1000;
        self.skew_boot = boot.map(str::to_string);
    }

    /// Place a telemetry snapshot written at `ts` (its own clock) that arrived at `arrival`;
    /// `kept`: the agent says it was kept during a network cut. A fresh one (sent as it was
    /// written) sets the reference and the measured skew; one that is history is placed like
    /// an event.
    pub fn place_telemetry(
        &mut self,
        ts: Time,
        info: Option<&ClockInfo>,
        kept: bool,
        arrival: Time,
        limit: Duration,
    ) -> Time {
        if kept {
            return self.place_event(ts, info, arrival, limit);
        }
        let tolerance_ms = LAG_TOLERANCE_S * 1000;
        match info {
            Some(i) => {
                if let Some(r) = self.reference.as_ref().filter(|r| r.boot == i.boot) {
                    // How much later it arrived than its uptime says it was written.
                    let lag = diff_ms(arrival, r.at).saturating_sub(uptime_delta_ms(r.uptime_ms, i.uptime_ms));
                    if lag > tolerance_ms {
                        let again = self.late.is_some_and(|(at, l)| {
                            diff_ms(arrival, at) >= 1000 && (lag.saturating_sub(l)).saturating_abs() <= 2000
                        });
                        if !again {
                            self.late = Some((arrival, lag));
                            return self.place_event(ts, info, arrival, limit); // late: history
                        }
                    }
                }
                self.late = None;
                self.synced = i.synced;
                self.measure(ts, arrival, Some(&i.boot));
                self.reference = Some(Reference { boot: i.boot.clone(), uptime_ms: i.uptime_ms, at: arrival });
                arrival
            }
            None => {
                let consistent = self.last_plain.is_some_and(|(pts, pat)| {
                    diff_ms(ts, pts).saturating_sub(diff_ms(arrival, pat)).saturating_abs() <= tolerance_ms
                });
                self.last_plain = Some((ts, arrival));
                if consistent {
                    self.measure(ts, arrival, None);
                }
                self.place_event(ts, None, arrival, limit)
            }
        }
    }

    /// Place an event written at `ts` (its own clock) that arrived at `arrival`.
    pub fn place_event(&self, ts: Time, info: Option<&ClockInfo>, arrival: Time, limit: Duration) -> Time {
        if let (Some(i), Some(r)) = (info, &self.reference) {
            if i.boot == r.boot {
                let placed = Duration::try_milliseconds(uptime_delta_ms(r.uptime_ms, i.uptime_ms))
                    .and_then(|d| r.at.checked_add_signed(d))
                    .unwrap_or(arrival);
                return placed.min(arrival);
            }
        }
        match info.and_then(|i| i.synced) {
            // The home says its clock was wrong when it wrote this: only the arrival is known.
            Some(false) => return arrival,
            // The home says its clock was right: its time stands (a replay from another boot).
            Some(true) => return ts.min(arrival),
            None => {}
        }
        // The measured skew applies to the boot it was measured in (or to an agent that sends
        // no clocks at all).
        let same_boot = self.skew_boot.as_deref() == info.map(|i| i.boot.as_str());
        let corrected = if same_boot && self.skewed(limit) {
            Duration::try_seconds(self.skew_s).and_then(|d| ts.checked_sub_signed(d)).unwrap_or(arrival)
        } else {
            ts
        };
        if corrected > arrival.checked_add_signed(limit).unwrap_or(arrival) {
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
        let placed = c.place_telemetry(t(3600), Some(&info(500, Some(true))), false, t(0), Duration::seconds(LIMIT));
        assert_eq!(placed, t(0));
        assert_eq!(c.skew_s, 3600);
        assert!(c.skewed(Duration::seconds(LIMIT)));
        assert_eq!(c.reference.as_ref().map(|r| (r.uptime_ms, r.at)), Some((500_000, t(0))));
    }

    #[test]
    fn events_from_the_same_boot_are_placed_by_uptime_whatever_their_wall_clock() {
        let mut c = HomeClock::default();
        c.place_telemetry(t(-86_400), Some(&info(1000, Some(false))), false, t(0), Duration::seconds(LIMIT));
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
        let l = Duration::seconds(LIMIT);
        // An older agent, an hour ahead: two snapshots sent as they were written.
        assert_eq!(c.place_telemetry(t(3590), None, false, t(-10), l), t(-10));
        assert_eq!(c.place_telemetry(t(3600), None, false, t(0), l), t(0));
        assert_eq!(c.skew_s, 3600);
        assert_eq!(c.place_event(t(3610), None, t(10), l), t(10));
        // Corrected: a replay from ten minutes ago by its clock is ten minutes ago.
        assert_eq!(c.place_event(t(3000), None, t(10), l), t(-600));
        // Right again.
        c.place_telemetry(t(15), None, false, t(15), l);
        assert_eq!(c.place_telemetry(t(20), None, false, t(20), l), t(20));
        assert_eq!(c.place_event(t(15), None, t(21), Duration::seconds(LIMIT)), t(15), "a small skew is kept");
        assert_eq!(c.place_event(t(900), None, t(22), Duration::seconds(LIMIT)), t(22), "the future is now");
        // An event from another boot whose clock was not synchronised: its arrival.
        let other = ClockInfo { boot: "b0".into(), uptime_ms: 5, synced: Some(false) };
        assert_eq!(c.place_event(t(-99_999), Some(&other), t(30), Duration::seconds(LIMIT)), t(30));
    }

    #[test]
    fn telemetry_kept_during_a_network_cut_is_history_and_moves_nothing() {
        let l = Duration::seconds(LIMIT);
        let mut c = HomeClock::default();
        c.place_telemetry(t(0), Some(&info(1000, Some(true))), false, t(0), l);
        // Cut at 10 s, back at 600 s: snapshots from 20 s and 30 s arrive at 600 s.
        assert_eq!(c.place_telemetry(t(20), Some(&info(1020, Some(true))), true, t(600), l), t(20));
        // Unmarked (an agent that does not mark them), its uptime gives it away.
        assert_eq!(c.place_telemetry(t(30), Some(&info(1030, Some(true))), false, t(600), l), t(30));
        assert_eq!((c.skew_s, c.reference.as_ref().map(|r| r.at)), (0, Some(t(0))), "neither moved");
        // The first fresh one after the cut.
        assert_eq!(c.place_telemetry(t(601), Some(&info(1601, Some(true))), false, t(601), l), t(601));
        assert_eq!(c.reference.as_ref().map(|r| r.at), Some(t(601)));
        // Without clocks: a burst of kept snapshots is not believed as a skew.
        let mut c = HomeClock::default();
        c.place_telemetry(t(0), None, false, t(0), l);
        for (ts, at) in [(300, 900), (310, 900), (320, 900)] {
            assert_eq!(c.place_telemetry(t(ts), None, false, t(at), l), t(ts));
        }
        assert_eq!(c.skew_s, 0);
    }

    #[test]
    fn a_reference_that_is_off_is_taken_again_and_a_skew_stays_with_its_boot() {
        let l = Duration::seconds(LIMIT);
        let mut c = HomeClock::default();
        c.place_telemetry(t(0), Some(&info(1000, Some(true))), false, t(0), l);
        // The gateway's clock steps an hour forward: every snapshot now looks an hour late.
        assert_eq!(c.place_telemetry(t(10), Some(&info(1010, Some(true))), false, t(3610), l), t(10));
        // The second one with the same lag: the reference is what is off; taken again.
        assert_eq!(c.place_telemetry(t(20), Some(&info(1020, Some(true))), false, t(3620), l), t(3620));
        assert_eq!(c.reference.as_ref().map(|r| r.at), Some(t(3620)));
        // A skew measured in boot b1 does not move an event from another boot.
        c.place_telemetry(t(10_000), Some(&info(1030, Some(true))), false, t(3630), l);
        assert!(c.skewed(l));
        let old = ClockInfo { boot: "b0".into(), uptime_ms: 5, synced: None };
        assert_eq!(c.place_event(t(3000), Some(&old), t(3640), l), t(3000));
        let old_synced = ClockInfo { boot: "b0".into(), uptime_ms: 5, synced: Some(true) };
        assert_eq!(c.place_event(t(2000), Some(&old_synced), t(3640), l), t(2000));
    }

    #[test]
    fn absurd_uptimes_do_not_panic() {
        let mut c = HomeClock::default();
        let huge = ClockInfo { boot: "b1".into(), uptime_ms: u64::MAX, synced: None };
        c.place_telemetry(t(0), Some(&huge), false, t(0), Duration::seconds(LIMIT));
        let _ = c.place_telemetry(t(0), Some(&huge), false, t(5), Duration::seconds(LIMIT));
        c.last_plain = Some((Time::MIN_UTC, Time::MAX_UTC));
        let _ = c.place_telemetry(Time::MAX_UTC, None, false, t(5), Duration::seconds(LIMIT));
        let zero = ClockInfo { boot: "b1".into(), uptime_ms: 0, synced: None };
        let _ = c.place_event(t(0), Some(&zero), t(1), Duration::seconds(LIMIT));
        // A reference at u64::MAX, then a snapshot at 0 (the review's case), both ways.
        let _ = c.place_telemetry(t(0), Some(&zero), false, t(2), Duration::seconds(LIMIT));
        let _ = c.place_telemetry(t(0), Some(&huge), false, t(3), Duration::seconds(LIMIT));
        let _ = c.place_telemetry(Time::MIN_UTC, Some(&zero), false, Time::MAX_UTC, Duration::seconds(LIMIT));
        let _ = c.place_telemetry(Time::MAX_UTC, Some(&huge), false, Time::MIN_UTC, Duration::seconds(LIMIT));
        let _ = c.place_event(Time::MIN_UTC, None, t(1), Duration::seconds(LIMIT));
        c.skew_s = i64::MAX;
        let _ = c.place_event(Time::MAX_UTC, None, t(1), Duration::seconds(LIMIT));
    }
}
