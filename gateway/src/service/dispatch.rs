//! Who gets a send slot, and when a destination is not tried at all. Pure: no I/O, no clock.
//!
//! The outbox holds rows for many destinations: each webhook endpoint, the SMS gateway, the
//! SMTP relay, the console. One of them can hang (accept a connection and never answer) or
//! trickle (a byte a second). Three rules keep it from holding up the others:
//!
//! 1. **Every attempt has a deadline** for the whole exchange ([`crate::edge::delivery::Sender`]
//!    wraps connect, TLS, request and response, or the whole SMTP dialogue, in one timeout),
//!    so a slot is never held longer than `delivery.timeout_ms`.
//! 2. **Slots are shared per destination.** At most `delivery.concurrency` sends are in
//!    flight at once, and at most `delivery.per_destination` of them to one destination, so a
//!    hung endpoint holds its share and no more. Rows are taken oldest first within what is
//!    left; the store skips destinations that are full ([`Dispatcher::saturated`]).
//!
//!    The slots themselves are the runner's (a semaphore per destination and one for all, in
//!    `run/lanes.rs`): this scheduler hands out up to [`SEND_AHEAD`] times as many rows, which wait
//!    there for a slot. A send that ends gives its slot straight to the next row for its
//!    destination, without waiting for the service to record its result. Before, a slot was
//!    given again only when the service came round to it, so a destination's rate was its
//!    slots per turn of the service: in a storm on PostgreSQL (a batch of a thousand messages,
//!    a pass over 20,000 homes) eight family pages a turn, and the last family was paged tens
//!    of seconds late (`docs/benchmarks.md`). The shares are in the same proportion as the
//!    slots, so it still takes `concurrency / per_destination` hung destinations to hold
//!    every row handed out. A row waiting for a slot of a destination that has failed
//!    `breaker_failures` times in a row since is not sent but failed at once, as an open
//!    breaker's row is (the breaker's probe excepted).
//! 3. **A destination that keeps failing is not tried for a while** (a circuit breaker):
//!    after `delivery.breaker_failures` failed attempts in a row it is *open* for
//!    `delivery.breaker_open_ms`; rows for it then fail at once with a clear reason, which
//!    counts as an attempt, so the fallback recipient is told without waiting for a timeout
//!    per row. After the pause one row is sent as a probe (*half-open*): success closes the
//!    breaker, failure opens it again.
//!
//! Rows in flight (and rows whose result is not recorded yet, while the store refuses
//! writes) are *leased* here: they are never handed out twice, and they do not count as due
//! when the service loop decides how long to sleep.

use std::collections::{HashMap, HashSet};

use crate::config::DeliveryConfig;
use crate::domain::engine::Time;
use crate::edge::store::OutboxRow;

/// Rows handed out per slot (per destination and overall): the runner holds the extra ones
/// until a slot frees, so a destination's sends go on back to back through a long turn of the
/// service. Measured on the PostgreSQL storm (`docs/benchmarks.md`): with 1 (slots given back
/// only by the service) the families were paged at p99 8-53 s, with 4 at 6-13 s, with 16 at
/// 1.7 s. The cost: a row handed out waits behind up to this many rows per slot of its
/// destination, so an acknowledgement that makes it moot meanwhile is not seen (at a slow SMS
/// gateway's second a send, up to 16 s); a destination that fails has its waiting rows failed
/// at once (see the module doc), so they reach their fallback as they did.
pub const SEND_AHEAD: usize = 16;

/// What to do with a due row.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send it now (it is leased until [`Dispatcher::finished`]).
    Send(OutboxRow),
    /// Do not try: its destination's breaker is open. Record it as a failed attempt with
    /// this reason (it is leased until [`Dispatcher::finished`]).
    Skip(OutboxRow, String),
}

#[derive(Debug, Clone, Default)]
struct Breaker {
    /// Failed attempts in a row.
    failures: u32,
    /// Open until then; after it, one probe may go.
    open_until: Option<Time>,
    /// A probe is in flight.
    probing: bool,
}

/// The send-slot scheduler.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    concurrency: usize,
    per_destination: usize,
    breaker_failures: u32,
    breaker_open: chrono::Duration,
    /// Rows being sent: key → destination.
    sending: HashMap<String, String>,
    /// Sends in flight per destination.
    per_dest: HashMap<String, usize>,
    /// Rows whose result waits to be recorded (a skip, or a send while the store refused).
    held: HashSet<String>,
    breakers: HashMap<String, Breaker>,
}

impl Dispatcher {
    /// A dispatcher for these settings.
    pub fn new(cfg: &DeliveryConfig) -> Dispatcher {
        Dispatcher {
            concurrency: cfg.concurrency.max(1),
            per_destination: cfg.per_destination.clamp(1, cfg.concurrency.max(1)),
            breaker_failures: cfg.breaker_failures.max(1),
            breaker_open: chrono::Duration::milliseconds(i64::try_from(cfg.breaker_open_ms).unwrap_or(i64::MAX / 2)),
            sending: HashMap::new(),
            per_dest: HashMap::new(),
            held: HashSet::new(),
            breakers: HashMap::new(),
        }
    }

    /// The runner's slots: sends at once overall, and to one destination.
    pub fn slots(&self) -> (usize, usize) {
        (self.concurrency, self.per_destination)
    }

    /// Failed attempts in a row after which a destination is not tried (for the runner's
    /// rows waiting for a slot).
    pub fn breaker_failures(&self) -> u32 {
        self.breaker_failures
    }

    /// Rows that may still be handed out.
    pub fn room(&self) -> usize {
        (self.concurrency * SEND_AHEAD).saturating_sub(self.sending.len())
    }

    /// Rows handed out whose result has not come back (being sent, or waiting for a slot).
    pub fn in_flight(&self) -> usize {
        self.sending.len()
    }

    /// Whether the row handed out is its destination's breaker probe (sent even though the
    /// destination failed just before).
    pub fn is_probe(&self, key: &str) -> bool {
        self.sending.get(key).and_then(|d| self.breakers.get(d)).is_some_and(|b| b.probing)
    }

    /// Rows leased (in flight or waiting to be recorded): the store's due query must return
    /// this many more rows than there is room for.
    pub fn leased(&self) -> usize {
        self.sending.len() + self.held.len()
    }

    /// Whether a row is leased.
    pub fn is_leased(&self, key: &str) -> bool {
        self.sending.contains_key(key) || self.held.contains(key)
    }

    /// Destinations with their whole share handed out: the due query skips their rows.
    pub fn saturated(&self) -> Vec<String> {
        let share = self.per_destination * SEND_AHEAD;
        let mut v: Vec<String> = self.per_dest.iter().filter(|(_, n)| **n >= share).map(|(d, _)| d.clone()).collect();
        v.sort();
        v
    }

    /// Destinations whose breaker is open at `now` (for logs and metrics).
    pub fn open_breakers(&self, now: Time) -> Vec<String> {
        let mut v: Vec<String> = self
            .breakers
            .iter()
            .filter(|(_, b)| b.open_until.is_some_and(|u| now < u) || b.probing)
            .map(|(d, _)| d.clone())
            .collect();
        v.sort();
        v
    }

    /// Decide for due rows (oldest first): send while there is room in the destination's
    /// share and overall, skip while its breaker is open. Rows already leased and rows that
    /// do not fit are left for later (a result frees a slot and wakes the loop).
    pub fn choose(&mut self, rows: Vec<OutboxRow>, now: Time) -> Vec<Decision> {
        let mut out = Vec::new();
        for row in rows {
            if self.is_leased(&row.key) {
                continue;
            }
            let dest = row.channel.destination();
            let breaker = self.breakers.entry(dest.clone()).or_default();
            if let Some(until) = breaker.open_until {
                if now < until || breaker.probing {
                    let why = format!(
                        "{dest}: not tried, it failed {} times in a row (tried again after {} s)",
                        breaker.failures,
                        self.breaker_open.num_seconds()
                    );
                    self.held.insert(row.key.clone());
                    out.push(Decision::Skip(row, why));
                    continue;
                }
            }
            if self.sending.len() >= self.concurrency * SEND_AHEAD {
                break;
            }
            let n = self.per_dest.entry(dest.clone()).or_default();
            if *n >= self.per_destination * SEND_AHEAD {
                continue;
            }
            *n += 1;
            if breaker.open_until.is_some() {
                breaker.probing = true; // half-open: this row is the probe
            }
            self.sending.insert(row.key.clone(), dest);
            out.push(Decision::Send(row));
        }
        out
    }

    /// A send came back (`destination_failed`: the destination itself failed, which counts
    /// toward its breaker; a refusal of this row alone does not). The row stays leased until
    /// [`Dispatcher::recorded`]. (A skipped row is leased from the moment it is skipped.)
    pub fn finished(&mut self, key: &str, ok: bool, destination_failed: bool, now: Time) {
        let Some(dest) = self.sending.remove(key) else { return };
        self.held.insert(key.to_string());
        if let Some(n) = self.per_dest.get_mut(&dest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_dest.remove(&dest);
            }
        }
        if ok {
            self.breakers.remove(&dest);
            return;
        }
        if !destination_failed {
            // The destination answered: it is up. A probe that was refused closes the breaker.
            if let Some(b) = self.breakers.get_mut(&dest) {
                b.probing = false;
                if b.open_until.is_some() {
                    self.breakers.remove(&dest);
                }
            }
            return;
        }
        let b = self.breakers.entry(dest).or_default();
        b.probing = false;
        b.failures = b.failures.saturating_add(1);
        if b.failures >= self.breaker_failures {
            b.open_until = Some(now + self.breaker_open);
        }
    }

    /// Its result is in the store: the row is no longer leased.
    pub fn recorded(&mut self, key: &str) {
        self.held.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::homes::{ChannelRef, Lang};
    use crate::edge::store::OutboxStatus;
    use chrono::DateTime;
    use mamori_protocol::mqtt::Role;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn row(key: &str, channel: ChannelRef) -> OutboxRow {
        OutboxRow {
            key: key.into(),
            alert_id: "a".into(),
            home: None,
            role: Role::Family,
            recipient: "r".into(),
            channel,
            lang: Lang::Ja,
            subject: String::new(),
            body: String::new(),
            content: serde_json::Value::Null,
            created_at: t(0),
            next_attempt_at: t(0),
            attempts: 0,
            status: OutboxStatus::Pending,
            last_error: None,
            delivered_at: None,
            fallback_done: false,
            conditional: false,
        }
    }

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            concurrency: 6,
            per_destination: 2,
            breaker_failures: 3,
            breaker_open_ms: 10_000,
            ..DeliveryConfig::default()
        }
    }

    fn sent(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Send(r) => Some(r.key.as_str()),
                Decision::Skip(..) => None,
            })
            .collect()
    }

    #[test]
    fn a_destination_gets_its_share_and_the_others_still_get_slots() {
        let mut d = Dispatcher::new(&cfg());
        let hung = ChannelRef::Webhook("family".into());
        let share = 2 * SEND_AHEAD;
        let mut rows: Vec<OutboxRow> = (0..share + 3).map(|i| row(&format!("f{i}"), hung.clone())).collect();
        rows.push(row("c0", ChannelRef::Webhook("coord".into())));
        rows.push(row("m0", ChannelRef::Email("a@b".into())));
        let out = d.choose(rows, t(0));
        // Two slots for the family endpoint, so its share of rows handed out (two sending, the
        // rest waiting in the runner for those two slots), then the others.
        let mut expected: Vec<String> = (0..share).map(|i| format!("f{i}")).collect();
        expected.extend(["c0".to_string(), "m0".to_string()]);
        assert_eq!(sent(&out), expected);
        assert_eq!(d.saturated(), ["webhook:family"]);
        assert_eq!((d.room(), d.in_flight()), (6 * SEND_AHEAD - share - 2, share + 2));
        assert_eq!(d.slots(), (6, 2), "the runner's semaphores");
        // The same rows again: nothing is handed out twice.
        let again = d.choose(vec![row("f0", hung.clone()), row("f2", hung.clone())], t(0));
        assert!(sent(&again).is_empty(), "{again:?}");
        d.finished("f0", false, true, t(1));
        assert!(d.is_leased("f0"), "leased until its result is recorded");
        d.recorded("f0");
        assert!(!d.is_leased("f0") && d.saturated().is_empty());
    }

    #[test]
    fn the_overall_limit_holds() {
        let mut d = Dispatcher::new(&DeliveryConfig { concurrency: 3, per_destination: 3, ..cfg() });
        let rows =
            (0..3 * SEND_AHEAD + 5).map(|i| row(&format!("k{i}"), ChannelRef::Webhook(format!("e{i}")))).collect();
        assert_eq!(sent(&d.choose(rows, t(0))).len(), 3 * SEND_AHEAD);
        assert_eq!(d.room(), 0);
    }

    #[test]
    fn a_failing_destination_opens_its_breaker_then_probes_once() {
        let mut d = Dispatcher::new(&cfg());
        let ch = ChannelRef::Webhook("family".into());
        for i in 0..3 {
            let k = format!("f{i}");
            assert_eq!(sent(&d.choose(vec![row(&k, ch.clone())], t(i))), [k.as_str()]);
            d.finished(&k, false, true, t(i));
            d.recorded(&k);
        }
        // Open: rows are skipped with a reason, at once.
        let out = d.choose(vec![row("f3", ch.clone()), row("c", ChannelRef::Webhook("coord".into()))], t(5));
        assert!(matches!(&out[0], Decision::Skip(r, why) if r.key == "f3" && why.contains("3 times")), "{out:?}");
        assert_eq!(sent(&out), ["c"], "other destinations are unaffected");
        assert_eq!(d.open_breakers(t(5)), ["webhook:family"]);
        d.recorded("f3");
        // After the pause: one probe, the rest still skipped.
        let out = d.choose(vec![row("f4", ch.clone()), row("f5", ch.clone())], t(20));
        assert_eq!(sent(&out), ["f4"]);
        assert!(d.is_probe("f4"), "the runner sends it even though its destination failed last");
        assert!(matches!(&out[1], Decision::Skip(..)));
        // The probe succeeds: closed again.
        d.finished("f4", true, true, t(21));
        d.recorded("f4");
        d.recorded("f5");
        assert!(d.open_breakers(t(21)).is_empty());
        assert_eq!(sent(&d.choose(vec![row("f6", ch.clone()), row("f7", ch)], t(22))), ["f6", "f7"]);
        assert!(!d.is_probe("f6"));
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let mut d = Dispatcher::new(&DeliveryConfig { breaker_failures: 1, ..cfg() });
        let ch = ChannelRef::Sms("+81".into());
        d.choose(vec![row("s0", ch.clone())], t(0));
        d.finished("s0", false, true, t(0));
        d.recorded("s0");
        assert_eq!(sent(&d.choose(vec![row("s1", ch.clone())], t(11))), ["s1"], "the probe");
        d.finished("s1", false, true, t(11));
        d.recorded("s1");
        assert!(matches!(&d.choose(vec![row("s2", ch)], t(12))[0], Decision::Skip(..)), "open again");
    }

    #[test]
    fn one_refused_row_does_not_count_against_its_destination() {
        let mut d = Dispatcher::new(&DeliveryConfig { breaker_failures: 2, ..cfg() });
        let ch = ChannelRef::Sms("+81".into());
        for i in 0..5 {
            let k = format!("bad{i}");
            assert_eq!(sent(&d.choose(vec![row(&k, ch.clone())], t(i))), [k.as_str()]);
            d.finished(&k, false, false, t(i)); // a 400 for an unknown number
            d.recorded(&k);
        }
        assert!(d.open_breakers(t(5)).is_empty(), "the SMS gateway answered every time");
    }

    #[test]
    fn destinations_group_channels_by_what_they_go_through() {
        assert_eq!(ChannelRef::Sms("+819011112222".into()).destination(), "sms");
        assert_eq!(ChannelRef::Email("a@b".into()).destination(), "smtp");
        assert_eq!(ChannelRef::Webhook("coord".into()).destination(), "webhook:coord");
    }
}
