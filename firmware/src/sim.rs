//! Simulated parts for the host: an INA219 register model on a fake I2C bus, and digital
//! inputs backed by a [`Cell`]. The tests drive the real driver and loop through them, and the
//! agent's `simulate` uses them so the frames it produces come from the firmware's own code.

use core::cell::Cell;

use embedded_hal::digital::{ErrorType, InputPin};
use embedded_hal::i2c::{self, I2c, Operation};

use crate::ina219::reg;

/// A digital input whose level is a shared cell (`true` = high).
#[derive(Debug, Clone, Copy)]
pub struct SimPin<'a>(pub &'a Cell<bool>);

impl ErrorType for SimPin<'_> {
    type Error = core::convert::Infallible;
}

impl InputPin for SimPin<'_> {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        Ok(self.0.get())
    }
    fn is_low(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.0.get())
    }
}

/// An INA219 as seen from its bus: a battery at `bus_mv` delivering `current_ma` through a
/// 100 mΩ shunt. Registers follow the datasheet's arithmetic (current = shunt × cal / 4096,
/// power = current × bus / 5000), so the driver's conversions are exercised for real.
#[derive(Debug)]
pub struct SimIna219 {
    bus_mv: Cell<u16>,
    current_ma: Cell<i32>,
    calibration: Cell<u16>,
    config: Cell<u16>,
    register: Cell<u8>,
    /// When set, every transaction fails as a missing device would (no acknowledge).
    pub fail: Cell<bool>,
}

/// The simulated shunt, mΩ.
pub const SIM_SHUNT_MILLIOHM: i32 = 100;

impl SimIna219 {
    /// A device reading `bus_mv` and `current_ma`.
    pub fn new(bus_mv: u16, current_ma: i32) -> Self {
        SimIna219 {
            bus_mv: Cell::new(bus_mv),
            current_ma: Cell::new(current_ma),
            calibration: Cell::new(0),
            config: Cell::new(crate::ina219::CONFIG_RESET_VALUE),
            register: Cell::new(0),
            fail: Cell::new(false),
        }
    }

    /// Change what it measures.
    pub fn set(&self, bus_mv: u16, current_ma: i32) {
        self.bus_mv.set(bus_mv);
        self.current_ma.set(current_ma);
    }

    fn shunt_reg(&self) -> i16 {
        // V_shunt[10 µV] = I[mA] × R[mΩ] / 10.
        (self.current_ma.get() * SIM_SHUNT_MILLIOHM / 10).clamp(i16::MIN.into(), i16::MAX.into()) as i16
    }

    fn current_reg(&self) -> i16 {
        (i32::from(self.shunt_reg()) * i32::from(self.calibration.get()) / 4096).clamp(i16::MIN.into(), i16::MAX.into())
            as i16
    }

    fn register_value(&self, register: u8) -> u16 {
        match register {
            reg::CONFIG => self.config.get(),
            reg::SHUNT_VOLTAGE => self.shunt_reg() as u16,
            reg::BUS_VOLTAGE => ((self.bus_mv.get() / 4) << 3) | 0b10,
            reg::POWER => {
                (i32::from(self.current_reg()).unsigned_abs() * u32::from(self.bus_mv.get() / 4) / 5000) as u16
            }
            reg::CURRENT => self.current_reg() as u16,
            reg::CALIBRATION => self.calibration.get(),
            _ => 0,
        }
    }

    fn store(&self, bytes: &[u8]) {
        if let Some((&r, rest)) = bytes.split_first() {
            self.register.set(r);
            if let [hi, lo] = rest {
                let v = u16::from_be_bytes([*hi, *lo]);
                match r {
                    reg::CONFIG if v & 0x8000 != 0 => {
                        self.config.set(crate::ina219::CONFIG_RESET_VALUE);
                        self.calibration.set(0);
                    }
                    reg::CONFIG => self.config.set(v),
                    reg::CALIBRATION => self.calibration.set(v & 0xFFFE),
                    _ => {}
                }
            }
        }
    }
}

/// The simulated bus's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimBusError;

impl i2c::Error for SimBusError {
    fn kind(&self) -> i2c::ErrorKind {
        i2c::ErrorKind::NoAcknowledge(i2c::NoAcknowledgeSource::Address)
    }
}

impl i2c::ErrorType for &SimIna219 {
    type Error = SimBusError;
}

impl I2c for &SimIna219 {
    fn transaction(&mut self, _address: u8, operations: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        if self.fail.get() {
            return Err(SimBusError);
        }
        for op in operations {
            match op {
                Operation::Write(bytes) => SimIna219::store(self, bytes),
                Operation::Read(buf) => {
                    let v = SimIna219::register_value(self, self.register.get()).to_be_bytes();
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = v.get(i).copied().unwrap_or(0);
                    }
                }
            }
        }
        Ok(())
    }
}
