//! # mamori-agent
//!
//! The home service. Layers, outside in:
//! - the command line (`main.rs`): `run`, `probe`, `decode`, `simulate`;
//! - the I/O edges: [`sources`] (serial, NUT, I2C, GPIO) and [`uplink`] (MQTT), with the
//!   device registry [`devices`] (what each protocol is sent and how its replies are read),
//!   which `run`, `probe` and `decode` share;
//! - the [`spool`]: the durable log that makes "nothing is lost" true;
//! - the pure core: [`monitor`] (readings to state and events) and [`alarm`] (what the
//!   family's buzzer and LEDs show), both with time passed in.
#![deny(unsafe_code, missing_docs)]

pub mod alarm;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decode;
pub mod devices;
pub mod gpio_alarm;
pub mod monitor;
pub mod probe;
pub mod run;
pub mod self_test;
pub mod simulate;
pub mod sources;
pub mod spool;
pub mod uplink;
