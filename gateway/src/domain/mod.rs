//! The pure core: what the gateway decides, with no I/O and no clock (every call takes
//! `now`). Everything here can be tested with plain values, and is.
//!
//! | module | what |
//! |---|---|
//! | [`engine`] | per-home state, alerts, escalation, regional incidents, silence |
//! | [`forecast`] | time left on backup power: a band, its basis, each battery learned |
//! | [`policy`] | escalation policies (tiers T0–T3) |
//! | [`homes`] | the homes file: care plans and contacts (personal data stays here) |
//! | [`message`] | message text (ja/en) and signed acknowledgement links |
//! | [`notice`] | notices about the gateway itself, in words for its operators |
//! | [`stats`] | delivery statistics per channel and role, the time each role takes to acknowledge |
//!
//! Nothing here imports [`crate::edge`], [`crate::service`], [`crate::web`] or
//! [`crate::admin`]; the layers above call down into it.

pub mod engine;
pub mod forecast;
pub mod homes;
pub mod message;
pub mod notice;
pub mod policy;
pub mod stats;
