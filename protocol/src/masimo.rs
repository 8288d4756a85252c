//! Masimo "ASCII 1" serial output (Rad-8, Radical-5/7, Rad-97).
//!
//! RS-232 9600 8N1, one line a second ending `\r\n`, for example:
//! `02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800`
//!
//! The line is parsed as `KEY=value` pairs, not columns: widths and the set of keys vary by
//! model. A value made only of `-`, `+`, `.` means "no value". `ALARM` and `EXC` are hex.
//!
//! `EXC` bits: 0x001 no sensor · 0x002 defective sensor · 0x004 low perfusion · 0x008 pulse
//! search · 0x010 interference · 0x020 sensor off · 0x040 ambient light · 0x080 unrecognised
//! sensor · 0x400 low signal IQ · 0x800 normal operation (SET).
//! `ALARM` bits: 0x01 SpO2 high · 0x02 SpO2 low · 0x04 pulse high · 0x08 pulse low ·
//! 0x10 alarm active · 0x20 alarm silenced · 0x40 low battery.
//! A silenced bedside alarm is a reason to tell someone remotely, not to stay quiet.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::reading::OximeterReading;
use crate::text::{ascii, decode_line, is_no_value, opt_f32, opt_u32};

/// Longest line accepted.
pub const MAX_LINE: usize = 512;

/// `EXC` bits.
pub mod exc {
    /// No sensor connected.
    pub const NO_SENSOR: u32 = 0x001;
    /// Defective sensor.
    pub const DEFECTIVE_SENSOR: u32 = 0x002;
    /// Low perfusion.
    pub const LOW_PERFUSION: u32 = 0x004;
    /// Searching for a pulse.
    pub const PULSE_SEARCH: u32 = 0x008;
    /// Interference detected.
    pub const INTERFERENCE: u32 = 0x010;
    /// Sensor off the patient.
    pub const SENSOR_OFF: u32 = 0x020;
    /// Too much ambient light.
    pub const AMBIENT_LIGHT: u32 = 0x040;
    /// Unrecognised sensor.
    pub const UNRECOGNISED_SENSOR: u32 = 0x080;
    /// Low signal IQ.
    pub const LOW_SIGNAL_IQ: u32 = 0x400;
    /// Normal operation (SET).
    pub const NORMAL: u32 = 0x800;
}

/// `ALARM` bits.
pub mod alarm {
    /// SpO2 above the high limit.
    pub const SPO2_HIGH: u32 = 0x01;
    /// SpO2 below the low limit.
    pub const SPO2_LOW: u32 = 0x02;
    /// Pulse above the high limit.
    pub const PULSE_HIGH: u32 = 0x04;
    /// Pulse below the low limit.
    pub const PULSE_LOW: u32 = 0x08;
    /// An alarm is sounding.
    pub const ACTIVE: u32 = 0x10;
    /// The alarm was silenced at the bedside.
    pub const SILENCED: u32 = 0x20;
    /// The oximeter's battery is low.
    pub const LOW_BATTERY: u32 = 0x40;
}

/// One Masimo line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// The device's own date and time, as printed (the device clock is not trusted).
    pub device_time: Option<String>,
    /// `SN`: serial number.
    pub serial: Option<String>,
    /// `SPO2`, %.
    pub spo2_pct: Option<u8>,
    /// `BPM`.
    pub pulse_bpm: Option<u16>,
    /// `PI`, %.
    pub perfusion_index: Option<f64>,
    /// `ALARM` bits.
    pub alarm: Option<u32>,
    /// `EXC` bits.
    pub exception: Option<u32>,
}

impl Record {
    /// The common reading. Flags are `None` when the line had no `EXC` / `ALARM` field.
    pub fn reading(&self) -> OximeterReading {
        let e = |bits: u32| self.exception.map(|x| x & bits != 0);
        let a = |bits: u32| self.alarm.map(|x| x & bits != 0);
        OximeterReading {
            spo2_pct: self.spo2_pct,
            pulse_bpm: self.pulse_bpm,
            perfusion_index: self.perfusion_index,
            sensor_off: e(exc::NO_SENSOR | exc::SENSOR_OFF),
            searching: e(exc::PULSE_SEARCH),
            low_perfusion: e(exc::LOW_PERFUSION),
            artifact: e(exc::INTERFERENCE | exc::AMBIENT_LIGHT),
            sensor_fault: e(exc::DEFECTIVE_SENSOR | exc::UNRECOGNISED_SENSOR),
            alarm_active: a(alarm::ACTIVE),
            alarm_silenced: a(alarm::SILENCED),
            low_battery: a(alarm::LOW_BATTERY),
        }
    }

    /// Encode as the oximeter prints it (for the simulated oximeter).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        if let Some(t) = &self.device_time {
            s.push_str(t);
            s.push(' ');
        }
        if let Some(sn) = &self.serial {
            let _ = write!(s, "SN={sn} ");
        }
        match self.spo2_pct {
            Some(v) => {
                let _ = write!(s, "SPO2={v:03}% ");
            }
            None => s.push_str("SPO2=---% "),
        }
        match self.pulse_bpm {
            Some(v) => {
                let _ = write!(s, "BPM={v:03} ");
            }
            None => s.push_str("BPM=--- "),
        }
        match self.perfusion_index {
            Some(v) => {
                let _ = write!(s, "PI={v:05.2}% ");
            }
            None => s.push_str("PI=--.--% "),
        }
        s.push_str("SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ");
        let _ =
            write!(s, "ALARM={:04X} EXC={:06X}\r\n", self.alarm.unwrap_or(0), self.exception.unwrap_or(exc::NORMAL));
        s.into_bytes()
    }
}

fn hex(v: &str) -> Result<Option<u32>, ()> {
    if is_no_value(v) {
        return Ok(None);
    }
    u32::from_str_radix(v, 16).map(Some).map_err(|_| ())
}

/// Parse one line (without terminator).
pub fn parse_line(line: &str) -> Result<Record, &'static str> {
    let mut rec = Record::default();
    let mut time = Vec::new();
    let mut seen_vital = false;
    for tok in line.split_ascii_whitespace() {
        let Some((key, value)) = tok.split_once('=') else {
            if rec.serial.is_none() && rec.spo2_pct.is_none() && !seen_vital {
                time.push(tok);
            }
            continue;
        };
        let v = value.trim_end_matches('%');
        match key {
            "SN" => rec.serial = Some(v.to_string()),
            "SPO2" => {
                seen_vital = true;
                rec.spo2_pct = opt_u32(v).map_err(|()| "Masimo SPO2")?.map(|x| x.min(255) as u8);
            }
            "BPM" => {
                seen_vital = true;
                rec.pulse_bpm = opt_u32(v).map_err(|()| "Masimo BPM")?.map(|x| x.min(u16::MAX as u32) as u16);
            }
            "PI" => rec.perfusion_index = opt_f32(v).map_err(|()| "Masimo PI")?,
            "ALARM" => rec.alarm = hex(v).map_err(|()| "Masimo ALARM")?,
            "EXC" => rec.exception = hex(v).map_err(|()| "Masimo EXC")?,
            _ => {} // SPCO, SPMET, DESAT, PIDELTA and keys of other models
        }
    }
    if !seen_vital {
        return Err("Masimo line without SPO2 or BPM");
    }
    if !time.is_empty() {
        rec.device_time = Some(time.join(" "));
    }
    Ok(rec)
}

/// Decoder for a Masimo ASCII 1 stream.
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Record;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Record> {
        decode_line(buf, MAX_LINE, |line, used| {
            let text = ascii(line).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
            parse_line(text).map(|r| Decoded::Complete(r, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        MAX_LINE + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, StreamEvent};

    const SAMPLE: &[u8] = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n";

    #[test]
    fn sample() {
        let r: Vec<_> = decode_all(Decoder, SAMPLE).into_iter().filter_map(StreamEvent::item).collect();
        let rec = &r[0];
        assert_eq!(rec.device_time.as_deref(), Some("02/22/16 22:47:45"));
        assert_eq!(rec.serial.as_deref(), Some("0000056661"));
        assert_eq!(rec.spo2_pct, Some(98));
        assert_eq!(rec.pulse_bpm, Some(97));
        assert_eq!(rec.perfusion_index, Some(3.6));
        let reading = rec.reading();
        assert_eq!(reading.sensor_off, Some(false));
        assert_eq!(reading.alarm_silenced, Some(false));
    }

    #[test]
    fn no_values_and_silenced_alarm() {
        let rec = parse_line("SPO2=---% BPM=--- PI=--.--% ALARM=0032 EXC=000021").unwrap();
        assert_eq!(rec.spo2_pct, None);
        assert_eq!(rec.pulse_bpm, None);
        assert_eq!(rec.perfusion_index, None);
        let r = rec.reading();
        assert_eq!(r.sensor_off, Some(true));
        assert_eq!(r.alarm_active, Some(true));
        assert_eq!(r.alarm_silenced, Some(true));
        assert_eq!(r.low_battery, Some(false));
    }

    #[test]
    fn other_widths_and_keys() {
        let rec = parse_line("SPO2=85 BPM=142 PI=0.4 NEWKEY=7 EXC=0808").unwrap();
        assert_eq!((rec.spo2_pct, rec.pulse_bpm), (Some(85), Some(142)));
        assert_eq!(rec.reading().searching, Some(true));
        assert_eq!(rec.reading().alarm_active, None);
    }

    #[test]
    fn garbage_and_junk_values() {
        assert!(parse_line("hello there").is_err());
        assert!(parse_line("SPO2=9x% BPM=097").is_err());
        let ev = decode_all(Decoder, b"\x00\x01garbage\r\nnoise line\r\nSPO2=097% BPM=080\r\n");
        assert_eq!(ev.iter().filter(|e| matches!(e, StreamEvent::Error { .. })).count(), 2);
        assert!(matches!(ev.last(), Some(StreamEvent::Item { item, .. }) if item.spo2_pct == Some(97)));
    }

    #[test]
    fn encode_round_trip() {
        let rec = Record {
            device_time: Some("11/22/26 01:02:03".into()),
            serial: Some("0000000042".into()),
            spo2_pct: Some(88),
            pulse_bpm: Some(121),
            perfusion_index: Some(1.25),
            alarm: Some(alarm::ACTIVE | alarm::SPO2_LOW),
            exception: Some(exc::NORMAL),
        };
        assert_eq!(parse_line(core::str::from_utf8(&rec.encode()).unwrap().trim_end()), Ok(rec));
    }
}
