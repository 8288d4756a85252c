//! The bridge loop: sample the inputs, build [`Frame`]s, write them, feed the watchdog.
//!
//! ## Shape
//! - [`BridgeCore`] is the pure part: it takes what was read ([`Inputs`]) and `now_ms`, keeps
//!   the debouncers, comparator and latch, and decides when a frame is due. It never touches
//!   hardware, so every timing rule is tested with explicit time.
//! - [`Bridge`] is the thin runner: it reads the [`Sensors`], calls the core, encodes the frame
//!   into a stack buffer and writes it through `embedded_io::Write`, then feeds the
//!   [`Watchdog`]. Nothing in the loop allocates.
//!
//! ## When a frame is sent
//! - a `Boot` frame first (with [`flags::WATCHDOG_RESET`] if the last reset was the watchdog);
//! - a `Sample` frame at once when anything discrete changes: mains presence, the ventilator
//!   contact state, a latched alarm, the low-battery flag, a sensor error;
//! - a `Heartbeat` frame when `heartbeat_interval_ms` passed without a frame, so the receiver
//!   can tell a quiet bridge from a dead one.
//!
//! The power monitor is read every `power_interval_ms` (its ADC averages anyway); contacts and
//! mains every `sample_interval_ms`.
//!
//! ## Watchdog
//! The watchdog is fed after each step that completed, including steps where a sensor failed
//! (a failed sensor is a flag, and the bridge must keep reporting it). It is *not* fed when
//! the frame could not be written: if the serial link is wedged, a reset is the right answer.

use embedded_hal::digital::InputPin;
use embedded_hal::i2c::I2c;
use mamori_protocol::bridge::{self, flags, ContactState, Frame, FrameKind, PowerSample};

use crate::contact::{ContactPair, PairConfig};
use crate::ina219::{self, Ina219};
use crate::power::{LowBattery, MainsSense};

/// Loop timing and thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeConfig {
    /// How often contacts and mains are read, ms.
    pub sample_interval_ms: u32,
    /// How often the power monitor is read, ms.
    pub power_interval_ms: u32,
    /// Longest silence between frames, ms.
    pub heartbeat_interval_ms: u32,
    /// Ventilator contact timing.
    pub contacts: PairConfig,
    /// Mains contact debounce, ms.
    pub mains_debounce_ms: u32,
    /// Battery voltage under which [`flags::LOW_BATTERY`] is set, mV (`None`: no comparator).
    pub low_battery_mv: Option<u16>,
    /// Voltage at which the low-battery flag clears again, mV.
    pub battery_recover_mv: u16,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            sample_interval_ms: 10,
            power_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            contacts: PairConfig::default(),
            mains_debounce_ms: 50,
            low_battery_mv: None,
            battery_recover_mv: 0,
        }
    }
}

/// Why a power sample is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerFault {
    /// The monitor did not answer on its bus.
    Bus,
    /// The monitor reported a math overflow.
    Overflow,
}

/// What was read in one step. `None` means "not read this step" (absent, or not due).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inputs {
    /// The power monitor.
    pub power: Option<Result<PowerSample, PowerFault>>,
    /// Mains present (raw level, already converted from the pin's polarity).
    pub mains_present: Option<bool>,
    /// Ventilator contacts: (normally-open closed, normally-closed closed).
    pub contacts: Option<(bool, bool)>,
    /// A digital input could not be read.
    pub pin_error: bool,
}

/// The pure bridge state machine.
#[derive(Debug, Clone)]
pub struct BridgeCore {
    config: BridgeConfig,
    seq: u32,
    booted: bool,
    watchdog_reset: bool,
    last_frame_ms: u64,
    next_power_ms: u64,
    power: Option<PowerSample>,
    power_flags: u16,
    pin_error: bool,
    mains: MainsSense,
    contacts: ContactPair,
    low_battery: Option<LowBattery>,
    /// The discrete part of the last frame sent, to detect changes.
    last_discrete: (Option<bool>, Option<ContactState>, u16),
}

impl BridgeCore {
    /// A core that has sent nothing yet; `watchdog_reset` says whether this boot followed a
    /// watchdog reset.
    pub fn new(config: BridgeConfig, watchdog_reset: bool) -> Self {
        BridgeCore {
            config,
            seq: 0,
            booted: false,
            watchdog_reset,
            last_frame_ms: 0,
            next_power_ms: 0,
            power: None,
            power_flags: 0,
            pin_error: false,
            mains: MainsSense::new(config.mains_debounce_ms),
            contacts: ContactPair::new(config.contacts),
            low_battery: config.low_battery_mv.map(|low| LowBattery::new(low, config.battery_recover_mv)),
            last_discrete: (None, None, 0),
        }
    }

    /// Whether the power monitor is due to be read at `now_ms`.
    pub fn power_due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_power_ms
    }

    /// When the next step is due (the runner sleeps until then).
    pub fn next_deadline(&self, now_ms: u64) -> u64 {
        now_ms + u64::from(self.config.sample_interval_ms.max(1))
    }

    fn flags(&self) -> u16 {
        let mut f = self.power_flags;
        if self.contacts.latched_alarm() {
            f |= flags::ALARM_LATCHED;
        }
        if self.low_battery.as_ref().and_then(LowBattery::is_low) == Some(true) {
            f |= flags::LOW_BATTERY;
        }
        if self.pin_error {
            f |= flags::SENSOR_ERROR;
        }
        if self.watchdog_reset {
            f |= flags::WATCHDOG_RESET;
        }
        f
    }

    /// Take one step's readings at `now_ms`; returns the frame to send, if one is due. Nothing
    /// about the frame is committed until [`BridgeCore::sent`] confirms it was written, so a
    /// frame that could not be sent (the boot frame, a latched alarm) is built again.
    pub fn step(&mut self, inputs: &Inputs, now_ms: u64) -> Option<Frame> {
        if let Some(p) = inputs.power {
            self.next_power_ms = now_ms + u64::from(self.config.power_interval_ms);
            match p {
                Ok(sample) => {
                    self.power = Some(sample);
                    self.power_flags = 0;
                    if let Some(lb) = &mut self.low_battery {
                        lb.update(sample.bus_mv);
                    }
                }
                Err(fault) => {
                    self.power = None;
                    self.power_flags = match fault {
                        PowerFault::Bus => flags::SENSOR_ERROR,
                        PowerFault::Overflow => flags::POWER_OVERFLOW,
                    };
                }
            }
        }
        if let Some(present) = inputs.mains_present {
            self.mains.update(present, now_ms);
        }
        if let Some((no, nc)) = inputs.contacts {
            self.contacts.update(no, nc, now_ms);
        }
        self.pin_error = inputs.pin_error;

        let flags = self.flags();
        let kind = if !self.booted {
            FrameKind::Boot
        } else if self.discrete(flags) != self.last_discrete || flags & ONE_SHOT_FLAGS != 0 {
            FrameKind::Sample
        } else if now_ms.saturating_sub(self.last_frame_ms) >= u64::from(self.config.heartbeat_interval_ms) {
            FrameKind::Heartbeat
        } else {
            return None;
        };
        Some(Frame {
            seq: self.seq,
            uptime_ms: now_ms as u32,
            kind,
            power: self.power,
            mains_present: self.mains.present(),
            ventilator: self.contacts.state(),
            flags,
        })
    }

    /// The state that, when it changes, is worth a frame at once (one-shot flags excluded:
    /// they are reported once and then clear).
    fn discrete(&self, flags: u16) -> (Option<bool>, Option<ContactState>, u16) {
        (self.mains.present(), self.contacts.state(), flags & !ONE_SHOT_FLAGS)
    }

    /// `frame` (from [`BridgeCore::step`]) was written at `now_ms`: commit it.
    pub fn sent(&mut self, frame: &Frame, now_ms: u64) {
        self.booted = true;
        self.seq = frame.seq.wrapping_add(1);
        self.last_frame_ms = now_ms;
        if frame.flags & flags::ALARM_LATCHED != 0 {
            self.contacts.take_latched_alarm();
        }
        if frame.flags & flags::WATCHDOG_RESET != 0 {
            self.watchdog_reset = false;
        }
        self.last_discrete = self.discrete(frame.flags);
    }
}

/// Flags reported in one frame and then cleared.
const ONE_SHOT_FLAGS: u16 = flags::ALARM_LATCHED | flags::WATCHDOG_RESET;

/// What the bridge reads from. [`HalSensors`] implements it over embedded-hal parts.
pub trait Sensors {
    /// Read the power monitor (called only when due). `None`: there is none.
    fn power(&mut self) -> Option<Result<PowerSample, PowerFault>>;
    /// Read the mains contact: `Some(Ok(present))`, `Some(Err(()))` on a pin error, `None` if absent.
    fn mains_present(&mut self) -> Option<Result<bool, ()>>;
    /// Read the ventilator pair: (normally-open closed, normally-closed closed).
    fn contacts(&mut self) -> Option<Result<(bool, bool), ()>>;
}

/// Something to feed so the hardware does not reset the bridge.
pub trait Watchdog {
    /// Feed it.
    fn feed(&mut self);
}

/// No watchdog.
impl Watchdog for () {
    fn feed(&mut self) {}
}

impl<F: FnMut()> Watchdog for F {
    fn feed(&mut self) {
        self()
    }
}

/// A digital input that is not wired (the type to name when an `Option` pin is `None`).
#[derive(Debug, Clone, Copy)]
pub struct NoPin;

impl embedded_hal::digital::ErrorType for NoPin {
    type Error = core::convert::Infallible;
}

impl InputPin for NoPin {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        Ok(false)
    }
    fn is_low(&mut self) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Sensors on embedded-hal parts. Contacts are read as "closed when the pin is low" (a pull-up
/// and the contact to ground, or an optocoupler pulling low) unless `closed_when_low` is false;
/// mains likewise with `mains_present_when_low`.
pub struct HalSensors<I2C, NO, NC, M> {
    /// The power monitor, if fitted.
    pub ina219: Option<Ina219<I2C>>,
    /// The ventilator contact pair (normally-open, normally-closed), if wired.
    pub contacts: Option<(NO, NC)>,
    /// The mains-sense input, if wired.
    pub mains: Option<M>,
    /// Contact polarity.
    pub closed_when_low: bool,
    /// Mains polarity.
    pub mains_present_when_low: bool,
}

impl<I2C: I2c, NO: InputPin, NC: InputPin, M: InputPin> Sensors for HalSensors<I2C, NO, NC, M> {
    fn power(&mut self) -> Option<Result<PowerSample, PowerFault>> {
        let ina = self.ina219.as_mut()?;
        Some(ina.sample().map_err(|e| match e {
            ina219::Error::Overflow => PowerFault::Overflow,
            ina219::Error::I2c(_) | ina219::Error::NotCalibrated => PowerFault::Bus,
        }))
    }

    fn mains_present(&mut self) -> Option<Result<bool, ()>> {
        let pin = self.mains.as_mut()?;
        let low = pin.is_low().map_err(drop);
        Some(low.map(|low| low == self.mains_present_when_low))
    }

    fn contacts(&mut self) -> Option<Result<(bool, bool), ()>> {
        let (no, nc) = self.contacts.as_mut()?;
        let closed = self.closed_when_low;
        let read = |low: Result<bool, ()>| low.map(|low| low == closed);
        Some(read(no.is_low().map_err(drop)).and_then(|a| read(nc.is_low().map_err(drop)).map(|b| (a, b))))
    }
}

/// The bridge: sensors in, frames out through `W`, watchdog fed.
pub struct Bridge<S, W, D> {
    core: BridgeCore,
    sensors: S,
    out: W,
    watchdog: D,
}

impl<S: Sensors, W: embedded_io::Write, D: Watchdog> Bridge<S, W, D> {
    /// A bridge over `sensors` writing to `out`.
    pub fn new(config: BridgeConfig, sensors: S, out: W, watchdog: D, watchdog_reset: bool) -> Self {
        Bridge { core: BridgeCore::new(config, watchdog_reset), sensors, out, watchdog }
    }

    /// Run one step at `now_ms`: read, decide, write, feed. Returns the frame written, if any.
    /// An error means the frame could not be written; the watchdog was not fed.
    pub fn step(&mut self, now_ms: u64) -> Result<Option<Frame>, W::Error> {
        let mut inputs = Inputs::default();
        if self.core.power_due(now_ms) {
            inputs.power = self.sensors.power();
        }
        match self.sensors.mains_present() {
            Some(Ok(p)) => inputs.mains_present = Some(p),
            Some(Err(())) => inputs.pin_error = true,
            None => {}
        }
        match self.sensors.contacts() {
            Some(Ok(c)) => inputs.contacts = Some(c),
            Some(Err(())) => inputs.pin_error = true,
            None => {}
        }
        let frame = self.core.step(&inputs, now_ms);
        if let Some(f) = &frame {
            let mut buf = [0u8; bridge::MAX_ENCODED];
            // MAX_ENCODED always holds a frame: the encoder cannot fail here.
            if let Ok(n) = bridge::encode(f, &mut buf) {
                self.out.write_all(&buf[..n])?;
                self.out.flush()?;
            }
            self.core.sent(f, now_ms);
        }
        self.watchdog.feed();
        Ok(frame)
    }

    /// When the next step is due.
    pub fn next_deadline(&self, now_ms: u64) -> u64 {
        self.core.next_deadline(now_ms)
    }

    /// The sensors (to release the bus or pins).
    pub fn into_parts(self) -> (S, W, D) {
        (self.sensors, self.out, self.watchdog)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::sim::{SimIna219, SimPin};
    use core::cell::Cell;
    use mamori_protocol::codec::{decode_all, StreamEvent};
    use std::vec::Vec;

    /// A serial port that records bytes, and can be made to fail.
    #[derive(Default)]
    struct Port {
        bytes: Vec<u8>,
        fail: bool,
    }

    #[derive(Debug)]
    struct PortError;
    impl embedded_io::Error for PortError {
        fn kind(&self) -> embedded_io::ErrorKind {
            embedded_io::ErrorKind::BrokenPipe
        }
    }
    impl embedded_io::ErrorType for Port {
        type Error = PortError;
    }
    impl embedded_io::Write for Port {
        fn write(&mut self, buf: &[u8]) -> Result<usize, PortError> {
            if self.fail {
                return Err(PortError);
            }
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> Result<(), PortError> {
            Ok(())
        }
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let ev = decode_all(mamori_protocol::bridge::Decoder, bytes);
        assert!(ev.iter().all(|e| matches!(e, StreamEvent::Item { .. })), "{ev:?}");
        ev.into_iter().filter_map(StreamEvent::item).collect()
    }

    struct Rig {
        ina: SimIna219,
        no: Cell<bool>,
        nc: Cell<bool>,
        mains: Cell<bool>,
        fed: Cell<u32>,
    }

    impl Rig {
        fn new() -> Rig {
            let ina = SimIna219::new(12_600, 1_500);
            // Normal contact: NO open (pin high), NC closed (pin low); mains present (low).
            Rig { ina, no: Cell::new(true), nc: Cell::new(false), mains: Cell::new(false), fed: Cell::new(0) }
        }

        fn bridge(
            &self,
            config: BridgeConfig,
        ) -> Bridge<HalSensors<&SimIna219, SimPin<'_>, SimPin<'_>, SimPin<'_>>, Port, impl FnMut() + '_> {
            let mut ina = Ina219::new(&self.ina, ina219::DEFAULT_ADDRESS);
            ina.calibrate(ina219::Calibration::new(100, 3200).unwrap()).unwrap();
            let sensors = HalSensors {
                ina219: Some(ina),
                contacts: Some((SimPin(&self.no), SimPin(&self.nc))),
                mains: Some(SimPin(&self.mains)),
                closed_when_low: true,
                mains_present_when_low: true,
            };
            Bridge::new(config, sensors, Port::default(), || self.fed.set(self.fed.get() + 1), false)
        }
    }

    fn run<S: Sensors, D: Watchdog>(b: &mut Bridge<S, Port, D>, from: u64, to: u64) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            out.extend(b.step(t).unwrap());
            t = b.next_deadline(t);
        }
        out
    }

    #[test]
    fn boot_then_heartbeats_when_nothing_changes() {
        let rig = Rig::new();
        let mut b = rig.bridge(BridgeConfig::default());
        let sent = run(&mut b, 0, 5_000);
        let (_, port, _) = b.into_parts();
        let decoded = frames(&port.bytes);
        assert_eq!(decoded, sent, "what was written is what was built");
        assert_eq!(decoded[0].kind, FrameKind::Boot);
        // After the inputs settle (one Sample frame), one heartbeat a second.
        let heartbeats = decoded.iter().filter(|f| f.kind == FrameKind::Heartbeat).count();
        assert!((4..=5).contains(&heartbeats), "{heartbeats} heartbeats in 5 s");
        assert!(decoded.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let last = decoded.last().unwrap();
        assert_eq!(last.mains_present, Some(true));
        assert_eq!(last.ventilator, Some(ContactState::Normal));
        let p = last.power.unwrap();
        assert_eq!(p.bus_mv, 12_600);
        // 1.5 A through 100 mΩ, quantised by the INA219's registers to within 1 mA.
        assert!(p.current_ma.is_some_and(|ma| (1_499..=1_500).contains(&ma)), "{p:?}");
        assert!(rig.fed.get() >= 400, "watchdog fed every step");
    }

    #[test]
    fn mains_loss_is_sent_at_once_not_at_the_next_heartbeat() {
        let rig = Rig::new();
        let mut b = rig.bridge(BridgeConfig::default());
        run(&mut b, 0, 2_000);
        rig.mains.set(true); // optocoupler off: mains gone
        let sent = run(&mut b, 2_000, 2_200);
        let f = sent.iter().find(|f| f.mains_present == Some(false)).expect("a frame with mains lost");
        assert_eq!(f.kind, FrameKind::Sample);
        assert!(f.uptime_ms <= 2_000 + 50 + 10, "sent at {} ms", f.uptime_ms);
    }

    #[test]
    fn a_short_ventilator_alarm_is_latched_into_a_frame() {
        let rig = Rig::new();
        let mut b = rig.bridge(BridgeConfig::default());
        run(&mut b, 0, 1_000);
        rig.no.set(false); // NO closes
        rig.nc.set(true); // NC opens
        let mut sent = run(&mut b, 1_000, 1_060);
        rig.no.set(true);
        rig.nc.set(false);
        sent.extend(run(&mut b, 1_060, 1_500));
        assert!(sent.iter().any(|f| f.ventilator == Some(ContactState::Alarm) && f.flags & flags::ALARM_LATCHED != 0));
        assert_eq!(sent.last().unwrap().ventilator, Some(ContactState::Normal));
        assert_eq!(sent.iter().filter(|f| f.flags & flags::ALARM_LATCHED != 0).count(), 1, "latched once: {sent:?}");
    }

    #[test]
    fn cut_cable_and_low_battery_and_sensor_failure() {
        let rig = Rig::new();
        let cfg = BridgeConfig { low_battery_mv: Some(11_800), battery_recover_mv: 12_200, ..BridgeConfig::default() };
        let mut b = rig.bridge(cfg);
        run(&mut b, 0, 1_000);
        rig.nc.set(true); // both open: cable cut
        let sent = run(&mut b, 1_000, 2_000);
        assert_eq!(sent.last().unwrap().ventilator, Some(ContactState::CableFault));
        rig.ina.set(11_500, 2_000);
        let sent = run(&mut b, 2_000, 3_100);
        assert!(sent.last().unwrap().flags & flags::LOW_BATTERY != 0);
        rig.ina.fail.set(true);
        let sent = run(&mut b, 3_100, 4_200);
        let last = sent.last().unwrap();
        assert!(last.flags & flags::SENSOR_ERROR != 0);
        assert_eq!(last.power, None, "no stale power reading after a bus failure");
        rig.ina.fail.set(false);
        let sent = run(&mut b, 4_200, 5_300);
        assert!(sent.last().unwrap().power.is_some());
    }

    #[test]
    fn a_failed_write_does_not_feed_the_watchdog() {
        let rig = Rig::new();
        let mut b = rig.bridge(BridgeConfig::default());
        b.out.fail = true;
        let fed = rig.fed.get();
        assert!(b.step(0).is_err());
        assert_eq!(rig.fed.get(), fed);
        b.out.fail = false;
        assert_eq!(b.step(10).unwrap().map(|f| f.kind), Some(FrameKind::Boot), "the boot frame is retried");
    }

    #[test]
    fn watchdog_reset_is_reported_in_the_boot_frame_only() {
        let mut core = BridgeCore::new(BridgeConfig::default(), true);
        let boot = core.step(&Inputs::default(), 0).unwrap();
        assert!(boot.flags & flags::WATCHDOG_RESET != 0);
        let again = core.step(&Inputs::default(), 10).unwrap();
        assert_eq!((again.kind, again.seq), (FrameKind::Boot, 0), "not committed until sent");
        core.sent(&again, 10);
        let next = core.step(&Inputs::default(), 1_010).unwrap();
        assert_eq!((next.kind, next.seq), (FrameKind::Heartbeat, 1));
        assert_eq!(next.flags & flags::WATCHDOG_RESET, 0);
    }

    #[test]
    fn the_loop_never_allocates_a_frame_larger_than_the_buffer() {
        let f = Frame {
            seq: u32::MAX,
            uptime_ms: u32::MAX,
            kind: FrameKind::Heartbeat,
            power: Some(PowerSample {
                bus_mv: u16::MAX,
                shunt_uv: i32::MIN,
                current_ma: Some(i32::MIN),
                power_mw: Some(u32::MAX),
            }),
            mains_present: Some(true),
            ventilator: Some(ContactState::CableFault),
            flags: u16::MAX,
        };
        let mut buf = [0u8; bridge::MAX_ENCODED];
        assert!(bridge::encode(&f, &mut buf).is_ok());
    }
}
