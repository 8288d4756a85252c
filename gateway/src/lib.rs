//! # mamori-gateway
//!
//! The centre service: it receives what homes publish, keeps each home's state, forecasts
//! how long its backup power lasts, raises alerts, and escalates them (family, coordinator,
//! facility, support centre) until someone acknowledges. A secondary, remote notification
//! system: it never silences or replaces a device's own alarm in the room.
//!
//! The folders are the layers:
//!
//! | folder | what |
//! |---|---|
//! | [`domain`] | the pure core: engine, forecast, policies, homes, messages, operators' notices, statistics (no I/O, time passed in) |
//! | [`edge`] | the store, the MQTT link, the senders, the HTTP listener, the clock |
//! | [`service`] | the service loop that owns the engine and the store; send slots, the lease, the standby, health |
//! | [`web`] | HTTP: the dashboard, `/api/v1`, `/metrics`, acknowledgement links |
//! | [`admin`] | accounts, the audit log, the PKI and broker configs |
//! | [`config`] | the gateway config file |
//! | [`cli`] | the command line (`src/main.rs` only calls it) |
//!
//!
//! Who imports whom: `domain` imports no other folder (only `mamori-protocol`). `edge` imports
//! `domain` and `config`, and the account and audit *row types* of `admin` that the store
//! keeps. `admin` imports `domain` and the store. `web` imports those three, and the service's
//! shared [`service::health::Health`] (the one reference up: `/healthz` reads what the loop
//! writes). `service` wires everything, the web included; `cli` calls the others.
//! Doc links may point anywhere.
//!
//! `docs/architecture.md` draws the same layers and follows one outage through them.
#![deny(unsafe_code, missing_docs)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod domain;
pub mod edge;
pub mod service;
pub mod web;
