//! # mamori-agent
//!
//! The home service. What is built so far:
//! - [`decode`]: the installer's `decode` verb, which turns a capture of any supported device
//!   into JSON readings.
//!
//! The sources, the pure monitor, the MQTT uplink with its durable spool, the local alarm and
//! the `run` / `probe` / `simulate` verbs are the agent issue's work and are not built yet.
#![deny(unsafe_code, missing_docs)]

pub mod decode;
