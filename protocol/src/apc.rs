//! APC "Smart" UPS protocol (2400 8N1).
//!
//! Commands are single characters with no terminator: send `Y` first and the UPS answers `SM`
//! (smart mode). Replies end in `\r\n`:
//! - `Q` → status byte in hex (`08` on line, `10` on battery, `50` on battery + low battery);
//!   bits 0x01 calibration · 0x02 SmartTrim · 0x04 SmartBoost · 0x08 on line · 0x10 on battery ·
//!   0x20 overload · 0x40 battery low · 0x80 replace battery.
//! - `f` → charge % (`099.0`); `j` → runtime **minutes** (`0327:`); `B` → battery V (`27.34`).
//! - `NA` for a value the model does not have.
//!
//! The UPS also sends unrequested single characters at any time between replies:
//! `!` line fail · `$` line restored · `%` low battery · `+` low battery cleared ·
//! `#` replace battery. The decoder reports them as [`Reply::Notification`] so a line failure
//! is seen at once, before the next poll.
//!
//! Replies carry no tag. [`parse_reply`] takes the command that was sent; the stateless
//! [`Decoder`] (for captures) classifies by shape: `SM`, two hex digits, `NNNN:`, `NNN.N`
//! (charge), `NN.NN` or `NN.N` (voltage) do not overlap.

use alloc::vec::Vec;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::reading::UpsReading;
use crate::text::{ascii, decode_line};

/// Longest reply line accepted.
pub const MAX_LINE: usize = 64;

/// A command the host sends (one byte, no terminator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `Y`: enter smart mode.
    SmartMode,
    /// `Q`: status byte.
    Status,
    /// `f`: battery charge %.
    BatteryCharge,
    /// `j`: runtime left, minutes.
    Runtime,
    /// `B`: battery voltage.
    BatteryVoltage,
}

impl Command {
    /// The byte to write.
    pub fn byte(self) -> u8 {
        match self {
            Command::SmartMode => b'Y',
            Command::Status => b'Q',
            Command::BatteryCharge => b'f',
            Command::Runtime => b'j',
            Command::BatteryVoltage => b'B',
        }
    }

    /// The command a byte stands for (for the simulated UPS).
    pub fn from_byte(b: u8) -> Option<Command> {
        [Command::SmartMode, Command::Status, Command::BatteryCharge, Command::Runtime, Command::BatteryVoltage]
            .into_iter()
            .find(|c| c.byte() == b)
    }
}

/// An unrequested character from the UPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// `!`: mains failed, now on battery.
    LineFail,
    /// `$`: mains restored.
    LineRestored,
    /// `%`: battery low.
    LowBattery,
    /// `+`: battery low cleared.
    LowBatteryCleared,
    /// `#`: battery needs replacing.
    ReplaceBattery,
}

impl Notification {
    /// From the byte on the wire.
    pub fn from_byte(b: u8) -> Option<Notification> {
        match b {
            b'!' => Some(Notification::LineFail),
            b'$' => Some(Notification::LineRestored),
            b'%' => Some(Notification::LowBattery),
            b'+' => Some(Notification::LowBatteryCleared),
            b'#' => Some(Notification::ReplaceBattery),
            _ => None,
        }
    }

    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Notification::LineFail => b'!',
            Notification::LineRestored => b'$',
            Notification::LowBattery => b'%',
            Notification::LowBatteryCleared => b'+',
            Notification::ReplaceBattery => b'#',
        }
    }

    /// The common reading this notification implies.
    pub fn reading(self) -> UpsReading {
        let mut r = UpsReading::default();
        match self {
            Notification::LineFail => r.on_battery = Some(true),
            Notification::LineRestored => r.on_battery = Some(false),
            Notification::LowBattery => r.battery_low = Some(true),
            Notification::LowBatteryCleared => r.battery_low = Some(false),
            Notification::ReplaceBattery => r.replace_battery = Some(true),
        }
        r
    }
}

/// The `Q` status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusByte(pub u8);

impl StatusByte {
    /// 0x08: on line.
    pub fn on_line(self) -> bool {
        self.0 & 0x08 != 0
    }
    /// 0x10: on battery.
    pub fn on_battery(self) -> bool {
        self.0 & 0x10 != 0
    }
    /// 0x40: battery low.
    pub fn battery_low(self) -> bool {
        self.0 & 0x40 != 0
    }
    /// 0x80: replace battery.
    pub fn replace_battery(self) -> bool {
        self.0 & 0x80 != 0
    }
    /// 0x02 or 0x04: SmartTrim or SmartBoost.
    pub fn trim_or_boost(self) -> bool {
        self.0 & 0x06 != 0
    }

    /// The common reading.
    pub fn reading(self) -> UpsReading {
        UpsReading {
            on_battery: Some(self.on_battery()),
            battery_low: Some(self.battery_low()),
            replace_battery: Some(self.replace_battery()),
            bypass_active: Some(self.trim_or_boost()),
            self_test: Some(self.0 & 0x01 != 0),
            ..UpsReading::default()
        }
    }
}

/// One reply or notification from an APC Smart UPS.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `SM`: smart mode entered.
    SmartMode,
    /// The `Q` status byte.
    Status(StatusByte),
    /// `f`: charge, %.
    BatteryChargePct(f64),
    /// `j`: runtime left, minutes.
    RuntimeMin(u32),
    /// `B`: battery voltage, V.
    BatteryVoltage(f64),
    /// `NA`: not available on this model.
    NotAvailable,
    /// An unrequested character.
    Notification(Notification),
}

impl Reply {
    /// The common reading, for the replies that carry one.
    pub fn reading(&self) -> Option<UpsReading> {
        let mut r = UpsReading::default();
        match *self {
            Reply::Status(s) => return Some(s.reading()),
            Reply::Notification(n) => return Some(n.reading()),
            Reply::BatteryChargePct(v) => r.battery_charge_pct = Some(v),
            Reply::RuntimeMin(m) => r.runtime_s = Some(m.saturating_mul(60)),
            Reply::BatteryVoltage(v) => r.battery_voltage_v = Some(v),
            Reply::SmartMode | Reply::NotAvailable => return None,
        }
        Some(r)
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `III.F` with `int` integer digits.
fn decimal(line: &str, int: &[usize]) -> Option<f64> {
    let (i, f) = line.split_once('.')?;
    (int.contains(&i.len()) && digits(i) && digits(f) && f.len() <= 2).then(|| line.parse().ok()).flatten()
}

/// Parse the reply to `cmd` (a line without its `\r\n`).
pub fn parse_reply(cmd: Command, line: &str) -> Result<Reply, &'static str> {
    if line == "NA" {
        return Ok(Reply::NotAvailable);
    }
    match cmd {
        Command::SmartMode if line == "SM" => Ok(Reply::SmartMode),
        Command::Status if line.len() == 2 && line.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u8::from_str_radix(line, 16).map(|b| Reply::Status(StatusByte(b))).map_err(|_| "APC status byte")
        }
        Command::Runtime => line
            .strip_suffix(':')
            .filter(|d| digits(d))
            .and_then(|d| d.parse().ok())
            .map(Reply::RuntimeMin)
            .ok_or("APC runtime"),
        Command::BatteryCharge => decimal(line, &[3]).map(Reply::BatteryChargePct).ok_or("APC charge"),
        Command::BatteryVoltage => decimal(line, &[2, 3]).map(Reply::BatteryVoltage).ok_or("APC battery voltage"),
        _ => Err("reply does not match the command"),
    }
}

/// Classify and parse a reply whose command is unknown (captures, `decode`).
pub fn parse_any(line: &str) -> Result<Reply, &'static str> {
    let cmd = if line == "SM" || line == "NA" {
        Command::SmartMode
    } else if line.len() == 2 {
        Command::Status
    } else if line.ends_with(':') {
        Command::Runtime
    } else if line.split_once('.').is_some_and(|(i, _)| i.len() == 3) {
        Command::BatteryCharge
    } else {
        Command::BatteryVoltage
    };
    parse_reply(cmd, line)
}

/// Stateless decoder for a stream from an APC Smart UPS (see [`parse_any`]).
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Reply;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Reply> {
        let blank = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        if blank > 0 {
            return Ok(Decoded::Progress(blank));
        }
        if let Some(n) = buf.first().copied().and_then(Notification::from_byte) {
            return Ok(Decoded::Complete(Reply::Notification(n), 1));
        }
        decode_line(buf, MAX_LINE, |line, used| {
            // An unrequested character can also arrive just before a reply, with no line break.
            if let Some(p) = line.iter().position(|&b| Notification::from_byte(b).is_some()) {
                if p > 0 {
                    return Err(DecodeError::new(ErrorKind::Garbage, p));
                }
            }
            let text = ascii(line).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
            parse_any(text).map(|r| Decoded::Complete(r, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        MAX_LINE + 2
    }
}

/// Encode a reply as the UPS sends it (for the simulated UPS).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    use alloc::format;
    let s = match reply {
        Reply::SmartMode => "SM\r\n".into(),
        Reply::Status(s) => format!("{:02X}\r\n", s.0),
        Reply::BatteryChargePct(v) => format!("{:05.1}\r\n", v.clamp(0.0, 999.9)),
        Reply::RuntimeMin(m) => format!("{:04}:\r\n", (*m).min(9999)),
        Reply::BatteryVoltage(v) => format!("{:05.2}\r\n", v.clamp(0.0, 99.99)),
        Reply::NotAvailable => "NA\r\n".into(),
        Reply::Notification(n) => return alloc::vec![n.byte()],
    };
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, StreamEvent};

    fn items(bytes: &[u8]) -> Vec<Reply> {
        decode_all(Decoder, bytes).into_iter().filter_map(StreamEvent::item).collect()
    }

    #[test]
    fn samples() {
        assert_eq!(
            items(b"SM\r\n08\r\n10\r\n50\r\n099.0\r\n0327:\r\n27.34\r\nNA\r\n"),
            [
                Reply::SmartMode,
                Reply::Status(StatusByte(0x08)),
                Reply::Status(StatusByte(0x10)),
                Reply::Status(StatusByte(0x50)),
                Reply::BatteryChargePct(99.0),
                Reply::RuntimeMin(327),
                Reply::BatteryVoltage(27.34),
                Reply::NotAvailable,
            ]
        );
        assert!(StatusByte(0x50).on_battery() && StatusByte(0x50).battery_low());
        assert!(StatusByte(0x08).on_line() && !StatusByte(0x08).on_battery());
        assert_eq!(Reply::RuntimeMin(327).reading().unwrap().runtime_s, Some(327 * 60));
    }

    #[test]
    fn unrequested_characters_between_and_before_replies() {
        assert_eq!(
            items(b"!08\r\n$%+#"),
            [
                Reply::Notification(Notification::LineFail),
                Reply::Status(StatusByte(0x08)),
                Reply::Notification(Notification::LineRestored),
                Reply::Notification(Notification::LowBattery),
                Reply::Notification(Notification::LowBatteryCleared),
                Reply::Notification(Notification::ReplaceBattery),
            ]
        );
        assert_eq!(Notification::LineFail.reading().on_battery, Some(true));
    }

    #[test]
    fn context_aware() {
        assert_eq!(parse_reply(Command::Status, "10"), Ok(Reply::Status(StatusByte(0x10))));
        assert!(parse_reply(Command::Runtime, "10").is_err());
        assert_eq!(Command::from_byte(b'j'), Some(Command::Runtime));
    }

    #[test]
    fn garbage_resyncs() {
        let ev = decode_all(Decoder, b"\xfe\xfe\r\nzz\r\n10\r\n");
        assert_eq!(ev.iter().filter(|e| matches!(e, StreamEvent::Error { .. })).count(), 2);
        assert_eq!(ev.last().cloned().and_then(StreamEvent::item), Some(Reply::Status(StatusByte(0x10))));
    }

    #[test]
    fn encode_round_trip() {
        for r in [
            Reply::SmartMode,
            Reply::Status(StatusByte(0x50)),
            Reply::BatteryChargePct(99.0),
            Reply::RuntimeMin(327),
            Reply::BatteryVoltage(27.34),
            Reply::Notification(Notification::LineFail),
        ] {
            assert_eq!(items(&encode_reply(&r)), [r]);
        }
    }
}
