//! The embedded store: one SQLite file, `<data_dir>/mamori.db`, in WAL mode with
//! `synchronous=FULL`, created readable by its owner only (it holds personal data).
//!
//! `PRAGMA user_version` holds the schema version; [`MIGRATIONS`] are applied in order, each
//! in its own transaction. The accounts and audit rows are in `sqlite_accounts.rs`.

use std::path::{Path, PathBuf};

use chrono::Utc;
use mamori_protocol::mqtt::{Event, HomeId, Role, Status, Telemetry};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    history_json, parse_ts, ts, AckRequest, HomeVersion, IncidentNote, OutboxRow, Store, StoreError, Tx,
    META_CREATED_AT, META_FIRST_MESSAGE_AT,
};
use crate::domain::engine::{Alert, HomeState, Incident, Time};
use crate::domain::homes::Home;

/// Schema migrations, in order.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE homes (id TEXT PRIMARY KEY, municipality TEXT NOT NULL, plan TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE home_state (id TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE events (home TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, ts TEXT NOT NULL, kind TEXT NOT NULL,
    received_at TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (home, seq)) WITHOUT ROWID;
CREATE TABLE telemetry (home TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, payload TEXT NOT NULL);
CREATE INDEX telemetry_home_ts ON telemetry (home, ts);
CREATE TABLE status (home TEXT NOT NULL, received_at TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE alerts (id TEXT PRIMARY KEY, home TEXT NOT NULL, kind TEXT NOT NULL, raised_at TEXT NOT NULL,
    cleared_at TEXT, body TEXT NOT NULL);
CREATE INDEX alerts_active ON alerts (cleared_at, raised_at);
CREATE TABLE incidents (id TEXT PRIMARY KEY, municipality TEXT NOT NULL, closed_at TEXT, body TEXT NOT NULL);
CREATE TABLE outbox (key TEXT PRIMARY KEY, alert_id TEXT NOT NULL, status TEXT NOT NULL, next_attempt_at TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX outbox_alert ON outbox (alert_id);
CREATE TABLE ack_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, alert_id TEXT NOT NULL, role TEXT NOT NULL,
    by TEXT NOT NULL, note TEXT, requested_at TEXT NOT NULL, result TEXT);
"#,
    r#"
CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL UNIQUE, display_name TEXT NOT NULL,
    role TEXT NOT NULL, municipalities TEXT NOT NULL, homes TEXT NOT NULL, password_hash TEXT NOT NULL,
    totp_secret TEXT, totp_last_step INTEGER NOT NULL DEFAULT 0, disabled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL);
CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users (id), csrf TEXT NOT NULL,
    created_at TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE api_tokens (id INTEGER PRIMARY KEY AUTOINCREMENT, token_hash TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL REFERENCES users (id), name TEXT NOT NULL, created_at TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, ip TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE INDEX events_home_ts ON events (home, ts);
CREATE INDEX alerts_home ON alerts (home, raised_at);
"#,
    // The destination of each outbox row (fair send slots skip full ones in the due query),
    // pruning by arrival time with an index, and the store's own bookkeeping.
    r#"
ALTER TABLE outbox ADD COLUMN dest TEXT NOT NULL DEFAULT '';
UPDATE outbox SET dest = CASE
    WHEN json_extract(body, '$.channel.webhook') IS NOT NULL THEN 'webhook:' || json_extract(body, '$.channel.webhook')
    WHEN json_extract(body, '$.channel.sms') IS NOT NULL THEN 'sms'
    WHEN json_extract(body, '$.channel.email') IS NOT NULL THEN 'smtp'
    WHEN json_extract(body, '$.channel.console') IS NOT NULL THEN 'console:' || json_extract(body, '$.channel.console')
    ELSE '' END;
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, dest);
CREATE INDEX telemetry_received ON telemetry (received_at);
CREATE INDEX status_received ON status (received_at);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
    // Every version of every care plan: who changed it, when (the dashboard's plan editor,
    // `homes import`, the homes file at start). The plans stored before this start history.
    r#"
CREATE TABLE home_versions (home TEXT NOT NULL, version INTEGER NOT NULL, at TEXT NOT NULL, changed_by TEXT NOT NULL,
    plan TEXT NOT NULL, PRIMARY KEY (home, version)) WITHOUT ROWID;
INSERT INTO home_versions (home, version, at, changed_by, plan) SELECT id, 1, updated_at, '', plan FROM homes;
"#,
    // The notes of an incident's after-action record (web/review.rs).
    r#"
CREATE TABLE incident_notes (n INTEGER PRIMARY KEY AUTOINCREMENT, incident TEXT NOT NULL, at TEXT NOT NULL,
    written_by TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX incident_notes_incident ON incident_notes (incident, n);
"#,
];

/// The SQLite store.
pub struct SqliteStore {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
}

impl SqliteStore {
    /// The database file in a data folder.
    pub fn file(dir: &Path) -> PathBuf {
        dir.join("mamori.db")
    }

    /// Open (creating and migrating) `<dir>/mamori.db`. The file is created readable by its
    /// owner only: it holds personal data.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = Self::file(dir);
        let created = !path.exists();
        let mut store = Self::open_file(&path)?;
        if created || store.meta(META_CREATED_AT)?.is_none() {
            store.set_meta(META_CREATED_AT, &ts(crate::edge::clock::now()))?;
        }
        Ok(store)
    }

    /// Open an existing `<dir>/mamori.db` (migrating it); [`StoreError::Missing`] when there
    /// is none. `run` uses this: it never creates a database (an empty `data_dir` is a data
    /// volume that is not mounted far more often than a new installation).
    pub fn open_existing(dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = Self::file(dir);
        if !path.is_file() {
            return Err(StoreError::Missing { path });
        }
        Self::open_file(&path)
    }

    fn open_file(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let db = |source: rusqlite::Error| StoreError::Sqlite { path: path.clone(), detail: source.to_string() };
        if !path.exists() {
            // Create it 0600 before SQLite opens it (SQLite would use the umask, 0644).
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        } else {
            // A database from before files were created private: made private now (SQLite gives
            // its -wal and -shm files the database's own mode).
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(&path) {
                if m.permissions().mode() & 0o077 != 0 {
                    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot make the database private (0600)");
                    }
                }
            }
        }
        let conn = Connection::open(&path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db)?;
        let mut store = SqliteStore { conn, path };
        store.migrate()?;
        // A database from before `first_message_at` was kept: it has stored messages if it
        // has events or home states.
        if store.meta(META_FIRST_MESSAGE_AT)?.is_none() && store.has_messages()? {
            // Best effort: a store that cannot write now still opens (and degrades).
            let _ = store.set_meta(META_FIRST_MESSAGE_AT, &ts(crate::edge::clock::now()));
        }
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for SQLite's own maintenance (a WAL checkpoint in a benchmark) and this
    /// backend's tests. Nothing in the gateway reads or writes through it: see [`super::Store`].
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(super) fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source: rusqlite::Error| StoreError::Sqlite { path: self.path.clone(), detail: source.to_string() }
    }

    pub(super) fn corrupt(&self, what: &'static str) -> impl Fn(serde_json::Error) -> StoreError + '_ {
        move |e| StoreError::Corrupt { path: self.path.clone(), what, detail: e.to_string() }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(self.db())?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
            let tx = self.conn.transaction().map_err(|source: rusqlite::Error| StoreError::Sqlite {
                path: self.path.clone(),
                detail: source.to_string(),
            })?;
            tx.execute_batch(m).map_err(|source: rusqlite::Error| StoreError::Sqlite {
                path: self.path.clone(),
                detail: source.to_string(),
            })?;
            tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(|source: rusqlite::Error| {
                StoreError::Sqlite { path: self.path.clone(), detail: source.to_string() }
            })?;
            tx.commit().map_err(|source: rusqlite::Error| StoreError::Sqlite {
                path: self.path.clone(),
                detail: source.to_string(),
            })?;
        }
        Ok(())
    }

    pub(super) fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.db())?;
        let rows = stmt.query_map(p, |r| r.get::<_, String>(0)).map_err(self.db())?;
        let mut out = Vec::new();
        for r in rows {
            let text = r.map_err(self.db())?;
            out.push(serde_json::from_str(&text).map_err(self.corrupt(what))?);
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<Tx, StoreError> {
        if !self.conn.is_autocommit() {
            // A transaction left open (a ROLLBACK that itself failed, on an I/O error): each
            // batch starts clean, or every later BEGIN would fail and the gateway never
            // recover.
            tracing::warn!(store = %self.path.display(), "a transaction was left open: rolled back before the next");
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(self.db())?;
        Ok(Tx::begun())
    }

    fn commit(&mut self, _tx: Tx) -> Result<(), StoreError> {
        let committed = self.conn.execute_batch("COMMIT").map_err(self.db());
        if committed.is_err() && !self.conn.is_autocommit() {
            // A COMMIT that failed (a full disk, SQLITE_BUSY) can leave the transaction open:
            // nothing of it is kept.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        committed
    }

    fn rollback(&mut self, _tx: Tx) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn upsert_homes(&mut self, homes: &[Home], by: &str) -> Result<(), StoreError> {
        let now = ts(crate::edge::clock::now());
        let path = self.path.clone();
        let db = move |source: rusqlite::Error| StoreError::Sqlite { path: path.clone(), detail: source.to_string() };
        let tx = self.conn.transaction().map_err(&db)?;
        for h in homes {
            let plan = serde_json::to_string(h).unwrap_or_default();
            let stored: Option<String> = tx
                .query_row("SELECT plan FROM homes WHERE id = ?1", params![h.id.as_str()], |r| r.get(0))
                .optional()
                .map_err(&db)?;
            if stored.as_deref() == Some(plan.as_str()) {
                continue;
            }
            tx.execute(
                "INSERT INTO homes (id, municipality, plan, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET municipality = ?2, plan = ?3, updated_at = ?4",
                params![h.id.as_str(), h.municipality, plan, now],
            )
            .map_err(&db)?;
            tx.execute(
                "INSERT INTO home_versions (home, version, at, changed_by, plan)
                 SELECT ?1, COALESCE(MAX(version), 0) + 1, ?2, ?3, ?4 FROM home_versions WHERE home = ?1",
                params![h.id.as_str(), now, by, plan],
            )
            .map_err(&db)?;
        }
        tx.commit().map_err(&db)
    }

    fn home_versions(&self, home: &HomeId) -> Result<Vec<HomeVersion>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT version, at, changed_by, plan FROM home_versions WHERE home = ?1 ORDER BY version DESC",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![home.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for r in rows {
            let (version, at, by, plan) = r.map_err(self.db())?;
            out.push(HomeVersion {
                version: u32::try_from(version).unwrap_or(0),
                at: parse_ts(&at).ok_or_else(|| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: "home version",
                    detail: at.clone(),
                })?,
                by,
                plan: serde_json::from_str(&plan).map_err(self.corrupt("home version"))?,
            });
        }
        Ok(out)
    }

    fn latest_plans_by(&self, by: &str) -> Result<Vec<Home>, StoreError> {
        self.json_rows(
            "SELECT plan FROM home_versions v WHERE changed_by = ?1 AND version =
             (SELECT MAX(version) FROM home_versions w WHERE w.home = v.home AND w.changed_by = ?1)",
            params![by],
            "home version",
        )
    }

    fn add_incident_note(&mut self, incident: &str, at: Time, by: &str, text: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO incident_notes (incident, at, written_by, text) VALUES (?1, ?2, ?3, ?4)",
                params![incident, ts(at), by, text],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn incident_notes(&self, incident: &str) -> Result<Vec<IncidentNote>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT at, written_by, text FROM incident_notes WHERE incident = ?1 ORDER BY n")
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![incident], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for r in rows {
            let (at, by, text) = r.map_err(self.db())?;
            let at = parse_ts(&at).ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                what: "incident note",
                detail: at.clone(),
            })?;
            out.push(IncidentNote { at, by, text });
        }
        Ok(out)
    }

    fn homes(&self) -> Result<Vec<Home>, StoreError> {
        self.json_rows("SELECT plan FROM homes ORDER BY id", [], "home")
    }

    fn insert_event(&mut self, _tx: &Tx, home: &HomeId, e: &Event, received: Time) -> Result<bool, StoreError> {
        let payload = serde_json::to_string(e).unwrap_or_default();
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO events (home, seq, id, ts, kind, received_at, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    home.as_str(),
                    e.seq as i64,
                    e.id,
                    ts(e.ts.with_timezone(&Utc)),
                    e.kind.as_str(),
                    ts(received),
                    payload
                ])
            })
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn insert_telemetry(&mut self, _tx: &Tx, home: &HomeId, t: &Telemetry, received: Time) -> Result<(), StoreError> {
        let payload = history_json(t);
        self.conn
            .prepare_cached("INSERT INTO telemetry (home, ts, received_at, payload) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![home.as_str(), ts(t.ts.with_timezone(&Utc)), ts(received), payload]))
            .map_err(self.db())?;
        Ok(())
    }

    fn insert_status(&mut self, _tx: &Tx, home: &HomeId, s: &Status, received: Time) -> Result<(), StoreError> {
        let payload = serde_json::to_string(s).unwrap_or_default();
        self.conn
            .prepare_cached("INSERT INTO status (home, received_at, payload) VALUES (?1, ?2, ?3)")
            .and_then(|mut st| st.execute(params![home.as_str(), ts(received), payload]))
            .map_err(self.db())?;
        Ok(())
    }

    fn save_state(&mut self, _tx: &Tx, home: &HomeId, state: &HomeState) -> Result<(), StoreError> {
        let body = serde_json::to_string(state).unwrap_or_default();
        self.conn
            .prepare_cached(
                "INSERT INTO home_state (id, state) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET state = ?2",
            )
            .and_then(|mut s| s.execute(params![home.as_str(), body]))
            .map_err(self.db())?;
        Ok(())
    }

    fn states(&self) -> Result<Vec<(HomeId, HomeState)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, state FROM home_state").map_err(self.db())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(self.db())?;
        let mut out = Vec::new();
        for r in rows {
            let (id, text) = r.map_err(self.db())?;
            let id = HomeId::new(&id).map_err(|_| StoreError::Corrupt {
                path: self.path.clone(),
                what: "home id",
                detail: id.clone(),
            })?;
            out.push((id, serde_json::from_str(&text).map_err(self.corrupt("home state"))?));
        }
        Ok(out)
    }

    fn save_alert(&mut self, _tx: &Tx, a: &Alert) -> Result<(), StoreError> {
        let body = serde_json::to_string(a).unwrap_or_default();
        self.conn
            .prepare_cached(
                "INSERT INTO alerts (id, home, kind, raised_at, cleared_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET cleared_at = ?5, body = ?6",
            )
            .and_then(|mut s| {
                s.execute(params![a.id, a.home.as_str(), a.kind.as_str(), ts(a.raised_at), a.cleared_at.map(ts), body])
            })
            .map_err(self.db())?;
        Ok(())
    }

    fn alerts(&self, active_only: bool, limit: usize) -> Result<Vec<Alert>, StoreError> {
        let sql = if active_only {
            "SELECT body FROM alerts WHERE cleared_at IS NULL ORDER BY raised_at DESC LIMIT ?1"
        } else {
            "SELECT body FROM alerts ORDER BY raised_at DESC LIMIT ?1"
        };
        self.json_rows(sql, [limit as i64], "alert")
    }

    fn save_incident(&mut self, _tx: &Tx, i: &Incident) -> Result<(), StoreError> {
        let body = serde_json::to_string(i).unwrap_or_default();
        self.conn
            .prepare_cached(
                "INSERT INTO incidents (id, municipality, closed_at, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET closed_at = ?3, body = ?4",
            )
            .and_then(|mut s| s.execute(params![i.id, i.municipality, i.closed_at.map(ts), body]))
            .map_err(self.db())?;
        Ok(())
    }

    fn open_incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.json_rows("SELECT body FROM incidents WHERE closed_at IS NULL", [], "incident")
    }

    fn incident(&self, id: &str) -> Result<Option<Incident>, StoreError> {
        Ok(self.json_rows("SELECT body FROM incidents WHERE id = ?1", [id], "incident")?.pop())
    }

    fn enqueue(&mut self, _tx: &Tx, row: &OutboxRow) -> Result<bool, StoreError> {
        let body = serde_json::to_string(row).unwrap_or_default();
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO outbox (key, alert_id, status, next_attempt_at, body, dest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    row.key,
                    row.alert_id,
                    row.status.as_str(),
                    ts(row.next_attempt_at),
                    body,
                    row.channel.destination()
                ])
            })
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn due(&self, now: Time, limit: usize, skip: &[String]) -> Result<Vec<OutboxRow>, StoreError> {
        let skip = serde_json::to_string(skip).unwrap_or_else(|_| "[]".into());
        self.json_rows(
            "SELECT body FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?1
             AND dest NOT IN (SELECT value FROM json_each(?3)) ORDER BY next_attempt_at LIMIT ?2",
            params![ts(now), limit as i64, skip],
            "outbox row",
        )
    }

    fn due_only(&self, now: Time, limit: usize, only: &[String]) -> Result<Vec<OutboxRow>, StoreError> {
        let only = serde_json::to_string(only).unwrap_or_else(|_| "[]".into());
        self.json_rows(
            "SELECT body FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?1
             AND dest IN (SELECT value FROM json_each(?3)) ORDER BY next_attempt_at LIMIT ?2",
            params![ts(now), limit as i64, only],
            "outbox row",
        )
    }

    fn next_due_after(&self, now: Time) -> Result<Option<Time>, StoreError> {
        let t: Option<String> = self
            .conn
            .prepare_cached("SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending' AND next_attempt_at > ?1")
            .and_then(|mut s| s.query_row([ts(now)], |r| r.get(0)).optional())
            .map_err(self.db())?
            .flatten();
        Ok(t.as_deref().and_then(parse_ts))
    }

    fn record_attempt(&mut self, _tx: &Tx, row: &OutboxRow) -> Result<(), StoreError> {
        let body = serde_json::to_string(row).unwrap_or_default();
        self.conn
            .prepare_cached("UPDATE outbox SET status = ?2, next_attempt_at = ?3, body = ?4 WHERE key = ?1")
            .and_then(|mut s| s.execute(params![row.key, row.status.as_str(), ts(row.next_attempt_at), body]))
            .map_err(self.db())?;
        Ok(())
    }

    fn outbox_for(&self, alert_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
        self.json_rows("SELECT body FROM outbox WHERE alert_id = ?1 ORDER BY rowid", [alert_id], "outbox row")
    }

    fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM outbox WHERE status = 'pending'", [], |r| r.get(0))
            .map_err(self.db())?;
        Ok(n as u64)
    }

    fn request_ack(&mut self, alert_id: &str, role: Role, by: &str, note: Option<&str>) -> Result<i64, StoreError> {
        let role = role.as_str();
        self.conn
            .execute(
                "INSERT INTO ack_requests (alert_id, role, by, note, requested_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![alert_id, role, by, note, ts(crate::edge::clock::now())],
            )
            .map_err(self.db())?;
        Ok(self.conn.last_insert_rowid())
    }

    fn pending_acks(&self) -> Result<Vec<AckRequest>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, alert_id, role, by, note FROM ack_requests WHERE result IS NULL ORDER BY id")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for r in rows {
            let (id, alert_id, role, by, note) = r.map_err(self.db())?;
            let role = role.parse::<Role>().map_err(|_| role);
            out.push(AckRequest { id, alert_id, role, by, note });
        }
        Ok(out)
    }

    fn finish_ack(&mut self, _tx: &Tx, id: i64, result: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE ack_requests SET result = ?2 WHERE id = ?1", params![id, result])
            .map_err(self.db())?;
        Ok(())
    }

    fn ack_result(&self, id: i64) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT result FROM ack_requests WHERE id = ?1", [id], |r| r.get::<_, Option<String>>(0))
            .optional()
            .map(Option::flatten)
            .map_err(self.db())
    }

    fn prune_history(&mut self, before: Time, limit: usize) -> Result<usize, StoreError> {
        let (before, limit) = (ts(before), limit as i64);
        let mut n = self
            .conn
            .prepare_cached(
                "DELETE FROM telemetry WHERE rowid IN
                 (SELECT rowid FROM telemetry WHERE received_at < ?1 ORDER BY received_at LIMIT ?2)",
            )
            .and_then(|mut s| s.execute(params![before, limit]))
            .map_err(self.db())?;
        if (n as i64) < limit {
            n += self
                .conn
                .prepare_cached(
                    "DELETE FROM status WHERE rowid IN
                     (SELECT rowid FROM status WHERE received_at < ?1 ORDER BY received_at LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![before, limit - n as i64]))
                .map_err(self.db())?;
        }
        Ok(n)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(self.db())
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2")
            .and_then(|mut s| s.execute([key, value]))
            .map_err(self.db())?;
        Ok(())
    }

    fn probe_write(&mut self, now: Time) -> Result<(), StoreError> {
        self.set_meta("probe", &ts(now))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether any message from a home was ever stored (events or home states).
    fn has_messages(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT EXISTS (SELECT 1 FROM events) OR EXISTS (SELECT 1 FROM home_state)", [], |r| r.get(0))
            .map_err(self.db())
    }

    /// A home's telemetry since `since`, oldest first (at most `limit` rows, evenly thinned).
    fn telemetry_since(&self, home: &HomeId, since: Time, limit: usize) -> Result<Vec<Telemetry>, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM telemetry WHERE home = ?1 AND ts >= ?2",
                params![home.as_str(), ts(since)],
                |r| r.get(0),
            )
            .map_err(self.db())?;
        let every = (n as usize).div_ceil(limit.max(1)).max(1) as i64;
        self.json_rows(
            "SELECT payload FROM (SELECT payload, ts, row_number() OVER (ORDER BY ts) AS k FROM telemetry
             WHERE home = ?1 AND ts >= ?2) WHERE k % ?3 = 0 OR k = 1 ORDER BY ts",
            params![home.as_str(), ts(since), every],
            "telemetry",
        )
    }

    /// A home's events, newest first.
    fn events_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.json_rows(
            "SELECT payload FROM events WHERE home = ?1 ORDER BY ts DESC LIMIT ?2",
            params![home.as_str(), limit as i64],
            "event",
        )
    }

    /// A home's alerts, active and cleared, newest first.
    fn alerts_for(&self, home: &HomeId, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.json_rows(
            "SELECT body FROM alerts WHERE home = ?1 ORDER BY raised_at DESC LIMIT ?2",
            params![home.as_str(), limit as i64],
            "alert",
        )
    }

    /// One alert, active or cleared.
    fn alert(&self, id: &str) -> Result<Option<Alert>, StoreError> {
        Ok(self.json_rows("SELECT body FROM alerts WHERE id = ?1", [id], "alert")?.pop())
    }

    /// Outbox rows by status.
    fn outbox_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT status, count(*) FROM outbox GROUP BY status").map_err(self.db())?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    /// What the delivery statistics need ([`crate::domain::stats`]): a few fields of every outbox
    /// row, and every acknowledgement of an alert or incident, read inside SQLite (no message
    /// text is parsed).
    fn delivery_inputs(
        &self,
    ) -> Result<(Vec<crate::domain::stats::Sent>, Vec<crate::domain::stats::Acked>), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT alert_id, dest, json_extract(body, '$.role'), status, json_extract(body, '$.attempts'),
                        json_extract(body, '$.delivered_at') FROM outbox",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(self.db())?;
        let time = |t: Option<String>| {
            t.and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&chrono::Utc))
        };
        let mut sent = Vec::new();
        for r in rows {
            let (alert_id, dest, role, status, attempts, delivered_at) = r.map_err(self.db())?;
            let Some(role) = role.as_deref().and_then(|r| r.parse::<Role>().ok()) else { continue };
            sent.push(crate::domain::stats::Sent {
                alert_id,
                channel: crate::domain::stats::channel_of(&dest),
                role,
                status,
                attempts: attempts.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32,
                delivered_at: time(delivered_at),
            });
        }
        let mut acked = Vec::new();
        for table in ["alerts", "incidents"] {
            let mut stmt = self
                .conn
                .prepare_cached(&format!(
                    "SELECT id, json_extract(body, '$.acks') FROM {table} WHERE json_array_length(body, '$.acks') > 0"
                ))
                .map_err(self.db())?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(self.db())?;
            for r in rows {
                let (id, acks) = r.map_err(self.db())?;
                let acks: Vec<crate::domain::engine::AckInfo> =
                    serde_json::from_str(&acks).map_err(self.corrupt("acks"))?;
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

#[cfg(test)]
mod tests;
