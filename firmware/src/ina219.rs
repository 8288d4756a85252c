//! INA219 high-side current and power monitor (Texas Instruments), over I2C.
//!
//! Register map (datasheet SBOS448, section 8.6); every register is 16 bits, big-endian, read by
//! writing the register pointer and reading two bytes:
//!
//! | reg | name | content |
//! |---|---|---|
//! | 0x00 | configuration | RST(15) · BRNG(13) · PG(12–11) · BADC(10–7) · SADC(6–3) · MODE(2–0); resets to 0x399F |
//! | 0x01 | shunt voltage | signed, LSB 10 µV |
//! | 0x02 | bus voltage | bits 15–3 voltage (LSB 4 mV) · bit 1 CNVR conversion ready · bit 0 OVF math overflow |
//! | 0x03 | power | × power LSB (= 20 × current LSB), valid after calibration |
//! | 0x04 | current | signed, × current LSB, valid after calibration |
//! | 0x05 | calibration | `trunc(0.04096 / (current_LSB × R_shunt))`, bit 0 always 0 |
//!
//! [`Calibration::new`] computes the register value for a shunt and a maximum expected current
//! in integer arithmetic (current LSB in nA, rounded up so the full scale covers the maximum).
//! Pi UPS boards usually carry the INA219 at 0x40–0x4F with a 100 mΩ or 10 mΩ shunt.

/// Register addresses.
pub mod reg {
    /// Configuration.
    pub const CONFIG: u8 = 0x00;
    /// Shunt voltage.
    pub const SHUNT_VOLTAGE: u8 = 0x01;
    /// Bus voltage.
    pub const BUS_VOLTAGE: u8 = 0x02;
    /// Power.
    pub const POWER: u8 = 0x03;
    /// Current.
    pub const CURRENT: u8 = 0x04;
    /// Calibration.
    pub const CALIBRATION: u8 = 0x05;
}

/// The configuration register's value after reset.
pub const CONFIG_RESET_VALUE: u16 = 0x399F;
/// The default I2C address (A0 = A1 = GND).
pub const DEFAULT_ADDRESS: u8 = 0x40;

/// An error from the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The I2C bus failed (no acknowledge, arbitration, ...).
    I2c(E),
    /// Current or power was asked for before [`Ina219::calibrate`].
    NotCalibrated,
    /// The chip reported a math overflow: current and power are not valid.
    Overflow,
}

/// A calibration that cannot be represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibrationError {
    /// Shunt resistance or maximum current is zero.
    Zero,
    /// The register value would not fit in 16 bits (or is below 1): choose another range.
    OutOfRange,
}

/// Bus voltage range (BRNG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusRange {
    /// 16 V full scale.
    V16,
    /// 32 V full scale (reset default).
    V32,
}

/// PGA gain and shunt voltage range (PG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gain {
    /// ±40 mV.
    Div1,
    /// ±80 mV.
    Div2,
    /// ±160 mV.
    Div4,
    /// ±320 mV (reset default).
    Div8,
}

/// ADC resolution / averaging (BADC, SADC): the four-bit codes of the datasheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adc {
    /// 9-bit, 84 µs.
    Bits9,
    /// 10-bit, 148 µs.
    Bits10,
    /// 11-bit, 276 µs.
    Bits11,
    /// 12-bit, 532 µs (reset default).
    Bits12,
    /// 12-bit, 2^n samples averaged, n = 1..=7 (1.06 ms to 68.1 ms).
    Average(u8),
}

impl Adc {
    fn code(self) -> u16 {
        match self {
            Adc::Bits9 => 0b0000,
            Adc::Bits10 => 0b0001,
            Adc::Bits11 => 0b0010,
            Adc::Bits12 => 0b0011,
            Adc::Average(n) => 0b1000 | u16::from(n.clamp(1, 7)),
        }
    }
}

/// Operating mode (MODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Power-down.
    PowerDown,
    /// Shunt and bus, triggered.
    Triggered,
    /// Shunt and bus, continuous (reset default).
    Continuous,
}

/// The configuration register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Bus voltage range.
    pub bus_range: BusRange,
    /// Shunt voltage range.
    pub gain: Gain,
    /// Bus ADC.
    pub bus_adc: Adc,
    /// Shunt ADC.
    pub shunt_adc: Adc,
    /// Mode.
    pub mode: Mode,
}

impl Default for Config {
    /// The reset configuration (0x399F).
    fn default() -> Self {
        Config {
            bus_range: BusRange::V32,
            gain: Gain::Div8,
            bus_adc: Adc::Bits12,
            shunt_adc: Adc::Bits12,
            mode: Mode::Continuous,
        }
    }
}

impl Config {
    /// The register value.
    pub fn bits(&self) -> u16 {
        let brng = match self.bus_range {
            BusRange::V16 => 0,
            BusRange::V32 => 1 << 13,
        };
        let pg = match self.gain {
            Gain::Div1 => 0,
            Gain::Div2 => 1,
            Gain::Div4 => 2,
            Gain::Div8 => 3,
        } << 11;
        let mode = match self.mode {
            Mode::PowerDown => 0b000,
            Mode::Triggered => 0b011,
            Mode::Continuous => 0b111,
        };
        brng | pg | (self.bus_adc.code() << 7) | (self.shunt_adc.code() << 3) | mode
    }
}

/// A calibration for a shunt and a maximum expected current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    /// Current per bit of the current register, nA.
    pub current_lsb_na: u32,
    /// The calibration register value.
    pub register: u16,
}

impl Calibration {
    /// Compute the calibration for a shunt of `shunt_milliohm` and currents up to
    /// `max_current_ma`.
    pub fn new(shunt_milliohm: u32, max_current_ma: u32) -> Result<Calibration, CalibrationError> {
        if shunt_milliohm == 0 || max_current_ma == 0 {
            return Err(CalibrationError::Zero);
        }
        // current_LSB = I_max / 2^15, in nA, rounded up.
        let lsb_na = (u64::from(max_current_ma) * 1_000_000).div_ceil(32_768);
        // cal = 0.04096 / (I_lsb[A] × R[Ω]) = 40_960_000_000 / (I_lsb[nA] × R[mΩ]).
        let cal = 40_960_000_000u64 / (lsb_na * u64::from(shunt_milliohm));
        if !(2..=0xFFFE).contains(&cal) || lsb_na > u64::from(u32::MAX) {
            return Err(CalibrationError::OutOfRange);
        }
        Ok(Calibration { current_lsb_na: lsb_na as u32, register: (cal as u16) & 0xFFFE })
    }
}

/// A bus voltage reading with its status bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusVoltage {
    /// Bus voltage, mV.
    pub millivolts: u16,
    /// CNVR: a conversion finished since the power register was last read.
    pub conversion_ready: bool,
    /// OVF: power or current calculation overflowed.
    pub overflow: bool,
}

impl BusVoltage {
    /// Decode the register.
    pub fn from_register(raw: u16) -> BusVoltage {
        BusVoltage { millivolts: (raw >> 3) * 4, conversion_ready: raw & 0b10 != 0, overflow: raw & 0b01 != 0 }
    }
}

/// The INA219 on an I2C bus.
#[derive(Debug)]
pub struct Ina219<I2C> {
    i2c: I2C,
    address: u8,
    calibration: Option<Calibration>,
}

impl<I2C: embedded_hal::i2c::I2c> Ina219<I2C> {
    /// A driver for the chip at `address`. Talks to nothing until a method is called.
    pub fn new(i2c: I2C, address: u8) -> Self {
        Ina219 { i2c, address, calibration: None }
    }

    /// Give the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// The calibration in force, if any.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    fn write(&mut self, register: u8, value: u16) -> Result<(), Error<I2C::Error>> {
        let [hi, lo] = value.to_be_bytes();
        self.i2c.write(self.address, &[register, hi, lo]).map_err(Error::I2c)
    }

    fn read(&mut self, register: u8) -> Result<u16, Error<I2C::Error>> {
        let mut buf = [0u8; 2];
        self.i2c.write_read(self.address, &[register], &mut buf).map_err(Error::I2c)?;
        Ok(u16::from_be_bytes(buf))
    }

    /// Reset the chip to its defaults (the calibration is lost).
    pub fn reset(&mut self) -> Result<(), Error<I2C::Error>> {
        self.calibration = None;
        self.write(reg::CONFIG, 0x8000)
    }

    /// Write the configuration register.
    pub fn configure(&mut self, config: &Config) -> Result<(), Error<I2C::Error>> {
        self.write(reg::CONFIG, config.bits())
    }

    /// Read the configuration register.
    pub fn read_config(&mut self) -> Result<u16, Error<I2C::Error>> {
        self.read(reg::CONFIG)
    }

    /// Write the calibration register; current and power become valid.
    pub fn calibrate(&mut self, calibration: Calibration) -> Result<(), Error<I2C::Error>> {
        self.write(reg::CALIBRATION, calibration.register)?;
        self.calibration = Some(calibration);
        Ok(())
    }

    /// Bus voltage and the conversion-ready and overflow flags.
    pub fn bus_voltage(&mut self) -> Result<BusVoltage, Error<I2C::Error>> {
        self.read(reg::BUS_VOLTAGE).map(BusVoltage::from_register)
    }

    /// Shunt voltage, µV.
    pub fn shunt_voltage_uv(&mut self) -> Result<i32, Error<I2C::Error>> {
        Ok(i32::from(self.read(reg::SHUNT_VOLTAGE)? as i16) * 10)
    }

    fn calibrated(&self) -> Result<Calibration, Error<I2C::Error>> {
        self.calibration.ok_or(Error::NotCalibrated)
    }

    /// Current, µA (sign as wired: positive when current flows from IN+ to IN−).
    pub fn current_ua(&mut self) -> Result<i32, Error<I2C::Error>> {
        let cal = self.calibrated()?;
        let raw = i64::from(self.read(reg::CURRENT)? as i16);
        Ok((raw * i64::from(cal.current_lsb_na) / 1000) as i32)
    }

    /// Power, mW.
    pub fn power_mw(&mut self) -> Result<u32, Error<I2C::Error>> {
        let cal = self.calibrated()?;
        let raw = u64::from(self.read(reg::POWER)?);
        // Power LSB = 20 × current LSB.
        Ok((raw * 20 * u64::from(cal.current_lsb_na) / 1_000_000) as u32)
    }

    /// Everything at once, as the bridge frame carries it. Current and power are `None` when
    /// the chip is not calibrated; an overflow is reported as [`Error::Overflow`].
    pub fn sample(&mut self) -> Result<mamori_protocol::bridge::PowerSample, Error<I2C::Error>> {
        let bus = self.bus_voltage()?;
        if bus.overflow {
            return Err(Error::Overflow);
        }
        let shunt_uv = self.shunt_voltage_uv()?;
        let (current_ma, power_mw) = if self.calibration.is_some() {
            (Some(self.current_ua()? / 1000), Some(self.power_mw()?))
        } else {
            (None, None)
        };
        Ok(mamori_protocol::bridge::PowerSample { bus_mv: bus.millivolts, shunt_uv, current_ma, power_mw })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use std::vec;

    const A: u8 = DEFAULT_ADDRESS;

    #[test]
    fn config_bits_match_the_reset_value_and_datasheet_fields() {
        assert_eq!(Config::default().bits(), CONFIG_RESET_VALUE);
        let c = Config {
            bus_range: BusRange::V16,
            gain: Gain::Div1,
            bus_adc: Adc::Bits9,
            shunt_adc: Adc::Average(7),
            mode: Mode::Triggered,
        };
        // RST 0 · BRNG 0 · PG 00 · BADC 0000 · SADC 1111 · MODE 011
        #[allow(clippy::unusual_byte_groupings)]
        let want = 0b0_0_0_00_0000_1111_011;
        assert_eq!(c.bits(), want);
    }

    #[test]
    fn calibration_for_common_boards() {
        // 100 mΩ, 3.2 A: LSB 97.66 µA, cal = 0.04096 / (97.657e-6 × 0.1) = 4194.
        let c = Calibration::new(100, 3200).unwrap();
        assert_eq!(c.current_lsb_na, 97_657);
        assert_eq!(c.register, 4194);
        // 10 mΩ, 8 A.
        let c = Calibration::new(10, 8000).unwrap();
        assert_eq!(c.current_lsb_na, 244_141);
        assert_eq!(c.register, 16776);
        assert_eq!(Calibration::new(0, 1000), Err(CalibrationError::Zero));
        assert_eq!(Calibration::new(1, 1), Err(CalibrationError::OutOfRange));
    }

    #[test]
    fn configure_calibrate_and_read_everything() {
        let cal = Calibration::new(100, 3200).unwrap();
        let expectations = [
            T::write(A, vec![reg::CONFIG, 0x39, 0x9F]),
            T::write(A, vec![reg::CALIBRATION, 0x10, 0x62]),
            // 12.48 V: 3120 × 4 mV, CNVR set.
            T::write_read(A, vec![reg::BUS_VOLTAGE], vec![0x61, 0x82]),
            // −23.1 mV shunt: −2310 × 10 µV.
            T::write_read(A, vec![reg::SHUNT_VOLTAGE], vec![0xF6, 0xFA]),
            T::write_read(A, vec![reg::CURRENT], vec![0xF6, 0xBB]),
            T::write_read(A, vec![reg::POWER], vec![0x05, 0xC3]),
        ];
        let mut ina = Ina219::new(Mock::new(&expectations), A);
        ina.configure(&Config::default()).unwrap();
        ina.calibrate(cal).unwrap();
        let s = ina.sample().unwrap();
        assert_eq!(s.bus_mv, 12_480);
        assert_eq!(s.shunt_uv, -23_100);
        // 0xF6BB = −2373 × 97.657 µA = −231.7 mA.
        assert_eq!(s.current_ma, Some(-231));
        // 0x05C3 = 1475 × 20 × 97.657 µA... = 2880 mW.
        assert_eq!(s.power_mw, Some(2880));
        ina.release().done();
    }

    #[test]
    fn flags_and_overflow() {
        assert_eq!(
            BusVoltage::from_register(0x6183),
            BusVoltage { millivolts: 12_480, conversion_ready: true, overflow: true }
        );
        let mut ina = Ina219::new(Mock::new(&[T::write_read(A, vec![reg::BUS_VOLTAGE], vec![0x61, 0x81])]), A);
        assert_eq!(ina.sample(), Err(Error::Overflow));
        ina.release().done();
    }

    #[test]
    fn uncalibrated_sample_has_no_current_and_current_is_an_error() {
        let expectations = [
            T::write_read(A, vec![reg::BUS_VOLTAGE], vec![0x61, 0x80]),
            T::write_read(A, vec![reg::SHUNT_VOLTAGE], vec![0x00, 0x64]),
        ];
        let mut ina = Ina219::new(Mock::new(&expectations), A);
        let s = ina.sample().unwrap();
        assert_eq!((s.shunt_uv, s.current_ma, s.power_mw), (1000, None, None));
        assert_eq!(ina.current_ua(), Err(Error::NotCalibrated));
        assert_eq!(ina.power_mw(), Err(Error::NotCalibrated));
        ina.release().done();
    }

    #[test]
    fn bus_errors_are_typed_not_panics() {
        let expectations = [
            T::write(A, vec![reg::CALIBRATION, 0x10, 0x62]).with_error(ErrorKind::Other),
            T::write_read(A, vec![reg::BUS_VOLTAGE], vec![0, 0]).with_error(ErrorKind::Other),
            T::write(A, vec![reg::CONFIG, 0x80, 0x00]),
        ];
        let mut ina = Ina219::new(Mock::new(&expectations), A);
        assert_eq!(ina.calibrate(Calibration::new(100, 3200).unwrap()), Err(Error::I2c(ErrorKind::Other)));
        assert_eq!(ina.calibration(), None, "a failed write leaves the driver uncalibrated");
        assert_eq!(ina.bus_voltage(), Err(Error::I2c(ErrorKind::Other)));
        ina.reset().unwrap();
        ina.release().done();
    }

    #[test]
    fn other_addresses() {
        let mut ina = Ina219::new(Mock::new(&[T::write_read(0x45, vec![reg::CONFIG], vec![0x39, 0x9F])]), 0x45);
        assert_eq!(ina.read_config().unwrap(), CONFIG_RESET_VALUE);
        ina.release().done();
    }
}
