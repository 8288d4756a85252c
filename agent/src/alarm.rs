//! The family's local alarm: what the buzzer and LEDs show. It works with no network at all:
//! it is driven by the monitor's state and the uplink's connection state, nothing else.
//!
//! Pure: [`LocalAlarm::outputs`] takes the situation and `now_ms` and returns the levels of
//! the buzzer and the LEDs for that instant; a thin GPIO driver applies them.
//!
//! ## Patterns (highest priority first; one shows at a time)
//! | situation | red LED | buzzer |
//! |---|---|---|
//! | backup battery low | fast blink (4 Hz) | 3 short beeps every 5 s |
//! | mains lost | slow blink (1 Hz) | 1 beep every 15 s |
//! | nobody outside can see us (broker unreachable past the limit) | two flashes every 2 s | 2 beeps every 60 s |
//! | a device lost, or the spool is holding events in memory | one flash every 3 s | 1 beep every 60 s |
//! | all well | off | off |
//!
//! The green LED is on while the uplink is connected, and blinks for 30 minutes after an
//! acknowledgement arrives: "someone outside knows". The silence button silences the
//! **buzzer only**, for `silence_min`; the LEDs keep showing, and nothing about the remote
//! escalation changes (this alarm is the family's, the gateway's is the coordinator's). A new,
//! higher-priority situation sounds again even while silenced.
//!
//! This alarm is secondary to every medical device's own alarm; it never replaces them.

/// What the alarm reflects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Situation {
    /// Mains lost.
    pub mains_lost: bool,
    /// Backup battery low.
    pub battery_low: bool,
    /// A device is lost.
    pub device_lost: bool,
    /// The spool is holding events in memory (disk full or failing).
    pub spool_degraded: bool,
    /// Connected to the broker.
    pub connected: bool,
    /// Monotonic ms since the broker was last reachable (`None` while connected).
    pub unreachable_since_ms: Option<u64>,
    /// Monotonic ms of the last acknowledgement from outside.
    pub last_ack_ms: Option<u64>,
}

/// Which pattern shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pattern {
    /// All well.
    Off,
    /// A device lost or the spool degraded.
    Attention,
    /// Nobody outside can see us.
    Unreachable,
    /// Mains lost.
    MainsLost,
    /// Backup battery low.
    BatteryLow,
}

/// Output levels for one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Buzzer on.
    pub buzzer: bool,
    /// Red LED on.
    pub red: bool,
    /// Green LED on.
    pub green: bool,
}

/// The alarm's state: the silence button and the limits.
#[derive(Debug, Clone)]
pub struct LocalAlarm {
    unreachable_after_ms: u64,
    silence_ms: u64,
    silenced: Option<(u64, Pattern)>,
}

const ACK_SHOW_MS: u64 = 30 * 60 * 1000;

/// `on` for `[start, start+len)` within each `period`, repeated `count` times `gap` apart.
fn pulses(t: u64, period: u64, count: u64, len: u64, gap: u64) -> bool {
    let p = t % period;
    (0..count).any(|i| p >= i * gap && p < i * gap + len)
}

impl LocalAlarm {
    /// An alarm that calls the broker unreachable after `unreachable_after_ms` and silences
    /// for `silence_ms`.
    pub fn new(unreachable_after_ms: u64, silence_ms: u64) -> Self {
        LocalAlarm { unreachable_after_ms, silence_ms, silenced: None }
    }

    /// The pattern for `s` at `now_ms`.
    pub fn pattern(&self, s: &Situation, now_ms: u64) -> Pattern {
        let unreachable = !s.connected
            && s.unreachable_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= self.unreachable_after_ms);
        if s.battery_low {
            Pattern::BatteryLow
        } else if s.mains_lost {
            Pattern::MainsLost
        } else if unreachable {
            Pattern::Unreachable
        } else if s.device_lost || s.spool_degraded {
            Pattern::Attention
        } else {
            Pattern::Off
        }
    }

    /// The silence button was pressed at `now_ms`: silence the buzzer for the current pattern.
    pub fn silence(&mut self, s: &Situation, now_ms: u64) {
        self.silenced = Some((now_ms + self.silence_ms, self.pattern(s, now_ms)));
    }

    /// Output levels at `now_ms`.
    pub fn outputs(&mut self, s: &Situation, now_ms: u64) -> Outputs {
        let pattern = self.pattern(s, now_ms);
        if let Some((until, silenced_pattern)) = self.silenced {
            // Expired, or something worse began: the silence ends.
            if now_ms >= until || pattern > silenced_pattern {
                self.silenced = None;
            }
        }
        let (red, buzzer) = match pattern {
            Pattern::Off => (false, false),
            Pattern::Attention => (pulses(now_ms, 3000, 1, 150, 0), pulses(now_ms, 60_000, 1, 200, 0)),
            Pattern::Unreachable => (pulses(now_ms, 2000, 2, 150, 300), pulses(now_ms, 60_000, 2, 200, 400)),
            Pattern::MainsLost => (pulses(now_ms, 1000, 1, 500, 0), pulses(now_ms, 15_000, 1, 300, 0)),
            Pattern::BatteryLow => (pulses(now_ms, 250, 1, 125, 0), pulses(now_ms, 5000, 3, 150, 300)),
        };
        let recently_acked =
            s.last_ack_ms.is_some_and(|t| now_ms.saturating_sub(t) < ACK_SHOW_MS) && pattern != Pattern::Off;
        let green = if recently_acked { pulses(now_ms, 1000, 1, 500, 0) } else { s.connected };
        Outputs { buzzer: buzzer && self.silenced.is_none(), red, green }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(alarm: &mut LocalAlarm, s: &Situation, from: u64, to: u64, f: impl Fn(Outputs) -> bool) -> u64 {
        (from..to).step_by(10).filter(|&t| f(alarm.outputs(s, t))).count() as u64
    }

    #[test]
    fn priorities() {
        let a = LocalAlarm::new(120_000, 1_800_000);
        let mut s = Situation { connected: true, ..Default::default() };
        assert_eq!(a.pattern(&s, 0), Pattern::Off);
        s.device_lost = true;
        assert_eq!(a.pattern(&s, 0), Pattern::Attention);
        s.connected = false;
        s.unreachable_since_ms = Some(0);
        assert_eq!(a.pattern(&s, 119_999), Pattern::Attention, "not before the limit");
        assert_eq!(a.pattern(&s, 120_000), Pattern::Unreachable);
        s.mains_lost = true;
        assert_eq!(a.pattern(&s, 120_000), Pattern::MainsLost);
        s.battery_low = true;
        assert_eq!(a.pattern(&s, 120_000), Pattern::BatteryLow);
    }

    #[test]
    fn patterns_are_distinct() {
        let mut a = LocalAlarm::new(0, 1_800_000);
        let mut seen = std::collections::BTreeSet::new();
        for s in [
            Situation { battery_low: true, ..Default::default() },
            Situation { mains_lost: true, ..Default::default() },
            Situation { unreachable_since_ms: Some(0), ..Default::default() },
            Situation { device_lost: true, connected: true, ..Default::default() },
        ] {
            let red: Vec<bool> = (0..60_000).step_by(50).map(|t| a.outputs(&s, t).red).collect();
            let buzz: Vec<bool> = (0..60_000).step_by(50).map(|t| a.outputs(&s, t).buzzer).collect();
            assert!(red.iter().any(|&x| x) && buzz.iter().any(|&x| x));
            assert!(seen.insert((red, buzz)), "two situations look the same");
        }
    }

    #[test]
    fn silence_stops_the_buzzer_not_the_leds_and_ends() {
        let mut a = LocalAlarm::new(120_000, 60_000);
        let s = Situation { mains_lost: true, ..Default::default() };
        assert!(count(&mut a, &s, 0, 15_000, |o| o.buzzer) > 0);
        a.silence(&s, 15_000);
        assert_eq!(count(&mut a, &s, 15_000, 75_000, |o| o.buzzer), 0);
        assert!(count(&mut a, &s, 15_000, 75_000, |o| o.red) > 0, "the LED keeps showing");
        assert!(count(&mut a, &s, 75_000, 91_000, |o| o.buzzer) > 0, "silence ends");
    }

    #[test]
    fn something_worse_sounds_through_the_silence() {
        let mut a = LocalAlarm::new(120_000, 600_000);
        let mut s = Situation { mains_lost: true, ..Default::default() };
        a.silence(&s, 0);
        assert_eq!(count(&mut a, &s, 0, 30_000, |o| o.buzzer), 0);
        s.battery_low = true;
        assert!(count(&mut a, &s, 30_000, 40_000, |o| o.buzzer) > 0);
    }

    #[test]
    fn green_shows_connection_and_acknowledgement() {
        let mut a = LocalAlarm::new(120_000, 60_000);
        let s = Situation { connected: true, ..Default::default() };
        assert!(a.outputs(&s, 0).green);
        let s = Situation { mains_lost: true, connected: true, last_ack_ms: Some(0), ..Default::default() };
        let blinks = count(&mut a, &s, 0, 10_000, |o| o.green);
        assert!(blinks > 0 && blinks < 1000, "blinks after an acknowledgement");
        assert!(!a.outputs(&Situation::default(), 0).green, "off when disconnected and nothing acknowledged");
    }
}
