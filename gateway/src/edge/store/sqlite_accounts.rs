//! The accounts and audit rows of the SQLite store ([`AccountRows`], [`AuditRows`]).
//!
//! An audit append takes SQLite's write lock first (`BEGIN IMMEDIATE`), so the dashboard's
//! connection and a CLI command can both append without forking the chain; triggers refuse
//! `UPDATE` and `DELETE` on the table.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{parse_ts, ts, AccountRows, AuditRows, LoginSecrets, SessionRow, SqliteStore, StoreError, TokenRow};
use crate::admin::accounts::{AccountRole, NewUser, User};
use crate::admin::audit::Entry;
use crate::domain::engine::Time;

const USER_COLUMNS: &str = "id, username, display_name, role, municipalities, homes, totp_secret IS NOT NULL, disabled";

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let s: String = r.get(i)?;
        Ok(serde_json::from_str(&s).unwrap_or_default())
    };
    let role: String = r.get(3)?;
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        display_name: r.get(2)?,
        // An unknown role (a newer version's) gets the narrowest one.
        role: AccountRole::parse(&role).unwrap_or(AccountRole::Family),
        municipalities: list(4)?,
        homes: list(5)?,
        totp: r.get(6)?,
        disabled: r.get(7)?,
    })
}

fn entry_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        seq: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        ip: r.get(3)?,
        action: r.get(4)?,
        target: r.get(5)?,
        detail: r.get(6)?,
        prev: r.get(7)?,
        hash: r.get(8)?,
    })
}

const ENTRY_COLUMNS: &str = "seq, at, actor, ip, action, target, detail, prev, hash";

impl SqliteStore {
    fn one_user(&self, filter: &str, p: impl rusqlite::Params) -> Result<Option<User>, StoreError> {
        self.conn
            .query_row(&format!("SELECT {USER_COLUMNS} FROM users WHERE {filter}"), p, user_row)
            .optional()
            .map_err(self.db())
    }
}

impl AccountRows for SqliteStore {
    fn users(&self) -> Result<Vec<User>, StoreError> {
        let mut stmt =
            self.conn.prepare(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY username")).map_err(self.db())?;
        let rows = stmt.query_map([], user_row).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        self.one_user("username = ?1", [username])
    }

    fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError> {
        self.one_user("id = ?1", [id])
    }

    fn home_exists(&self, id: &str) -> Result<bool, StoreError> {
        self.conn.query_row("SELECT EXISTS (SELECT 1 FROM homes WHERE id = ?1)", [id], |r| r.get(0)).map_err(self.db())
    }

    fn insert_user(
        &mut self,
        u: &NewUser,
        password_hash: &str,
        totp_secret: Option<&str>,
        now: Time,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO users (username, display_name, role, municipalities, homes, password_hash, totp_secret, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    u.username,
                    u.display_name.trim(),
                    u.role.as_str(),
                    serde_json::to_string(&u.municipalities).unwrap_or_default(),
                    serde_json::to_string(&u.homes).unwrap_or_default(),
                    password_hash,
                    totp_secret,
                    ts(now)
                ],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn login_secrets(&self, username: &str) -> Result<Option<LoginSecrets>, StoreError> {
        self.conn
            .query_row(
                "SELECT password_hash, totp_secret, totp_last_step FROM users WHERE username = ?1",
                [username],
                |r| Ok(LoginSecrets { password_hash: r.get(0)?, totp_secret: r.get(1)?, totp_last_step: r.get(2)? }),
            )
            .optional()
            .map_err(self.db())
    }

    fn use_totp_step(&mut self, user_id: i64, step: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE users SET totp_last_step = ?1 WHERE id = ?2 AND totp_last_step < ?1",
                params![step, user_id],
            )
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn replace_password(&mut self, username: &str, password_hash: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let db = |source: rusqlite::Error| StoreError::Sqlite { path: path.clone(), detail: source.to_string() };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let n = tx
            .execute("UPDATE users SET password_hash = ?1 WHERE username = ?2", params![password_hash, username])
            .map_err(db)?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = ?1)", [username])
            .map_err(db)?;
        tx.execute(
            "UPDATE api_tokens SET revoked = 1 WHERE user_id = (SELECT id FROM users WHERE username = ?1)",
            [username],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(true)
    }

    fn totp_secrets(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT id, totp_secret FROM users WHERE totp_secret IS NOT NULL").map_err(self.db())?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn set_totp_secret(&mut self, user_id: i64, stored: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE users SET totp_secret = ?1 WHERE id = ?2", params![stored, user_id])
            .map_err(self.db())?;
        Ok(())
    }

    fn enrol_totp(&mut self, username: &str, stored: &str, step: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE users SET totp_secret = ?1, totp_last_step = ?2 WHERE username = ?3",
                params![stored, step, username],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn set_disabled(&mut self, username: &str, disabled: bool) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("UPDATE users SET disabled = ?1 WHERE username = ?2", params![disabled, username])
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn set_scope(
        &mut self,
        username: &str,
        role: AccountRole,
        municipalities: &[String],
        homes: &[String],
    ) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE users SET role = ?1, municipalities = ?2, homes = ?3 WHERE username = ?4",
                params![
                    role.as_str(),
                    serde_json::to_string(municipalities).unwrap_or_default(),
                    serde_json::to_string(homes).unwrap_or_default(),
                    username
                ],
            )
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn end_sessions(&mut self, username: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = ?1)", [username])
            .map_err(self.db())?;
        Ok(())
    }

    fn insert_session(&mut self, id_hash: &str, user_id: i64, csrf: &str, now: Time) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO sessions (id_hash, user_id, csrf, created_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![id_hash, user_id, csrf, ts(now)],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        self.conn
            .query_row("SELECT user_id, csrf, created_at, last_seen FROM sessions WHERE id_hash = ?1", [id_hash], |r| {
                Ok(SessionRow {
                    user_id: r.get(0)?,
                    csrf: r.get(1)?,
                    created_at: parse_ts(&r.get::<_, String>(2)?),
                    last_seen: parse_ts(&r.get::<_, String>(3)?),
                })
            })
            .optional()
            .map_err(self.db())
    }

    fn touch_session(&mut self, id_hash: &str, now: Time) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE sessions SET last_seen = ?1 WHERE id_hash = ?2", params![ts(now), id_hash])
            .map_err(self.db())?;
        Ok(())
    }

    fn delete_session(&mut self, id_hash: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM sessions WHERE id_hash = ?1", [id_hash]).map_err(self.db())?;
        Ok(())
    }

    fn insert_token(&mut self, token_hash: &str, user_id: i64, name: &str, now: Time) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![token_hash, user_id, name, ts(now)],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn tokens(&self, username: &str) -> Result<Vec<TokenRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT t.id, t.name, t.created_at, t.revoked FROM api_tokens t JOIN users u ON u.id = t.user_id
                 WHERE u.username = ?1 ORDER BY t.id",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([username], |r| {
                Ok(TokenRow { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)?, revoked: r.get(3)? })
            })
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn revoke_token(&mut self, username: &str, id: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE api_tokens SET revoked = 1
                 WHERE id = ?1 AND revoked = 0 AND user_id = (SELECT id FROM users WHERE username = ?2)",
                params![id, username],
            )
            .map_err(self.db())?;
        Ok(n == 1)
    }

    fn token_user(&self, token_hash: &str) -> Result<Option<User>, StoreError> {
        self.one_user("id = (SELECT user_id FROM api_tokens WHERE token_hash = ?1 AND revoked = 0)", [token_hash])
    }
}

impl AuditRows for SqliteStore {
    fn audit_append(&mut self, make: &mut dyn FnMut(Option<(i64, String)>) -> Entry) -> Result<Entry, StoreError> {
        let path = self.path.clone();
        let db = |source: rusqlite::Error| StoreError::Sqlite { path: path.clone(), detail: source.to_string() };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let last: Option<(i64, String)> = tx
            .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        let e = make(last);
        tx.execute(
            &format!("INSERT INTO audit ({ENTRY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![e.seq, e.at, e.actor, e.ip, e.action, e.target, e.detail, e.prev, e.hash],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(e)
    }

    fn audit_before(&self, before: Option<i64>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"))
            .map_err(self.db())?;
        let rows = stmt.query_map(params![before.unwrap_or(i64::MAX), limit as i64], entry_row).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn audit_after(&self, after: i64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"))
            .map_err(self.db())?;
        let rows = stmt.query_map(params![after, limit as i64], entry_row).map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }
}
