//! The edges: where the gateway meets the world, each behind a type the service drives.
//!
//! | module | what |
//! |---|---|
//! | [`store`] | the `Store` seam and its SQLite (WAL) and PostgreSQL implementations |
//! | [`mqtt`] | the broker link: connection state, PUBACKs only after storage |
//! | [`delivery`] | the outbox's senders: webhook (HMAC), SMS gateway, SMTP, LINE, voice, console |
//! | [`listen`] | the HTTP(S) listener and trusted reverse proxies |
//! | [`clock`] | the one place the gateway reads the wall clock |
//!
//! Each edge has a deadline on every wait and a typed error; none decides anything about a
//! home (that is [`crate::domain`]).

pub mod clock;
pub mod delivery;
pub mod listen;
pub mod mqtt;
pub mod store;
