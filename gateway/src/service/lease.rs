//! One active gateway among several sharing a PostgreSQL store (`[cluster]`).
//!
//! ## The rule
//! A row in the store (`lease`) names the active gateway, its **fencing token** (one more at
//! every change of holder) and when the lease ends, by the database's clock, so every gateway
//! agrees on it whatever its own clock says. A gateway starts as a **standby**: it serves the
//! dashboard from the store and passes actions to the active ([`crate::service::standby`]), and tries
//! to take the lease every second. Once it has it, it loads the engine from
//! the store (as after a restart: every timer re-armed from its stored time), connects to the
//! broker with the shared client id (the broker's persistent session holds what arrived
//! meanwhile) and runs. A keeper thread renews the lease every third of its length.
//!
//! ## Never two senders
//! The active trusts its lease only until `the moment it asked for the last renewal + lease
//! length − one second`, by its own monotonic clock ([`Validity`]). The database ends the lease
//! no earlier than `the moment it granted it + lease length`, which is later, and a standby takes
//! it only after that. So the active has stopped trusting its lease before anyone else can hold
//! it, whether it was killed, cut off from the database (renewals fail) or frozen (a `SIGSTOP`:
//! the monotonic clock runs on while the process is stopped, so on waking its lease has already
//! expired, before it sends anything). Every send is gated on it ([`crate::service::run`]'s dispatch);
//! a lease that has expired or was taken ends the service, and the process exits 1 to be
//! restarted as a standby. A send already in flight when the lease ends may complete: the same
//! message, with the same idempotency key, may then be sent again by the new active. That is
//! the chosen failure: a duplicate page, never a missed one. Ingest, timers and recording
//! results are gated the same way, and the store is fenced ([`crate::edge::store::Store::fence`]):
//! each write transaction checks, under a share lock held to its commit, that this gateway's
//! name and token still hold the lease.
//!
//! A clean stop gives the lease up at once, so a standby takes over without waiting for it to
//! end.
//!
//! ## Watching each other
//! Every gateway writes that it is alive (`gateways`: its name, `active` or `standby`, when) at
//! each poll or renewal. The active reads which standbys were seen in the last three seconds;
//! when none has been for three leases' time, the operators are told that a failure of the
//! active would not be taken over, and told again when one is back
//! ([`crate::domain::notice::StandbyWatch`]). The dead-man heartbeat to an outside monitor is the
//! service's, so it is sent by whichever gateway is active.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::edge::store::pg::{PgLocation, PgStore};

/// Trusted for one second less than the lease lasts.
const MARGIN: Duration = Duration::from_secs(1);

/// How long this gateway may trust its lease: pure, the monotonic time passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    until: Option<Instant>,
}

impl Validity {
    /// Nothing held.
    pub fn none() -> Validity {
        Validity { until: None }
    }

    /// A grant or renewal asked for at `asked` (before the request was sent), for `ttl`.
    pub fn granted(asked: Instant, ttl: Duration) -> Validity {
        Validity { until: Some(asked + ttl.saturating_sub(MARGIN)) }
    }

    /// Whether the lease may be trusted at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

/// The lease as the service sees it: whether it may send now.
#[derive(Debug)]
pub struct Lease {
    validity: Mutex<Validity>,
    /// This gateway's name.
    pub holder: String,
    /// Its fencing token.
    pub token: i64,
    lost: CancellationToken,
    standbys: Mutex<Option<Vec<String>>>,
}

impl Lease {
    /// The standbys seen at the last renewal (`None`: not read yet).
    pub fn standbys(&self) -> Option<Vec<String>> {
        self.standbys.lock().ok().and_then(|s| s.clone())
    }

    /// Whether this gateway may send now (the I/O edge: it reads the monotonic clock).
    pub fn valid(&self) -> bool {
        #[allow(clippy::disallowed_methods)] // the lease's own deadline, on the monotonic clock
        let now = Instant::now();
        self.validity.lock().map(|v| v.valid_at(now)).unwrap_or(false)
    }

    /// Cancelled when the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    fn set(&self, v: Validity) {
        if let Ok(mut g) = self.validity.lock() {
            *g = v;
        }
    }
}

/// A held lease and its keeper.
pub struct Held {
    /// What the service checks before each send.
    pub lease: Arc<Lease>,
    stop: std::sync::mpsc::Sender<()>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

impl Held {
    /// Stop renewing and give the lease up (a clean stop), unless it was lost.
    pub fn release(mut self) {
        let _ = self.stop.send(());
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

fn lease_location(at: &PgLocation, ttl: Duration) -> PgLocation {
    // Its own connection, whose calls can never outlast a renewal period.
    let mut at = at.clone();
    at.timeout = (ttl / 3).max(Duration::from_secs(1));
    at.config.connect_timeout(at.timeout);
    at
}

/// Wait as a standby until this gateway holds the lease (`None`: cancelled first).
pub async fn wait_for_lease(
    at: &PgLocation,
    cluster: &ClusterConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Held>> {
    let ttl = Duration::from_secs(u64::from(cluster.lease_s));
    let at = lease_location(at, ttl);
    let name = cluster.name.clone();
    let mut said = String::new();
    // Under systemd a standby is started and well: ready, and alive while it waits.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("standby")]);
    let watchdog = sd_notify::watchdog_enabled().is_some();
    loop {
        if watchdog {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        let (at2, name2) = (at.clone(), name.clone());
        #[allow(clippy::disallowed_methods)] // the lease's own deadline, on the monotonic clock
        let asked = Instant::now();
        let tried = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = PgStore::open(&at2, false)?;
            let token = store.take_lease(&name2, ttl)?;
            // Said after the take, and never in its way: a lease taken is not lost to an
            // error here.
            let _ = store.gateway_seen(&name2, if token.is_some() { "active" } else { "standby" });
            let holder = if token.is_none() { store.lease_holder().ok() } else { None };
            Ok((store, token, holder))
        })
        .await?;
        match tried {
            Ok((store, Some(token), _)) => {
                tracing::info!(gateway = %name, token, lease_s = cluster.lease_s, "lease acquired: this gateway is active");
                let lease = Arc::new(Lease {
                    validity: Mutex::new(Validity::granted(asked, ttl)),
                    holder: name.clone(),
                    token,
                    lost: CancellationToken::new(),
                    standbys: Mutex::new(None),
                });
                return Ok(Some(keep(store, lease, ttl, asked)?));
            }
            Ok((_, None, Some(h))) => {
                let line = format!("{}/{}", h.holder, h.token);
                if line != said {
                    tracing::info!(gateway = %name, active = %h.holder, token = h.token, left_s = h.left_s, "standby: another gateway holds the lease");
                    said = line;
                }
            }
            Ok((_, None, None)) => {}
            Err(e) => tracing::warn!(gateway = %name, error = format!("{e:#}"), "standby: cannot reach the lease"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[allow(clippy::disallowed_methods)] // the keeper's schedule is on the monotonic clock
fn keep(store: PgStore, lease: Arc<Lease>, ttl: Duration, granted: Instant) -> anyhow::Result<Held> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let l = lease.clone();
    let keeper = std::thread::Builder::new().name("mamori-lease".into()).spawn(move || {
        // Renewals are scheduled from when the last one was asked for, whatever else took
        // time, and a failed one is tried again soon.
        let every = ttl / 3;
        let mut next = granted + every;
        loop {
            match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    if l.valid() {
                        if let Err(e) = store.release_lease(&l.holder, l.token) {
                            tracing::warn!(error = %e, "could not give the lease up: a standby waits for it to end");
                        } else {
                            tracing::info!(gateway = %l.holder, "lease given up");
                        }
                    }
                    return;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            #[allow(clippy::disallowed_methods)] // the lease's own deadline, on the monotonic clock
            let asked = Instant::now();
            next = asked + every;
            match store.renew_lease(&l.holder, l.token, ttl) {
                Ok(true) => {
                    l.set(Validity::granted(asked, ttl));
                    // Who would take over: the standbys that said so within three polls; only
                    // when it cannot delay the next renewal.
                    if Instant::now() + every / 2 > next {
                        continue;
                    }
                    let seen = store
                        .gateway_seen(&l.holder, "active")
                        .and_then(|()| store.standbys(&l.holder, Duration::from_secs(3)));
                    match seen {
                        Ok(s) => {
                            if let Ok(mut g) = l.standbys.lock() {
                                *g = Some(s);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the standbys"),
                    }
                }
                Ok(false) => {
                    l.set(Validity::none());
                    tracing::error!(gateway = %l.holder, token = l.token, "lease lost: another gateway took it or it ended; stopping");
                    l.lost.cancel();
                    return;
                }
                Err(e) => {
                    next = Instant::now() + Duration::from_millis(250);
                    tracing::warn!(gateway = %l.holder, error = %e, "cannot renew the lease");
                    if !l.valid() {
                        tracing::error!(gateway = %l.holder, "lease expired unrenewed: stopping");
                        l.lost.cancel();
                        return;
                    }
                }
            }
        }
    })?;
    Ok(Held { lease, stop, keeper: Some(keeper) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // any instant will do as the origin
    fn a_lease_is_trusted_until_a_second_before_it_could_end() {
        let t0 = Instant::now();
        let v = Validity::granted(t0, Duration::from_secs(6));
        assert!(v.valid_at(t0) && v.valid_at(t0 + Duration::from_millis(4_999)));
        assert!(!v.valid_at(t0 + Duration::from_secs(5)), "stops before the database ends it");
        assert!(!Validity::none().valid_at(t0));
        // A process frozen for longer wakes to an expired lease.
        assert!(!v.valid_at(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn one_gateway_holds_the_lease_and_the_next_gets_it_only_when_it_ends() {
        let db = mamori_testkit::postgres::TestDb::new().unwrap();
        let at = PgLocation::parse(&db.settings(), db.password().as_deref(), Duration::from_secs(5)).unwrap();
        let store = PgStore::open(&at, true).unwrap();
        let ttl = Duration::from_secs(3);
        let a = store.take_lease("gw-a", ttl).unwrap().unwrap();
        assert_eq!(store.take_lease("gw-b", ttl).unwrap(), None, "held");
        assert!(store.renew_lease("gw-a", a, ttl).unwrap());
        let h = store.lease_holder().unwrap();
        assert_eq!((h.holder.as_str(), h.token), ("gw-a", a));
        assert!(h.left_s > 2.0 && h.left_s <= 3.0, "{h:?}");
        // Given up: the next takes it at once, with a new token; the old holder cannot renew.
        store.release_lease("gw-a", a).unwrap();
        let b = store.take_lease("gw-b", ttl).unwrap().unwrap();
        assert_eq!(b, a + 1);
        assert!(!store.renew_lease("gw-a", a, ttl).unwrap(), "the deposed holder's token is dead");
        assert!(store.renew_lease("gw-b", b, ttl).unwrap());
    }
}
