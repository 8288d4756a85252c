//! The store: everything the gateway needs to resume after a crash, the history, the
//! accounts and the audit log.
//!
//! ## The seam
//! Callers see only traits, never SQL:
//! - [`Store`]: homes, messages, engine state, alerts, incidents, the outbox, acknowledgement
//!   requests, history and the store's own bookkeeping, with explicit write transactions
//!   ([`Store::begin`] gives a [`Tx`], which every write of the engine's record takes, and
//!   [`Store::commit`] or [`Store::rollback`] takes back);
//! - [`AccountRows`]: the rows behind accounts, sessions and API tokens (the rules, such as
//!   password policy, second factors and expiry, stay in [`crate::admin::accounts`]);
//! - [`AuditRows`]: the append-only audit log (the hash chain is computed in [`crate::admin::audit`];
//!   the backend only makes each append atomic against other appenders).
//!
//! The service, the web and the CLI hold a `Box<dyn Store>` ([`open`], [`open_existing`]).
//! [`SqliteStore`] is the embedded default (one file, `<data_dir>/mamori.db`, WAL,
//! `synchronous=FULL`). A second backend (PostgreSQL, for several gateways) implements the
//! three traits and is chosen in [`open`]; no caller changes. [`SqliteStore::conn`] remains
//! for SQLite's own maintenance in benchmarks and its tests; the gateway reads nothing through it.
//!
//! Reads take `&self` and writes `&mut self`; a backend whose client needs `&mut` for reads
//! keeps it in a `RefCell` (a store is `Send`, used by one thread at a time).
//!
//! ## Invariants
//! - Ingest stores a batch of messages and the engine's resulting state, alerts and outbox
//!   rows in **one transaction**, and only then acknowledges the messages to the broker
//!   (manual MQTT acks). A crash before the commit loses nothing: the broker sends again.
//! - Events are unique by `(home, seq)`: a redelivered or replayed event is recognised here.
//! - An outbox row is unique by its idempotency key, so re-deciding a notification after a
//!   restart never makes a second one; a row is `delivered` only after the receiver's 2xx or
//!   the SMTP server's acceptance.
//! - The audit log is append-only, and two appenders never fork its chain.
//!
//! ## Migrations
//! Each backend keeps its schema version and applies its migrations in order, each in its own
//! transaction (SQLite: `PRAGMA user_version` and [`MIGRATIONS`]).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use mamori_protocol::mqtt::{Event, HomeId, Role, Status, Telemetry};
use serde::{Deserialize, Serialize};

use crate::admin::accounts::{AccountRole, NewUser, User};
use crate::admin::audit::Entry;
use crate::domain::engine::{Alert, HomeState, Incident, Time};
use crate::domain::homes::{ChannelRef, Home, Lang};

#[cfg(test)]
pub(crate) mod contract;
pub mod pg;
mod pg_accounts;
pub mod pg_tls;
mod sqlite;
mod sqlite_accounts;

pub use sqlite::{SqliteStore, MIGRATIONS};

/// Where the store is: the config's `[store]` ([`crate::config::Config::store_location`]).
#[derive(Debug, Clone)]
pub enum Location {
    /// SQLite: `mamori.db` in this folder (the default).
    Sqlite(PathBuf),
    /// PostgreSQL.
    Postgres(Box<pg::PgLocation>),
}

impl Location {
    /// What to call it in messages (a file, or host, port and database; never a password).
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(dir) => SqliteStore::file(dir).display().to_string(),
            Location::Postgres(at) => at.target.clone(),
        }
    }

    /// Whether the store is there already: the SQLite file, or mamori's tables in the
    /// PostgreSQL database (an unreachable database is an error, not "no").
    pub fn exists(&self) -> Result<bool, StoreError> {
        match self {
            Location::Sqlite(dir) => Ok(SqliteStore::file(dir).exists()),
            Location::Postgres(at) => match pg::PgStore::open(at, false) {
                Ok(_) => Ok(true),
                Err(StoreError::NoSchema { .. }) => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    /// The SQLite folder, when it is one.
    pub fn sqlite_dir(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(d) => Some(d),
            Location::Postgres(_) => None,
        }
    }
}

/// Open (creating the SQLite file, or the schema in an existing PostgreSQL database, and
/// migrating) the store: `init`, the CLI, the demo.
pub fn open(at: &Location) -> Result<Box<dyn Store>, StoreError> {
    match at {
        Location::Sqlite(dir) => Ok(Box::new(SqliteStore::open(dir)?)),
        Location::Postgres(at) => Ok(Box::new(pg::PgStore::open(at, true)?)),
    }
}

/// Open an existing store ([`StoreError::Missing`] or [`StoreError::NoSchema`] when there is
/// none): `run` never creates one.
pub fn open_existing(at: &Location) -> Result<Box<dyn Store>, StoreError> {
    match at {
        Location::Sqlite(dir) => Ok(Box::new(SqliteStore::open_existing(dir)?)),
        Location::Postgres(at) => Ok(Box::new(pg::PgStore::open(at, false)?)),
    }
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The SQLite database refused (its driver's words: the seam names no driver's types).
    #[error("database {path}: {detail}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The database file could not be created.
    #[error("database {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `run` found no database where the config says it is (the data volume not mounted, or
    /// a new installation that was never initialised).
    #[error(
        "no database at {path}: if the data volume is not mounted, mount it; if this is a new \
         installation, create the database with `mamori-gateway init --config <file>` first"
    )]
    Missing {
        /// The file that should exist.
        path: PathBuf,
    },
    /// A PostgreSQL database refused, or could not be reached in time.
    #[error("database {target}: {detail}")]
    Postgres {
        /// Which database (host, port, name; never a password).
        target: String,
        /// Why.
        detail: String,
    },
    /// `run` found a PostgreSQL database without mamori's tables.
    #[error(
        "database {target} has no mamori tables: if this is a new installation, create them with \
         `mamori-gateway init --config <file>` first; otherwise check that the config names the right database"
    )]
    NoSchema {
        /// Which database.
        target: String,
    },
    /// A stored row does not decode (written by a newer version, or damaged).
    #[error("database {path}: a stored {what} does not decode: {detail}")]
    Corrupt {
        /// The file or database.
        path: PathBuf,
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// Delivery state of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    /// Waiting to be sent (or retried).
    Pending,
    /// The receiver accepted it.
    Delivered,
    /// Given up (too old).
    Abandoned,
    /// Not sent: by the time it came due, its role had acknowledged or the alert was over.
    NotNeeded,
}

impl OutboxStatus {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Delivered => "delivered",
            OutboxStatus::Abandoned => "abandoned",
            OutboxStatus::NotNeeded => "not_needed",
        }
    }
}

/// One message to one channel of one recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Idempotency key: `{notification key}:{role}:{contact}:{channel}`.
    pub key: String,
    /// The alert or incident.
    pub alert_id: String,
    /// The home, for per-home messages.
    pub home: Option<HomeId>,
    /// The recipient's role.
    pub role: Role,
    /// The recipient's name.
    pub recipient: String,
    /// The channel.
    pub channel: ChannelRef,
    /// The language.
    pub lang: Lang,
    /// Subject.
    pub subject: String,
    /// Body.
    pub body: String,
    /// The notification's content as JSON (for the fallback recipient and the webhook body).
    pub content: serde_json::Value,
    /// When it was written.
    pub created_at: Time,
    /// When to try (next).
    pub next_attempt_at: Time,
    /// Attempts so far.
    pub attempts: u32,
    /// State.
    pub status: OutboxStatus,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<Time>,
    /// The fallback recipient was notified.
    pub fallback_done: bool,
    /// Sent only if, when it comes due, the alert is still open and the row's role has not
    /// acknowledged since `created_at` (a contact's later channel, a quiet-held message);
    /// otherwise it is marked [`OutboxStatus::NotNeeded`].
    #[serde(default)]
    pub conditional: bool,
}

/// A note in an incident's after-action record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentNote {
    /// When it was written.
    pub at: Time,
    /// Who wrote it (an account).
    pub by: String,
    /// What it says.
    pub text: String,
}

/// One version of a home's care plan.
#[derive(Debug, Clone, PartialEq)]
pub struct HomeVersion {
    /// 1, 2, … per home.
    pub version: u32,
    /// When it was stored.
    pub at: Time,
    /// Who stored it: an account's username, `homes import` or `homes file` (empty for the
    /// plan stored before versions were kept).
    pub by: String,
    /// The plan.
    pub plan: Home,
}

/// An acknowledgement requested outside the running gateway (the CLI), applied by it.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRequest {
    /// Row id.
    pub id: i64,
    /// Alert or incident id.
    pub alert_id: String,
    /// Role: `Err` with the stored text when it names no role (never taken for another).
    pub role: Result<Role, String>,
    /// Who.
    pub by: String,
    /// Note.
    pub note: Option<String>,
}

/// An open write transaction, in the types.
///
/// The engine's record (messages, home states, alerts, incidents, outbox rows and their
/// attempts, applied acknowledgement requests) must change all together or not at all, and on
/// a store shared by several gateways only inside the lease's fence ([`Store::fence`]). So
/// every [`Store`] method that writes it takes a `&Tx`, and only [`Store::begin`] makes one
/// (its field is private to this module: no caller can build one), while [`Store::commit`]
/// and [`Store::rollback`] take it by value: a write of the record cannot be called outside a
/// transaction, nor after the transaction's end. The service's turns hold one each
/// (`Service::transaction`).
///
/// The writes that do not take one are whole in themselves, each one transaction inside the
/// backend: a care plan's versions ([`Store::upsert_homes`], fenced like a batch), an
/// incident's note, an acknowledgement request from the CLI, pruning the history, the
/// store's own bookkeeping ([`Store::set_meta`], [`Store::probe_write`]), accounts and audit.
///
/// What the types do not say: a `Tx` belongs to the store that made it, and is not to be
/// handed to another (a process holds one store), and a store has one transaction at a time:
/// `begin` rolls back one left open (after a ROLLBACK that itself failed), so a second `Tx`
/// taken while the first is held ends the first's work. The service holds one per turn.
///
/// Written in a transaction, the record is stored:
/// ```
/// # use mamori_gateway::edge::store::{Store, StoreError};
/// # use mamori_gateway::domain::engine::Alert;
/// fn store(s: &mut dyn Store, a: &Alert) -> Result<(), StoreError> {
///     let tx = s.begin()?;
///     s.save_alert(&tx, a)?;
///     s.commit(tx)
/// }
/// ```
/// Outside one, it does not compile:
/// ```compile_fail
/// # use mamori_gateway::edge::store::{Store, StoreError};
/// # use mamori_gateway::domain::engine::Alert;
/// fn store(s: &mut dyn Store, a: &Alert) -> Result<(), StoreError> {
///     s.save_alert(a)
/// }
/// ```
/// Nor does a transaction made by hand, or one used after its commit:
/// ```compile_fail
/// # use mamori_gateway::edge::store::{Store, StoreError, Tx};
/// # use mamori_gateway::domain::engine::Alert;
/// fn store(s: &mut dyn Store, a: &Alert) -> Result<(), StoreError> {
///     s.save_alert(&Tx { _begun: () }, a)
/// }
/// ```
/// ```compile_fail
/// # use mamori_gateway::edge::store::{Store, StoreError};
/// # use mamori_gateway::domain::engine::Alert;
/// fn store(s: &mut dyn Store, a: &Alert) -> Result<(), StoreError> {
///     let tx = s.begin()?;
///     s.commit(tx)?;
///     s.save_alert(&tx, a)
/// }
/// ```
#[must_use = "a transaction ends in Store::commit or Store::rollback"]
#[derive(Debug)]
pub struct Tx {
    _begun: (),
}

impl Tx {
    /// Made by a backend's `begin`, once its transaction is open.
    fn begun() -> Self {
        Tx { _begun: () }
    }
}

/// The store: what the service, the web and the CLI read and write (see the module doc).
pub trait Store: Send + AccountRows + AuditRows {
    /// Where it is, for an operator (a file, a database name; never a password).
    fn location(&self) -> String;
    /// Several gateways on one store: every write transaction ([`Store::begin`]) first checks
    /// that this holder and fencing token still hold the lease, and fails otherwise, so a
    /// deposed gateway cannot write (a store one machine owns ignores it).
    fn fence(&mut self, _holder: Option<(String, i64)>) {}

    /// Start a write transaction: the [`Tx`] that the engine's record is written with. When
    /// it fails (the store refuses, the fence is lost) no transaction is left open.
    fn begin(&mut self) -> Result<Tx, StoreError>;
    /// Commit it. When the commit fails, nothing of the transaction is kept and none is left
    /// open.
    fn commit(&mut self, tx: Tx) -> Result<(), StoreError>;
    /// Abandon it.
    fn rollback(&mut self, tx: Tx);

    /// Add or replace care plans, in one transaction. A plan that differs from the stored
    /// one (or is new) becomes the home's next version, recorded with `by` (an account, or
    /// `homes import` / `homes file`); an unchanged plan is left as it is.
    fn upsert_homes(&mut self, homes: &[Home], by: &str) -> Result<(), StoreError>;
    /// A home's plan versions, newest first.
    fn home_versions(&self, home: &HomeId) -> Result<Vec<HomeVersion>, StoreError>;
    /// For every home, the newest plan version stored by `by` (the homes file at start asks
    /// which of its plans it already stored).
    fn latest_plans_by(&self, by: &str) -> Result<Vec<Home>, StoreError>;
    /// Every care plan.
    fn homes(&self) -> Result<Vec<Home>, StoreError>;

    /// Store an event; false when `(home, seq)` is already stored.
    fn insert_event(&mut self, tx: &Tx, home: &HomeId, e: &Event, received: Time) -> Result<bool, StoreError>;
    /// Store a telemetry snapshot.
    fn insert_telemetry(&mut self, tx: &Tx, home: &HomeId, t: &Telemetry, received: Time) -> Result<(), StoreError>;
    /// Store a status message.
    fn insert_status(&mut self, tx: &Tx, home: &HomeId, s: &Status, received: Time) -> Result<(), StoreError>;

    /// Store a batch's events at once: for each, whether it was new (an event already stored,
    /// or earlier in the same batch, is not). One statement where the backend can: on a
    /// network database every statement is a round trip, and a storm's events queued behind
    /// them.
    fn insert_events(&mut self, tx: &Tx, events: &[(HomeId, Event)], received: Time) -> Result<Vec<bool>, StoreError> {
        events.iter().map(|(h, e)| self.insert_event(tx, h, e, received)).collect()
    }
    /// Store a batch's kept telemetry at once.
    fn insert_telemetry_many(
        &mut self,
        tx: &Tx,
        rows: &[(HomeId, Telemetry)],
        received: Time,
    ) -> Result<(), StoreError> {
        for (h, t) in rows {
            self.insert_telemetry(tx, h, t, received)?;
        }
        Ok(())
    }
    /// Store a batch's status messages at once.
    fn insert_statuses(&mut self, tx: &Tx, rows: &[(HomeId, Status)], received: Time) -> Result<(), StoreError> {
        for (h, st) in rows {
            self.insert_status(tx, h, st, received)?;
        }
        Ok(())
    }

    /// Save a home's state.
    fn save_state(&mut self, tx: &Tx, home: &HomeId, state: &HomeState) -> Result<(), StoreError>;
    /// Save many homes' states (each home once), in one statement where the backend can: a
    /// batch of a fleet's telemetry changes as many states as it has messages.
    fn save_states(&mut self, tx: &Tx, states: &[(HomeId, HomeState)]) -> Result<(), StoreError> {
        for (h, st) in states {
            self.save_state(tx, h, st)?;
        }
        Ok(())
    }
    /// Every home's saved state.
    fn states(&self) -> Result<Vec<(HomeId, HomeState)>, StoreError>;
    /// Save an alert.
    fn save_alert(&mut self, tx: &Tx, a: &Alert) -> Result<(), StoreError>;
    /// Save many alerts at once (each id once: the caller keeps the latest).
    fn save_alerts(&mut self, tx: &Tx, alerts: &[Alert]) -> Result<(), StoreError> {
        for a in alerts {
            self.save_alert(tx, a)?;
        }
        Ok(())
    }
    /// Alerts, newest first (`active_only`: not cleared).
    fn alerts(&self, active_only: bool, limit: usize) -> Result<Vec<Alert>, StoreError>;
    /// Save an incident.
    fn save_incident(&mut self, tx: &Tx, i: &Incident) -> Result<(), StoreError>;
    /// Incidents not closed.
    fn open_incidents(&self) -> Result<Vec<Incident>, StoreError>;
    /// One incident, open or closed.
    fn incident(&self, id: &str) -> Result<Option<Incident>, StoreError>;
    /// Add a note to an incident's after-action record.
    fn add_incident_note(&mut self, incident: &str, at: Time, by: &str, text: &str) -> Result<(), StoreError>;
    /// An incident's notes, oldest first.
    fn incident_notes(&self, incident: &str) -> Result<Vec<IncidentNote>, StoreError>;

    /// Write an outbox row unless its key exists; true when written.
    fn enqueue(&mut self, tx: &Tx, row: &OutboxRow) -> Result<bool, StoreError>;
    /// Queue many notifications at once (a key already queued is left as it is).
    fn enqueue_many(&mut self, tx: &Tx, rows: &[OutboxRow]) -> Result<(), StoreError> {
        for r in rows {
            self.enqueue(tx, r)?;
        }
        Ok(())
    }
    /// Pending rows due at `now`, oldest first, leaving out rows for the destinations in
    /// `skip` (see [`ChannelRef::destination`](crate::domain::homes::ChannelRef::destination)).
    fn due(&self, now: Time, limit: usize, skip: &[String]) -> Result<Vec<OutboxRow>, StoreError>;
    /// Pending rows due at `now` for the destinations in `only`, oldest first.
    fn due_only(&self, now: Time, limit: usize, only: &[String]) -> Result<Vec<OutboxRow>, StoreError>;
    /// The earliest next attempt of a pending row that is not due yet at `now` (rows due now
    /// are the dispatcher's business: sent, leased, or waiting for a free slot).
    fn next_due_after(&self, now: Time) -> Result<Option<Time>, StoreError>;
    /// Record an attempt's result.
    fn record_attempt(&mut self, tx: &Tx, row: &OutboxRow) -> Result<(), StoreError>;
    /// An alert's outbox rows.
    fn outbox_for(&self, alert_id: &str) -> Result<Vec<OutboxRow>, StoreError>;
    /// Pending rows.
    fn outbox_depth(&self) -> Result<u64, StoreError>;

    /// Ask the running gateway to apply an acknowledgement.
    fn request_ack(&mut self, alert_id: &str, role: Role, by: &str, note: Option<&str>) -> Result<i64, StoreError>;
    /// Requests not yet applied.
    fn pending_acks(&self) -> Result<Vec<AckRequest>, StoreError>;
    /// Mark a request applied (`result`: `ok` or the error).
    fn finish_ack(&mut self, tx: &Tx, id: i64, result: &str) -> Result<(), StoreError>;
    /// A request's result, once applied.
    fn ack_result(&self, id: i64) -> Result<Option<String>, StoreError>;

    /// Delete at most `limit` telemetry and status rows received before `before`; returns
    /// the rows deleted (call again while it returns `limit`).
    fn prune_history(&mut self, before: Time, limit: usize) -> Result<usize, StoreError>;

    /// A value from the store's own bookkeeping (`meta`).
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Set one.
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Write something small and commit it: whether the store takes writes again.
    fn probe_write(&mut self, now: Time) -> Result<(), StoreError>;

    /// Whether any message from a home was ever stored (events or home states).
    fn has_messages(&self) -> Result<bool, StoreError>;
    /// A home's telemetry since `since`, oldest first (at most `limit` rows, evenly thinned).
    fn telemetry_since(&self, home: &HomeId, since: Time, limit: usize) -> Result<Vec<Telemetry>, StoreError>;
    /// A home's events, newest first.
    fn events_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// A home's alerts, active and cleared, newest first.
    fn alerts_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Alert>, StoreError>;
    /// One alert, active or cleared.
    fn alert(&self, id: &str) -> Result<Option<Alert>, StoreError>;
    /// Outbox rows by status.
    fn outbox_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// What the delivery statistics need ([`crate::domain::stats`]): a few fields of every outbox
    /// row, and every acknowledgement of an alert or incident.
    fn delivery_inputs(
        &self,
    ) -> Result<(Vec<crate::domain::stats::Sent>, Vec<crate::domain::stats::Acked>), StoreError>;
}

/// A session's row, found by its cookie's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// Its account.
    pub user_id: i64,
    /// The form token.
    pub csrf: String,
    /// When it started (`None`: a stored time that does not parse; the session is not live).
    pub created_at: Option<Time>,
    /// Its last request, to within 30 s.
    pub last_seen: Option<Time>,
}

/// What a login reads of an account besides the account itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginSecrets {
    /// The password hash.
    pub password_hash: String,
    /// The TOTP secret as stored (sealed, or in clear from before sealing).
    pub totp_secret: Option<String>,
    /// The last TOTP step used.
    pub totp_last_step: i64,
}

/// The rows behind accounts, sessions and API tokens. [`crate::admin::accounts::Accounts`] holds the
/// rules; a backend only stores. "Not found" is `Ok(None)` or `Ok(false)`, never an error.
pub trait AccountRows {
    /// Every account, by username.
    fn users(&self) -> Result<Vec<User>, StoreError>;
    /// One account by name.
    fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError>;
    /// One account by id.
    fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError>;
    /// Whether a home is registered.
    fn home_exists(&self, id: &str) -> Result<bool, StoreError>;
    /// Add an account (validated by the caller); its password hashed and its TOTP secret
    /// sealed already.
    fn insert_user(
        &mut self,
        u: &NewUser,
        password_hash: &str,
        totp_secret: Option<&str>,
        now: Time,
    ) -> Result<(), StoreError>;
    /// What a login checks.
    fn login_secrets(&self, username: &str) -> Result<Option<LoginSecrets>, StoreError>;
    /// Record a TOTP step as used unless a later or equal one is: true when this call did
    /// (of two logins at once with the same code, only one gets true).
    fn use_totp_step(&mut self, user_id: i64, step: i64) -> Result<bool, StoreError>;
    /// Replace a password hash, end the account's sessions and revoke its API tokens, all
    /// at once; false when there is no such account.
    fn replace_password(&mut self, username: &str, password_hash: &str) -> Result<bool, StoreError>;
    /// Every stored TOTP secret, by account id.
    fn totp_secrets(&self) -> Result<Vec<(i64, String)>, StoreError>;
    /// Replace an account's stored TOTP secret (sealing one stored in clear).
    fn set_totp_secret(&mut self, user_id: i64, stored: &str) -> Result<(), StoreError>;
    /// Enrol a second factor: its sealed secret and the step of the code that proved it.
    fn enrol_totp(&mut self, username: &str, stored: &str, step: i64) -> Result<(), StoreError>;
    /// Disable or enable; false when there is no such account.
    fn set_disabled(&mut self, username: &str, disabled: bool) -> Result<bool, StoreError>;
    /// Replace an account's role and scope (validated by the caller): false when there is no
    /// such account.
    fn set_scope(
        &mut self,
        username: &str,
        role: AccountRole,
        municipalities: &[String],
        homes: &[String],
    ) -> Result<bool, StoreError>;
    /// End every session of an account.
    fn end_sessions(&mut self, username: &str) -> Result<(), StoreError>;
    /// Store a new session.
    fn insert_session(&mut self, id_hash: &str, user_id: i64, csrf: &str, now: Time) -> Result<(), StoreError>;
    /// A session by its hash.
    fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError>;
    /// Move a session's last request.
    fn touch_session(&mut self, id_hash: &str, now: Time) -> Result<(), StoreError>;
    /// End one session.
    fn delete_session(&mut self, id_hash: &str) -> Result<(), StoreError>;
    /// Store an API token (its hash).
    fn insert_token(&mut self, token_hash: &str, user_id: i64, name: &str, now: Time) -> Result<(), StoreError>;
    /// The account an API token (by its hash) acts as, unless the token is revoked.
    fn token_user(&self, token_hash: &str) -> Result<Option<User>, StoreError>;
    /// An account's API tokens (never the token itself: it is not kept).
    fn tokens(&self, username: &str) -> Result<Vec<TokenRow>, StoreError>;
    /// Revoke one of an account's live tokens by its id; false when it has no live token by
    /// that id (none, another account's, or revoked already).
    fn revoke_token(&mut self, username: &str, id: i64) -> Result<bool, StoreError>;
}

/// An API token as listed: what it is for, when it was made, whether it still works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    /// Its id (to revoke it by).
    pub id: i64,
    /// What it is for.
    pub name: String,
    /// When it was made (as stored).
    pub created_at: String,
    /// Revoked.
    pub revoked: bool,
}

/// The audit log's rows. The chain is [`crate::admin::audit`]'s; the backend keeps entries in order
/// and never lets two appends read the same last entry.
pub trait AuditRows {
    /// Append the entry `make` builds from the last entry's `(seq, hash)` (`None`: the log is
    /// empty), atomically against every other appender; returns it.
    fn audit_append(&mut self, make: &mut dyn FnMut(Option<(i64, String)>) -> Entry) -> Result<Entry, StoreError>;
    /// Entries newest first, only those with `seq < before` when given.
    fn audit_before(&self, before: Option<i64>, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// Entries oldest first with `seq > after`.
    fn audit_after(&self, after: i64, limit: usize) -> Result<Vec<Entry>, StoreError>;
}

/// `meta` key: when the database was created (`init`, or any command that may create it).
pub const META_CREATED_AT: &str = "created_at";
/// `meta` key: when the first message from a home was stored. Absent: this database has never
/// received anything (see [`crate::service::run`]'s rule for a broker session that says otherwise).
pub const META_FIRST_MESSAGE_AT: &str = "first_message_at";
/// `meta` key: when this database first connected to the broker (which then keeps a session
/// for the gateway's client id).
pub const META_BROKER_SESSION_AT: &str = "broker_session_at";
/// `meta` key: an operator accepted that this new database takes over an existing broker
/// session (`init --adopt-broker-session`).
pub const META_ADOPT_SESSION: &str = "adopt_broker_session";

/// A telemetry snapshot as history keeps it: what the charts, the API's history and the
/// forecast read (power, the battery, the load, the oximeter's values, the ventilator contact),
/// without the values that are not there. About a third of the whole snapshot: at 2,000 homes
/// and one snapshot a minute for 48 h, the difference is gigabytes (docs/benchmarks.md).
pub fn history_json(t: &Telemetry) -> String {
    use serde_json::Value;
    fn keep(v: Value, fields: &[&str]) -> Option<Value> {
        let Value::Object(m) = v else { return None };
        let kept: serde_json::Map<String, Value> =
            m.into_iter().filter(|(k, v)| !v.is_null() && fields.contains(&k.as_str())).collect();
        (!kept.is_empty()).then_some(Value::Object(kept))
    }
    let mut out = serde_json::Map::new();
    out.insert("ts".into(), serde_json::to_value(t.ts).unwrap_or_default());
    out.insert("interval_s".into(), t.interval_s.into());
    if let Some(m) = t.mains_present {
        out.insert("mains_present".into(), m.into());
    }
    let ups = ["on_battery", "battery_low", "load_pct", "battery_voltage_v", "battery_charge_pct", "runtime_s"];
    let parts = [
        ("ups", t.ups.as_ref().and_then(|u| keep(serde_json::to_value(u).ok()?, &ups))),
        (
            "power_meter",
            t.power_meter
                .as_ref()
                .and_then(|m| keep(serde_json::to_value(m).ok()?, &["battery_voltage_v", "current_a", "power_w"])),
        ),
        ("oximeter", t.oximeter.as_ref().and_then(|o| keep(serde_json::to_value(o).ok()?, &["spo2_pct", "pulse_bpm"]))),
        ("ventilator", t.ventilator.as_ref().and_then(|v| serde_json::to_value(v).ok())),
    ];
    for (k, v) in parts {
        if let Some(v) = v {
            out.insert(k.into(), v);
        }
    }
    if t.kept {
        out.insert("kept".into(), true.into());
    }
    Value::Object(out).to_string()
}

/// A time as the stores keep it: fixed width, so text order is time order.
pub(crate) fn ts(t: Time) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A stored time.
pub(crate) fn parse_ts(s: &str) -> Option<Time> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}
