//! The Voltronic dialect of the Megatec protocol (newer units; NUT's `nutdrv_qx` "voltronic").
//!
//! Same line discipline as [`crate::megatec`]: queries end in `\r`, replies start with `(` and
//! end in `\r`. Replies carry no tag, so [`parse_reply`] takes the query that was sent; the
//! stateless [`Decoder`] (for captures, where the queries are not recorded) classifies replies
//! by shape, which is unambiguous for the replies handled here.
//!
//! - `QPI` → `(PI00`: protocol id.
//! - `QGS` → general status; the last field is 12 status characters `a1 a0 b9 … b0`
//!   (a1a0 = UPS type, then b9 on battery, b8 battery low, b6 fault). Fields before it, in order:
//!   input V, input Hz, output V, output Hz, output current A, load %, +BUS V, −BUS V,
//!   +battery V, −battery V, temperature °C. (The field order follows NUT's notes on this
//!   dialect and is not yet checked against a real unit: fields beyond the status characters
//!   are read only when present and numeric.)
//! - `QMOD` → `(L`: one letter, the mode.
//! - `QBV` → `(026.5 02 01 068 255`: battery V, packs in series, packs in parallel, charge %,
//!   **minutes** left.
//! - `(ACK` / `(NAK`: command accepted / refused.
//!
//! A Voltronic unit also answers Megatec `Q1`; such replies decode as [`Reply::Q1`].

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::megatec;
use crate::reading::UpsReading;
use crate::text::{ascii, bits, decode_line, opt_f32, opt_u32};

/// Longest reply line accepted.
pub const MAX_LINE: usize = 160;

/// A query the host sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `QPI`: protocol id.
    ProtocolId,
    /// `QGS`: general status.
    GeneralStatus,
    /// `QMOD`: mode.
    Mode,
    /// `QBV`: battery.
    Battery,
    /// `Q1`: Megatec status, which Voltronic units also answer.
    Q1,
}

impl Query {
    /// The bytes to write, terminator included.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Query::ProtocolId => b"QPI\r",
            Query::GeneralStatus => b"QGS\r",
            Query::Mode => b"QMOD\r",
            Query::Battery => b"QBV\r",
            Query::Q1 => b"Q1\r",
        }
    }
}

/// The UPS's operating mode (`QMOD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `P`: power on.
    PowerOn,
    /// `S`: standby.
    Standby,
    /// `Y`: bypass.
    Bypass,
    /// `L`: line (mains).
    Line,
    /// `B`: battery.
    Battery,
    /// `T`: battery test.
    BatteryTest,
    /// `F`: fault.
    Fault,
    /// `E`: ECO / high-efficiency.
    Eco,
    /// `C`: converter.
    Converter,
    /// `D`: shutdown.
    Shutdown,
    /// Another letter.
    Other(char),
}

impl Mode {
    fn from_letter(c: char) -> Mode {
        match c {
            'P' => Mode::PowerOn,
            'S' => Mode::Standby,
            'Y' => Mode::Bypass,
            'L' => Mode::Line,
            'B' => Mode::Battery,
            'T' => Mode::BatteryTest,
            'F' => Mode::Fault,
            'E' | 'H' => Mode::Eco,
            'C' => Mode::Converter,
            'D' => Mode::Shutdown,
            other => Mode::Other(other),
        }
    }

    /// The common reading this mode implies.
    pub fn reading(self) -> UpsReading {
        UpsReading {
            on_battery: match self {
                Mode::Battery | Mode::BatteryTest => Some(true),
                Mode::Line | Mode::Eco | Mode::Bypass | Mode::Converter => Some(false),
                _ => None,
            },
            ups_fault: Some(self == Mode::Fault),
            bypass_active: Some(self == Mode::Bypass),
            self_test: Some(self == Mode::BatteryTest),
            ..UpsReading::default()
        }
    }
}

/// A `QGS` general-status reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneralStatus {
    /// Input voltage, V.
    pub input_voltage_v: Option<f64>,
    /// Input frequency, Hz.
    pub input_frequency_hz: Option<f64>,
    /// Output voltage, V.
    pub output_voltage_v: Option<f64>,
    /// Output current, A.
    pub output_current_a: Option<f64>,
    /// Load, %.
    pub load_pct: Option<f64>,
    /// Battery voltage (positive string), V.
    pub battery_voltage_v: Option<f64>,
    /// Temperature, °C.
    pub temperature_c: Option<f64>,
    /// The 12 status characters as bits, a1 first (bit 11) to b0 (bit 0).
    pub status: u16,
}

impl GeneralStatus {
    /// b9: utility fail, on battery.
    pub fn on_battery(&self) -> bool {
        self.status & (1 << 9) != 0
    }
    /// b8: battery low.
    pub fn battery_low(&self) -> bool {
        self.status & (1 << 8) != 0
    }
    /// b6: UPS fault.
    pub fn fault(&self) -> bool {
        self.status & (1 << 6) != 0
    }

    /// The common reading.
    pub fn reading(&self) -> UpsReading {
        UpsReading {
            on_battery: Some(self.on_battery()),
            battery_low: Some(self.battery_low()),
            ups_fault: Some(self.fault()),
            input_voltage_v: self.input_voltage_v,
            frequency_hz: self.input_frequency_hz,
            output_voltage_v: self.output_voltage_v,
            load_pct: self.load_pct,
            battery_voltage_v: self.battery_voltage_v,
            temperature_c: self.temperature_c,
            ..UpsReading::default()
        }
    }
}

/// A `QBV` battery reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Battery {
    /// Battery voltage, V.
    pub voltage_v: Option<f64>,
    /// Battery packs in series.
    pub packs_series: Option<u32>,
    /// Battery packs in parallel.
    pub packs_parallel: Option<u32>,
    /// Charge, %.
    pub charge_pct: Option<f64>,
    /// Runtime left, minutes.
    pub runtime_min: Option<u32>,
}

impl Battery {
    /// The common reading (runtime converted to seconds).
    pub fn reading(&self) -> UpsReading {
        UpsReading {
            battery_voltage_v: self.voltage_v,
            battery_charge_pct: self.charge_pct,
            runtime_s: self.runtime_min.map(|m| m.saturating_mul(60)),
            ..UpsReading::default()
        }
    }
}

/// One reply from a Voltronic UPS.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `QPI`: the protocol id, e.g. `PI00`.
    ProtocolId(String),
    /// `QGS`.
    GeneralStatus(GeneralStatus),
    /// `QMOD`.
    Mode(Mode),
    /// `QBV`.
    Battery(Battery),
    /// A Megatec `Q1` status.
    Q1(megatec::Status),
    /// `(ACK`.
    Ack,
    /// `(NAK`.
    Nak,
}

impl Reply {
    /// The common reading, for the replies that carry one.
    pub fn reading(&self) -> Option<UpsReading> {
        match self {
            Reply::GeneralStatus(s) => Some(s.reading()),
            Reply::Mode(m) => Some(m.reading()),
            Reply::Battery(b) => Some(b.reading()),
            Reply::Q1(s) => Some(s.reading()),
            _ => None,
        }
    }
}

fn parse_general_status(toks: &[&str]) -> Result<GeneralStatus, &'static str> {
    let (last, fields) = toks.split_last().ok_or("QGS reply")?;
    if last.len() != 12 {
        return Err("QGS status characters");
    }
    let status = bits(last).ok_or("QGS status characters")?;
    let num = |i: usize| -> Result<Option<f64>, &'static str> {
        fields.get(i).map_or(Ok(None), |t| opt_f32(t).map_err(|()| "QGS number"))
    };
    Ok(GeneralStatus {
        input_voltage_v: num(0)?,
        input_frequency_hz: num(1)?,
        output_voltage_v: num(2)?,
        output_current_a: num(4)?,
        load_pct: num(5)?,
        battery_voltage_v: num(8)?,
        temperature_c: num(10)?,
        status,
    })
}

fn parse_battery(toks: &[&str]) -> Result<Battery, &'static str> {
    let e = "QBV reply";
    Ok(Battery {
        voltage_v: opt_f32(toks[0]).map_err(|()| e)?,
        packs_series: opt_u32(toks[1]).map_err(|()| e)?,
        packs_parallel: opt_u32(toks[2]).map_err(|()| e)?,
        charge_pct: opt_f32(toks[3]).map_err(|()| e)?,
        runtime_min: opt_u32(toks[4]).map_err(|()| e)?,
    })
}

/// Parse the reply to `query` (a line without its terminator).
pub fn parse_reply(query: Query, line: &str) -> Result<Reply, &'static str> {
    match line {
        "(ACK" => return Ok(Reply::Ack),
        "(NAK" => return Ok(Reply::Nak),
        _ => {}
    }
    let body = line.strip_prefix('(').ok_or("Voltronic reply without '('")?;
    let toks: Vec<&str> = body.split_ascii_whitespace().collect();
    match query {
        Query::ProtocolId if body.starts_with("PI") && body.len() <= 6 => Ok(Reply::ProtocolId(body.to_string())),
        Query::Mode if body.len() == 1 => Ok(Reply::Mode(Mode::from_letter(body.chars().next().unwrap_or('?')))),
        Query::Battery if toks.len() == 5 => parse_battery(&toks).map(Reply::Battery),
        Query::GeneralStatus => parse_general_status(&toks).map(Reply::GeneralStatus),
        Query::Q1 => megatec::parse_status(body).map(Reply::Q1),
        _ => Err("reply does not match the query"),
    }
}

/// Classify and parse a reply whose query is unknown (captures, `decode`).
pub fn parse_any(line: &str) -> Result<Reply, &'static str> {
    let body = line.strip_prefix('(').ok_or("Voltronic reply without '('")?;
    let toks: Vec<&str> = body.split_ascii_whitespace().collect();
    let query = match (toks.len(), toks.last().map(|t| t.len())) {
        _ if body == "ACK" || body == "NAK" => Query::Mode, // handled first by parse_reply
        _ if body.starts_with("PI") => Query::ProtocolId,
        (1, Some(1)) => Query::Mode,
        (5, _) => Query::Battery,
        (8, Some(8)) => Query::Q1,
        (_, Some(12)) => Query::GeneralStatus,
        _ => return Err("unrecognised Voltronic reply"),
    };
    parse_reply(query, line)
}

/// Stateless decoder for a stream of Voltronic replies (see [`parse_any`]).
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Reply;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Reply> {
        decode_line(buf, MAX_LINE, |line, used| {
            if let Some(p) = line.iter().rposition(|&b| b == b'(').filter(|&p| p > 0) {
                return Err(DecodeError::new(ErrorKind::Garbage, p));
            }
            let text = ascii(line).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
            parse_any(text).map(|r| Decoded::Complete(r, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        MAX_LINE + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, StreamEvent};

    fn items(bytes: &[u8]) -> Vec<Reply> {
        decode_all(Decoder, bytes).into_iter().filter_map(StreamEvent::item).collect()
    }

    #[test]
    fn qpi_qmod_ack_nak() {
        assert_eq!(
            items(b"(PI00\r(L\r(B\r(ACK\r(NAK\r"),
            [
                Reply::ProtocolId("PI00".into()),
                Reply::Mode(Mode::Line),
                Reply::Mode(Mode::Battery),
                Reply::Ack,
                Reply::Nak
            ]
        );
        assert_eq!(Mode::Battery.reading().on_battery, Some(true));
        assert_eq!(Mode::Fault.reading().ups_fault, Some(true));
    }

    #[test]
    fn qbv_sample_minutes_become_seconds() {
        let r = items(b"(026.5 02 01 068 255\r");
        let Reply::Battery(b) = &r[0] else { panic!("{r:?}") };
        assert_eq!(b.voltage_v, Some(26.5));
        assert_eq!(b.charge_pct, Some(68.0));
        assert_eq!(b.runtime_min, Some(255));
        assert_eq!(b.reading().runtime_s, Some(255 * 60));
    }

    #[test]
    fn qgs_status_bits() {
        // a1a0 = 10 (online type); b9 on battery; b8 battery low; b0 beeper.
        let r = items(b"(000.0 00.0 229.8 50.0 000.0 035 369.1 356.3 052.7 ---.- 026.5 101100000001\r");
        let Reply::GeneralStatus(s) = &r[0] else { panic!("{r:?}") };
        assert!(s.on_battery() && s.battery_low() && !s.fault());
        assert_eq!(s.load_pct, Some(35.0));
        assert_eq!(s.battery_voltage_v, Some(52.7));
        assert_eq!(s.temperature_c, Some(26.5));
        let on_line = items(b"(234.9 50.0 229.8 50.0 000.0 000 369.1 356.3 052.7 ---.- 026.5 100001000001\r");
        let Reply::GeneralStatus(s) = &on_line[0] else { panic!() };
        assert!(!s.on_battery() && s.fault());
    }

    #[test]
    fn q1_from_a_voltronic_unit() {
        assert!(
            matches!(items(b"(226.0 195.0 226.0 014 49.0 27.5 30.0 10001000\r")[0], Reply::Q1(ref s) if s.bits.utility_fail)
        );
    }

    #[test]
    fn context_aware_parse_rejects_mismatch() {
        assert!(parse_reply(Query::Battery, "(L").is_err());
        assert_eq!(parse_reply(Query::Mode, "(F"), Ok(Reply::Mode(Mode::Fault)));
        assert_eq!(Query::GeneralStatus.as_bytes(), b"QGS\r");
    }

    #[test]
    fn garbage_is_skipped() {
        let ev = decode_all(Decoder, b"zz\x01(L\rhello\r(B\r");
        let got: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Item { item, .. } => Some(item.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(got, [Reply::Mode(Mode::Line), Reply::Mode(Mode::Battery)]);
        assert_eq!(ev.len(), 4);
    }
}
