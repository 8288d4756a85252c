//! `mamori-agent decode`: read a capture of a device's serial output (or a `upsd` session)
//! and print one JSON object per decoded reading, one per line.
//!
//! - Every object has `type` (`ups`, `oximeter`, `ups_rating`, `ups_identity`, `nut_error`,
//!   `bridge_frame`, ...) and `offset` (the byte offset of its frame in the input).
//! - Readings use the field names of `docs/mqtt.md`; a value the device did not report is
//!   `null`, never 0.
//! - Bytes that do not decode are reported on stderr as `offset N: reason` and skipped;
//!   decoding goes on. The input is read in chunks and decoded as it arrives, so a live port
//!   can be piped in (`cat /dev/ttyUSB0 | mamori-agent decode --format megatec`).

use std::io::{self, Read, Write};

use clap::ValueEnum;
use mamori_protocol::codec::{Decoder, Stream, StreamEvent};
use mamori_protocol::reading::{OximeterReading, UpsReading};
use mamori_protocol::{apc, bridge, masimo, megatec, nellcor, nonin, nut, voltronic};
use serde_json::{json, Map, Value};

use crate::config::{OximeterProtocol, UpsProtocol};
use crate::devices::{OximeterRecord, UpsReply};

/// The formats `decode` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Megatec Q1 UPS replies.
    Megatec,
    /// Voltronic dialect UPS replies.
    Voltronic,
    /// APC Smart protocol.
    Apc,
    /// A Network UPS Tools server (upsd) session.
    Nut,
    /// Masimo ASCII 1.
    Masimo,
    /// Nonin ASCII (`SPO2=... HR=...`).
    NoninAscii,
    /// Nonin data format #2.
    #[value(name = "nonin-2")]
    Nonin2,
    /// Nonin data format #7.
    #[value(name = "nonin-7")]
    Nonin7,
    /// Nonin data format #8.
    #[value(name = "nonin-8")]
    Nonin8,
    /// Nellcor / Covidien ASCII.
    Nellcor,
    /// mamori's sensor-bridge frames.
    Bridge,
}

/// What a decoding run saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Readings printed.
    pub readings: u64,
    /// Undecodable stretches reported.
    pub errors: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// A decoded item as the JSON `decode` prints.
pub trait ToJson {
    /// The object, without `offset`.
    fn to_json(&self) -> Map<String, Value>;
}

fn object(kind: &str, body: impl serde::Serialize) -> Map<String, Value> {
    let mut m = match serde_json::to_value(body) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    m.insert("type".into(), kind.into());
    m
}

fn ups(r: &UpsReading) -> Map<String, Value> {
    object("ups", r)
}

fn oximeter(r: &OximeterReading) -> Map<String, Value> {
    object("oximeter", r)
}

impl ToJson for megatec::Reply {
    fn to_json(&self) -> Map<String, Value> {
        match self {
            megatec::Reply::Status(s) => ups(&s.reading()),
            megatec::Reply::Rating(r) => object(
                "ups_rating",
                json!({"rated_voltage_v": r.voltage_v, "rated_current_a": r.current_a,
                       "nominal_battery_voltage_v": r.battery_voltage_v, "rated_frequency_hz": r.frequency_hz}),
            ),
            megatec::Reply::Info(i) => {
                object("ups_identity", json!({"company": i.company, "model": i.model, "version": i.version}))
            }
            megatec::Reply::Echo(c) => object("ups_unknown_command", json!({"command": c})),
        }
    }
}

impl ToJson for voltronic::Reply {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = match self.reading() {
            Some(r) => ups(&r),
            None => match self {
                voltronic::Reply::ProtocolId(p) => object("ups_protocol", json!({"protocol": p})),
                voltronic::Reply::Ack => object("ups_command_reply", json!({"accepted": true})),
                _ => object("ups_command_reply", json!({"accepted": false})),
            },
        };
        if let voltronic::Reply::Mode(mode) = self {
            m.insert("mode".into(), format!("{mode:?}").to_lowercase().into());
        }
        m
    }
}

impl ToJson for apc::Reply {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = match self.reading() {
            Some(r) => ups(&r),
            None if *self == apc::Reply::SmartMode => object("ups_smart_mode", json!({})),
            None => object("ups_not_available", json!({})),
        };
        if let apc::Reply::Notification(n) = self {
            let name = match n {
                apc::Notification::LineFail => "line_fail",
                apc::Notification::LineRestored => "line_restored",
                apc::Notification::LowBattery => "low_battery",
                apc::Notification::LowBatteryCleared => "low_battery_cleared",
                apc::Notification::ReplaceBattery => "replace_battery",
            };
            m.insert("notification".into(), name.into());
        }
        m
    }
}

impl ToJson for nut::Output {
    fn to_json(&self) -> Map<String, Value> {
        match self {
            nut::Output::Reading { ups: name, reading, .. } => {
                let mut m = ups(reading);
                m.insert("ups_name".into(), name.clone().into());
                m
            }
            nut::Output::Error(code) => object("nut_error", json!({"error": code.as_str()})),
        }
    }
}

impl ToJson for masimo::Record {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = oximeter(&self.reading());
        m.insert("device_time".into(), json!(self.device_time));
        m
    }
}

impl ToJson for nonin::AsciiRecord {
    fn to_json(&self) -> Map<String, Value> {
        oximeter(&self.reading())
    }
}

impl ToJson for nonin::Packet {
    fn to_json(&self) -> Map<String, Value> {
        oximeter(&self.reading())
    }
}

impl ToJson for nonin::Format8 {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = oximeter(&self.reading());
        m.insert("smartpoint".into(), self.smartpoint().into());
        m
    }
}

impl ToJson for nellcor::Record {
    fn to_json(&self) -> Map<String, Value> {
        let mut m = oximeter(&self.reading());
        m.insert("device_time".into(), self.device_time.clone().into());
        m.insert("status_codes".into(), self.codes.iter().map(|c| c.as_str()).collect::<Vec<_>>().into());
        m
    }
}

impl ToJson for bridge::Frame {
    fn to_json(&self) -> Map<String, Value> {
        object("bridge_frame", self)
    }
}

fn run_with<D, R, O, E>(decoder: D, mut input: R, out: &mut O, err: &mut E) -> io::Result<Summary>
where
    D: Decoder,
    D::Item: ToJson,
    R: Read,
    O: Write,
    E: Write,
{
    let mut stream = Stream::new(decoder);
    let mut summary = Summary::default();
    let mut chunk = [0u8; 4096];
    let emit = |ev: StreamEvent<D::Item>, summary: &mut Summary, out: &mut O, err: &mut E| -> io::Result<()> {
        match ev {
            StreamEvent::Item { item, offset } => {
                let mut m = item.to_json();
                m.insert("offset".into(), offset.into());
                serde_json::to_writer(&mut *out, &Value::Object(m))?;
                out.write_all(b"\n")?;
                summary.readings += 1;
            }
            StreamEvent::Error { error, offset } => {
                writeln!(err, "offset {offset}: {error}")?;
                summary.errors += 1;
            }
        }
        Ok(())
    };
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        summary.bytes += n as u64;
        stream.push(&chunk[..n]);
        while let Some(ev) = stream.next_event() {
            emit(ev, &mut summary, out, err)?;
        }
        out.flush()?;
    }
    if let Some(ev) = stream.finish() {
        emit(ev, &mut summary, out, err)?;
    }
    out.flush()?;
    Ok(summary)
}

impl ToJson for UpsReply {
    fn to_json(&self) -> Map<String, Value> {
        match self {
            UpsReply::Megatec(r) => r.to_json(),
            UpsReply::Voltronic(r) => r.to_json(),
            UpsReply::Apc(r) => r.to_json(),
        }
    }
}

impl ToJson for OximeterRecord {
    fn to_json(&self) -> Map<String, Value> {
        match self {
            OximeterRecord::Masimo(r) => r.to_json(),
            OximeterRecord::NoninAscii(r) => r.to_json(),
            OximeterRecord::NoninPacket(r) => r.to_json(),
            OximeterRecord::Nonin8(r) => r.to_json(),
            OximeterRecord::Nellcor(r) => r.to_json(),
        }
    }
}

/// Decode `input` as `format`, writing JSON lines to `out` and errors to `err`. The UPS and
/// oximeter formats go through the same decoders as the service ([`crate::devices`]).
pub fn run<R: Read, O: Write, E: Write>(format: Format, input: R, out: &mut O, err: &mut E) -> io::Result<Summary> {
    use OximeterProtocol as Ox;
    match format {
        Format::Megatec => run_with(UpsProtocol::Megatec.decoder(), input, out, err),
        Format::Voltronic => run_with(UpsProtocol::Voltronic.decoder(), input, out, err),
        Format::Apc => run_with(UpsProtocol::Apc.decoder(), input, out, err),
        Format::Nut => run_with(nut::ReadingDecoder::default(), input, out, err),
        Format::Masimo => run_with(Ox::Masimo.decoder(), input, out, err),
        Format::NoninAscii => run_with(Ox::NoninAscii.decoder(), input, out, err),
        Format::Nonin2 => run_with(Ox::Nonin2.decoder(), input, out, err),
        Format::Nonin7 => run_with(Ox::Nonin7.decoder(), input, out, err),
        Format::Nonin8 => run_with(Ox::Nonin8.decoder(), input, out, err),
        Format::Nellcor => run_with(Ox::Nellcor.decoder(), input, out, err),
        Format::Bridge => run_with(bridge::Decoder, input, out, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(format: Format, input: &[u8]) -> (Vec<Value>, String, Summary) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let s = run(format, input, &mut out, &mut err).unwrap();
        let lines = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines, String::from_utf8(err).unwrap(), s)
    }

    #[test]
    fn megatec_sample_with_null_for_no_value() {
        let (v, err, s) = decode(Format::Megatec, b"(230.0 230.0 230.0 @@@ 50.0 27.5 30.0 10000000\r");
        assert_eq!(err, "");
        assert_eq!(s.readings, 1);
        assert_eq!(v[0]["type"], "ups");
        assert_eq!(v[0]["on_battery"], true);
        assert_eq!(v[0]["load_pct"], Value::Null);
        assert_eq!(v[0]["battery_charge_pct"], Value::Null);
        assert_eq!(v[0]["input_voltage_v"], 230.0);
        assert_eq!(v[0]["offset"], 0);
    }

    #[test]
    fn errors_carry_offsets_and_decoding_goes_on() {
        let (v, err, s) = decode(Format::Masimo, b"SPO2=097% BPM=080\r\nzzz\r\nSPO2=---% BPM=--- EXC=000021\r\n");
        assert_eq!(s.errors, 1);
        assert!(err.starts_with("offset 19: malformed"), "{err}");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["spo2_pct"], Value::Null);
        assert_eq!(v[1]["sensor_off"], true);
    }
}
