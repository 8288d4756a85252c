//! The device registry: for each serial protocol, what to send, how to decode, and what a reply
//! means to the agent, in one place.
//!
//! `run` ([`crate::sources`]), `probe` ([`crate::probe`]) and `decode` ([`crate::decode`]) all
//! dispatch through here, so the installer's probe speaks to a device exactly as the service
//! will, and a new protocol is added once:
//!
//! - a serial UPS: [`UpsDriver`] (what is sent when the port opens, every poll, every tenth
//!   poll and hourly, and the quick battery test's command) and [`UpsDecoder`], one decoder type
//!   for every UPS protocol, whose [`UpsReply`] says whether it carries a reading and whether it
//!   answered a query (APC's unrequested characters do not);
//! - a serial pulse oximeter: [`OximeterDecoder`], whose [`OximeterRecord`] gives the common
//!   reading.
//!
//! The bridge's frames and NUT's `upsd` lines have one format each and are used directly. Pure:
//! no I/O, no clock.

use mamori_protocol::codec::{DecodeResult, Decoded, Decoder};
use mamori_protocol::reading::{OximeterReading, UpsReading};
use mamori_protocol::{apc, masimo, megatec, nellcor, nonin, voltronic};

use crate::config::{OximeterProtocol, UpsProtocol};

/// What a serial UPS is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpsDriver {
    /// Once, when the port opens, before the first poll (APC's smart mode `Y`).
    pub init: &'static [&'static [u8]],
    /// Every poll: the status.
    pub each: &'static [&'static [u8]],
    /// Every tenth poll: slower readings (runtime, charge, battery voltage).
    pub tenth: &'static [&'static [u8]],
    /// At the start and hourly: identity and ratings, for the logs.
    pub hourly: &'static [&'static [u8]],
    /// The quick battery self-test: Megatec and Voltronic `T` (10 seconds), APC Smart `W`.
    pub test: &'static [u8],
}

impl UpsProtocol {
    /// How to talk to a UPS of this protocol.
    pub fn driver(self) -> UpsDriver {
        match self {
            UpsProtocol::Megatec => UpsDriver {
                init: &[],
                each: &[b"Q1\r"],
                tenth: &[],
                hourly: &[b"I\r", b"F\r"],
                test: megatec::Query::Test.as_bytes(),
            },
            UpsProtocol::Voltronic => {
                UpsDriver { init: &[], each: &[b"QGS\r"], tenth: &[b"QBV\r"], hourly: &[b"QPI\r"], test: b"T\r" }
            }
            UpsProtocol::Apc => {
                UpsDriver { init: &[b"Y"], each: &[b"Q"], tenth: &[b"f", b"j", b"B"], hourly: &[], test: b"W" }
            }
        }
    }

    /// Its decoder.
    pub fn decoder(self) -> UpsDecoder {
        match self {
            UpsProtocol::Megatec => UpsDecoder::Megatec(megatec::Decoder),
            UpsProtocol::Voltronic => UpsDecoder::Voltronic(voltronic::Decoder),
            UpsProtocol::Apc => UpsDecoder::Apc(apc::Decoder),
        }
    }
}

/// A reply from a serial UPS, of whichever protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum UpsReply {
    /// Megatec Q1.
    Megatec(megatec::Reply),
    /// Voltronic.
    Voltronic(voltronic::Reply),
    /// APC Smart.
    Apc(apc::Reply),
}

impl UpsReply {
    /// The common reading, for the replies that carry one.
    pub fn reading(&self) -> Option<UpsReading> {
        match self {
            UpsReply::Megatec(megatec::Reply::Status(s)) => Some(s.reading()),
            UpsReply::Megatec(_) => None,
            UpsReply::Voltronic(r) => r.reading(),
            UpsReply::Apc(r) => r.reading(),
        }
    }

    /// Whether it answers a query (the next query may go): everything but APC's unrequested
    /// characters (`!` line fail, `$` line back, ...).
    pub fn solicited(&self) -> bool {
        !matches!(self, UpsReply::Apc(apc::Reply::Notification(_)))
    }

    /// A command the UPS echoed back because it does not know it: a Megatec-like device that
    /// is not one, or the wrong protocol configured.
    pub fn echoed(&self) -> Option<&str> {
        match self {
            UpsReply::Megatec(megatec::Reply::Echo(c)) => Some(c),
            _ => None,
        }
    }
}

/// One decoder for every serial UPS protocol.
#[derive(Debug, Clone)]
pub enum UpsDecoder {
    /// Megatec Q1.
    Megatec(megatec::Decoder),
    /// Voltronic.
    Voltronic(voltronic::Decoder),
    /// APC Smart.
    Apc(apc::Decoder),
}

fn wrap<T, U>(r: DecodeResult<T>, f: impl FnOnce(T) -> U) -> DecodeResult<U> {
    r.map(|d| match d {
        Decoded::Complete(t, n) => Decoded::Complete(f(t), n),
        Decoded::Progress(n) => Decoded::Progress(n),
        Decoded::Incomplete => Decoded::Incomplete,
    })
}

impl Decoder for UpsDecoder {
    type Item = UpsReply;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<UpsReply> {
        match self {
            UpsDecoder::Megatec(d) => wrap(d.decode(buf), UpsReply::Megatec),
            UpsDecoder::Voltronic(d) => wrap(d.decode(buf), UpsReply::Voltronic),
            UpsDecoder::Apc(d) => wrap(d.decode(buf), UpsReply::Apc),
        }
    }

    fn max_frame_len(&self) -> usize {
        match self {
            UpsDecoder::Megatec(d) => d.max_frame_len(),
            UpsDecoder::Voltronic(d) => d.max_frame_len(),
            UpsDecoder::Apc(d) => d.max_frame_len(),
        }
    }
}

/// A record from a serial pulse oximeter, of whichever protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum OximeterRecord {
    /// Masimo ASCII 1.
    Masimo(masimo::Record),
    /// Nonin ASCII.
    NoninAscii(nonin::AsciiRecord),
    /// Nonin data format #2 or #7.
    NoninPacket(nonin::Packet),
    /// Nonin data format #8.
    Nonin8(nonin::Format8),
    /// Nellcor / Covidien ASCII.
    Nellcor(nellcor::Record),
}

impl OximeterRecord {
    /// The common reading.
    pub fn reading(&self) -> OximeterReading {
        match self {
            OximeterRecord::Masimo(r) => r.reading(),
            OximeterRecord::NoninAscii(r) => r.reading(),
            OximeterRecord::NoninPacket(r) => r.reading(),
            OximeterRecord::Nonin8(r) => r.reading(),
            OximeterRecord::Nellcor(r) => r.reading(),
        }
    }
}

/// One decoder for every serial oximeter protocol.
#[derive(Debug, Clone)]
pub enum OximeterDecoder {
    /// Masimo ASCII 1.
    Masimo(masimo::Decoder),
    /// Nonin ASCII.
    NoninAscii(nonin::AsciiDecoder),
    /// Nonin data format #2.
    Nonin2(nonin::Format2Decoder),
    /// Nonin data format #7.
    Nonin7(nonin::Format7Decoder),
    /// Nonin data format #8.
    Nonin8(nonin::Format8Decoder),
    /// Nellcor / Covidien ASCII.
    Nellcor(nellcor::Decoder),
}

impl OximeterProtocol {
    /// Its decoder.
    pub fn decoder(self) -> OximeterDecoder {
        match self {
            OximeterProtocol::Masimo => OximeterDecoder::Masimo(masimo::Decoder),
            OximeterProtocol::NoninAscii => OximeterDecoder::NoninAscii(nonin::AsciiDecoder),
            OximeterProtocol::Nonin2 => OximeterDecoder::Nonin2(nonin::Format2Decoder::default()),
            OximeterProtocol::Nonin7 => OximeterDecoder::Nonin7(nonin::Format7Decoder::default()),
            OximeterProtocol::Nonin8 => OximeterDecoder::Nonin8(nonin::Format8Decoder),
            OximeterProtocol::Nellcor => OximeterDecoder::Nellcor(nellcor::Decoder),
        }
    }
}

impl Decoder for OximeterDecoder {
    type Item = OximeterRecord;

    fn decode(&mut self, buf: &[u8]) -> DecodeResult<OximeterRecord> {
        match self {
            OximeterDecoder::Masimo(d) => wrap(d.decode(buf), OximeterRecord::Masimo),
            OximeterDecoder::NoninAscii(d) => wrap(d.decode(buf), OximeterRecord::NoninAscii),
            OximeterDecoder::Nonin2(d) => wrap(d.decode(buf), OximeterRecord::NoninPacket),
            OximeterDecoder::Nonin7(d) => wrap(d.decode(buf), OximeterRecord::NoninPacket),
            OximeterDecoder::Nonin8(d) => wrap(d.decode(buf), OximeterRecord::Nonin8),
            OximeterDecoder::Nellcor(d) => wrap(d.decode(buf), OximeterRecord::Nellcor),
        }
    }

    fn max_frame_len(&self) -> usize {
        match self {
            OximeterDecoder::Masimo(d) => d.max_frame_len(),
            OximeterDecoder::NoninAscii(d) => d.max_frame_len(),
            OximeterDecoder::Nonin2(d) => d.max_frame_len(),
            OximeterDecoder::Nonin7(d) => d.max_frame_len(),
            OximeterDecoder::Nonin8(d) => d.max_frame_len(),
            OximeterDecoder::Nellcor(d) => d.max_frame_len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamori_protocol::codec::{Stream, StreamEvent};

    fn items<D: Decoder>(d: D, bytes: &[u8]) -> (Vec<D::Item>, usize) {
        let mut s = Stream::new(d);
        s.push(bytes);
        let (mut items, mut errors) = (Vec::new(), 0);
        while let Some(ev) = s.next_event() {
            match ev {
                StreamEvent::Item { item, .. } => items.push(item),
                StreamEvent::Error { .. } => errors += 1,
            }
        }
        (items, errors)
    }

    #[test]
    fn each_ups_protocol_decodes_its_status_through_the_one_decoder() {
        let megatec = b"(208.4 140.0 208.4 034 59.9 2.05 35.0 10000000\r";
        let (r, errors) = items(UpsProtocol::Megatec.decoder(), megatec);
        assert_eq!((r.len(), errors), (1, 0));
        let reading = r[0].reading().expect("a status carries a reading");
        assert!(reading.on_battery == Some(true) && r[0].solicited() && r[0].echoed().is_none());
        // An echoed command: no reading, and said so.
        let (r, _) = items(UpsProtocol::Megatec.decoder(), b"Q1\r");
        assert_eq!(r[0].echoed(), Some("Q1"), "{r:?}");
        // APC: smart mode answers a query; a line-fail character does not.
        let (r, errors) = items(UpsProtocol::Apc.decoder(), b"SM\r\n!");
        assert_eq!(errors, 0, "{r:?}");
        assert!(r[0].solicited() && r[0].reading().is_none());
        assert!(!r[1].solicited(), "{r:?}");
    }

    #[test]
    fn the_drivers_say_what_each_protocol_is_sent() {
        assert_eq!(UpsProtocol::Apc.driver().init, [b"Y"]);
        assert!(UpsProtocol::Megatec.driver().init.is_empty());
        assert_eq!(UpsProtocol::Voltronic.driver().each, [b"QGS\r"]);
        assert_eq!(UpsProtocol::Megatec.driver().test, b"T\r");
        assert_eq!(UpsProtocol::Apc.driver().test, b"W");
    }

    #[test]
    fn each_oximeter_protocol_decodes_through_the_one_decoder() {
        let masimo = b"02/05/26 12:34:56 SN=0000012345 SPO2=097% BPM=072 PI=01.20% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000\r\n";
        let (r, errors) = items(OximeterProtocol::Masimo.decoder(), masimo);
        assert_eq!((r.len(), errors), (1, 0), "{r:?}");
        assert_eq!(r[0].reading().spo2_pct, Some(97));
        let (r, _) = items(OximeterProtocol::NoninAscii.decoder(), b"SPO2=095 HR=080\r\n");
        assert_eq!(r[0].reading().pulse_bpm, Some(80), "{r:?}");
    }
}
