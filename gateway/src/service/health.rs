//! The gateway's own health, as `/healthz`, `/metrics`, the dead-man heartbeat and systemd's
//! watchdog see it.
//!
//! The service loop writes it; the web reads it. It is unhealthy when:
//! - the store refuses writes (the gateway is *degraded*: it keeps sending what is already
//!   committed, holds new messages at the broker, and tells the operators);
//! - it has no homes at all (a store that is not the deployment's: it would acknowledge and
//!   drop every home's messages, so it does not acknowledge them);
//! - its broker connection has been down for longer than [`BROKER_DOWN_UNHEALTHY_S`].
//!
//! A standby gateway ([`crate::service::standby`]) has no broker connection and writes nothing; it is
//! unhealthy only when its dashboard has not read the store for
//! [`STANDBY_BEHIND_UNHEALTHY_S`], so a load balancer keeps it in rotation while it serves.
//!
//! A monitor outside the centre notices the one failure the gateway cannot report itself,
//! being dead, through the heartbeat (`[heartbeat]`): the service loop pings a URL every
//! `interval_s` while it is healthy, and the `fail_url` (if any) while it is not. A loop that
//! is stuck pings nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::domain::engine::Time;
use crate::domain::notice::StoreProblem;

/// A broker connection down for longer than this makes the gateway unhealthy, s (a reconnect
/// after a broker restart takes a few seconds and is not a failure).
pub const BROKER_DOWN_UNHEALTHY_S: i64 = 30;

/// Why the store refuses writes, since when.
#[derive(Debug, Clone, PartialEq)]
pub struct Degraded {
    /// Since when.
    pub since: Time,
    /// Classified.
    pub problem: StoreProblem,
    /// The database's words.
    pub detail: String,
}

/// The shared health state.
#[derive(Debug, Default)]
pub struct Health {
    degraded: Mutex<Option<Degraded>>,
    broker_down_since: Mutex<Option<Time>>,
    /// The subscriptions the broker refused on the connection that is up (none while down),
    /// and since when it has refused any.
    refused: Mutex<(Vec<String>, Option<Time>)>,
    no_homes: AtomicBool,
    /// Store errors since start.
    pub store_errors: AtomicU64,
    /// Messages held in memory because the store refused them (not acknowledged to the broker).
    pub held_messages: AtomicU64,
    /// Delivery results waiting to be recorded.
    pub unrecorded_results: AtomicU64,
    /// Destinations whose breaker is open.
    pub open_breakers: AtomicU64,
    /// Several gateways: the standbys the active saw at its last renewal.
    pub standbys: AtomicU64,
    /// A standby's view of the store (`None`: this gateway is the active one, or alone).
    standby: Mutex<Option<Standby>>,
}

/// How a standby gateway is doing: it has no broker connection and sends nothing, so its
/// health is whether its dashboard is current and whether it can pass actions on.
#[derive(Debug, Clone)]
pub struct Standby {
    /// When it started standing by.
    pub since: Time,
    /// When it last read the store whole.
    pub read_at: Option<Time>,
    /// Why the last read failed.
    pub error: Option<String>,
    /// Why an action could not be passed to the active gateway now (no address for it, or it
    /// does not answer); `None` when it can, or when no lease is live (a takeover).
    pub pass_on: Option<String>,
}

impl Standby {
    /// Just started: nothing read yet.
    pub fn new(since: Time) -> Standby {
        Standby { since, read_at: None, error: None, pass_on: None }
    }
}

/// A standby whose dashboard is this many seconds behind the store is unhealthy (a load
/// balancer takes it out of rotation).
pub const STANDBY_BEHIND_UNHEALTHY_S: i64 = 15;

impl Health {
    /// A new, healthy state with the broker not connected yet (since `now`).
    pub fn new(now: Time) -> Health {
        let h = Health::default();
        h.set_broker(false, now);
        h
    }

    /// The store's state.
    pub fn set_degraded(&self, d: Option<Degraded>) {
        *self.degraded.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = d;
    }

    /// Whether the store refuses writes.
    pub fn degraded(&self) -> Option<Degraded> {
        self.degraded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The broker connection went up or down at `now`.
    pub fn set_broker(&self, up: bool, now: Time) {
        let mut d = self.broker_down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (up, *d) {
            (true, _) => *d = None,
            (false, None) => *d = Some(now),
            (false, Some(_)) => {}
        }
    }

    /// The filters the broker refused at the last subscription (cleared when the connection
    /// drops: then the connection is the problem).
    pub fn set_refused(&self, filters: Vec<String>, now: Time) {
        let mut r = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = match filters.is_empty() {
            true => None,
            false => Some(r.1.unwrap_or(now)),
        };
        *r = (filters, since);
    }

    /// Since when the broker connection is down.
    pub fn broker_down_since(&self) -> Option<Time> {
        *self.broker_down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store has no homes at all.
    pub fn set_no_homes(&self, none: bool) {
        self.no_homes.store(none, Ordering::Relaxed);
    }

    /// This gateway stands by (`Some`) or is active.
    pub fn set_standby(&self, s: Option<Standby>) {
        *self.standby.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = s;
    }

    /// Change the standby's state (nothing when this gateway is not one).
    pub fn update_standby(&self, f: impl FnOnce(&mut Standby)) {
        if let Some(s) = self.standby.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            f(s);
        }
    }

    /// Whether this gateway stands by.
    pub fn standby(&self) -> Option<Standby> {
        self.standby.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Everything wrong at `now`, in words for an operator (empty: healthy).
    pub fn problems(&self, now: Time) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = self.standby() {
            // A standby's broker and store writes are not in use: what counts is that its
            // pages are current and that it can pass actions on.
            match s.read_at {
                None => out.push(format!(
                    "standby: has not read the store yet{}",
                    s.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                )),
                Some(at) if (now - at).num_seconds() > STANDBY_BEHIND_UNHEALTHY_S => out.push(format!(
                    "standby: the dashboard cannot read the store since {} ({})",
                    at.to_rfc3339(),
                    s.error.as_deref().unwrap_or("no answer")
                )),
                Some(_) => {}
            }
            if let Some(why) = s.pass_on {
                out.push(format!("standby: actions cannot be passed to the active gateway: {why}"));
            }
            return out;
        }
        if let Some(d) = self.degraded() {
            out.push(format!(
                "store refuses writes since {} ({}: {}); new messages are held at the broker",
                d.since.to_rfc3339(),
                d.problem.text(crate::domain::homes::Lang::En),
                d.detail
            ));
        }
        if self.no_homes.load(Ordering::Relaxed) {
            out.push("no homes in the store: messages are not acknowledged (is this the deployment's store?)".into());
        }
        let long = |since: Time| (now - since).num_seconds() > BROKER_DOWN_UNHEALTHY_S;
        let refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        // A refusal is timed from its own start; only without one is the connection the
        // problem.
        let line = match (refused, self.broker_down_since()) {
            ((filters, Some(since)), _) if !filters.is_empty() => long(since).then(|| {
                format!(
                    "the broker refuses the subscription to {} since {} (subscribing again)",
                    filters.join(", "),
                    since.to_rfc3339()
                )
            }),
            (_, Some(since)) => long(since).then(|| format!("no broker connection since {}", since.to_rfc3339())),
            _ => None,
        };
        out.extend(line);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    #[test]
    fn unhealthy_while_degraded_without_homes_or_long_without_a_broker() {
        let h = Health::new(t(0));
        assert!(h.problems(t(10)).is_empty(), "a broker connecting at start is not a failure yet");
        assert_eq!(h.problems(t(31)).len(), 1);
        h.set_broker(true, t(31));
        assert!(h.problems(t(32)).is_empty());
        h.set_degraded(Some(Degraded { since: t(40), problem: StoreProblem::DiskFull, detail: "full".into() }));
        h.set_no_homes(true);
        let p = h.problems(t(41));
        assert!(p[0].contains("disk is full") && p[1].contains("no homes"), "{p:?}");
        h.set_degraded(None);
        h.set_no_homes(false);
        assert!(h.problems(t(42)).is_empty());
    }

    #[test]
    fn a_standby_is_healthy_without_a_broker_while_it_reads_the_store() {
        let h = Health::new(t(0));
        h.set_standby(Some(Standby::new(t(0))));
        assert!(h.problems(t(1))[0].contains("has not read the store yet"), "out of rotation until it has");
        h.update_standby(|s| s.read_at = Some(t(20)));
        let p = h.problems(t(100));
        assert!(p.len() == 1 && p[0].contains("cannot read the store"), "80 s behind, and only that: {p:?}");
        h.update_standby(|s| s.read_at = Some(t(99)));
        assert!(h.problems(t(100)).is_empty(), "{:?}", h.problems(t(100)));
        h.update_standby(|s| {
            s.read_at = Some(t(80));
            s.error = Some("refused".into());
        });
        let p = h.problems(t(100));
        assert!(p.len() == 1 && p[0].contains("refused"), "{p:?}");
        h.update_standby(|s| {
            s.read_at = Some(t(99));
            s.pass_on = Some("no address for `gw-a`".into());
        });
        let p = h.problems(t(100));
        assert!(p.len() == 1 && p[0].contains("cannot be passed") && p[0].contains("gw-a"), "{p:?}");
        h.set_standby(None);
        assert!(h.problems(t(100))[0].contains("no broker"), "active again: the broker counts");
    }
}
