//! Nonin pulse oximeters: the ASCII output, and serial data formats #2, #7 and #8.
//!
//! - **ASCII**: `SPO2=XXX HR=YYY` once a second; `---` for no value.
//! - **#2** (9600 8N1): 75 frames/s, 25 frames a packet. Frame = `01 STATUS PLETH FLOAT CHK`,
//!   CHK = sum of the first four bytes mod 256.
//! - **#7**: the same frame without the leading `01` and with a 16-bit pleth:
//!   `STATUS PLETH_MSB PLETH_LSB FLOAT CHK`, CHK = sum of the first four bytes mod 256.
//!   (Check the pleth width against the unit's manual; the checksum rejects a wrong guess.)
//! - STATUS: bit7 always 1 · bit6 sensor disconnected · bit5 artifact · bit4 out of track ·
//!   bit3 sensor alarm · bits2–1 perfusion (01 green, 10 red, 11 yellow) · bit0 SYNC (frame 1
//!   of a packet). FLOAT by frame index: 0–1 heart rate MSB/LSB
//!   (HR = ((MSB & 3) << 7) | LSB), 2 SpO2, 8 SpO2 for display, 13–14 8-beat heart rate.
//!   Missing: HR 511, SpO2 127.
//! - **#8**: 4 bytes a second. byte0: bit7 set (frame marker, assumed as in #2's STATUS),
//!   0x40 sensor disconnected, 0x20 out of track, 0x10 low perfusion, 0x08 marginal perfusion,
//!   0x04 artifact, bits1–0 = HR bits 8–7; byte1 = HR bits 6–0; byte2 = SpO2; byte3 = 0x20
//!   SmartPoint, 0x08 sensor fault, 0x01 low battery, 0x02 battery critical. Bytes 1–3 have
//!   bit7 clear. The framing is unverified, so a frame is also checked for plausibility
//!   (HR ≤ 300 or 511, SpO2 ≤ 100 or 127) before it is accepted.
//!
//! Formats #2 and #7 yield one [`Packet`] per 25 frames; frames before the first SYNC are
//! used and dropped (decoding starts mid-packet after a plug-in). A checksum error drops the
//! packet under assembly: its values can no longer be trusted.

use alloc::vec::Vec;

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};
use crate::reading::OximeterReading;
use crate::text::{ascii, decode_line, opt_u32};

/// Frames in a #2 / #7 packet.
pub const FRAMES_PER_PACKET: usize = 25;
/// The "no value" heart rate.
pub const HR_MISSING: u16 = 511;
/// The "no value" SpO2.
pub const SPO2_MISSING: u8 = 127;

/// STATUS bits of formats #2 and #7.
pub mod status {
    /// Always set.
    pub const ALWAYS: u8 = 0x80;
    /// Sensor disconnected.
    pub const SENSOR_DISCONNECTED: u8 = 0x40;
    /// Artifact.
    pub const ARTIFACT: u8 = 0x20;
    /// Out of track.
    pub const OUT_OF_TRACK: u8 = 0x10;
    /// Sensor alarm.
    pub const SENSOR_ALARM: u8 = 0x08;
    /// Perfusion bits (2–1).
    pub const PERFUSION_MASK: u8 = 0x06;
    /// Green perfusion.
    pub const PERFUSION_GREEN: u8 = 0x02;
    /// Red perfusion (low).
    pub const PERFUSION_RED: u8 = 0x04;
    /// Yellow perfusion (marginal).
    pub const PERFUSION_YELLOW: u8 = 0x06;
    /// First frame of a packet.
    pub const SYNC: u8 = 0x01;
}

fn hr_from(msb: u8, lsb: u8) -> Option<u16> {
    let hr = (u16::from(msb & 0x03) << 7) | u16::from(lsb & 0x7f);
    (hr != HR_MISSING).then_some(hr)
}

fn spo2_from(b: u8) -> Option<u8> {
    let v = b & 0x7f;
    (v != SPO2_MISSING).then_some(v)
}

/// One ASCII line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsciiRecord {
    /// SpO2, %.
    pub spo2_pct: Option<u8>,
    /// Heart rate, bpm.
    pub pulse_bpm: Option<u16>,
}

impl AsciiRecord {
    /// The common reading.
    pub fn reading(&self) -> OximeterReading {
        OximeterReading { spo2_pct: self.spo2_pct, pulse_bpm: self.pulse_bpm, ..OximeterReading::default() }
    }

    /// Encode as the oximeter prints it.
    pub fn encode(&self) -> Vec<u8> {
        use alloc::format;
        let f = |v: Option<u16>| v.map_or_else(|| "---".into(), |v| format!("{v:03}"));
        format!("SPO2={} HR={}\r\n", f(self.spo2_pct.map(u16::from)), f(self.pulse_bpm)).into_bytes()
    }
}

/// Parse one ASCII line.
pub fn parse_ascii(line: &str) -> Result<AsciiRecord, &'static str> {
    let mut rec = AsciiRecord::default();
    let mut seen = false;
    for (k, v) in line.split_ascii_whitespace().filter_map(|t| t.split_once('=')) {
        let v = v.trim_end_matches('%');
        match k {
            "SPO2" => {
                seen = true;
                rec.spo2_pct = opt_u32(v).map_err(|()| "Nonin SPO2")?.filter(|&x| x != 127).map(|x| x.min(255) as u8);
            }
            "HR" => {
                seen = true;
                rec.pulse_bpm = opt_u32(v).map_err(|()| "Nonin HR")?.filter(|&x| x != 511).map(|x| x.min(999) as u16);
            }
            _ => {}
        }
    }
    if seen {
        Ok(rec)
    } else {
        Err("Nonin ASCII line without SPO2 or HR")
    }
}

/// Decoder for the ASCII output.
#[derive(Debug, Default, Clone)]
pub struct AsciiDecoder;

impl DecoderTrait for AsciiDecoder {
    type Item = AsciiRecord;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<AsciiRecord> {
        decode_line(buf, 128, |line, used| {
            let text = ascii(line).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
            parse_ascii(text).map(|r| Decoded::Complete(r, used)).map_err(|what| DecodeError::malformed(what, used))
        })
    }

    fn max_frame_len(&self) -> usize {
        130
    }
}

/// A complete #2 / #7 packet: 25 frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The FLOAT byte of each frame.
    pub floats: [u8; FRAMES_PER_PACKET],
    /// STATUS bits set in any frame of the packet.
    pub status_any: u8,
    /// STATUS of the last frame (perfusion is a level, not an event).
    pub status_last: u8,
}

impl Packet {
    /// Heart rate (4-beat average), bpm.
    pub fn pulse_bpm(&self) -> Option<u16> {
        hr_from(self.floats[0], self.floats[1])
    }
    /// SpO2 (4-beat average), %.
    pub fn spo2_pct(&self) -> Option<u8> {
        spo2_from(self.floats[2])
    }
    /// SpO2 formatted for display, %.
    pub fn spo2_display_pct(&self) -> Option<u8> {
        spo2_from(self.floats[8])
    }
    /// 8-beat heart rate, bpm.
    pub fn pulse_8beat_bpm(&self) -> Option<u16> {
        hr_from(self.floats[13], self.floats[14])
    }

    /// The common reading.
    pub fn reading(&self) -> OximeterReading {
        let perf = self.status_last & status::PERFUSION_MASK;
        OximeterReading {
            spo2_pct: self.spo2_display_pct().or(self.spo2_pct()),
            pulse_bpm: self.pulse_bpm(),
            sensor_off: Some(self.status_any & status::SENSOR_DISCONNECTED != 0),
            artifact: Some(self.status_any & status::ARTIFACT != 0),
            searching: Some(self.status_any & status::OUT_OF_TRACK != 0),
            sensor_fault: Some(self.status_any & status::SENSOR_ALARM != 0),
            low_perfusion: Some(perf == status::PERFUSION_RED || perf == status::PERFUSION_YELLOW),
            ..OximeterReading::default()
        }
    }
}

/// Which framed format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Format2,
    Format7,
}

/// Packet assembly shared by #2 and #7.
#[derive(Debug, Clone)]
struct Assembler {
    framing: Framing,
    floats: [u8; FRAMES_PER_PACKET],
    status_any: u8,
    /// Index of the next frame in the packet; `None` until a SYNC frame is seen.
    next: Option<usize>,
}

impl Assembler {
    fn new(framing: Framing) -> Self {
        Self { framing, floats: [0; FRAMES_PER_PACKET], status_any: 0, next: None }
    }

    fn is_start(&self, b: &[u8]) -> bool {
        match self.framing {
            Framing::Format2 => b[0] == 0x01,
            Framing::Format7 => b[0] & 0x80 != 0,
        }
    }

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Packet> {
        const LEN: usize = 5;
        if !self.is_start(buf) {
            // Skip to the next byte that could start a frame.
            let skip = (1..buf.len()).find(|&i| self.is_start(&buf[i..])).unwrap_or(buf.len());
            self.next = None;
            return Err(DecodeError::new(ErrorKind::Garbage, skip));
        }
        if buf.len() < LEN {
            return Ok(Decoded::Incomplete);
        }
        let f = &buf[..LEN];
        let (st, float) = match self.framing {
            Framing::Format2 => (f[1], f[3]),
            Framing::Format7 => (f[0], f[3]),
        };
        let sum = f[..4].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        if st & status::ALWAYS == 0 {
            self.next = None;
            return Err(DecodeError::new(ErrorKind::Garbage, 1));
        }
        if sum != f[4] {
            self.next = None;
            return Err(DecodeError::new(ErrorKind::Checksum { computed: sum.into(), received: f[4].into() }, 1));
        }
        if st & status::SYNC != 0 {
            self.next = Some(0);
            self.status_any = 0;
        }
        let Some(i) = self.next else { return Ok(Decoded::Progress(LEN)) };
        self.floats[i] = float;
        self.status_any |= st;
        if i + 1 == FRAMES_PER_PACKET {
            self.next = None;
            let p = Packet { floats: self.floats, status_any: self.status_any, status_last: st };
            return Ok(Decoded::Complete(p, LEN));
        }
        self.next = Some(i + 1);
        Ok(Decoded::Progress(LEN))
    }
}

/// Decoder for data format #2.
#[derive(Debug, Clone)]
pub struct Format2Decoder(Assembler);

impl Default for Format2Decoder {
    fn default() -> Self {
        Self(Assembler::new(Framing::Format2))
    }
}

impl DecoderTrait for Format2Decoder {
    type Item = Packet;
    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Packet> {
        self.0.decode(buf)
    }
    fn max_frame_len(&self) -> usize {
        5
    }
}

/// Decoder for data format #7.
#[derive(Debug, Clone)]
pub struct Format7Decoder(Assembler);

impl Default for Format7Decoder {
    fn default() -> Self {
        Self(Assembler::new(Framing::Format7))
    }
}

impl DecoderTrait for Format7Decoder {
    type Item = Packet;
    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Packet> {
        self.0.decode(buf)
    }
    fn max_frame_len(&self) -> usize {
        5
    }
}

/// Encode one packet as 25 frames of format #2 (`format7 = false`) or #7, for the simulated
/// oximeter. `status` is applied to every frame; SYNC is set on the first.
pub fn encode_packet(spo2_pct: Option<u8>, pulse_bpm: Option<u16>, status_bits: u8, format7: bool) -> Vec<u8> {
    let hr = pulse_bpm.unwrap_or(HR_MISSING).min(HR_MISSING);
    let spo2 = spo2_pct.unwrap_or(SPO2_MISSING).min(SPO2_MISSING);
    let mut floats = [0u8; FRAMES_PER_PACKET];
    floats[0] = (hr >> 7) as u8 & 0x03;
    floats[1] = (hr & 0x7f) as u8;
    floats[2] = spo2;
    floats[8] = spo2;
    floats[13] = floats[0];
    floats[14] = floats[1];
    let mut out = Vec::with_capacity(FRAMES_PER_PACKET * 5);
    for (i, &float) in floats.iter().enumerate() {
        let st = status::ALWAYS | (status_bits & 0x7e) | u8::from(i == 0);
        let pleth = (i * 10) as u8;
        let head: [u8; 4] = if format7 { [st, 0, pleth, float] } else { [0x01, st, pleth, float] };
        out.extend_from_slice(&head);
        out.push(head.iter().fold(0u8, |a, &b| a.wrapping_add(b)));
    }
    out
}

/// One format #8 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format8 {
    /// The four bytes.
    pub bytes: [u8; 4],
}

impl Format8 {
    /// Heart rate, bpm.
    pub fn pulse_bpm(&self) -> Option<u16> {
        hr_from(self.bytes[0], self.bytes[1])
    }
    /// SpO2, %.
    pub fn spo2_pct(&self) -> Option<u8> {
        spo2_from(self.bytes[2])
    }
    /// SmartPoint measurement.
    pub fn smartpoint(&self) -> bool {
        self.bytes[3] & 0x20 != 0
    }

    /// The common reading.
    pub fn reading(&self) -> OximeterReading {
        let [b0, _, _, b3] = self.bytes;
        OximeterReading {
            spo2_pct: self.spo2_pct(),
            pulse_bpm: self.pulse_bpm(),
            sensor_off: Some(b0 & 0x40 != 0),
            searching: Some(b0 & 0x20 != 0),
            low_perfusion: Some(b0 & 0x18 != 0),
            artifact: Some(b0 & 0x04 != 0),
            sensor_fault: Some(b3 & 0x08 != 0),
            low_battery: Some(b3 & 0x03 != 0),
            ..OximeterReading::default()
        }
    }

    /// Encode a frame (for the simulated oximeter).
    pub fn encode(spo2_pct: Option<u8>, pulse_bpm: Option<u16>, flags0: u8, flags3: u8) -> [u8; 4] {
        let hr = pulse_bpm.unwrap_or(HR_MISSING).min(HR_MISSING);
        let spo2 = spo2_pct.unwrap_or(SPO2_MISSING).min(SPO2_MISSING);
        [0x80 | (flags0 & 0x7c) | ((hr >> 7) as u8 & 0x03), (hr & 0x7f) as u8, spo2, flags3 & 0x7f]
    }
}

/// Decoder for data format #8.
#[derive(Debug, Default, Clone)]
pub struct Format8Decoder;

impl DecoderTrait for Format8Decoder {
    type Item = Format8;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Format8> {
        if buf[0] & 0x80 == 0 {
            let skip = buf.iter().position(|b| b & 0x80 != 0).unwrap_or(buf.len());
            return Err(DecodeError::new(ErrorKind::Garbage, skip));
        }
        if buf.len() < 4 {
            return Ok(Decoded::Incomplete);
        }
        let bytes = [buf[0], buf[1], buf[2], buf[3]];
        if bytes[1..].iter().any(|b| b & 0x80 != 0) {
            return Err(DecodeError::new(ErrorKind::Garbage, 1));
        }
        let f = Format8 { bytes };
        let hr = hr_from(bytes[0], bytes[1]).unwrap_or(0);
        let spo2 = spo2_from(bytes[2]).unwrap_or(0);
        if hr > 300 || spo2 > 100 {
            return Err(DecodeError::malformed("implausible Nonin #8 frame", 1));
        }
        Ok(Decoded::Complete(f, 4))
    }

    fn max_frame_len(&self) -> usize {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_all, StreamEvent};

    #[test]
    fn ascii() {
        let r: Vec<_> = decode_all(AsciiDecoder, b"SPO2=097 HR=072\r\nSPO2=--- HR=---\r\n")
            .into_iter()
            .filter_map(StreamEvent::item)
            .collect();
        assert_eq!(
            r,
            [AsciiRecord { spo2_pct: Some(97), pulse_bpm: Some(72) }, AsciiRecord { spo2_pct: None, pulse_bpm: None }]
        );
        assert_eq!(parse_ascii(core::str::from_utf8(&r[0].encode()).unwrap().trim_end()), Ok(r[0].clone()));
    }

    #[test]
    fn sample_frames_checksums() {
        // `01 81 01 00 83` (SYNC set) and `01 80 01 48 CA` from the spec.
        let mut d = Format2Decoder::default();
        assert_eq!(d.decode(&[0x01, 0x81, 0x01, 0x00, 0x83]), Ok(Decoded::Progress(5)));
        assert_eq!(d.decode(&[0x01, 0x80, 0x01, 0x48, 0xCA]), Ok(Decoded::Progress(5)));
        assert!(matches!(
            d.decode(&[0x01, 0x80, 0x01, 0x48, 0xCB]),
            Err(DecodeError { kind: ErrorKind::Checksum { .. }, skip: 1 })
        ));
    }

    #[test]
    fn format2_packet() {
        let bytes = encode_packet(Some(96), Some(260), status::PERFUSION_GREEN, false);
        let p: Vec<_> =
            decode_all(Format2Decoder::default(), &bytes).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pulse_bpm(), Some(260));
        assert_eq!(p[0].spo2_pct(), Some(96));
        let r = p[0].reading();
        assert_eq!(
            (r.spo2_pct, r.pulse_bpm, r.sensor_off, r.low_perfusion),
            (Some(96), Some(260), Some(false), Some(false))
        );
    }

    #[test]
    fn format2_missing_values_and_disconnected() {
        let bytes = encode_packet(None, None, status::SENSOR_DISCONNECTED | status::PERFUSION_RED, false);
        let p = decode_all(Format2Decoder::default(), &bytes).into_iter().find_map(StreamEvent::item).unwrap();
        let r = p.reading();
        assert_eq!((r.spo2_pct, r.pulse_bpm), (None, None));
        assert_eq!(r.sensor_off, Some(true));
        assert_eq!(r.low_perfusion, Some(true));
    }

    #[test]
    fn format2_mid_packet_start_and_garbage() {
        let one = encode_packet(Some(95), Some(80), 0, false);
        let mut stream = Vec::new();
        stream.extend_from_slice(&one[37..]); // starts mid-frame, mid-packet
        stream.extend_from_slice(b"\xff\xee garbage");
        stream.extend_from_slice(&one);
        stream.extend_from_slice(&one);
        let packets: Vec<_> =
            decode_all(Format2Decoder::default(), &stream).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(packets.len(), 2);
        assert!(packets.iter().all(|p| p.spo2_pct() == Some(95)));
    }

    #[test]
    fn format7_packet() {
        let bytes = encode_packet(Some(88), Some(151), status::ARTIFACT, true);
        let p: Vec<_> =
            decode_all(Format7Decoder::default(), &bytes).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].spo2_pct(), p[0].pulse_bpm()), (Some(88), Some(151)));
        assert_eq!(p[0].reading().artifact, Some(true));
    }

    #[test]
    fn format8_frames() {
        let f = Format8::encode(Some(93), Some(300), 0x04, 0x01);
        let got: Vec<_> = decode_all(Format8Decoder, &f).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(got[0].pulse_bpm(), Some(300));
        assert_eq!(got[0].spo2_pct(), Some(93));
        let r = got[0].reading();
        assert_eq!((r.artifact, r.low_battery, r.sensor_off), (Some(true), Some(true), Some(false)));
        let missing = Format8::encode(None, None, 0x40, 0);
        let r = decode_all(Format8Decoder, &missing).into_iter().find_map(StreamEvent::item).unwrap().reading();
        assert_eq!((r.spo2_pct, r.pulse_bpm, r.sensor_off), (None, None, Some(true)));
        // Implausible SpO2 (120) is rejected, then the stream resyncs on the next frame.
        let mut bad = alloc::vec![0x80, 0x40, 120, 0];
        bad.extend_from_slice(&f);
        let ev = decode_all(Format8Decoder, &bad);
        assert!(matches!(ev.last(), Some(StreamEvent::Item { offset: 4, .. })));
    }
}
