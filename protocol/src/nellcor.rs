//! Nellcor / Covidien oximeters (N-560, N-595, NPB-290): the ASCII printer/trend stream.
//!
//! After a header (`TIME %SPO2 BPM PA Status`, and on some models a device line with the
//! firmware version and limits), one line per interval:
//! `12-NOV-97 14:00:05 100 120 50` followed by zero or more status codes:
//! AO alarm off · AS alarm silenced · LB low battery · LP loss of pulse · MO motion ·
//! PH/PL pulse high/low · PS pulse search · SH/SL saturation high/low · SD sensor disconnected.
//! `---` for no value. Header and device lines are skipped; any other line is an error.
//!
//! Mapping to the common reading: SD → `sensor_off`; PS and LP → `searching`; MO →
//! `artifact`; PH/PL/SH/SL → `alarm_active`; AS **or AO** → `alarm_silenced` (an alarm switched
//! off at the bedside is as much a reason to tell someone as a silenced one); LB → `low_battery`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::reading::OximeterReading;
use crate::text::{ascii, decode_line, opt_u32};

/// Longest line accepted.
pub const MAX_LINE: usize = 256;

/// A status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    /// `AO`: alarm off.
    AlarmOff,
    /// `AS`: alarm silenced.
    AlarmSilenced,
    /// `LB`: low battery.
    LowBattery,
    /// `LP`: loss of pulse.
    LossOfPulse,
    /// `MO`: motion.
    Motion,
    /// `PH`: pulse high.
    PulseHigh,
    /// `PL`: pulse low.
    PulseLow,
    /// `PS`: pulse search.
    PulseSearch,
    /// `SH`: saturation high.
    SatHigh,
    /// `SL`: saturation low.
    SatLow,
    /// `SD`: sensor disconnected.
    SensorDisconnected,
}

impl StatusCode {
    /// From the two letters on the wire.
    pub fn parse(s: &str) -> Option<StatusCode> {
        Some(match s {
            "AO" => StatusCode::AlarmOff,
            "AS" => StatusCode::AlarmSilenced,
            "LB" => StatusCode::LowBattery,
            "LP" => StatusCode::LossOfPulse,
            "MO" => StatusCode::Motion,
            "PH" => StatusCode::PulseHigh,
            "PL" => StatusCode::PulseLow,
            "PS" => StatusCode::PulseSearch,
            "SH" => StatusCode::SatHigh,
            "SL" => StatusCode::SatLow,
            "SD" => StatusCode::SensorDisconnected,
            _ => return None,
        })
    }

    /// The two letters on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::AlarmOff => "AO",
            StatusCode::AlarmSilenced => "AS",
            StatusCode::LowBattery => "LB",
            StatusCode::LossOfPulse => "LP",
            StatusCode::Motion => "MO",
            StatusCode::PulseHigh => "PH",
            StatusCode::PulseLow => "PL",
            StatusCode::PulseSearch => "PS",
            StatusCode::SatHigh => "SH",
            StatusCode::SatLow => "SL",
            StatusCode::SensorDisconnected => "SD",
        }
    }
}

/// One data line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The device's date and time, as printed.
    pub device_time: String,
    /// SpO2, %.
    pub spo2_pct: Option<u8>,
    /// Pulse rate, bpm.
    pub pulse_bpm: Option<u16>,
    /// Pulse amplitude (device units).
    pub pulse_amplitude: Option<u16>,
    /// Status codes on the line.
    pub codes: Vec<StatusCode>,
}

impl Record {
    fn has(&self, c: StatusCode) -> bool {
        self.codes.contains(&c)
    }

    /// The common reading.
    pub fn reading(&self) -> OximeterReading {
        use StatusCode::*;
        OximeterReading {
            spo2_pct: self.spo2_pct,
            pulse_bpm: self.pulse_bpm,
            perfusion_index: None,
            sensor_off: Some(self.has(SensorDisconnected)),
            searching: Some(self.has(PulseSearch) || self.has(LossOfPulse)),
            low_perfusion: None,
            artifact: Some(self.has(Motion)),
            sensor_fault: None,
            alarm_active: Some([PulseHigh, PulseLow, SatHigh, SatLow].iter().any(|&c| self.has(c))),
            alarm_silenced: Some(self.has(AlarmSilenced) || self.has(AlarmOff)),
            low_battery: Some(self.has(LowBattery)),
        }
    }

    /// Encode as the oximeter prints it.
    pub fn encode(&self) -> Vec<u8> {
        use alloc::format;
        let f = |v: Option<u16>| v.map_or_else(|| "---".to_string(), |v| format!("{v:3}"));
        let mut s = format!(
            "{}  {}  {}  {}",
            self.device_time,
            f(self.spo2_pct.map(u16::from)),
            f(self.pulse_bpm),
            f(self.pulse_amplitude)
        );
        for c in &self.codes {
            s.push(' ');
            s.push_str(c.as_str());
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

/// What one line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A data line.
    Data(Record),
    /// A header or device line.
    Header,
}

fn is_date(t: &str) -> bool {
    t.len() >= 7 && t.contains('-') && t.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Parse one line.
pub fn parse_line(line: &str) -> Result<Line, &'static str> {
    let toks: Vec<&str> = line.split_ascii_whitespace().collect();
    match toks.first() {
        Some(&"TIME") => return Ok(Line::Header),
        Some(t) if t.starts_with("N-") || t.starts_with("NPB-") || line.contains("VERSION") => return Ok(Line::Header),
        _ => {}
    }
    if toks.len() < 5 || !is_date(toks[0]) || !toks[1].contains(':') {
        return Err("Nellcor data line");
    }
    let v = |i: usize| opt_u32(toks[i]).map_err(|()| "Nellcor value");
    let mut codes = Vec::new();
    for t in &toks[5..] {
        codes.push(StatusCode::parse(t).ok_or("Nellcor status code")?);
    }
    Ok(Line::Data(Record {
        device_time: [toks[0], " ", toks[1]].concat(),
        spo2_pct: v(2)?.map(|x| x.min(255) as u8),
        pulse_bpm: v(3)?.map(|x| x.min(999) as u16),
        pulse_amplitude: v(4)?.map(|x| x.min(999) as u16),
        codes,
    }))
}

/// Decoder for a Nellcor ASCII stream; header lines are consumed without an item.
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Record;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Record> {
        decode_line(buf, MAX_LINE, |line, used| {
            let text = ascii(line).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
            match parse_line(text) {
                Ok(Line::Data(r)) => Ok(Decoded::Complete(r, used)),
                Ok(Line::Header) => Ok(Decoded::Progress(used)),
                Err(what) => Err(DecodeError::malformed(what, used)),
            }
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

    #[test]
    fn sample_with_header() {
        let input = b"N-595   VERSION 1.51.00  CRC:XXXX\r\nTIME %SPO2 BPM PA Status\r\n12-NOV-97 14:00:05 100 120 50\r\n12-NOV-97 14:00:07 --- --- --- SD\r\n12-NOV-97 14:00:09  86 165 30 SL AS MO\r\n";
        let r: Vec<_> = decode_all(Decoder, input).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].spo2_pct, r[0].pulse_bpm, r[0].pulse_amplitude), (Some(100), Some(120), Some(50)));
        assert_eq!(r[0].device_time, "12-NOV-97 14:00:05");
        assert_eq!((r[1].spo2_pct, r[1].pulse_bpm), (None, None));
        assert_eq!(r[1].reading().sensor_off, Some(true));
        let alarm = r[2].reading();
        assert_eq!((alarm.alarm_active, alarm.alarm_silenced, alarm.artifact), (Some(true), Some(true), Some(true)));
    }

    #[test]
    fn alarm_off_counts_as_silenced() {
        let Line::Data(r) = parse_line("12-NOV-97 14:00:05 88 120 50 AO LB").unwrap() else { panic!() };
        assert_eq!(r.reading().alarm_silenced, Some(true));
        assert_eq!(r.reading().low_battery, Some(true));
    }

    #[test]
    fn bad_lines() {
        assert!(parse_line("12-NOV-97 14:00:05 100 120 50 XX").is_err());
        assert!(parse_line("hello").is_err());
        assert!(parse_line("12-NOV-97 14:00:05 1O0 120 50").is_err());
    }

    #[test]
    fn encode_round_trip() {
        let r = Record {
            device_time: "22-NOV-26 01:02:03".into(),
            spo2_pct: Some(87),
            pulse_bpm: None,
            pulse_amplitude: Some(12),
            codes: alloc::vec![StatusCode::SatLow, StatusCode::AlarmSilenced],
        };
        let back: Vec<_> = decode_all(Decoder, &r.encode()).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(back, [r]);
    }
}
