//! The sensor-bridge frame: what the bridge microcontroller (or the Pi running the same
//! firmware code) sends over serial.
//!
//! ## Wire format
//! ```text
//! 0x00 · COBS( VERSION:u8 · postcard(Frame) · CRC-32/ISO-HDLC(VERSION · postcard(Frame)), little-endian ) · 0x00
//! ```
//! The leading `0x00` costs one byte and means line noise before a frame can never run into
//! it: the frame always starts right after a delimiter.
//! - **Self-synchronising**: COBS leaves no zero byte inside a frame, so `0x00` always ends
//!   one; a receiver that starts mid-stream drops bytes up to the next `0x00` and is in step.
//! - **Checksummed**: CRC-32 over the version and body; a corrupted frame is dropped whole.
//! - **Versioned**: the first byte is [`VERSION`]; a frame of another version is reported as
//!   [`ErrorKind::UnknownVersion`], not misread.
//! - **Small and allocation-free**: [`Frame`] is `Copy`; [`encode`] writes into a caller's
//!   buffer of [`MAX_ENCODED`] bytes, so the firmware's sampling loop never allocates.
//!
//! postcard encodes integers as varints, so a typical frame is 15–25 bytes on the wire.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, DecodeResult, Decoded, Decoder as DecoderTrait, ErrorKind};

/// The frame format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Largest unencoded body: version + postcard frame + CRC.
pub const MAX_BODY: usize = 64;
/// Largest encoded frame including both `0x00` delimiters.
pub const MAX_ENCODED: usize = MAX_BODY + MAX_BODY / 254 + 3;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Bits of [`Frame::flags`].
pub mod flags {
    /// The monitored battery voltage is under the low threshold (with hysteresis).
    pub const LOW_BATTERY: u16 = 0x0001;
    /// The power monitor reported a math overflow: current and power are not valid.
    pub const POWER_OVERFLOW: u16 = 0x0002;
    /// An alarm pulse on the ventilator contact was latched since the previous frame, even if
    /// the contact is back to normal now.
    pub const ALARM_LATCHED: u16 = 0x0004;
    /// The power monitor did not answer on its bus.
    pub const SENSOR_ERROR: u16 = 0x0008;
    /// The bridge restarted after its watchdog fired.
    pub const WATCHDOG_RESET: u16 = 0x0010;
}

/// Why the frame was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FrameKind {
    /// First frame after the bridge starts.
    Boot,
    /// A regular sample.
    #[default]
    Sample,
    /// Nothing changed; sent so the receiver knows the bridge is alive.
    Heartbeat,
}

/// The ventilator remote-alarm contact, read as a normally-open + normally-closed pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactState {
    /// No alarm (NO open, NC closed).
    Normal,
    /// Alarm (NO closed, NC open).
    Alarm,
    /// Both open or both closed: the cable is cut or miswired.
    CableFault,
}

/// A power-monitor sample (INA219 on the battery / power-station DC side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PowerSample {
    /// Bus voltage, mV.
    pub bus_mv: u16,
    /// Shunt voltage, µV.
    pub shunt_uv: i32,
    /// Current, mA (positive = discharging into the load), when calibrated.
    pub current_ma: Option<i32>,
    /// Power, mW, when calibrated.
    pub power_mw: Option<u32>,
}

/// One bridge frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Frame {
    /// Increments by one per frame, wrapping; a gap means frames were lost.
    pub seq: u32,
    /// Milliseconds since the bridge started (wraps after 49 days).
    pub uptime_ms: u32,
    /// Why it was sent.
    pub kind: FrameKind,
    /// Power monitor sample, if the bridge has one.
    pub power: Option<PowerSample>,
    /// Mains presence from the mains-sense contact, if wired.
    pub mains_present: Option<bool>,
    /// The ventilator's alarm contact pair, if wired.
    pub ventilator: Option<ContactState>,
    /// [`flags`] bits.
    pub flags: u16,
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer is smaller than the encoded frame.
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// Encode `frame` into `out` (at least [`MAX_ENCODED`] bytes is always enough); returns the
/// number of bytes written, both delimiters included.
pub fn encode(frame: &Frame, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut body = [0u8; MAX_BODY];
    body[0] = VERSION;
    let n = postcard::to_slice(frame, &mut body[1..MAX_BODY - 4]).map_err(|_| EncodeError::BufferTooSmall)?.len();
    let crc = CRC.checksum(&body[..1 + n]);
    body[1 + n..5 + n].copy_from_slice(&crc.to_le_bytes());
    *out.first_mut().ok_or(EncodeError::BufferTooSmall)? = 0;
    let len = cobs_encode(&body[..5 + n], &mut out[1..]).ok_or(EncodeError::BufferTooSmall)?;
    *out.get_mut(len + 1).ok_or(EncodeError::BufferTooSmall)? = 0;
    Ok(len + 2)
}

/// COBS-encode `src` into `dst` (no delimiter); `None` if `dst` is too small.
pub fn cobs_encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut code_at = 0;
    let mut out = 1;
    let mut code: u8 = 1;
    for &b in src {
        if b == 0 {
            *dst.get_mut(code_at)? = code;
            code_at = out;
            out += 1;
            code = 1;
        } else {
            *dst.get_mut(out)? = b;
            out += 1;
            code += 1;
            if code == 0xFF {
                *dst.get_mut(code_at)? = code;
                code_at = out;
                out += 1;
                code = 1;
            }
        }
    }
    *dst.get_mut(code_at)? = code;
    Some(out)
}

/// COBS-decode `src` (no delimiter) into `dst`; `None` if it is not valid COBS or `dst` is too
/// small.
pub fn cobs_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut i = 0;
    let mut out = 0;
    while i < src.len() {
        let code = usize::from(src[i]);
        if code == 0 || i + code > src.len() {
            return None;
        }
        for &b in &src[i + 1..i + code] {
            if b == 0 {
                return None;
            }
            *dst.get_mut(out)? = b;
            out += 1;
        }
        i += code;
        if code < 0xFF && i < src.len() {
            *dst.get_mut(out)? = 0;
            out += 1;
        }
    }
    Some(out)
}

/// Decoder for a stream of bridge frames.
#[derive(Debug, Default, Clone)]
pub struct Decoder;

impl DecoderTrait for Decoder {
    type Item = Frame;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Frame> {
        // Oversize runs are dropped in fixed steps, so the result never depends on how much
        // of the stream happens to be buffered.
        let too_long = DecodeError::new(ErrorKind::TooLong { max: MAX_ENCODED }, MAX_ENCODED);
        let Some(end) = buf.iter().position(|&b| b == 0) else {
            return if buf.len() > MAX_ENCODED { Err(too_long) } else { Ok(Decoded::Incomplete) };
        };
        let used = end + 1;
        if end == 0 {
            return Ok(Decoded::Progress(1));
        }
        if end > MAX_ENCODED {
            return Err(too_long);
        }
        let mut body = [0u8; MAX_BODY];
        let n = cobs_decode(&buf[..end], &mut body).ok_or_else(|| DecodeError::new(ErrorKind::Garbage, used))?;
        if n < 6 {
            return Err(DecodeError::malformed("bridge frame too short", used));
        }
        let (content, crc) = body[..n].split_at(n - 4);
        let received = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = CRC.checksum(content);
        if computed != received {
            return Err(DecodeError::new(ErrorKind::Checksum { computed, received }, used));
        }
        if content[0] != VERSION {
            return Err(DecodeError::new(ErrorKind::UnknownVersion(content[0]), used));
        }
        match postcard::take_from_bytes::<Frame>(&content[1..]) {
            Ok((frame, [])) => Ok(Decoded::Complete(frame, used)),
            _ => Err(DecodeError::malformed("bridge frame body", used)),
        }
    }

    fn max_frame_len(&self) -> usize {
        MAX_ENCODED
    }
}

#[cfg(all(test, feature = "alloc"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    extern crate std;
    use crate::codec::{decode_all, StreamEvent};
    use std::vec::Vec;

    fn sample() -> Frame {
        Frame {
            seq: 41,
            uptime_ms: 123_456,
            kind: FrameKind::Sample,
            power: Some(PowerSample {
                bus_mv: 12_480,
                shunt_uv: -2_310,
                current_ma: Some(-231),
                power_mw: Some(2_880),
            }),
            mains_present: Some(false),
            ventilator: Some(ContactState::Alarm),
            flags: flags::ALARM_LATCHED | flags::LOW_BATTERY,
        }
    }

    fn wire(f: &Frame) -> Vec<u8> {
        let mut out = [0u8; MAX_ENCODED];
        let n = encode(f, &mut out).unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn round_trip_and_no_zero_inside() {
        let w = wire(&sample());
        assert_eq!((w[0], *w.last().unwrap()), (0, 0));
        assert!(!w[1..w.len() - 1].contains(&0));
        assert!(w.len() < 40, "frame is {} bytes", w.len());
        let got: Vec<_> = decode_all(Decoder, &w).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(got, [sample()]);
    }

    #[test]
    fn corrupted_frame_is_dropped_and_the_next_one_read() {
        let mut w = wire(&sample());
        w[3] ^= 0x10;
        let mut stream = w.clone();
        stream.extend(wire(&Frame { seq: 42, ..sample() }));
        let ev = decode_all(Decoder, &stream);
        assert!(
            matches!(&ev[0], StreamEvent::Error { error, .. } if matches!(error.kind, ErrorKind::Checksum { .. } | ErrorKind::Garbage))
        );
        assert!(matches!(&ev[1], StreamEvent::Item { item, .. } if item.seq == 42));
    }

    #[test]
    fn unknown_version_is_reported() {
        let mut body = [0u8; MAX_BODY];
        body[0] = 9;
        let n = postcard::to_slice(&sample(), &mut body[1..]).unwrap().len();
        let crc = CRC.checksum(&body[..1 + n]);
        body[1 + n..5 + n].copy_from_slice(&crc.to_le_bytes());
        let mut out = [0u8; MAX_ENCODED + 1];
        let len = cobs_encode(&body[..5 + n], &mut out).unwrap();
        let ev = decode_all(Decoder, &out[..len + 1]);
        assert!(matches!(&ev[0], StreamEvent::Error { error, .. } if error.kind == ErrorKind::UnknownVersion(9)));
    }

    #[test]
    fn mid_stream_start_resyncs_at_the_delimiter() {
        let w = wire(&sample());
        let mut stream = w[5..].to_vec();
        stream.extend(b"line noise with no zero byte");
        stream.extend(&w);
        let items: Vec<_> = decode_all(Decoder, &stream).into_iter().filter_map(StreamEvent::item).collect();
        assert_eq!(items, [sample()]);
    }

    #[test]
    fn cobs_edge_cases() {
        for src in [&[][..], &[0], &[0, 0], &[1, 2, 0, 3], &[0xFF; 300][..]] {
            let mut enc = [0u8; 400];
            let n = cobs_encode(src, &mut enc).unwrap();
            assert!(!enc[..n].contains(&0));
            let mut dec = [0u8; 400];
            let m = cobs_decode(&enc[..n], &mut dec).unwrap();
            assert_eq!(&dec[..m], src);
        }
        assert!(cobs_encode(&[1, 2, 3], &mut [0u8; 2]).is_none());
    }

    #[test]
    fn small_output_buffer_is_an_error_not_a_panic() {
        assert_eq!(encode(&sample(), &mut [0u8; 8]), Err(EncodeError::BufferTooSmall));
    }
}
