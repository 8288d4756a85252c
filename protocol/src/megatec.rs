//! Megatec "Q1" UPS protocol (the cheap serial UPS; NUT's `nutdrv_qx` / `blazer_ser`).
//!
//! 2400 bps 8N1. Queries end in `\r`; replies start with `(` (status) or `#` (rating, identity)
//! and end in `\r`. A UPS that does not know a command echoes it back ([`Reply::Echo`]).
//! Unavailable fields may be filled with `@`; those become `None`.
//!
//! - `Q1\r` → `(MMM.M NNN.N PPP.P QQQ RR.R S.SS TT.T b7b6b5b4b3b2b1b0\r` (47 bytes with `\r`):
//!   input V, input *fault* V, output V, load %, frequency Hz, battery V (per cell `S.SS` or
//!   total `SS.S`), temperature °C, then 8 status bits, `1` = set, b7 first:
//!   b7 utility fail · b6 battery low · b5 bypass/boost/buck · b4 UPS failed · b3 standby type ·
//!   b2 self-test · b1 shutdown active · b0 beeper on.
//! - `F\r` → `#MMM.M QQQ SS.SS RR.R\r`: rated voltage, rated current, battery voltage, frequency.
//! - `I\r` → `#` + company (15) + ` ` + model (10) + ` ` + version (10) + `\r`.
//!
//! The parser reads fields by whitespace, not by column, so a unit that pads differently still
//! decodes; it requires the 8-bit status field last. Garbage before a `(` on the same line is
//! skipped up to the `(` so decoding resynchronises within the line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait};
use crate::reading::UpsReading;
use crate::text::{ascii, bits, decode_line, opt_f32};

/// Longest reply line accepted (the identity reply is 38 bytes; allow padding).
pub const MAX_LINE: usize = 128;

/// A query the host sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `Q1`: status.
    Status,
    /// `F`: ratings.
    Rating,
    /// `I`: identity.
    Info,
    /// `T`: a 10-second battery test (no reply; status bit b2 while it runs).
    Test,
}

impl Query {
    /// The bytes to write, terminator included.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Query::Status => b"Q1\r",
            Query::Rating => b"F\r",
            Query::Info => b"I\r",
            Query::Test => b"T\r",
        }
    }

    /// Recognise a query line (without its `\r`), as a simulated UPS must.
    pub fn parse(line: &[u8]) -> Option<Query> {
        match line {
            b"Q1" => Some(Query::Status),
            b"F" => Some(Query::Rating),
            b"I" => Some(Query::Info),
            b"T" => Some(Query::Test),
            _ => None,
        }
    }
}

/// The 8 status bits of a `Q1` reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusBits {
    /// b7: utility fail, running on battery.
    pub utility_fail: bool,
    /// b6: battery low.
    pub battery_low: bool,
    /// b5: bypass, boost or buck active.
    pub bypass_boost_buck: bool,
    /// b4: UPS failed.
    pub ups_failed: bool,
    /// b3: standby (offline) type; 0 = online.
    pub standby_type: bool,
    /// b2: self-test in progress.
    pub self_test: bool,
    /// b1: shutdown active.
    pub shutdown_active: bool,
    /// b0: beeper on.
    pub beeper_on: bool,
}

impl StatusBits {
    /// From the byte b7..b0.
    pub fn from_byte(b: u8) -> Self {
        Self {
            utility_fail: b & 0x80 != 0,
            battery_low: b & 0x40 != 0,
            bypass_boost_buck: b & 0x20 != 0,
            ups_failed: b & 0x10 != 0,
            standby_type: b & 0x08 != 0,
            self_test: b & 0x04 != 0,
            shutdown_active: b & 0x02 != 0,
            beeper_on: b & 0x01 != 0,
        }
    }

    /// As the byte b7..b0.
    pub fn to_byte(self) -> u8 {
        [
            self.utility_fail,
            self.battery_low,
            self.bypass_boost_buck,
            self.ups_failed,
            self.standby_type,
            self.self_test,
            self.shutdown_active,
            self.beeper_on,
        ]
        .iter()
        .fold(0u8, |acc, &b| (acc << 1) | u8::from(b))
    }
}

/// A `Q1` status reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    /// Input voltage, V.
    pub input_voltage_v: Option<f64>,
    /// Input fault voltage, V (latches a glitch until the next query).
    pub input_fault_voltage_v: Option<f64>,
    /// Output voltage, V.
    pub output_voltage_v: Option<f64>,
    /// Load, %.
    pub load_pct: Option<f64>,
    /// Input frequency, Hz.
    pub frequency_hz: Option<f64>,
    /// Battery voltage, V (per cell or total, by model).
    pub battery_voltage_v: Option<f64>,
    /// Temperature, °C.
    pub temperature_c: Option<f64>,
    /// The status bits.
    pub bits: StatusBits,
}

impl Status {
    /// The common reading.
    pub fn reading(&self) -> UpsReading {
        UpsReading {
            on_battery: Some(self.bits.utility_fail),
            battery_low: Some(self.bits.battery_low),
            input_voltage_v: self.input_voltage_v,
            input_fault_voltage_v: self.input_fault_voltage_v,
            output_voltage_v: self.output_voltage_v,
            load_pct: self.load_pct,
            battery_voltage_v: self.battery_voltage_v,
            temperature_c: self.temperature_c,
            frequency_hz: self.frequency_hz,
            ups_fault: Some(self.bits.ups_failed),
            bypass_active: Some(self.bits.bypass_boost_buck),
            self_test: Some(self.bits.self_test),
            shutdown_active: Some(self.bits.shutdown_active),
            beeper_on: Some(self.bits.beeper_on),
            ..UpsReading::default()
        }
    }

    /// Encode the reply exactly as a Megatec UPS sends it: 47 bytes including `\r`, fixed
    /// widths, `@` for fields with no value. Used by the simulated UPS, which NUT's own
    /// `nutdrv_qx` must be able to read.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(48);
        s.push('(');
        field(&mut s, self.input_voltage_v, 5, 1);
        s.push(' ');
        field(&mut s, self.input_fault_voltage_v, 5, 1);
        s.push(' ');
        field(&mut s, self.output_voltage_v, 5, 1);
        s.push(' ');
        field(&mut s, self.load_pct.map(libm_round), 3, 0);
        s.push(' ');
        field(&mut s, self.frequency_hz, 4, 1);
        s.push(' ');
        match self.battery_voltage_v {
            Some(v) if v < 9.995 => field(&mut s, Some(v), 4, 2),
            other => field(&mut s, other, 4, 1),
        }
        s.push(' ');
        field(&mut s, self.temperature_c, 4, 1);
        s.push(' ');
        let _ = write!(s, "{:08b}", self.bits.to_byte());
        s.push('\r');
        s.into_bytes()
    }
}

fn libm_round(v: f64) -> f64 {
    // core has no f64::round without std; values here are small and non-negative in practice.
    if v >= 0.0 {
        (v + 0.5) as u32 as f64
    } else {
        -((-v + 0.5) as u32 as f64)
    }
}

/// Write `v` zero-padded to `width` with `decimals`, or `@` × `width` for no value, clamped so a
/// field never grows past its width (the reply's byte offsets must not move).
fn field(s: &mut String, v: Option<f64>, width: usize, decimals: usize) {
    match v {
        Some(v) => {
            // The largest value that fits, e.g. 99.9 for width 4 with 1 decimal.
            let max = {
                let int_digits = if decimals == 0 { width } else { width - decimals - 1 };
                let (mut m, mut step) = (1.0f64, 1.0f64);
                for _ in 0..int_digits {
                    m *= 10.0;
                }
                for _ in 0..decimals {
                    step /= 10.0;
                }
                m - step
            };
            let v = v.clamp(0.0, max);
            let _ = write!(s, "{v:0width$.decimals$}");
        }
        None => s.extend(core::iter::repeat_n('@', width)),
    }
}

/// An `F` rating reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rating {
    /// Rated voltage, V.
    pub voltage_v: Option<f64>,
    /// Rated current, A.
    pub current_a: Option<f64>,
    /// Nominal battery voltage, V.
    pub battery_voltage_v: Option<f64>,
    /// Rated frequency, Hz.
    pub frequency_hz: Option<f64>,
}

impl Rating {
    /// Encode as the UPS sends it.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::from("#");
        field(&mut s, self.voltage_v, 5, 1);
        s.push(' ');
        field(&mut s, self.current_a, 3, 0);
        s.push(' ');
        field(&mut s, self.battery_voltage_v, 5, 1);
        s.push(' ');
        field(&mut s, self.frequency_hz, 4, 1);
        s.push('\r');
        s.into_bytes()
    }
}

/// An `I` identity reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Info {
    /// Manufacturer (15 columns on the wire).
    pub company: String,
    /// Model (10 columns).
    pub model: String,
    /// Firmware version (10 columns).
    pub version: String,
}

impl Info {
    /// Encode as the UPS sends it, padding or cutting each field to its width.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::from("#");
        for (i, (v, w)) in [(&self.company, 15), (&self.model, 10), (&self.version, 10)].into_iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            let v: String = v.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(w).collect();
            let _ = write!(s, "{v:<w$}");
        }
        s.push('\r');
        s.into_bytes()
    }
}

/// One reply from a Megatec UPS.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `Q1` status.
    Status(Status),
    /// `F` ratings.
    Rating(Rating),
    /// `I` identity.
    Info(Info),
    /// The UPS echoed a command it does not know.
    Echo(String),
}

/// Parse the fields of a `(` status line (without the `(`): seven numbers and 8 status bits.
pub fn parse_status(body: &str) -> Result<Status, &'static str> {
    let toks: Vec<&str> = body.split_ascii_whitespace().collect();
    if toks.len() != 8 {
        return Err("Q1 status: expected 8 fields");
    }
    let b = bits(toks[7]).filter(|_| toks[7].len() == 8).ok_or("Q1 status bits")?;
    let mut nums = [None; 7];
    for (slot, tok) in nums.iter_mut().zip(&toks[..7]) {
        *slot = opt_f32(tok).map_err(|()| "Q1 status number")?;
    }
    Ok(Status {
        input_voltage_v: nums[0],
        input_fault_voltage_v: nums[1],
        output_voltage_v: nums[2],
        load_pct: nums[3],
        frequency_hz: nums[4],
        battery_voltage_v: nums[5],
        temperature_c: nums[6],
        bits: StatusBits::from_byte(b as u8),
    })
}

fn parse_hash(body: &str) -> Result<Reply, &'static str> {
    let toks: Vec<&str> = body.split_ascii_whitespace().collect();
    let nums: Result<Vec<Option<f64>>, ()> = toks.iter().map(|t| opt_f32(t)).collect();
    match nums {
        Ok(n) if n.len() == 4 => {
            Ok(Reply::Rating(Rating { voltage_v: n[0], current_a: n[1], battery_voltage_v: n[2], frequency_hz: n[3] }))
        }
        _ if body.len() >= 30 => {
            let col = |from: usize, to: usize| body.get(from..to.min(body.len())).unwrap_or("").trim().to_string();
            Ok(Reply::Info(Info { company: col(0, 15), model: col(16, 26), version: col(27, 37) }))
        }
        _ => Err("Megatec '#' reply"),
    }
}

/// Parse one reply line (without its terminator).
pub fn parse_reply(line: &str) -> Result<Reply, &'static str> {
    if let Some(body) = line.strip_prefix('(') {
        parse_status(body).map(Reply::Status)
    } else if let Some(body) = line.strip_prefix('#') {
        parse_hash(body)
    } else if !line.is_empty() && line.len() <= 4 && line.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        Ok(Reply::Echo(line.to_string()))
    } else {
        Err("Megatec reply")
    }
}

/// Decoder for a stream of Megatec replies.
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Reply;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Reply> {
        decode_line(buf, MAX_LINE, |line, used| {
            // Resynchronise inside the line: garbage before the last `(` or `#` is dropped.
            if let Some(p) = line.iter().rposition(|&b| b == b'(' || b == b'#').filter(|&p| p > 0) {
                return Err(DecodeError::new(crate::codec::ErrorKind::Garbage, p));
            }
            let text = ascii(line).ok_or_else(|| DecodeError::new(crate::codec::ErrorKind::Garbage, used))?;
            parse_reply(text).map(|r| Decoded::Complete(r, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        MAX_LINE + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, ErrorKind, StreamEvent};

    fn items(bytes: &[u8]) -> Vec<Reply> {
        decode_all(Decoder, bytes).into_iter().filter_map(StreamEvent::item).collect()
    }

    #[test]
    fn sample_online_unit_with_per_cell_battery() {
        let r = items(b"(208.4 140.0 208.4 034 59.9 2.05 35.0 00110000\r");
        let Reply::Status(s) = &r[0] else { panic!("{r:?}") };
        assert_eq!(s.input_voltage_v, Some(208.4));
        assert_eq!(s.input_fault_voltage_v, Some(140.0));
        assert_eq!(s.load_pct, Some(34.0));
        assert_eq!(s.frequency_hz, Some(59.9));
        assert_eq!(s.battery_voltage_v, Some(2.05));
        assert_eq!(s.temperature_c, Some(35.0));
        assert!(s.bits.bypass_boost_buck && s.bits.ups_failed);
        assert!(!s.bits.utility_fail && !s.bits.battery_low && !s.bits.standby_type);
        let reading = s.reading();
        assert_eq!(reading.on_battery, Some(false));
        assert_eq!(reading.ups_fault, Some(true));
    }

    #[test]
    fn sample_standby_unit_with_total_battery() {
        let r = items(b"(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000\r");
        let Reply::Status(s) = &r[0] else { panic!("{r:?}") };
        assert_eq!(s.battery_voltage_v, Some(27.5));
        assert!(s.bits.standby_type);
        assert_eq!(s.bits.to_byte(), 0b0000_1000);
    }

    #[test]
    fn on_battery_and_low() {
        let r = items(b"(000.0 000.0 229.0 041 50.0 22.1 31.0 11001001\r");
        let Reply::Status(s) = &r[0] else { panic!() };
        assert!(s.bits.utility_fail && s.bits.battery_low && s.bits.beeper_on);
    }

    #[test]
    fn at_signs_are_no_value_not_zero() {
        let r = items(b"(230.0 230.0 230.0 @@@ 50.0 @.@@ @@.@ 00000000\r");
        let Reply::Status(s) = &r[0] else { panic!() };
        assert_eq!(s.load_pct, None);
        assert_eq!(s.battery_voltage_v, None);
        assert_eq!(s.temperature_c, None);
    }

    #[test]
    fn rating_and_info() {
        let r = items(b"#220.0 000 024.0 50.0\r#MEGATEC         UPS-1000   V1.0      \r");
        assert_eq!(
            r[0],
            Reply::Rating(Rating {
                voltage_v: Some(220.0),
                current_a: Some(0.0),
                battery_voltage_v: Some(24.0),
                frequency_hz: Some(50.0)
            })
        );
        assert_eq!(
            r[1],
            Reply::Info(Info { company: "MEGATEC".into(), model: "UPS-1000".into(), version: "V1.0".into() })
        );
    }

    #[test]
    fn echo_of_unknown_command() {
        assert_eq!(items(b"I\r"), [Reply::Echo("I".into())]);
    }

    #[test]
    fn garbage_then_resync_within_the_line() {
        let ev = decode_all(Decoder, b"\x00\xffxx(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000\r");
        assert!(
            matches!(ev[0], StreamEvent::Error { ref error, offset: 0 } if error.kind == ErrorKind::Garbage && error.skip == 4)
        );
        assert!(matches!(ev[1], StreamEvent::Item { item: Reply::Status(_), offset: 4 }));
        assert_eq!(ev.len(), 2);
    }

    #[test]
    fn crlf_and_lf_terminators() {
        assert_eq!(items(b"(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000\r\n#220.0 000 024.0 50.0\n").len(), 2);
    }

    #[test]
    fn half_frame_needs_more() {
        let mut d = Decoder;
        assert_eq!(d.decode(b"(226.0 195.0 226").unwrap(), Decoded::Incomplete);
    }

    #[test]
    fn overlong_line_is_dropped_not_buffered_forever() {
        let junk = [b'A'; 300];
        let ev = decode_all(Decoder, &junk);
        assert!(
            matches!(&ev[0], StreamEvent::Error { error, .. } if error.kind == ErrorKind::TooLong { max: MAX_LINE })
        );
    }

    #[test]
    fn encode_is_47_bytes_with_bits_at_38() {
        let s = Status {
            input_voltage_v: Some(208.4),
            input_fault_voltage_v: Some(140.0),
            output_voltage_v: Some(208.4),
            load_pct: Some(34.0),
            frequency_hz: Some(59.9),
            battery_voltage_v: Some(2.05),
            temperature_c: Some(35.0),
            bits: StatusBits::from_byte(0b0011_0000),
        };
        let wire = s.encode();
        assert_eq!(wire, b"(208.4 140.0 208.4 034 59.9 2.05 35.0 00110000\r");
        assert_eq!(wire.len(), 47);
        assert_eq!(&wire[38..46], b"00110000");
        let with_total = Status { battery_voltage_v: Some(27.5), ..s.clone() }.encode();
        assert_eq!(with_total.len(), 47);
        let none = Status::default().encode();
        assert_eq!(none, b"(@@@@@ @@@@@ @@@@@ @@@ @@@@ @@@@ @@@@ 00000000\r");
    }

    #[test]
    fn rating_and_info_encode_round_trip() {
        let rating = Rating {
            voltage_v: Some(220.0),
            current_a: Some(0.0),
            battery_voltage_v: Some(24.0),
            frequency_hz: Some(50.0),
        };
        assert_eq!(rating.encode(), b"#220.0 000 024.0 50.0\r");
        let info = Info { company: "mamori".into(), model: "SIM-Q1".into(), version: "0.1".into() };
        assert_eq!(items(&info.encode()), [Reply::Info(info)]);
    }

    #[test]
    fn queries() {
        assert_eq!(Query::Status.as_bytes(), b"Q1\r");
        for q in [Query::Status, Query::Rating, Query::Info] {
            let b = q.as_bytes();
            assert_eq!(Query::parse(&b[..b.len() - 1]), Some(q));
        }
    }
}
