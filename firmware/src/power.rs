//! Power inputs with no data port: mains presence from a contact, and a low-battery comparator
//! on a measured voltage.
//!
//! Portable power stations usually have no data port. Mains presence then comes from a
//! mains-powered relay or optocoupler on an input, and the battery's state from its voltage
//! (an INA219 on the DC side). Both are noisy in the way that matters: a relay chatters as it
//! drops out, and a battery's voltage sags under load and recovers at rest, so each has a rule
//! against flapping.

use crate::contact::Debouncer;

/// Mains presence from a contact: debounced, so a relay chattering as it drops out reports
/// one change.
#[derive(Debug, Clone)]
pub struct MainsSense {
    debouncer: Debouncer,
}

impl MainsSense {
    /// Accept a level after it has held for `debounce_ms` (50 ms catches a real outage at
    /// once and ignores a relay's chatter).
    pub const fn new(debounce_ms: u32) -> Self {
        MainsSense { debouncer: Debouncer::new(debounce_ms) }
    }

    /// Whether mains is present, once known.
    pub fn present(&self) -> Option<bool> {
        self.debouncer.stable()
    }

    /// Feed the raw "mains present" level; returns the new state when it changes.
    pub fn update(&mut self, present: bool, now_ms: u64) -> Option<bool> {
        self.debouncer.update(present, now_ms)
    }
}

/// A low-battery comparator with hysteresis: low below `low_mv`, not low again until the
/// voltage reaches `recover_mv` (> `low_mv`). A battery sagging around the threshold under a
/// pulsing load does not flap.
#[derive(Debug, Clone)]
pub struct LowBattery {
    low_mv: u16,
    recover_mv: u16,
    low: Option<bool>,
}

impl LowBattery {
    /// A comparator; `recover_mv` is raised to `low_mv` if given lower.
    pub const fn new(low_mv: u16, recover_mv: u16) -> Self {
        let recover_mv = if recover_mv < low_mv { low_mv } else { recover_mv };
        LowBattery { low_mv, recover_mv, low: None }
    }

    /// The state after the last sample.
    pub fn is_low(&self) -> Option<bool> {
        self.low
    }

    /// Feed a voltage; returns whether the battery is low.
    pub fn update(&mut self, millivolts: u16) -> bool {
        let low = match self.low {
            Some(true) => millivolts < self.recover_mv,
            _ => millivolts < self.low_mv,
        };
        self.low = Some(low);
        low
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hysteresis() {
        let mut lb = LowBattery::new(11_800, 12_200);
        assert!(!lb.update(12_500));
        assert!(lb.update(11_790));
        assert!(lb.update(12_000), "still low between the thresholds");
        assert!(!lb.update(12_200));
        assert!(!lb.update(11_900), "not low again until under the low threshold");
    }

    #[test]
    fn mains_relay_chatter_is_one_change() {
        let mut m = MainsSense::new(50);
        assert_eq!(m.update(true, 0), None);
        assert_eq!(m.update(true, 50), Some(true));
        let mut changes = 0;
        for t in 51..200u64 {
            // Chatter for 40 ms, then steadily absent.
            let raw = if t < 91 { t % 2 == 0 } else { false };
            changes += usize::from(m.update(raw, t).is_some());
        }
        assert_eq!(changes, 1);
        assert_eq!(m.present(), Some(false));
    }

    proptest! {
        /// Noise smaller than the hysteresis band around any level makes at most one change.
        #[test]
        fn no_flapping_inside_the_band(base in 11_000u16..13_000, noise in proptest::collection::vec(0u16..399, 1..200)) {
            let mut lb = LowBattery::new(11_800, 12_200);
            let mut last = None;
            let mut changes = 0;
            for n in noise {
                let v = base.saturating_add(n).saturating_sub(200);
                let now = lb.update(v);
                if last.is_some_and(|l| l != now) {
                    changes += 1;
                }
                last = Some(now);
            }
            prop_assert!(changes <= 1, "{} changes", changes);
        }
    }
}
