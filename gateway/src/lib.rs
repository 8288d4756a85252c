//! # mamori-gateway
//!
//! The centre service: it receives what homes publish, keeps each home's state, forecasts
//! how long its backup power lasts, raises alerts, and escalates them (family, coordinator,
//! facility, support centre) until someone acknowledges. A secondary, remote notification
//! system: it never silences or replaces a device's own alarm in the room.
//!
//! | module | what |
//! |---|---|
//! | [`accounts`] | dashboard and API accounts: roles, scopes, passwords, TOTP, sessions, tokens |
//! | [`audit`] | the hash-chained, append-only audit log |
//! | [`homes`] | the homes file: care plans and contacts (personal data stays here) |
//! | [`policy`] | escalation policies (tiers T0–T3) |
//! | [`forecast`] | time left on backup power, with its basis |
//! | [`engine`] | the pure core: state, alerts, escalation, regional incidents (time passed in) |
//! | [`message`] | message text (ja/en) and signed acknowledgement links |
//! | [`store`] | the `Store` trait and its SQLite (WAL) implementation |
//! | [`delivery`] | the outbox's senders: webhook (HMAC), SMS gateway, SMTP, LINE, voice calls, console |
//! | [`stats`] | delivery statistics per channel and role, the time each role takes to acknowledge (pure) |
//! | [`dispatch`] | send slots shared per destination, circuit breakers, leases (pure) |
//! | [`config`] | the gateway config file |
//! | [`run`] | the service: MQTT in (validation, dedup, storage before action), degraded mode, wiring |
//! | [`mqtt`] | the broker link: connection state, PUBACKs after storage |
//! | [`lease`] | several gateways on one PostgreSQL store: the lease, its fencing token |
//! | [`standby`] | a standby's dashboard: read from the store, actions passed to the active |
//! | [`health`] | the gateway's own health: `/healthz`, the heartbeat, the watchdog |
//! | [`notice`] | notices about the gateway itself for its operators (sent without the store) |
//! | [`listen`] | the HTTP(S) listener and trusted reverse proxies |
//! | [`web`] | HTTP: the dashboard, `/api/v1`, `/metrics`, acknowledgement links |
//! | [`pki`] | the deployment's CA, broker config and per-home credentials |
//! | [`cli`] | the command line (`src/main.rs` only calls it) |
#![deny(unsafe_code, missing_docs)]

pub mod accounts;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod engine;
pub mod forecast;
pub mod health;
pub mod homes;
pub mod lease;
pub mod listen;
pub mod message;
pub mod mqtt;
pub mod nats;
pub mod notice;
pub mod pki;
pub mod policy;
pub mod run;
pub mod standby;
pub mod stats;
pub mod store;
pub mod web;
