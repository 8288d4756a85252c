//! # mamori-gateway
//!
//! The centre service: ingest, per-home state, forecast, alerts and escalation, delivery, the
//! store and the dashboard. **Not built yet**: this crate holds only the command-line shell
//! so the workspace's commands work; the gateway issue builds the rest.
#![deny(unsafe_code, missing_docs)]

/// What `mamori-gateway demo` prints until the gateway is built.
pub const DEMO_NOT_BUILT: &str = "mamori-gateway demo: the gateway is not built yet.\n\
The demo (embedded broker, simulated homes, escalation, dashboard) arrives with the gateway issue.\n\
What works today: the home agent on simulated devices (see the README: mamori-agent simulate,\n\
probe and run), the device codecs and the MQTT v1 contract, and `mamori-agent decode`.";
