//! # mamori-firmware
//!
//! The sensor bridge's logic, written once against embedded-hal 1.0 and embedded-io so it
//! runs on a microcontroller, on the Raspberry Pi through `linux-embedded-hal`, and on the
//! host in tests and the agent's simulator.
//!
//! | module | what |
//! |---|---|
//! | [`ina219`] | INA219 power-monitor driver (I2C): bus and shunt voltage, current, power |
//! | [`contact`] | a debouncer with time passed in, and the ventilator's normally-open + normally-closed contact pair (normal / alarm / cable fault, short alarms latched) |
//! | [`power`] | mains presence from a contact, and a low-battery comparator with hysteresis |
//! | [`bridge`] | the bridge loop: sample, build [`mamori_protocol::bridge::Frame`]s, write them, feed the watchdog |
//! | [`sim`] | simulated INA219 and pins for the host (tests, `mamori-agent simulate`) |
//!
//! ## Rules
//! - `no_std`, no allocation anywhere (frames are encoded into a stack buffer).
//! - Time is an argument (`now_ms`, a monotonic millisecond count): no module reads a clock,
//!   so every timing rule is tested without sleeping.
//! - Bus errors are typed ([`ina219::Error`]) and never panic; a failed sensor becomes a flag
//!   in the frame, not a dead bridge.
#![no_std]
#![deny(unsafe_code, missing_docs)]

pub mod bridge;
pub mod contact;
pub mod ina219;
pub mod power;
pub mod sim;
