//! Dry contacts: a debouncer with time passed in, and the ventilator's remote-alarm contact
//! read as a normally-open + normally-closed pair.
//!
//! ## Why a pair
//! A home ventilator's remote-alarm (nurse-call) output is a changeover contact. Wired to two
//! inputs, the four combinations mean different things:
//!
//! | NO | NC | state |
//! |---|---|---|
//! | open | closed | [`ContactState::Normal`] |
//! | closed | open | [`ContactState::Alarm`] |
//! | open | open | [`ContactState::CableFault`]: the cable is cut or unplugged |
//! | closed | closed | [`ContactState::CableFault`]: miswired or shorted |
//!
//! A single contact cannot tell "no alarm" from "cable cut"; the pair can.
//!
//! ## Timing rules (all in ms, time passed in)
//! - Each input is debounced ([`Debouncer`]): a level counts once it has held for
//!   `debounce_ms`. Bounce shorter than that never changes the state.
//! - An alarm is **latched**: when the debounced pair enters alarm, [`ContactPair::take_latched_alarm`]
//!   reports it once even if the contact went back to normal before anyone looked (carers
//!   often press silence within seconds, and many ventilators drop the contact then).
//! - A changeover contact passes through "both open" for a moment while it switches, so a
//!   fault must persist for `cable_fault_ms` before it is declared.

pub use mamori_protocol::bridge::ContactState;

/// Debounces one digital input.
#[derive(Debug, Clone)]
pub struct Debouncer {
    settle_ms: u32,
    stable: Option<bool>,
    /// The level being timed and when it was first seen.
    candidate: Option<(bool, u64)>,
}

impl Debouncer {
    /// A debouncer that accepts a level after it has held for `settle_ms`.
    pub const fn new(settle_ms: u32) -> Self {
        Debouncer { settle_ms, stable: None, candidate: None }
    }

    /// The debounced level (`None` until the first level has held long enough).
    pub fn stable(&self) -> Option<bool> {
        self.stable
    }

    /// Feed a raw reading taken at `now_ms`; returns the new debounced level when it changes.
    pub fn update(&mut self, raw: bool, now_ms: u64) -> Option<bool> {
        let since = match self.candidate {
            Some((level, since)) if level == raw => since,
            _ => {
                self.candidate = Some((raw, now_ms));
                now_ms
            }
        };
        if self.stable != Some(raw) && now_ms.saturating_sub(since) >= u64::from(self.settle_ms) {
            self.stable = Some(raw);
            return Some(raw);
        }
        None
    }
}

/// Timing for a [`ContactPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairConfig {
    /// How long each input must hold a level, ms.
    pub debounce_ms: u32,
    /// How long an impossible combination must persist to be a cable fault, ms.
    pub cable_fault_ms: u32,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig { debounce_ms: 30, cable_fault_ms: 500 }
    }
}

/// The normally-open + normally-closed pair state machine.
#[derive(Debug, Clone)]
pub struct ContactPair {
    config: PairConfig,
    no: Debouncer,
    nc: Debouncer,
    state: Option<ContactState>,
    fault_since: Option<u64>,
    latched_alarm: bool,
}

impl ContactPair {
    /// A pair with `config`; its state is unknown until both inputs have settled.
    pub fn new(config: PairConfig) -> Self {
        ContactPair {
            config,
            no: Debouncer::new(config.debounce_ms),
            nc: Debouncer::new(config.debounce_ms),
            state: None,
            fault_since: None,
            latched_alarm: false,
        }
    }

    /// The current state, once known.
    pub fn state(&self) -> Option<ContactState> {
        self.state
    }

    /// Whether an alarm began since the last call (clears the latch).
    pub fn take_latched_alarm(&mut self) -> bool {
        core::mem::take(&mut self.latched_alarm)
    }

    /// Whether an alarm began since the latch was last taken (does not clear it).
    pub fn latched_alarm(&self) -> bool {
        self.latched_alarm
    }

    /// Feed the raw contact readings (`true` = closed) taken at `now_ms`; returns the new
    /// state when it changes.
    pub fn update(&mut self, no_closed: bool, nc_closed: bool, now_ms: u64) -> Option<ContactState> {
        self.no.update(no_closed, now_ms);
        self.nc.update(nc_closed, now_ms);
        let (Some(no), Some(nc)) = (self.no.stable(), self.nc.stable()) else { return None };
        let next = match (no, nc) {
            (false, true) => Some(ContactState::Normal),
            (true, false) => Some(ContactState::Alarm),
            _ => {
                let since = *self.fault_since.get_or_insert(now_ms);
                (now_ms.saturating_sub(since) >= u64::from(self.config.cable_fault_ms))
                    .then_some(ContactState::CableFault)
            }
        };
        if matches!(next, Some(ContactState::Normal | ContactState::Alarm)) {
            self.fault_since = None;
        }
        match next {
            Some(s) if self.state != Some(s) => {
                // Latch the edge into alarm, not the level: an alarm that persists is one alarm.
                self.latched_alarm |= s == ContactState::Alarm;
                self.state = Some(s);
                Some(s)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// Drive a pair with (no, nc) levels, each held for a number of ms, sampled every ms.
    fn drive(pair: &mut ContactPair, steps: &[(bool, bool, u64)], mut t: u64) -> (Vec<ContactState>, u64) {
        let mut seen = Vec::new();
        for &(no, nc, dur) in steps {
            for _ in 0..dur {
                seen.extend(pair.update(no, nc, t));
                t += 1;
            }
        }
        (seen, t)
    }

    #[test]
    fn debouncer_ignores_bounce_and_accepts_a_held_level() {
        let mut d = Debouncer::new(10);
        assert_eq!(d.update(true, 0), None);
        assert_eq!(d.update(true, 10), Some(true));
        for t in 11..30 {
            assert_eq!(d.update(t % 3 == 0, t), None, "bounce at {t}");
        }
        assert_eq!(d.stable(), Some(true));
        assert_eq!(d.update(false, 30), None);
        assert_eq!(d.update(false, 40), Some(false));
        assert_eq!(d.update(false, 50), None, "reported once");
    }

    #[test]
    fn all_four_combinations() {
        for (no, nc, want) in [
            (false, true, ContactState::Normal),
            (true, false, ContactState::Alarm),
            (false, false, ContactState::CableFault),
            (true, true, ContactState::CableFault),
        ] {
            let mut p = ContactPair::new(PairConfig::default());
            let (seen, _) = drive(&mut p, &[(no, nc, 600)], 0);
            assert_eq!(seen, [want], "{no} {nc}");
            assert_eq!(p.state(), Some(want));
        }
    }

    #[test]
    fn a_short_alarm_is_latched_after_it_ends() {
        let mut p = ContactPair::new(PairConfig::default());
        drive(&mut p, &[(false, true, 100)], 0);
        assert!(!p.take_latched_alarm());
        let (seen, _) = drive(&mut p, &[(true, false, 40), (false, true, 100)], 100);
        assert_eq!(seen, [ContactState::Alarm, ContactState::Normal]);
        assert!(p.take_latched_alarm(), "the alarm is reported even though it has ended");
        assert!(!p.take_latched_alarm(), "and only once");
    }

    #[test]
    fn a_changeover_passing_through_both_open_is_not_a_cable_fault() {
        let mut p = ContactPair::new(PairConfig::default());
        let (seen, _) = drive(&mut p, &[(false, true, 100), (false, false, 50), (true, false, 100)], 0);
        assert_eq!(seen, [ContactState::Normal, ContactState::Alarm]);
    }

    #[test]
    fn a_cut_cable_is_a_fault_and_recovers() {
        let mut p = ContactPair::new(PairConfig::default());
        let (seen, _) = drive(&mut p, &[(false, true, 100), (false, false, 600), (false, true, 100)], 0);
        assert_eq!(seen, [ContactState::Normal, ContactState::CableFault, ContactState::Normal]);
        assert!(!p.take_latched_alarm());
    }

    fn truth(no: bool, nc: bool) -> ContactState {
        match (no, nc) {
            (false, true) => ContactState::Normal,
            (true, false) => ContactState::Alarm,
            _ => ContactState::CableFault,
        }
    }

    proptest! {
        /// Whatever bounces came before, once both inputs hold long enough the state is the
        /// truth table's; and an alarm that held for the debounce time is always latched.
        #[test]
        fn settles_to_the_truth_table(bounces in proptest::collection::vec((any::<bool>(), any::<bool>(), 1u64..40), 0..40), no in any::<bool>(), nc in any::<bool>()) {
            let cfg = PairConfig::default();
            let mut p = ContactPair::new(cfg);
            let (_, t) = drive(&mut p, &bounces, 0);
            let alarm_held = bounces.iter().any(|&(a, b, d)| a && !b && d > u64::from(cfg.debounce_ms));
            drive(&mut p, &[(no, nc, u64::from(cfg.debounce_ms + cfg.cable_fault_ms) + 2)], t);
            prop_assert_eq!(p.state(), Some(truth(no, nc)));
            if alarm_held || (no && !nc) {
                prop_assert!(p.take_latched_alarm());
            }
        }

        /// Bounce shorter than the debounce time around a steady level never changes the state.
        #[test]
        fn short_bounce_never_changes_a_settled_state(no in any::<bool>(), nc in any::<bool>(), glitches in proptest::collection::vec((any::<bool>(), any::<bool>(), 1u64..29), 1..30)) {
            let cfg = PairConfig::default();
            let mut p = ContactPair::new(cfg);
            let (_, mut t) = drive(&mut p, &[(no, nc, 600)], 0);
            let settled = p.state();
            p.take_latched_alarm();
            for (a, b, d) in glitches {
                let (seen, t2) = drive(&mut p, &[(a, b, d), (no, nc, 30)], t);
                t = t2;
                prop_assert!(seen.is_empty(), "{:?}", seen);
            }
            prop_assert_eq!(p.state(), settled);
            prop_assert!(!p.take_latched_alarm(), "no alarm began");
        }
    }
}
