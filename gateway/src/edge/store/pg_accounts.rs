//! The accounts and audit rows of the PostgreSQL store ([`AccountRows`], [`AuditRows`]).

use super::pg::{p, Params, PgStore};
use super::{parse_ts, ts, AccountRows, AuditRows, LoginSecrets, SessionRow, Store, StoreError, TokenRow};
use crate::admin::accounts::{AccountRole, NewUser, User};
use crate::admin::audit::Entry;
use crate::domain::engine::Time;

/// `SELECT` of an account's columns, in the order [`PgStore::user`] reads them.
macro_rules! user_sql {
    ($tail:literal) => {
        concat!(
            "SELECT id, username, display_name, role, municipalities, homes, totp_secret IS NOT NULL, disabled FROM users ",
            $tail
        )
    };
}

/// `SELECT` of an audit entry's columns, in the order [`PgStore::entry`] reads them.
macro_rules! entry_sql {
    ($tail:literal) => {
        concat!("SELECT seq, at, actor, ip, action, target, detail, prev, hash FROM audit ", $tail)
    };
}

impl PgStore {
    fn users_of(&self, sql: &'static str, params: Params) -> Result<Vec<User>, StoreError> {
        self.rows(sql, params)?.iter().map(|r| self.user(r)).collect()
    }
}

impl AccountRows for PgStore {
    fn users(&self) -> Result<Vec<User>, StoreError> {
        self.users_of(user_sql!("ORDER BY username"), p![])
    }

    fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        Ok(self.users_of(user_sql!("WHERE username = $1"), p![username.to_string()])?.pop())
    }

    fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError> {
        Ok(self.users_of(user_sql!("WHERE id = $1"), p![id])?.pop())
    }

    fn home_exists(&self, id: &str) -> Result<bool, StoreError> {
        self.scalar("SELECT EXISTS (SELECT 1 FROM homes WHERE id = $1)", p![id.to_string()])
    }

    fn insert_user(
        &mut self,
        u: &NewUser,
        password_hash: &str,
        totp_secret: Option<&str>,
        now: Time,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO users (username, display_name, role, municipalities, homes, password_hash, totp_secret, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            p![
                u.username.clone(),
                u.display_name.trim().to_string(),
                u.role.as_str().to_string(),
                serde_json::to_string(&u.municipalities).unwrap_or_default(),
                serde_json::to_string(&u.homes).unwrap_or_default(),
                password_hash.to_string(),
                totp_secret.map(str::to_string),
                ts(now)
            ],
        )?;
        Ok(())
    }

    fn login_secrets(&self, username: &str) -> Result<Option<LoginSecrets>, StoreError> {
        let r = self.rows(
            "SELECT password_hash, totp_secret, totp_last_step FROM users WHERE username = $1",
            p![username.to_string()],
        )?;
        r.first()
            .map(|r| {
                Ok(LoginSecrets {
                    password_hash: self.get(r, 0)?,
                    totp_secret: self.get(r, 1)?,
                    totp_last_step: self.get(r, 2)?,
                })
            })
            .transpose()
    }

    fn use_totp_step(&mut self, user_id: i64, step: i64) -> Result<bool, StoreError> {
        Ok(self
            .exec("UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $1", p![step, user_id])?
            == 1)
    }

    fn replace_password(&mut self, username: &str, password_hash: &str) -> Result<bool, StoreError> {
        let (u, h) = (username.to_string(), password_hash.to_string());
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let Some(row) =
                tx.query_opt("UPDATE users SET password_hash = $1 WHERE username = $2 RETURNING id", &[&h, &u])?
            else {
                return Ok(false);
            };
            let id: i64 = row.try_get(0)?;
            tx.execute("DELETE FROM sessions WHERE user_id = $1", &[&id])?;
            tx.execute("UPDATE api_tokens SET revoked = TRUE WHERE user_id = $1", &[&id])?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn totp_secrets(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.rows("SELECT id, totp_secret FROM users WHERE totp_secret IS NOT NULL ORDER BY id", p![])?
            .iter()
            .map(|r| Ok((self.get(r, 0)?, self.get(r, 1)?)))
            .collect()
    }

    fn set_totp_secret(&mut self, user_id: i64, stored: &str) -> Result<(), StoreError> {
        self.exec("UPDATE users SET totp_secret = $1 WHERE id = $2", p![stored.to_string(), user_id])?;
        Ok(())
    }

    fn enrol_totp(&mut self, username: &str, stored: &str, step: i64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE users SET totp_secret = $1, totp_last_step = $2 WHERE username = $3",
            p![stored.to_string(), step, username.to_string()],
        )?;
        Ok(())
    }

    fn set_disabled(&mut self, username: &str, disabled: bool) -> Result<bool, StoreError> {
        Ok(self.exec("UPDATE users SET disabled = $1 WHERE username = $2", p![disabled, username.to_string()])? == 1)
    }

    fn set_scope(
        &mut self,
        username: &str,
        role: AccountRole,
        municipalities: &[String],
        homes: &[String],
    ) -> Result<bool, StoreError> {
        Ok(self.exec(
            "UPDATE users SET role = $1, municipalities = $2, homes = $3 WHERE username = $4",
            p![
                role.as_str().to_string(),
                serde_json::to_string(municipalities).unwrap_or_default(),
                serde_json::to_string(homes).unwrap_or_default(),
                username.to_string()
            ],
        )? == 1)
    }

    fn end_sessions(&mut self, username: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = $1)",
            p![username.to_string()],
        )?;
        Ok(())
    }

    fn insert_session(&mut self, id_hash: &str, user_id: i64, csrf: &str, now: Time) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO sessions (id_hash, user_id, csrf, created_at, last_seen) VALUES ($1, $2, $3, $4, $4)",
            p![id_hash.to_string(), user_id, csrf.to_string(), ts(now)],
        )?;
        Ok(())
    }

    fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        let r = self.rows(
            "SELECT user_id, csrf, created_at, last_seen FROM sessions WHERE id_hash = $1",
            p![id_hash.to_string()],
        )?;
        r.first()
            .map(|r| {
                let (created, seen): (String, String) = (self.get(r, 2)?, self.get(r, 3)?);
                Ok(SessionRow {
                    user_id: self.get(r, 0)?,
                    csrf: self.get(r, 1)?,
                    created_at: parse_ts(&created),
                    last_seen: parse_ts(&seen),
                })
            })
            .transpose()
    }

    fn touch_session(&mut self, id_hash: &str, now: Time) -> Result<(), StoreError> {
        self.exec("UPDATE sessions SET last_seen = $1 WHERE id_hash = $2", p![ts(now), id_hash.to_string()])?;
        Ok(())
    }

    fn delete_session(&mut self, id_hash: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM sessions WHERE id_hash = $1", p![id_hash.to_string()])?;
        Ok(())
    }

    fn insert_token(&mut self, token_hash: &str, user_id: i64, name: &str, now: Time) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES ($1, $2, $3, $4)",
            p![token_hash.to_string(), user_id, name.to_string(), ts(now)],
        )?;
        Ok(())
    }

    fn tokens(&self, username: &str) -> Result<Vec<TokenRow>, StoreError> {
        self.rows(
            "SELECT t.id, t.name, t.created_at, t.revoked FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE u.username = $1 ORDER BY t.id",
            p![username.to_string()],
        )?
        .iter()
        .map(|r| {
            Ok(TokenRow {
                id: self.get(r, 0)?,
                name: self.get(r, 1)?,
                created_at: self.get(r, 2)?,
                revoked: self.get(r, 3)?,
            })
        })
        .collect()
    }

    fn revoke_token(&mut self, username: &str, id: i64) -> Result<bool, StoreError> {
        Ok(self.exec(
            "UPDATE api_tokens SET revoked = TRUE
             WHERE id = $1 AND NOT revoked AND user_id = (SELECT id FROM users WHERE username = $2)",
            p![id, username.to_string()],
        )? == 1)
    }

    fn token_user(&self, token_hash: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .users_of(
                user_sql!("WHERE id = (SELECT user_id FROM api_tokens WHERE token_hash = $1 AND NOT revoked)"),
                p![token_hash.to_string()],
            )?
            .pop())
    }
}

impl AuditRows for PgStore {
    fn audit_append(&mut self, make: &mut dyn FnMut(Option<(i64, String)>) -> Entry) -> Result<Entry, StoreError> {
        // The entry is built between reading the last one and inserting, under the table lock;
        // `make` is not `Send`, so the lock is held across two calls to the connection's thread
        // inside one transaction.
        let tx = self.begin()?;
        let result = (|| {
            self.exec("LOCK TABLE audit IN SHARE ROW EXCLUSIVE MODE", p![])?;
            let r = self.rows("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", p![])?;
            let last = r.first().map(|r| Ok::<_, StoreError>((self.get(r, 0)?, self.get(r, 1)?))).transpose()?;
            let e = make(last);
            self.exec(
                "INSERT INTO audit (seq, at, actor, ip, action, target, detail, prev, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                p![
                    e.seq,
                    e.at.clone(),
                    e.actor.clone(),
                    e.ip.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    e.detail.clone(),
                    e.prev.clone(),
                    e.hash.clone()
                ],
            )?;
            Ok(e)
        })();
        match result {
            Ok(e) => {
                self.commit(tx)?;
                Ok(e)
            }
            Err(err) => {
                self.rollback(tx);
                Err(err)
            }
        }
    }

    fn audit_before(&self, before: Option<i64>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.rows(
            entry_sql!("WHERE seq < $1 ORDER BY seq DESC LIMIT $2"),
            p![before.unwrap_or(i64::MAX), limit as i64],
        )?
        .iter()
        .map(|r| self.entry(r))
        .collect()
    }

    fn audit_after(&self, after: i64, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.rows(entry_sql!("WHERE seq > $1 ORDER BY seq LIMIT $2"), p![after, limit as i64])?
            .iter()
            .map(|r| self.entry(r))
            .collect()
    }
}
