//! The service: the loop that owns the engine and the store, and what runs beside it.
//!
//! | module | what |
//! |---|---|
//! | [`run`] | `mamori-gateway run`: ingest (validation, dedup, storage before action), timers, the outbox, degraded mode, wiring |
//! | [`lease`] | several gateways on one PostgreSQL store: the lease and its fencing token |
//! | [`standby`] | a standby's dashboard: read from the store, actions passed to the active |
//! | [`health`] | the gateway's own health: `/healthz`, the heartbeat, the watchdog |
//! | [`dispatch`] | send slots shared per destination, circuit breakers, leases (pure: the loop asks it) |

pub mod dispatch;
pub mod health;
pub mod lease;
pub mod run;
pub mod standby;
