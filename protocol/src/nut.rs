//! The Network UPS Tools server protocol (`upsd`, TCP 3493), as a line codec.
//!
//! One command a line, ending `\n` (a `\r\n` is accepted). Replies used by mamori:
//! - `LIST VAR <ups>` → `BEGIN LIST VAR <ups>`, lines `VAR <ups> <name> "<value>"`,
//!   `END LIST VAR <ups>`;
//! - `GET VAR <ups> <name>` → `VAR <ups> <name> "<value>"`;
//! - `ERR <WORD> [...]`, e.g. `ERR DATA-STALE`, `ERR DRIVER-NOT-CONNECTED`, `ERR UNKNOWN-UPS`.
//!
//! Words are separated by spaces; a word in double quotes may hold spaces, with `\"` and `\\`
//! as escapes. Reading needs no login.
//!
//! [`Decoder`] yields one [`Line`] per line. [`VarCollector`] (pure) gathers a `LIST VAR` reply
//! into one [`UpsReading`]; [`ReadingDecoder`] chains the two for captures and `decode`.
//! `ups.status` tokens are space-separated (OL, OB, LB, HB, RB, CHRG, DISCHRG, BYPASS, CAL,
//! OFF, OVER, TRIM, BOOST, FSD, ALARM); unknown tokens are kept and ignored.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::reading::UpsReading;
use crate::text::{decode_line, opt_f32};

/// Longest line accepted (NUT's own limit for a line is 512 bytes).
pub const MAX_LINE: usize = 512;

/// A command to send to `upsd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `LIST VAR <ups>`.
    ListVar {
        /// The UPS name.
        ups: String,
    },
    /// `GET VAR <ups> <var>`.
    GetVar {
        /// The UPS name.
        ups: String,
        /// The variable.
        var: String,
    },
    /// `LIST UPS`.
    ListUps,
    /// `USERNAME <name>` (for an instant command).
    Username(String),
    /// `PASSWORD <password>`.
    Password(String),
    /// `INSTCMD <ups> <command>`: needs a user with `instcmds` rights in `upsd.users`.
    InstCmd {
        /// The UPS name.
        ups: String,
        /// The command, e.g. `test.battery.start.quick`.
        cmd: String,
    },
}

impl Command {
    /// The line to write, `\n` included, with arguments quoted where they need it.
    pub fn encode(&self) -> String {
        let mut s = match self {
            Command::ListVar { ups } => ["LIST VAR ", &quote(ups)].concat(),
            Command::GetVar { ups, var } => ["GET VAR ", &quote(ups), " ", &quote(var)].concat(),
            Command::ListUps => "LIST UPS".to_string(),
            Command::Username(u) => ["USERNAME ", &quote(u)].concat(),
            Command::Password(p) => ["PASSWORD ", &quote(p)].concat(),
            Command::InstCmd { ups, cmd } => ["INSTCMD ", &quote(ups), " ", &quote(cmd)].concat(),
        };
        s.push('\n');
        s
    }
}

/// Quote a word if it needs it, escaping `"` and `\`.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if plain {
        return word.to_string();
    }
    let mut s = String::with_capacity(word.len() + 2);
    s.push('"');
    for c in word.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Split a line into words, honouring quotes and escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') || chars.peek() == Some(&'\t') {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => word.push(chars.next().ok_or("NUT escape at end of line")?),
                    Some('"') => break,
                    Some(c) => word.push(c),
                    None => return Err("NUT unterminated quote"),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' || c == '\t' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// An `ERR` code from `upsd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// `DATA-STALE`: the driver has not updated the data.
    DataStale,
    /// `DRIVER-NOT-CONNECTED`: upsd has no driver for the UPS.
    DriverNotConnected,
    /// `UNKNOWN-UPS`.
    UnknownUps,
    /// `VAR-NOT-SUPPORTED`.
    VarNotSupported,
    /// `ACCESS-DENIED`.
    AccessDenied,
    /// Any other word.
    Other(String),
}

impl ErrorCode {
    fn parse(word: &str) -> ErrorCode {
        match word {
            "DATA-STALE" => ErrorCode::DataStale,
            "DRIVER-NOT-CONNECTED" => ErrorCode::DriverNotConnected,
            "UNKNOWN-UPS" => ErrorCode::UnknownUps,
            "VAR-NOT-SUPPORTED" => ErrorCode::VarNotSupported,
            "ACCESS-DENIED" => ErrorCode::AccessDenied,
            other => ErrorCode::Other(other.to_string()),
        }
    }

    /// The word on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::DataStale => "DATA-STALE",
            ErrorCode::DriverNotConnected => "DRIVER-NOT-CONNECTED",
            ErrorCode::UnknownUps => "UNKNOWN-UPS",
            ErrorCode::VarNotSupported => "VAR-NOT-SUPPORTED",
            ErrorCode::AccessDenied => "ACCESS-DENIED",
            ErrorCode::Other(s) => s,
        }
    }
}

/// One line from `upsd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `BEGIN LIST <what...>`.
    BeginList(Vec<String>),
    /// `END LIST <what...>`.
    EndList(Vec<String>),
    /// `VAR <ups> <name> <value>`.
    Var {
        /// The UPS name.
        ups: String,
        /// The variable name.
        name: String,
        /// The value, unquoted.
        value: String,
    },
    /// `UPS <name> <description>` (in `LIST UPS`).
    Ups {
        /// The UPS name.
        name: String,
        /// Its description.
        description: String,
    },
    /// `ERR <code>`.
    Err(ErrorCode),
    /// `OK ...`.
    Ok,
}

impl Line {
    /// Encode the line as `upsd` sends it (for tests and a simulated server).
    pub fn encode(&self) -> String {
        let join = |head: &str, rest: &[String]| {
            let mut s = head.to_string();
            for w in rest {
                s.push(' ');
                s.push_str(&quote(w));
            }
            s
        };
        let mut s = match self {
            Line::BeginList(w) => join("BEGIN LIST", w),
            Line::EndList(w) => join("END LIST", w),
            Line::Var { ups, name, value } => {
                let mut s = join("VAR", &[ups.clone(), name.clone()]);
                s.push(' ');
                // Values are always quoted, as upsd does.
                let q = quote(value);
                if q.starts_with('"') {
                    s.push_str(&q);
                } else {
                    s.push('"');
                    s.push_str(&q);
                    s.push('"');
                }
                s
            }
            Line::Ups { name, description } => join("UPS", &[name.clone(), description.clone()]),
            Line::Err(code) => join("ERR", &[code.as_str().to_string()]),
            Line::Ok => "OK".to_string(),
        };
        s.push('\n');
        s
    }
}

/// Parse one line (without its terminator).
pub fn parse_line(text: &str) -> Result<Line, &'static str> {
    let mut w = split_words(text)?;
    let head = w.first().map(String::as_str);
    match (head, w.len()) {
        (Some("BEGIN"), n) if n >= 2 && w[1] == "LIST" => Ok(Line::BeginList(w.split_off(2))),
        (Some("END"), n) if n >= 2 && w[1] == "LIST" => Ok(Line::EndList(w.split_off(2))),
        (Some("VAR"), 4) => {
            let value = w.pop().unwrap_or_default();
            let name = w.pop().unwrap_or_default();
            let ups = w.pop().unwrap_or_default();
            Ok(Line::Var { ups, name, value })
        }
        (Some("UPS"), 3) => {
            let description = w.pop().unwrap_or_default();
            let name = w.pop().unwrap_or_default();
            Ok(Line::Ups { name, description })
        }
        (Some("ERR"), n) if n >= 2 => Ok(Line::Err(ErrorCode::parse(&w[1]))),
        (Some("OK"), _) => Ok(Line::Ok),
        _ => Err("NUT line"),
    }
}

/// Line decoder for a `upsd` connection.
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Line;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Line> {
        decode_line(buf, MAX_LINE, |line, used| {
            let text = core::str::from_utf8(line).map_err(|_| DecodeError::new(ErrorKind::Garbage, used))?;
            parse_line(text).map(|l| Decoded::Complete(l, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        MAX_LINE + 2
    }
}

/// Turn NUT variables into the common reading. Unknown variables are ignored; a value that
/// does not parse is left out (absent, not zero).
pub fn reading_from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> UpsReading {
    let mut r = UpsReading::default();
    for (name, value) in vars {
        let num = || opt_f32(value.trim()).ok().flatten();
        match name {
            "ups.status" => {
                let has = |t: &str| value.split_ascii_whitespace().any(|x| x == t);
                if has("OB") {
                    r.on_battery = Some(true);
                } else if has("OL") {
                    r.on_battery = Some(false);
                }
                r.battery_low = Some(has("LB"));
                r.replace_battery = Some(has("RB"));
                r.bypass_active = Some(has("BYPASS") || has("TRIM") || has("BOOST"));
                r.self_test = Some(has("CAL"));
                r.shutdown_active = Some(has("FSD"));
                r.ups_fault = Some(has("ALARM") || has("OFF"));
            }
            "battery.charge" => r.battery_charge_pct = num(),
            "battery.runtime" => r.runtime_s = num().filter(|v| *v >= 0.0).map(|v| v as u32),
            "battery.voltage" => r.battery_voltage_v = num(),
            "input.voltage" => r.input_voltage_v = num(),
            "output.voltage" => r.output_voltage_v = num(),
            "ups.load" => r.load_pct = num(),
            "ups.temperature" | "battery.temperature" => r.temperature_c = r.temperature_c.or(num()),
            "input.frequency" => r.frequency_hz = num(),
            "ups.beeper.status" => r.beeper_on = Some(value == "enabled"),
            _ => {}
        }
    }
    r
}

/// What a `upsd` conversation yields once lines are gathered.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A complete `LIST VAR` (or a lone `VAR` from `GET VAR`).
    Reading {
        /// The UPS name.
        ups: String,
        /// The reading.
        reading: UpsReading,
        /// The raw variables, in the order received.
        vars: Vec<(String, String)>,
    },
    /// `ERR`.
    Error(ErrorCode),
}

/// Gathers the lines of a `LIST VAR` reply (pure state; feed it [`Line`]s).
#[derive(Debug, Default, Clone)]
pub struct VarCollector {
    open: Option<(String, Vec<(String, String)>)>,
}

impl VarCollector {
    /// Feed one line; returns an output when a reading or an error is complete.
    pub fn push(&mut self, line: Line) -> Option<Output> {
        match line {
            Line::BeginList(w) if w.first().map(String::as_str) == Some("VAR") => {
                self.open = Some((w.get(1).cloned().unwrap_or_default(), Vec::new()));
                None
            }
            Line::Var { ups, name, value } => match &mut self.open {
                Some((open_ups, vars)) if *open_ups == ups => {
                    vars.push((name, value));
                    None
                }
                _ => {
                    let reading = reading_from_vars([(name.as_str(), value.as_str())]);
                    Some(Output::Reading { ups, reading, vars: alloc::vec![(name, value)] })
                }
            },
            Line::EndList(w) if w.first().map(String::as_str) == Some("VAR") => {
                let (ups, vars) = self.open.take()?;
                let reading = reading_from_vars(vars.iter().map(|(n, v)| (n.as_str(), v.as_str())));
                Some(Output::Reading { ups, reading, vars })
            }
            Line::Err(code) => {
                self.open = None;
                Some(Output::Error(code))
            }
            _ => None,
        }
    }
}

/// [`Decoder`] and [`VarCollector`] together: one [`Output`] per complete reply.
#[derive(Debug, Default, Clone)]
pub struct ReadingDecoder {
    lines: Decoder,
    collector: VarCollector,
}

impl DecoderTrait for ReadingDecoder {
    type Item = Output;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Output> {
        Ok(match self.lines.decode(buf)? {
            Decoded::Complete(line, n) => match self.collector.push(line) {
                Some(out) => Decoded::Complete(out, n),
                None => Decoded::Progress(n),
            },
            Decoded::Progress(n) => Decoded::Progress(n),
            Decoded::Incomplete => Decoded::Incomplete,
        })
    }

    fn max_frame_len(&self) -> usize {
        self.lines.max_frame_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, StreamEvent};

    const LIST: &[u8] = b"BEGIN LIST VAR ups\n\
VAR ups battery.charge \"100\"\n\
VAR ups battery.runtime \"1830\"\n\
VAR ups battery.voltage \"13.60\"\n\
VAR ups input.voltage \"229.0\"\n\
VAR ups ups.load \"23\"\n\
VAR ups ups.status \"OB LB DISCHRG\"\n\
VAR ups device.mfr \"Mamori \\\"Sim\\\" Works\"\n\
END LIST VAR ups\n";

    #[test]
    fn list_var_becomes_one_reading() {
        let out: Vec<_> =
            decode_all(ReadingDecoder::default(), LIST).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(out.len(), 1);
        let Output::Reading { ups, reading, vars } = &out[0] else { panic!() };
        assert_eq!(ups, "ups");
        assert_eq!(reading.on_battery, Some(true));
        assert_eq!(reading.battery_low, Some(true));
        assert_eq!(reading.battery_charge_pct, Some(100.0));
        assert_eq!(reading.runtime_s, Some(1830));
        assert_eq!(reading.load_pct, Some(23.0));
        assert_eq!(vars[6].1, "Mamori \"Sim\" Works");
    }

    #[test]
    fn get_var_and_errors() {
        let out: Vec<_> = decode_all(
            ReadingDecoder::default(),
            b"VAR ups ups.status \"OL\"\r\nERR DATA-STALE\nERR DRIVER-NOT-CONNECTED\nERR UNKNOWN-UPS\nERR SOMETHING-NEW\n",
        )
        .into_iter()
        .filter_map(StreamEvent::item)
        .collect();
        assert!(matches!(&out[0], Output::Reading { reading, .. } if reading.on_battery == Some(false)));
        assert_eq!(out[1], Output::Error(ErrorCode::DataStale));
        assert_eq!(out[2], Output::Error(ErrorCode::DriverNotConnected));
        assert_eq!(out[3], Output::Error(ErrorCode::UnknownUps));
        assert_eq!(out[4], Output::Error(ErrorCode::Other("SOMETHING-NEW".into())));
    }

    #[test]
    fn quoting_and_escapes() {
        assert_eq!(split_words(r#"VAR ups x "a \"b\" \\ c""#).unwrap(), ["VAR", "ups", "x", r#"a "b" \ c"#]);
        assert!(split_words(r#"VAR ups x "open"#).is_err());
        assert_eq!(quote("my ups"), "\"my ups\"");
        assert_eq!(
            Command::GetVar { ups: "ups".into(), var: "ups.status".into() }.encode(),
            "GET VAR ups ups.status\n"
        );
        assert_eq!(Command::ListVar { ups: "a b".into() }.encode(), "LIST VAR \"a b\"\n");
    }

    #[test]
    fn line_encode_round_trip() {
        for l in [
            Line::BeginList(alloc::vec!["VAR".into(), "ups".into()]),
            Line::Var { ups: "ups".into(), name: "device.model".into(), value: "a \"q\" \\ b".into() },
            Line::Var { ups: "ups".into(), name: "ups.status".into(), value: "OL".into() },
            Line::Err(ErrorCode::DataStale),
            Line::Ups { name: "ups".into(), description: "Sim UPS".into() },
        ] {
            assert_eq!(parse_line(l.encode().trim_end()), Ok(l));
        }
    }

    #[test]
    fn unknown_status_tokens_and_bad_numbers() {
        let r = reading_from_vars([("ups.status", "OL CHRG WEIRD"), ("battery.charge", "n/a")]);
        assert_eq!(r.on_battery, Some(false));
        assert_eq!(r.battery_charge_pct, None);
    }

    #[test]
    fn garbage_lines_are_errors_not_readings() {
        let ev = decode_all(ReadingDecoder::default(), b"\xff\xfe\nhello world\nVAR ups ups.status \"OB\"\n");
        assert_eq!(ev.iter().filter(|e| matches!(e, StreamEvent::Error { .. })).count(), 2);
    }
}
