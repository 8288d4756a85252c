//! # mamori-protocol
//!
//! The data model and every wire format mamori speaks, with no I/O and no clock:
//!
//! | module | what |
//! |---|---|
//! | [`codec`] | the decoding contract shared by every device codec, and a buffered [`codec::Stream`] |
//! | [`reading`] | the common UPS and oximeter readings, with the field names of `docs/mqtt.md` |
//! | [`megatec`] | Megatec "Q1" UPS replies (`Q1`, `F`, `I`) and queries |
//! | [`voltronic`] | the Voltronic dialect (`QPI`, `QGS`, `QMOD`, `QBV`, `(ACK`/`(NAK`) |
//! | [`apc`] | APC "Smart" protocol replies and unrequested notifications |
//! | [`nut`] | the Network UPS Tools server protocol, as a line codec |
//! | [`masimo`] | Masimo "ASCII 1" serial output |
//! | [`nonin`] | Nonin ASCII, data formats #2, #7 and #8 |
//! | [`nellcor`] | Nellcor / Covidien ASCII trend lines |
//! | [`bridge`] | the sensor-bridge frame (COBS + CRC-32 + postcard) |
//! | [`mqtt`] | the MQTT v1 contract: topics and payloads |
//!
//! ## Design
//! Every decoder is sans-IO: it is handed the bytes buffered so far and answers
//! [`codec::Decoded::Complete`] (an item and how many bytes it used),
//! [`codec::Decoded::Progress`] (bytes used, no item yet: a blank line, a mid-packet frame),
//! [`codec::Decoded::Incomplete`] (need more bytes), or a [`codec::DecodeError`] that says how
//! many bytes to skip to resynchronise. A decoder never reads a port or a clock, so the firmware
//! (`no_std`), the agent (tokio) and the tests share the same code.
//!
//! "No value" on the wire (`---`, `--.-`, `@@@`, Nonin 127/511) is `None`, never zero.
//!
//! ## Features
//! - `alloc` (default through `std`): every module. Without it only [`bridge`] and the
//!   [`codec`] contract remain, and nothing needs a heap: that is how the firmware uses it.
//! - `std` (default): `alloc` plus `std::error::Error` through the dependencies.
#![no_std]
#![deny(unsafe_code, missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod bridge;
pub mod codec;

#[cfg(feature = "alloc")]
pub mod apc;
#[cfg(feature = "alloc")]
pub mod event_data;
#[cfg(feature = "alloc")]
pub mod masimo;
#[cfg(feature = "alloc")]
pub mod megatec;
#[cfg(feature = "alloc")]
pub mod mqtt;
#[cfg(feature = "alloc")]
pub mod nellcor;
#[cfg(feature = "alloc")]
pub mod nonin;
#[cfg(feature = "alloc")]
pub mod nut;
#[cfg(feature = "alloc")]
pub mod reading;
#[cfg(feature = "alloc")]
pub mod voltronic;

#[cfg(feature = "alloc")]
mod text;
