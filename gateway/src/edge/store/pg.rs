//! The PostgreSQL store: the same tables, guarantees and tests as SQLite (`contract.rs`), in a
//! database that several gateways can share (issue: beyond one machine).
//!
//! ## Shape
//! - One connection per [`PgStore`], owned by a thread of its own. The synchronous `postgres`
//!   client runs its own small runtime and must not be driven from an async task, and the
//!   service calls its store from one; so every call is a job sent to that thread, and its
//!   answer is awaited for at most `timeout_s` (the server's `statement_timeout` is the same,
//!   so a statement that overruns is cancelled there too). A store that does not answer in
//!   time is an error like any other: the service degrades and tries again.
//! - A session left idle inside a transaction (its gateway frozen mid-batch, holding its share
//!   lock on the lease row) is ended by the server after twice the timeout, so a standby can
//!   take the lease from a frozen active.
//! - A lost connection is made again on the next call, except inside a transaction: then the
//!   call fails (the batch is rolled back by the caller and its messages are not acknowledged),
//!   so no half of a batch is ever committed on a new connection.
//! - Times are stored as fixed-width UTC text, as in SQLite, so both order the same way;
//!   message bodies as JSON text.
//! - Migrations: `mamori_schema(version)`, applied in order under a transaction-scoped advisory
//!   lock, so two gateways starting at once do not both migrate.
//! - The accounts and audit rows are in `pg_accounts.rs`. The audit log: an append locks the table (`SHARE ROW EXCLUSIVE`, which conflicts with
//!   itself), and a trigger refuses `UPDATE`, `DELETE` and `TRUNCATE`.
//!
//! - TLS (`pg_tls.rs`): with `[store] postgres_ca_file`, every connection is TLS and the
//!   server's certificate is verified for its host; plain only to loopback (or with
//!   `postgres_plain = true`).
//!
//! Over 800 lines for a reason: it is one backend of the whole [`super::Store`] seam (its
//! accounts and audit rows are in `pg_accounts.rs`, its TLS in `pg_tls.rs`), each method a
//! statement next to the SQLite one it must agree with (`contract.rs` checks both).

use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use ::postgres::{Client, NoTls, Row};
use mamori_protocol::mqtt::{Event, HomeId, Role, Status, Telemetry};

use super::{
    history_json, parse_ts, ts, AckRequest, HomeVersion, IncidentNote, OutboxRow, Store, StoreError, Tx,
    META_CREATED_AT, META_FIRST_MESSAGE_AT,
};
use crate::admin::accounts::{AccountRole, User};
use crate::admin::audit::Entry;
use crate::domain::engine::{Alert, HomeState, Incident, Time};
use crate::domain::homes::Home;

/// The schema, by version.
pub const PG_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE homes (id TEXT PRIMARY KEY, municipality TEXT NOT NULL, plan TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE home_state (id TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE events (home TEXT NOT NULL, seq BIGINT NOT NULL, id TEXT NOT NULL, ts TEXT NOT NULL, kind TEXT NOT NULL,
    received_at TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (home, seq));
CREATE INDEX events_home_ts ON events (home, ts);
CREATE TABLE telemetry (n BIGSERIAL PRIMARY KEY, home TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE INDEX telemetry_home_ts ON telemetry (home, ts);
CREATE INDEX telemetry_received ON telemetry (received_at);
CREATE TABLE status (n BIGSERIAL PRIMARY KEY, home TEXT NOT NULL, received_at TEXT NOT NULL, payload TEXT NOT NULL);
CREATE INDEX status_received ON status (received_at);
CREATE TABLE alerts (id TEXT PRIMARY KEY, home TEXT NOT NULL, kind TEXT NOT NULL, raised_at TEXT NOT NULL,
    cleared_at TEXT, body TEXT NOT NULL);
CREATE INDEX alerts_active ON alerts (cleared_at, raised_at);
CREATE INDEX alerts_home ON alerts (home, raised_at);
CREATE TABLE incidents (id TEXT PRIMARY KEY, municipality TEXT NOT NULL, closed_at TEXT, body TEXT NOT NULL);
CREATE TABLE outbox (n BIGSERIAL, key TEXT PRIMARY KEY, alert_id TEXT NOT NULL, status TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL, body TEXT NOT NULL, dest TEXT NOT NULL DEFAULT '');
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, dest);
CREATE INDEX outbox_alert ON outbox (alert_id);
CREATE TABLE ack_requests (id BIGSERIAL PRIMARY KEY, alert_id TEXT NOT NULL, role TEXT NOT NULL,
    by TEXT NOT NULL, note TEXT, requested_at TEXT NOT NULL, result TEXT);
CREATE TABLE users (id BIGSERIAL PRIMARY KEY, username TEXT NOT NULL UNIQUE, display_name TEXT NOT NULL,
    role TEXT NOT NULL, municipalities TEXT NOT NULL, homes TEXT NOT NULL, password_hash TEXT NOT NULL,
    totp_secret TEXT, totp_last_step BIGINT NOT NULL DEFAULT 0, disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TEXT NOT NULL);
CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id), csrf TEXT NOT NULL,
    created_at TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE api_tokens (id BIGSERIAL PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,
    user_id BIGINT NOT NULL REFERENCES users (id), name TEXT NOT NULL, created_at TEXT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE audit (seq BIGINT PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, ip TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE FUNCTION mamori_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION mamori_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT EXECUTE FUNCTION mamori_audit_append_only();
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
    // The active gateway's lease (crate::service::lease): its holder, its fencing token, and when it
    // ends by the database's own clock.
    r#"
CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL);
INSERT INTO lease (name, holder, token, expires_at) VALUES ('active', '', 0, '-infinity');
"#,
    // Each gateway of a cluster says it is alive, as active or standby.
    r#"
CREATE TABLE gateways (name TEXT PRIMARY KEY, role TEXT NOT NULL, seen_at TIMESTAMPTZ NOT NULL);
"#,
    // Every version of every care plan (as in SQLite's migrations).
    r#"
CREATE TABLE home_versions (home TEXT NOT NULL, version BIGINT NOT NULL, at TEXT NOT NULL, changed_by TEXT NOT NULL,
    plan TEXT NOT NULL, PRIMARY KEY (home, version));
INSERT INTO home_versions (home, version, at, changed_by, plan) SELECT id, 1, updated_at, '', plan FROM homes;
"#,
    // The notes of an incident's after-action record.
    r#"
CREATE TABLE incident_notes (n BIGSERIAL PRIMARY KEY, incident TEXT NOT NULL, at TEXT NOT NULL,
    written_by TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX incident_notes_incident ON incident_notes (incident, n);
"#,
];

/// The advisory lock taken while migrating (any constant the deployment does not use).
const MIGRATION_LOCK: i64 = 0x6d616d6f7269;

/// Where a PostgreSQL store is, resolved from the config.
#[derive(Clone)]
pub struct PgLocation {
    /// Connection settings, with the password set.
    pub config: ::postgres::Config,
    /// What to call it in messages: host, port and database, never the password.
    pub target: String,
    /// The longest one call may take.
    pub timeout: Duration,
    /// TLS, verified against the configured CA (None: plain).
    pub tls: Option<super::pg_tls::RustlsConnect>,
}

impl std::fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgLocation({}, timeout {:?}, tls {})", self.target, self.timeout, self.tls.is_some())
    }
}

impl PgLocation {
    /// From a libpq-style connection string (`host=… port=… user=… dbname=…` or a
    /// `postgresql://` URL) and a password kept elsewhere.
    pub fn parse(conn: &str, password: Option<&str>, timeout: Duration) -> Result<PgLocation, String> {
        let mut config = ::postgres::Config::from_str(conn).map_err(|e| format!("{e}"))?;
        if config.get_password().is_some() {
            return Err("holds a password: give it as postgres_password (a file or an environment variable)".into());
        }
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(10));
        let host = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                ::postgres::config::Host::Tcp(h) => h.clone(),
                ::postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!("postgres {host}:{port}/{}", config.get_dbname().unwrap_or("(default)"));
        Ok(PgLocation { config, target, timeout, tls: None })
    }

    /// The same, over TLS verified against the CA certificates in `ca_file` (never a plain
    /// fallback).
    pub fn with_tls(mut self, ca_file: &std::path::Path) -> Result<PgLocation, String> {
        // The server's certificate is checked for the host name or address the settings give.
        if self.config.get_hosts().iter().any(|h| !matches!(h, ::postgres::config::Host::Tcp(_))) {
            return Err("postgres_ca_file: TLS needs a host name or address, not a Unix socket".into());
        }
        self.tls = Some(super::pg_tls::RustlsConnect::from_ca_file(ca_file)?);
        self.config.ssl_mode(::postgres::config::SslMode::Require);
        self.target.push_str(" (TLS)");
        Ok(self)
    }

    /// Whether every host is this machine (loopback, or a Unix socket).
    pub fn is_local(&self) -> bool {
        self.config.get_hosts().iter().all(|h| match h {
            ::postgres::config::Host::Tcp(h) => crate::config::is_loopback(h),
            ::postgres::config::Host::Unix(_) => true,
        }) && self.config.get_hostaddrs().iter().all(|a| a.is_loopback())
    }
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// Owned statement parameters, sent to the connection's thread.
pub(super) type Params = Vec<Box<dyn ::postgres::types::ToSql + Send + Sync>>;

/// The connection, on its own thread.
struct Conn {
    client: Option<Client>,
    at: PgLocation,
    in_tx: bool,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, String> {
        let lost = self.client.as_ref().is_none_or(|c| c.is_closed());
        if lost {
            if self.in_tx {
                self.client = None;
                return Err("the connection was lost inside a transaction; it was not committed".into());
            }
            let mut c = match &self.at.tls {
                Some(tls) => self.at.config.connect(tls.clone()),
                None => self.at.config.connect(NoTls),
            }
            .map_err(|e| pg_text(&e))?;
            // A gateway frozen (SIGSTOP, a stalled VM) inside a batch would hold its share lock
            // on the lease row until its connection dies, which a frozen process never lets
            // happen, and no standby could take over: the server ends a session left idle
            // inside a transaction after twice the store's timeout (at least 2 s).
            let ms = self.at.timeout.as_millis();
            c.batch_execute(&format!(
                "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {}",
                (ms * 2).max(2000)
            ))
            .map_err(|e| pg_text(&e))?;
            self.client = Some(c);
        }
        self.client.as_mut().ok_or_else(|| "no connection".to_string())
    }
}

/// An error with its database message (`postgres::Error`'s own text says only "db error").
fn pg_text(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        }
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    jobs: mpsc::Sender<Job>,
    fence: Option<(String, i64)>,
    target: String,
    timeout: Duration,
}

impl PgStore {
    /// Connect, and migrate. `create`: make the tables in an empty database (`init`, the
    /// CLI); otherwise a database without them is [`StoreError::NoSchema`] (`run`).
    pub fn open(at: &PgLocation, create: bool) -> Result<PgStore, StoreError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let mut conn = Conn { client: None, at: at.clone(), in_tx: false };
        std::thread::Builder::new()
            .name("mamori-pg".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Postgres { target: at.target.clone(), detail: format!("thread: {e}") })?;
        let mut store = PgStore { jobs, fence: None, target: at.target.clone(), timeout: at.timeout };
        store.migrate(create)?;
        if create && store.meta(META_CREATED_AT)?.is_none() {
            store.set_meta(META_CREATED_AT, &ts(crate::edge::clock::now()))?;
        }
        if store.meta(META_FIRST_MESSAGE_AT)?.is_none() && store.has_messages()? {
            let _ = store.set_meta(META_FIRST_MESSAGE_AT, &ts(crate::edge::clock::now()));
        }
        Ok(store)
    }

    pub(super) fn err(&self, detail: String) -> StoreError {
        StoreError::Postgres { target: self.target.clone(), detail }
    }

    /// Roll back whatever transaction is open on the connection (none is open after it).
    fn end_open(&self) {
        let _ = self.call(|c| {
            c.in_tx = false;
            if let Some(cl) = c.client.as_mut().filter(|cl| !cl.is_closed()) {
                let _ = cl.batch_execute("ROLLBACK");
            }
            Ok(())
        });
    }

    /// Run `f` on the connection's thread; its answer within the timeout.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, String> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        // A job that waited past its caller's deadline is not run: its caller has given up
        // (and a late BEGIN or lease renewal would act for nobody).
        #[allow(clippy::disallowed_methods)] // the call's own deadline, on the monotonic clock
        let deadline = std::time::Instant::now() + self.timeout;
        let job: Job = Box::new(move |c| {
            #[allow(clippy::disallowed_methods)] // the call's own deadline, on the monotonic clock
            let late = std::time::Instant::now() > deadline;
            let _ = tx.send(if late { Err("not run: it waited past its deadline".into()) } else { f(c) });
        });
        self.jobs.send(job).map_err(|_| self.err("the connection's thread has ended".into()))?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(|d| self.err(d)),
            Err(_) => Err(self.err(format!("no answer within {} s", self.timeout.as_secs_f64()))),
        }
    }

    /// Run `f` with the client.
    pub(super) fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, ::postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(move |c| {
            let client = c.client()?;
            f(client).map_err(|e| pg_text(&e))
        })
    }

    pub(super) fn rows(&self, sql: &'static str, params: Params) -> Result<Vec<Row>, StoreError> {
        self.with(move |c| {
            let p: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                params.iter().map(|b| b.as_ref() as &(dyn ::postgres::types::ToSql + Sync)).collect();
            c.query(sql, &p)
        })
    }

    pub(super) fn exec(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
        self.with(move |c| {
            let p: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                params.iter().map(|b| b.as_ref() as &(dyn ::postgres::types::ToSql + Sync)).collect();
            c.execute(sql, &p)
        })
    }

    fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        sql: &'static str,
        params: Params,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for r in self.rows(sql, params)? {
            let text: String = self.get(&r, 0)?;
            out.push(serde_json::from_str(&text).map_err(|e| self.corrupt(what, e.to_string()))?);
        }
        Ok(out)
    }

    /// The first column of the one row a statement returns.
    pub(super) fn scalar<T: for<'a> ::postgres::types::FromSql<'a>>(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<T, StoreError> {
        let rows = self.rows(sql, params)?;
        let r = rows.first().ok_or_else(|| self.err(format!("no row from {sql}")))?;
        self.get(r, 0)
    }

    pub(super) fn get<'a, T: ::postgres::types::FromSql<'a>>(&self, r: &'a Row, i: usize) -> Result<T, StoreError> {
        r.try_get(i).map_err(|e| self.err(pg_text(&e)))
    }

    pub(super) fn corrupt(&self, what: &'static str, detail: String) -> StoreError {
        StoreError::Corrupt { path: self.target.clone().into(), what, detail }
    }

    fn migrate(&mut self, create: bool) -> Result<(), StoreError> {
        let exists: bool = self.scalar("SELECT to_regclass('mamori_schema') IS NOT NULL", vec![])?;
        if !exists && !create {
            return Err(StoreError::NoSchema { target: self.target.clone() });
        }
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS mamori_schema (version BIGINT NOT NULL)")?;
            let v: Option<i64> =
                tx.query_opt("SELECT version FROM mamori_schema", &[])?.map(|r| r.try_get(0)).transpose()?;
            if v.is_none() {
                tx.execute("INSERT INTO mamori_schema (version) VALUES (0)", &[])?;
            }
            let from = usize::try_from(v.unwrap_or(0)).unwrap_or(0);
            for (i, m) in PG_MIGRATIONS.iter().enumerate().skip(from) {
                tx.batch_execute(m)?;
                tx.execute("UPDATE mamori_schema SET version = $1", &[&((i + 1) as i64)])?;
            }
            tx.commit()
        })
    }

    pub(super) fn user(&self, r: &Row) -> Result<User, StoreError> {
        let list = |i: usize| -> Result<Vec<String>, StoreError> {
            let s: String = self.get(r, i)?;
            Ok(serde_json::from_str(&s).unwrap_or_default())
        };
        let role: String = self.get(r, 3)?;
        Ok(User {
            id: self.get(r, 0)?,
            username: self.get(r, 1)?,
            display_name: self.get(r, 2)?,
            // An unknown role (a newer version's) gets the narrowest one.
            role: AccountRole::parse(&role).unwrap_or(AccountRole::Family),
            municipalities: list(4)?,
            homes: list(5)?,
            totp: self.get(r, 6)?,
            disabled: self.get(r, 7)?,
        })
    }

    pub(super) fn entry(&self, r: &Row) -> Result<Entry, StoreError> {
        Ok(Entry {
            seq: self.get(r, 0)?,
            at: self.get(r, 1)?,
            actor: self.get(r, 2)?,
            ip: self.get(r, 3)?,
            action: self.get(r, 4)?,
            target: self.get(r, 5)?,
            detail: self.get(r, 6)?,
            prev: self.get(r, 7)?,
            hash: self.get(r, 8)?,
        })
    }
}

/// Owned statement parameters: `p![a, b]`.
macro_rules! p {
    ($($x:expr),* $(,)?) => {
        vec![$(Box::new($x) as Box<dyn ::postgres::types::ToSql + Send + Sync>),*]
    };
}
pub(super) use p;

impl Store for PgStore {
    fn location(&self) -> String {
        self.target.clone()
    }

    fn fence(&mut self, holder: Option<(String, i64)>) {
        self.fence = holder;
    }

    fn begin(&mut self) -> Result<Tx, StoreError> {
        let fence = self.fence.clone();
        let begun = self.call(move |c| {
            if c.in_tx {
                // A transaction left open on this connection: each batch starts clean (a BEGIN
                // inside it would only warn, and the batch would join the old one).
                tracing::warn!("a transaction was left open: rolled back before the next");
                c.in_tx = false;
                if let Some(cl) = c.client.as_mut().filter(|cl| !cl.is_closed()) {
                    let _ = cl.batch_execute("ROLLBACK");
                }
            }
            c.client()?.batch_execute("BEGIN").map_err(|e| pg_text(&e))?;
            c.in_tx = true;
            if let Some((holder, token)) = fence {
                // Held until the commit: a standby's take waits for this batch, and a batch
                // of a deposed holder writes nothing.
                let held = c
                    .client()?
                    .query_opt(
                        "SELECT 1 FROM lease WHERE name = 'active' AND holder = $1 AND token = $2
                         AND expires_at > now() FOR SHARE",
                        &[&holder, &token],
                    )
                    .map_err(|e| pg_text(&e))?;
                if held.is_none() {
                    return Err(format!("{holder} no longer holds the lease (token {token}): nothing is written"));
                }
            }
            Ok(())
        });
        match begun {
            Ok(()) => Ok(Tx::begun()),
            Err(e) => {
                // Begun and then refused (the fence, a lost connection): nothing is left open.
                self.end_open();
                Err(e)
            }
        }
    }

    fn commit(&mut self, _tx: Tx) -> Result<(), StoreError> {
        // A failed COMMIT ends the transaction on the server too (it rolls back).
        self.call(|c| {
            let r = c.client().and_then(|cl| cl.batch_execute("COMMIT").map_err(|e| pg_text(&e)));
            c.in_tx = false;
            r
        })
    }

    fn rollback(&mut self, _tx: Tx) {
        self.end_open();
    }

    fn upsert_homes(&mut self, homes: &[Home], by: &str) -> Result<(), StoreError> {
        let now = ts(crate::edge::clock::now());
        let by = by.to_string();
        // Fenced like a batch (`begin`): a gateway that lost the lease writes no plan.
        let fence = self.fence.clone();
        let rows: Vec<(String, String, String)> = homes
            .iter()
            .map(|h| (h.id.as_str().to_string(), h.municipality.clone(), serde_json::to_string(h).unwrap_or_default()))
            .collect();
        self.call(move |c| {
            let mut tx = c.client()?.transaction().map_err(|e| pg_text(&e))?;
            if let Some((holder, token)) = &fence {
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM lease WHERE name = 'active' AND holder = $1 AND token = $2
                         AND expires_at > now() FOR SHARE",
                        &[holder, token],
                    )
                    .map_err(|e| pg_text(&e))?;
                if held.is_none() {
                    return Err(format!("{holder} no longer holds the lease (token {token}): the plan is not written"));
                }
            }
            // Set-based, whatever the number of homes (a prefecture's import is three
            // statements, not three per home): the existing rows are locked first, so that a
            // concurrent writer's version is seen; then each plan that differs from the stored
            // one is written, with its next version.
            let write = |tx: &mut ::postgres::Transaction<'_>| -> Result<(), ::postgres::Error> {
                let ids: Vec<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
                let munis: Vec<&str> = rows.iter().map(|(_, m, _)| m.as_str()).collect();
                let plans: Vec<&str> = rows.iter().map(|(_, _, p)| p.as_str()).collect();
                tx.execute("SELECT id FROM homes WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&ids])?;
                tx.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS plans_in (id TEXT, municipality TEXT, plan TEXT) ON COMMIT DELETE ROWS",
                    &[],
                )?;
                tx.execute(
                    "INSERT INTO plans_in (id, municipality, plan)
                     SELECT i.id, i.m, i.p FROM unnest($1::text[], $2::text[], $3::text[]) AS i(id, m, p)
                     LEFT JOIN homes h ON h.id = i.id WHERE h.plan IS DISTINCT FROM i.p",
                    &[&ids, &munis, &plans],
                )?;
                tx.execute(
                    "INSERT INTO homes (id, municipality, plan, updated_at) SELECT id, municipality, plan, $1 FROM plans_in
                     ON CONFLICT (id) DO UPDATE SET municipality = EXCLUDED.municipality, plan = EXCLUDED.plan,
                     updated_at = EXCLUDED.updated_at",
                    &[&now],
                )?;
                tx.execute(
                    "INSERT INTO home_versions (home, version, at, changed_by, plan)
                     SELECT c.id, COALESCE((SELECT MAX(v.version) FROM home_versions v WHERE v.home = c.id), 0) + 1,
                     $1, $2, c.plan FROM plans_in c",
                    &[&now, &by],
                )?;
                Ok(())
            };
            write(&mut tx).map_err(|e| pg_text(&e))?;
            tx.commit().map_err(|e| pg_text(&e))
        })
    }

    fn home_versions(&self, home: &HomeId) -> Result<Vec<HomeVersion>, StoreError> {
        let rows = self.rows(
            "SELECT version, at, changed_by, plan FROM home_versions WHERE home = $1 ORDER BY version DESC",
            p![home.as_str().to_string()],
        )?;
        let mut out = Vec::new();
        for r in &rows {
            let (version, at, by, plan): (i64, String, String, String) =
                (self.get(r, 0)?, self.get(r, 1)?, self.get(r, 2)?, self.get(r, 3)?);
            out.push(HomeVersion {
                version: u32::try_from(version).unwrap_or(0),
                at: parse_ts(&at).ok_or_else(|| self.corrupt("home version", at.clone()))?,
                by,
                plan: serde_json::from_str(&plan).map_err(|e| self.corrupt("home version", e.to_string()))?,
            });
        }
        Ok(out)
    }

    fn latest_plans_by(&self, by: &str) -> Result<Vec<Home>, StoreError> {
        self.json_rows(
            "SELECT plan FROM home_versions v WHERE changed_by = $1 AND version =
             (SELECT MAX(version) FROM home_versions w WHERE w.home = v.home AND w.changed_by = $1)",
            p![by.to_string()],
            "home version",
        )
    }

    fn add_incident_note(&mut self, incident: &str, at: Time, by: &str, text: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO incident_notes (incident, at, written_by, text) VALUES ($1, $2, $3, $4)",
            p![incident.to_string(), ts(at), by.to_string(), text.to_string()],
        )?;
        Ok(())
    }

    fn incident_notes(&self, incident: &str) -> Result<Vec<IncidentNote>, StoreError> {
        let rows = self.rows(
            "SELECT at, written_by, text FROM incident_notes WHERE incident = $1 ORDER BY n",
            p![incident.to_string()],
        )?;
        let mut out = Vec::new();
        for r in &rows {
            let (at, by, text): (String, String, String) = (self.get(r, 0)?, self.get(r, 1)?, self.get(r, 2)?);
            let at = parse_ts(&at).ok_or_else(|| self.corrupt("incident note", at.clone()))?;
            out.push(IncidentNote { at, by, text });
        }
        Ok(out)
    }

    fn homes(&self) -> Result<Vec<Home>, StoreError> {
        self.json_rows("SELECT plan FROM homes ORDER BY id", p![], "home")
    }

    fn insert_event(&mut self, _tx: &Tx, home: &HomeId, e: &Event, received: Time) -> Result<bool, StoreError> {
        let n = self.exec(
            "INSERT INTO events (home, seq, id, ts, kind, received_at, payload) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT DO NOTHING",
            p![
                home.as_str().to_string(),
                e.seq as i64, // as SQLite keeps it: distinct for every u64
                e.id.clone(),
                ts(e.ts.with_timezone(&chrono::Utc)),
                e.kind.as_str().to_string(),
                ts(received),
                serde_json::to_string(e).unwrap_or_default()
            ],
        )?;
        Ok(n == 1)
    }

    fn insert_events(&mut self, _tx: &Tx, events: &[(HomeId, Event)], received: Time) -> Result<Vec<bool>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let homes: Vec<String> = events.iter().map(|(h, _)| h.as_str().to_string()).collect();
        let seqs: Vec<i64> = events.iter().map(|(_, e)| e.seq as i64).collect();
        let ids: Vec<String> = events.iter().map(|(_, e)| e.id.clone()).collect();
        let tss: Vec<String> = events.iter().map(|(_, e)| ts(e.ts.with_timezone(&chrono::Utc))).collect();
        let kinds: Vec<String> = events.iter().map(|(_, e)| e.kind.as_str().to_string()).collect();
        let bodies: Vec<String> = events.iter().map(|(_, e)| serde_json::to_string(e).unwrap_or_default()).collect();
        let rows = self.rows(
            "INSERT INTO events (home, seq, id, ts, kind, received_at, payload)
             SELECT h, s, i, t, k, $6, p FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $7::text[])
                 AS e(h, s, i, t, k, p)
             ON CONFLICT DO NOTHING RETURNING home, seq",
            p![homes, seqs, ids, tss, kinds, ts(received), bodies],
        )?;
        let mut new = std::collections::HashSet::new();
        for r in &rows {
            new.insert((self.get::<String>(r, 0)?, self.get::<i64>(r, 1)?));
        }
        // In order: the first of a home's seq that was inserted is new, any later one is not.
        Ok(events.iter().map(|(h, e)| new.remove(&(h.as_str().to_string(), e.seq as i64))).collect())
    }

    fn insert_telemetry_many(
        &mut self,
        _tx: &Tx,
        rows: &[(HomeId, Telemetry)],
        received: Time,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let homes: Vec<String> = rows.iter().map(|(h, _)| h.as_str().to_string()).collect();
        let tss: Vec<String> = rows.iter().map(|(_, t)| ts(t.ts.with_timezone(&chrono::Utc))).collect();
        let bodies: Vec<String> = rows.iter().map(|(_, t)| history_json(t)).collect();
        self.exec(
            "INSERT INTO telemetry (home, ts, received_at, payload)
             SELECT h, t, $3, p FROM unnest($1::text[], $2::text[], $4::text[]) AS r(h, t, p)",
            p![homes, tss, ts(received), bodies],
        )?;
        Ok(())
    }

    fn insert_statuses(&mut self, _tx: &Tx, rows: &[(HomeId, Status)], received: Time) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let homes: Vec<String> = rows.iter().map(|(h, _)| h.as_str().to_string()).collect();
        let bodies: Vec<String> = rows.iter().map(|(_, st)| serde_json::to_string(st).unwrap_or_default()).collect();
        self.exec(
            "INSERT INTO status (home, received_at, payload) SELECT h, $2, p FROM unnest($1::text[], $3::text[]) AS r(h, p)",
            p![homes, ts(received), bodies],
        )?;
        Ok(())
    }

    fn insert_telemetry(&mut self, _tx: &Tx, home: &HomeId, t: &Telemetry, received: Time) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO telemetry (home, ts, received_at, payload) VALUES ($1, $2, $3, $4)",
            p![home.as_str().to_string(), ts(t.ts.with_timezone(&chrono::Utc)), ts(received), history_json(t)],
        )?;
        Ok(())
    }

    fn insert_status(&mut self, _tx: &Tx, home: &HomeId, s: &Status, received: Time) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO status (home, received_at, payload) VALUES ($1, $2, $3)",
            p![home.as_str().to_string(), ts(received), serde_json::to_string(s).unwrap_or_default()],
        )?;
        Ok(())
    }

    fn save_state(&mut self, _tx: &Tx, home: &HomeId, state: &HomeState) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO home_state (id, state) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET state = $2",
            p![home.as_str().to_string(), serde_json::to_string(state).unwrap_or_default()],
        )?;
        Ok(())
    }

    fn save_states(&mut self, _tx: &Tx, states: &[(HomeId, HomeState)]) -> Result<(), StoreError> {
        if states.is_empty() {
            return Ok(());
        }
        // One round trip for the batch, not one per home (each is a hop to the connection's
        // thread and to the server: at 2,000 messages a second they were the limit).
        let ids: Vec<String> = states.iter().map(|(h, _)| h.as_str().to_string()).collect();
        let texts: Vec<String> = states.iter().map(|(_, st)| serde_json::to_string(st).unwrap_or_default()).collect();
        self.exec(
            "INSERT INTO home_state (id, state) SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state",
            p![ids, texts],
        )?;
        Ok(())
    }

    fn states(&self) -> Result<Vec<(HomeId, HomeState)>, StoreError> {
        let mut out = Vec::new();
        for r in self.rows("SELECT id, state FROM home_state", p![])? {
            let (id, text): (String, String) = (self.get(&r, 0)?, self.get(&r, 1)?);
            let id = HomeId::new(&id).map_err(|_| self.corrupt("home id", id.clone()))?;
            out.push((id, serde_json::from_str(&text).map_err(|e| self.corrupt("home state", e.to_string()))?));
        }
        Ok(out)
    }

    fn save_alert(&mut self, _tx: &Tx, a: &Alert) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO alerts (id, home, kind, raised_at, cleared_at, body) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET cleared_at = $5, body = $6",
            p![
                a.id.clone(),
                a.home.as_str().to_string(),
                a.kind.to_string(),
                ts(a.raised_at),
                a.cleared_at.map(ts),
                serde_json::to_string(a).unwrap_or_default()
            ],
        )?;
        Ok(())
    }

    fn save_alerts(&mut self, _tx: &Tx, alerts: &[Alert]) -> Result<(), StoreError> {
        if alerts.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = alerts.iter().map(|a| a.id.clone()).collect();
        let homes: Vec<String> = alerts.iter().map(|a| a.home.as_str().to_string()).collect();
        let kinds: Vec<String> = alerts.iter().map(|a| a.kind.to_string()).collect();
        let raised: Vec<String> = alerts.iter().map(|a| ts(a.raised_at)).collect();
        let cleared: Vec<Option<String>> = alerts.iter().map(|a| a.cleared_at.map(ts)).collect();
        let bodies: Vec<String> = alerts.iter().map(|a| serde_json::to_string(a).unwrap_or_default()).collect();
        self.exec(
            "INSERT INTO alerts (id, home, kind, raised_at, cleared_at, body)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             ON CONFLICT (id) DO UPDATE SET cleared_at = EXCLUDED.cleared_at, body = EXCLUDED.body",
            p![ids, homes, kinds, raised, cleared, bodies],
        )?;
        Ok(())
    }

    fn alerts(&self, active_only: bool, limit: usize) -> Result<Vec<Alert>, StoreError> {
        let limit = limit as i64;
        if active_only {
            self.json_rows(
                "SELECT body FROM alerts WHERE cleared_at IS NULL ORDER BY raised_at DESC LIMIT $1",
                p![limit],
                "alert",
            )
        } else {
            self.json_rows("SELECT body FROM alerts ORDER BY raised_at DESC LIMIT $1", p![limit], "alert")
        }
    }

    fn save_incident(&mut self, _tx: &Tx, i: &Incident) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO incidents (id, municipality, closed_at, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET closed_at = $3, body = $4",
            p![i.id.clone(), i.municipality.clone(), i.closed_at.map(ts), serde_json::to_string(i).unwrap_or_default()],
        )?;
        Ok(())
    }

    fn open_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.json_rows("SELECT body FROM incidents WHERE closed_at IS NULL", p![], "incident")
    }

    fn incident(&self, id: &str) -> Result<Option<Incident>, StoreError> {
        Ok(self.json_rows("SELECT body FROM incidents WHERE id = $1", p![id.to_string()], "incident")?.pop())
    }

    fn enqueue(&mut self, _tx: &Tx, row: &OutboxRow) -> Result<bool, StoreError> {
        let n = self.exec(
            "INSERT INTO outbox (key, alert_id, status, next_attempt_at, body, dest) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT DO NOTHING",
            p![
                row.key.clone(),
                row.alert_id.clone(),
                row.status.as_str().to_string(),
                ts(row.next_attempt_at),
                serde_json::to_string(row).unwrap_or_default(),
                row.channel.destination()
            ],
        )?;
        Ok(n == 1)
    }

    fn enqueue_many(&mut self, _tx: &Tx, rows: &[OutboxRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
        let alerts: Vec<String> = rows.iter().map(|r| r.alert_id.clone()).collect();
        let statuses: Vec<String> = rows.iter().map(|r| r.status.as_str().to_string()).collect();
        let next: Vec<String> = rows.iter().map(|r| ts(r.next_attempt_at)).collect();
        let bodies: Vec<String> = rows.iter().map(|r| serde_json::to_string(r).unwrap_or_default()).collect();
        let dests: Vec<String> = rows.iter().map(|r| r.channel.destination()).collect();
        self.exec(
            "INSERT INTO outbox (key, alert_id, status, next_attempt_at, body, dest)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             ON CONFLICT DO NOTHING",
            p![keys, alerts, statuses, next, bodies, dests],
        )?;
        Ok(())
    }

    fn due(&self, now: Time, limit: usize, skip: &[String]) -> Result<Vec<OutboxRow>, StoreError> {
        self.json_rows(
            "SELECT body FROM outbox WHERE status = 'pending' AND next_attempt_at <= $1 AND dest <> ALL($3)
             ORDER BY next_attempt_at LIMIT $2",
            p![ts(now), limit as i64, skip.to_vec()],
            "outbox row",
        )
    }

    fn due_only(&self, now: Time, limit: usize, only: &[String]) -> Result<Vec<OutboxRow>, StoreError> {
        self.json_rows(
            "SELECT body FROM outbox WHERE status = 'pending' AND next_attempt_at <= $1 AND dest = ANY($3)
             ORDER BY next_attempt_at LIMIT $2",
            p![ts(now), limit as i64, only.to_vec()],
            "outbox row",
        )
    }

    fn next_due_after(&self, now: Time) -> Result<Option<Time>, StoreError> {
        let r = self.rows(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending' AND next_attempt_at > $1",
            p![ts(now)],
        )?;
        let t: Option<String> = match r.first() {
            Some(r) => self.get(r, 0)?,
            None => None,
        };
        Ok(t.as_deref().and_then(parse_ts))
    }

    fn record_attempt(&mut self, _tx: &Tx, row: &OutboxRow) -> Result<(), StoreError> {
        self.exec(
            "UPDATE outbox SET status = $2, next_attempt_at = $3, body = $4 WHERE key = $1",
            p![
                row.key.clone(),
                row.status.as_str().to_string(),
                ts(row.next_attempt_at),
                serde_json::to_string(row).unwrap_or_default()
            ],
        )?;
        Ok(())
    }

    fn outbox_for(&self, alert_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
        self.json_rows("SELECT body FROM outbox WHERE alert_id = $1 ORDER BY n", p![alert_id.to_string()], "outbox row")
    }

    fn outbox_depth(&self) -> Result<u64, StoreError> {
        Ok(self.scalar::<i64>("SELECT COUNT(*) FROM outbox WHERE status = 'pending'", p![])?.max(0) as u64)
    }

    fn request_ack(&mut self, alert_id: &str, role: Role, by: &str, note: Option<&str>) -> Result<i64, StoreError> {
        self.scalar(
            "INSERT INTO ack_requests (alert_id, role, by, note, requested_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            p![
                alert_id.to_string(),
                role.as_str().to_string(),
                by.to_string(),
                note.map(str::to_string),
                ts(crate::edge::clock::now())
            ],
        )
    }

    fn pending_acks(&self) -> Result<Vec<AckRequest>, StoreError> {
        let mut out = Vec::new();
        for r in
            self.rows("SELECT id, alert_id, role, by, note FROM ack_requests WHERE result IS NULL ORDER BY id", p![])?
        {
            let role: String = self.get(&r, 2)?;
            out.push(AckRequest {
                id: self.get(&r, 0)?,
                alert_id: self.get(&r, 1)?,
                role: role.parse::<Role>().map_err(|_| role),
                by: self.get(&r, 3)?,
                note: self.get(&r, 4)?,
            });
        }
        Ok(out)
    }

    fn finish_ack(&mut self, _tx: &Tx, id: i64, result: &str) -> Result<(), StoreError> {
        self.exec("UPDATE ack_requests SET result = $2 WHERE id = $1", p![id, result.to_string()])?;
        Ok(())
    }

    fn ack_result(&self, id: i64) -> Result<Option<String>, StoreError> {
        let r = self.rows("SELECT result FROM ack_requests WHERE id = $1", p![id])?;
        match r.first() {
            Some(r) => self.get(r, 0),
            None => Ok(None),
        }
    }

    fn prune_history(&mut self, before: Time, limit: usize) -> Result<usize, StoreError> {
        let (before, limit) = (ts(before), limit as i64);
        let mut n = self.exec(
            "DELETE FROM telemetry WHERE n IN (SELECT n FROM telemetry WHERE received_at < $1 ORDER BY received_at LIMIT $2)",
            p![before.clone(), limit],
        )? as i64;
        if n < limit {
            n += self.exec(
                "DELETE FROM status WHERE n IN (SELECT n FROM status WHERE received_at < $1 ORDER BY received_at LIMIT $2)",
                p![before, limit - n],
            )? as i64;
        }
        Ok(n as usize)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let r = self.rows("SELECT value FROM meta WHERE key = $1", p![key.to_string()])?;
        r.first().map(|r| self.get(r, 0)).transpose()
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
            p![key.to_string(), value.to_string()],
        )?;
        Ok(())
    }

    fn probe_write(&mut self, now: Time) -> Result<(), StoreError> {
        self.set_meta("probe", &ts(now))
    }

    fn has_messages(&self) -> Result<bool, StoreError> {
        self.scalar("SELECT EXISTS (SELECT 1 FROM events) OR EXISTS (SELECT 1 FROM home_state)", p![])
    }

    fn telemetry_since(&self, home: &HomeId, since: Time, limit: usize) -> Result<Vec<Telemetry>, StoreError> {
        let n: i64 = self.scalar(
            "SELECT count(*) FROM telemetry WHERE home = $1 AND ts >= $2",
            p![home.as_str().to_string(), ts(since)],
        )?;
        let every = (n.max(0) as usize).div_ceil(limit.max(1)).max(1) as i64;
        self.json_rows(
            "SELECT payload FROM (SELECT payload, ts, row_number() OVER (ORDER BY ts) AS k FROM telemetry
             WHERE home = $1 AND ts >= $2) t WHERE k % $3 = 0 OR k = 1 ORDER BY ts",
            p![home.as_str().to_string(), ts(since), every],
            "telemetry",
        )
    }

    fn events_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.json_rows(
            "SELECT payload FROM events WHERE home = $1 ORDER BY ts DESC LIMIT $2",
            p![home.as_str().to_string(), limit as i64],
            "event",
        )
    }

    fn alerts_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.json_rows(
            "SELECT body FROM alerts WHERE home = $1 ORDER BY raised_at DESC LIMIT $2",
            p![home.as_str().to_string(), limit as i64],
            "alert",
        )
    }

    fn alert(&self, id: &str) -> Result<Option<Alert>, StoreError> {
        Ok(self.json_rows("SELECT body FROM alerts WHERE id = $1", p![id.to_string()], "alert")?.pop())
    }

    fn outbox_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for r in self.rows("SELECT status, count(*) FROM outbox GROUP BY status", p![])? {
            out.push((self.get(&r, 0)?, self.get::<i64>(&r, 1)?.max(0) as u64));
        }
        Ok(out)
    }

    fn delivery_inputs(
        &self,
    ) -> Result<(Vec<crate::domain::stats::Sent>, Vec<crate::domain::stats::Acked>), StoreError> {
        // The few fields are read from the stored JSON here, as SQLite's json_extract does.
        let mut sent = Vec::new();
        for r in self.rows(
            "SELECT alert_id, dest, body::json ->> 'role', status, (body::json ->> 'attempts')::bigint,
                    body::json ->> 'delivered_at' FROM outbox",
            p![],
        )? {
            let role: Option<String> = self.get(&r, 2)?;
            let Some(role) = role.and_then(|r| r.parse::<Role>().ok()) else { continue };
            let dest: String = self.get(&r, 1)?;
            let attempts: Option<i64> = self.get(&r, 4)?;
            let delivered_at: Option<String> = self.get(&r, 5)?;
            sent.push(crate::domain::stats::Sent {
                alert_id: self.get(&r, 0)?,
                channel: crate::domain::stats::channel_of(&dest),
                role,
                status: self.get(&r, 3)?,
                attempts: attempts.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32,
                delivered_at: delivered_at.as_deref().and_then(parse_ts),
            });
        }
        let mut acked = Vec::new();
        for sql in [
            "SELECT id, (body::json -> 'acks')::text FROM alerts WHERE json_array_length(body::json -> 'acks') > 0",
            "SELECT id, (body::json -> 'acks')::text FROM incidents WHERE json_array_length(body::json -> 'acks') > 0",
        ] {
            for r in self.rows(sql, p![])? {
                let (id, acks): (String, String) = (self.get(&r, 0)?, self.get(&r, 1)?);
                let acks: Vec<crate::domain::engine::AckInfo> =
                    serde_json::from_str(&acks).map_err(|e| self.corrupt("acks", e.to_string()))?;
                acked.extend(acks.into_iter().filter(|a| a.acknowledges()).map(|a| crate::domain::stats::Acked {
                    alert_id: id.clone(),
                    role: a.role,
                    at: a.at,
                }));
            }
        }
        Ok((sent, acked))
    }
}

/// Who holds the active gateway's lease, as [`PgStore::lease_holder`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseHolder {
    /// The gateway's name (empty: nobody yet).
    pub holder: String,
    /// Its fencing token.
    pub token: i64,
    /// Seconds until it ends by the database's clock (negative: ended).
    pub left_s: f64,
}

/// The lease, by the database's clock: every gateway agrees on when it ends, whatever its own
/// clock says ([`crate::service::lease`] holds the rules).
impl PgStore {
    /// Take the lease if it has ended (or was released): the new fencing token, one more than
    /// the last holder's. `None`: someone holds it.
    pub fn take_lease(&self, holder: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let rows = self.rows(
            "UPDATE lease SET holder = $1, token = token + 1, expires_at = now() + make_interval(secs => $2)
             WHERE name = 'active' AND expires_at < now() RETURNING token",
            p![holder.to_string(), ttl.as_secs_f64()],
        )?;
        rows.first().map(|r| self.get(r, 0)).transpose()
    }

    /// Extend the lease this holder has with this token; false when it is no longer theirs
    /// (it ended, or another gateway took it).
    pub fn renew_lease(&self, holder: &str, token: i64, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.exec(
            "UPDATE lease SET expires_at = now() + make_interval(secs => $3)
             WHERE name = 'active' AND holder = $1 AND token = $2 AND expires_at >= now()",
            p![holder.to_string(), token, ttl.as_secs_f64()],
        )? == 1)
    }

    /// Give the lease up at once (a clean stop), so a standby need not wait for it to end.
    pub fn release_lease(&self, holder: &str, token: i64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE lease SET expires_at = '-infinity' WHERE name = 'active' AND holder = $1 AND token = $2",
            p![holder.to_string(), token],
        )?;
        Ok(())
    }

    /// Say that this gateway is alive, as `role` (`active` or `standby`).
    pub fn gateway_seen(&self, name: &str, role: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO gateways (name, role, seen_at) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET role = $2, seen_at = now()",
            p![name.to_string(), role.to_string()],
        )?;
        Ok(())
    }

    /// The other gateways seen as standbys within `within`, by name.
    pub fn standbys(&self, me: &str, within: Duration) -> Result<Vec<String>, StoreError> {
        self.rows(
            "SELECT name FROM gateways WHERE name <> $1 AND role = 'standby'
             AND seen_at > now() - make_interval(secs => $2) ORDER BY name",
            p![me.to_string(), within.as_secs_f64()],
        )?
        .iter()
        .map(|r| self.get(r, 0))
        .collect()
    }

    /// Who holds the lease.
    pub fn lease_holder(&self) -> Result<LeaseHolder, StoreError> {
        let rows = self.rows(
            "SELECT holder, token, CASE WHEN isfinite(expires_at) THEN EXTRACT(EPOCH FROM (expires_at - now()))::float8 END
             FROM lease WHERE name = 'active'",
            p![],
        )?;
        let r = rows.first().ok_or_else(|| self.err("no lease row".into()))?;
        let left: Option<f64> = self.get(r, 2)?;
        Ok(LeaseHolder { holder: self.get(r, 0)?, token: self.get(r, 1)?, left_s: left.unwrap_or(f64::NEG_INFINITY) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::store::contract::{ev, t};
    use mamori_testkit::postgres::TestDb;

    fn at(db: &TestDb) -> PgLocation {
        PgLocation::parse(&db.settings(), db.password().as_deref(), Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn keeps_the_store_contract() {
        let db = TestDb::new().unwrap();
        let mut s = PgStore::open(&at(&db), true).unwrap();
        crate::edge::store::contract::check(&mut s);
    }

    #[test]
    fn over_tls_the_server_is_verified_for_its_name_and_a_stranger_is_refused() {
        let pki = tempfile::tempdir().unwrap();
        mamori_testkit::pki::make(pki.path()).unwrap();
        let server = mamori_testkit::postgres::TlsServer::start(pki.path()).unwrap();
        let at = |ca: &str| {
            PgLocation::parse(&server.settings(), None, Duration::from_secs(10))
                .unwrap()
                .with_tls(&pki.path().join(ca))
                .unwrap()
        };
        // The CA that signed the server's certificate (for 127.0.0.1): the store works, over TLS.
        let mut s = PgStore::open(&at("ca.pem"), true).unwrap();
        let ssl: bool = s.scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", p![]).unwrap();
        assert!(ssl, "the connection is encrypted");
        crate::edge::store::contract::check(&mut s);
        // Another CA: refused, saying why, with nothing sent in the clear.
        let e = PgStore::open(&at("other-ca.pem"), false).err().unwrap().to_string();
        assert!(e.contains("certificate") || e.contains("UnknownIssuer"), "{e}");
        // The same server reached by a name its certificate does not carry: refused.
        let by_name = PgLocation::parse(
            &format!("host=127.0.0.2 hostaddr=127.0.0.1 port={} user=postgres dbname=postgres", server.port()),
            None,
            Duration::from_secs(10),
        )
        .unwrap()
        .with_tls(&pki.path().join("ca.pem"))
        .unwrap();
        let e = PgStore::open(&by_name, false).err().unwrap().to_string();
        assert!(e.contains("NotValidForName") || e.contains("not valid for"), "{e}");
        // Without TLS configured, the same server is plain (what the config allows only to
        // loopback).
        let plain =
            PgStore::open(&PgLocation::parse(&server.settings(), None, Duration::from_secs(10)).unwrap(), false)
                .unwrap();
        let ssl: bool = plain.scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", p![]).unwrap();
        assert!(!ssl);
    }

    #[test]
    fn run_refuses_a_database_without_tables_and_init_makes_them_once() {
        let db = TestDb::new().unwrap();
        let e = PgStore::open(&at(&db), false).err().unwrap();
        assert!(matches!(e, StoreError::NoSchema { .. }), "{e}");
        assert!(e.to_string().contains("mamori-gateway init"), "{e}");
        drop(PgStore::open(&at(&db), true).unwrap());
        // Again, and by `run`: migrations already applied are not applied twice.
        let s = PgStore::open(&at(&db), false).unwrap();
        assert!(s.meta(META_CREATED_AT).unwrap().is_some());
    }

    #[test]
    fn two_connections_appending_at_once_never_fork_the_audit_chain() {
        let db = TestDb::new().unwrap();
        drop(PgStore::open(&at(&db), true).unwrap());
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let at = at(&db);
                std::thread::spawn(move || {
                    let mut s = PgStore::open(&at, false).unwrap();
                    for i in 0..60 {
                        crate::admin::audit::append(&mut s, t(i), &format!("w{w}"), "-", "view_home", "h", "").unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let s = PgStore::open(&at(&db), false).unwrap();
        assert!(matches!(
            crate::admin::audit::verify(&s).unwrap(),
            crate::admin::audit::Verdict::Intact { entries: 120, .. }
        ));
        // Nobody rewrites it, not even the gateway's own connection.
        let e = s.exec("UPDATE audit SET actor = 'x' WHERE seq = 2", p![]).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(s.exec("TRUNCATE audit", p![]).is_err());
    }

    #[test]
    fn a_lost_connection_is_made_again_but_never_inside_a_batch() {
        let db = TestDb::new().unwrap();
        let mut s = PgStore::open(&at(&db), true).unwrap();
        let home = HomeId::new("h").unwrap();
        // Outside a transaction: the call that finds the connection gone fails, the next one
        // connects again.
        db.cut_connections().unwrap();
        let _ = s.meta("x");
        assert_eq!(s.meta("x").unwrap(), None);
        // Inside one: nothing of the batch is committed on a new connection.
        let tx = s.begin().unwrap();
        assert!(s.insert_event(&tx, &home, &ev(1), t(0)).unwrap());
        db.cut_connections().unwrap();
        let _ = s.insert_event(&tx, &home, &ev(2), t(0));
        assert!(s.insert_event(&tx, &home, &ev(3), t(0)).is_err(), "no statement of the batch runs elsewhere");
        assert!(s.commit(tx).is_err());
        assert!(s.events_for(&home, 10).unwrap().is_empty(), "the lost batch left nothing");
        // The batch again, whole.
        let tx = s.begin().unwrap();
        assert!(s.insert_event(&tx, &home, &ev(1), t(0)).unwrap());
        s.commit(tx).unwrap();
        assert_eq!(s.events_for(&home, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_fenced_store_writes_nothing_once_its_token_is_not_the_lease() {
        let db = TestDb::new().unwrap();
        let mut a = PgStore::open(&at(&db), true).unwrap();
        let b = PgStore::open(&at(&db), false).unwrap();
        let ttl = Duration::from_secs(30);
        let token = a.take_lease("gw-a", ttl).unwrap().unwrap();
        a.fence(Some(("gw-a".into(), token)));
        let tx = a.begin().unwrap();
        a.set_meta("k", "1").unwrap();
        a.commit(tx).unwrap();
        // Another gateway takes over.
        a.release_lease("gw-a", token).unwrap();
        b.take_lease("gw-b", ttl).unwrap().unwrap();
        let e = a.begin().unwrap_err().to_string();
        assert!(e.contains("no longer holds the lease"), "{e}");
        // The refused transaction is not left open: the store's own bookkeeping (whole in
        // itself, not fenced) is seen by the other gateway at once.
        a.set_meta("after", "x").unwrap();
        assert_eq!(b.meta("after").unwrap().as_deref(), Some("x"));
        assert_eq!(b.meta("k").unwrap().as_deref(), Some("1"));
        // A care plan from the deposed gateway's dashboard is not written either.
        let home: Home = serde_json::from_value(serde_json::json!({
            "id": "h", "municipality": "431001", "label": "K", "devices": [], "backup": [], "contacts": []
        }))
        .unwrap();
        let e = a.upsert_homes(std::slice::from_ref(&home), "coord-a").unwrap_err().to_string();
        assert!(e.contains("no longer holds the lease"), "{e}");
        assert!(b.homes().unwrap().is_empty() && b.home_versions(&home.id).unwrap().is_empty());
        // Unfenced (one machine's store), it writes as before.
        a.fence(None);
        let tx = a.begin().unwrap();
        a.set_meta("k", "2").unwrap();
        a.commit(tx).unwrap();
    }

    #[test]
    fn a_password_in_the_connection_settings_is_refused_and_never_shown() {
        let e = PgLocation::parse("host=db user=mamori password=hunter2 dbname=m", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(e.contains("postgres_password") && !e.contains("hunter2"), "{e}");
        let at = PgLocation::parse("host=db port=6432 user=mamori dbname=m", Some("hunter2"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(at.target, "postgres db:6432/m");
        assert!(!format!("{at:?}").contains("hunter2"));
    }
}
