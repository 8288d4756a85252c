//! `mamori-agent run`: the service. Wires the sources, the monitor, the uplink (with its
//! spool) and the local alarm together, and shuts down cleanly.
//!
//! One task (this one) owns the [`Monitor`]: observations arrive on a channel, events go to
//! the uplink (on a thread of its own, `mamori-uplink`, so that the spool's fsync never
//! stalls the monitor; each serial device is a thread of its own too), telemetry is sent
//! every period and whenever the monitor's discrete state changes. It sleeps until the
//! monitor's next deadline, so staleness and alarm delays fire on time without polling.
//!
//! Battery self-tests ([`crate::self_test`]), when the home opted in: checked every minute;
//! when one is due and nothing blocks it, each serial UPS is asked to test and the monitor
//! told, so that the switch to battery is not taken for an outage. The last test's time is
//! kept in `data_dir/self_test_last` (so a restart does not test again); a due test that is
//! blocked is reported once a day as a skipped `battery_test`.
//!
//! Shutdown (SIGTERM or Ctrl-C): an `agent_stopping` event is spooled and published, the
//! retained status becomes `{"state":"offline","reason":"shutdown"}`, PUBACKs are awaited for
//! a few seconds, and the spool is flushed. With systemd's `WatchdogSec=`, the loop pings the
//! watchdog only while it is turning; a wedged agent is restarted.

use std::time::Duration;

use anyhow::Context;
use mamori_protocol::event_data::{to_data, BatteryTest, TestResult};
use mamori_protocol::mqtt::{Event, EventKind, SourceInfo, Telemetry};
use serde_json::Map;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::alarm::{LocalAlarm, Outputs, Situation};
use crate::clock;
use crate::config::Config;
use crate::monitor::{Monitor, NewEvent};
use crate::sources;
use crate::spool::{FileStorage, Spool};
use crate::uplink::{Connection, FromUplink, ToUplink, Uplink, UplinkSettings};

fn to_event(e: NewEvent, boot: &str, clock_cfg: &crate::config::ClockConfig) -> Event {
    let at = crate::monitor::Now { mono_ms: e.mono_ms, wall: e.ts };
    Event {
        id: boot.to_string(),
        seq: 0,
        ts: e.ts,
        kind: e.kind,
        severity: e.kind.default_severity(),
        source: e.source,
        data: e.data,
        clock: Some(clock::info(&at, &clock_cfg.synced_file)),
    }
}

/// A telemetry snapshot with the clocks at the time it was taken.
fn snapshot(monitor: &mut Monitor, interval_s: u32, clock_cfg: &crate::config::ClockConfig) -> Telemetry {
    let now = clock::now();
    let mut t = monitor.snapshot(&now, interval_s, None);
    t.clock = Some(clock::info(&now, &clock_cfg.synced_file));
    t
}

/// Run the agent until `cancel`.
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let home = config.home();
    let conn = Connection::from_config(home.clone(), &config.broker).context("broker")?;
    let boot = format!("{:08x}", rand::random::<u32>());
    let storage =
        FileStorage::open(&config.data_dir).with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let (spool, recovery) = Spool::open(storage, config.spool.capacity_bytes, clock::unix_ms())?;
    tracing::info!(home = %home, pending = recovery.pending_events, kept_telemetry = recovery.telemetry, torn_bytes = recovery.torn_bytes, next_seq = spool.next_seq(), "spool opened");

    let specs = sources::specs(&config);
    let now = clock::now();
    let interval_s = config.telemetry.interval_s;
    let online = Uplink::<FileStorage>::announce(
        specs.iter().map(|s| SourceInfo { id: s.id.clone(), kind: s.kind }).collect(),
        interval_s,
        now.wall,
    );
    let settings = UplinkSettings {
        inflight: usize::from(config.spool.inflight),
        telemetry_interval: Duration::from_secs(u64::from(interval_s)),
        online,
        shutdown_grace: Duration::from_secs(5),
    };
    let (up_tx, up_rx) = mpsc::channel(1024);
    let (from_tx, mut from_rx) = mpsc::channel(256);
    let uplink_cancel = CancellationToken::new();
    // The uplink on a thread of its own, with a one-thread runtime of its own: appending to the
    // spool is an fsync (milliseconds on an SD card, seconds on a worn one), which must not
    // stall the monitor, the sources or the local alarm on this thread.
    let (spool_tx, spool_rx) = tokio::sync::oneshot::channel();
    {
        let c = uplink_cancel.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the uplink's runtime")?;
        std::thread::Builder::new()
            .name("mamori-uplink".into())
            .spawn(move || {
                let spool = rt.block_on(Uplink::new(conn, settings, spool).run(up_rx, from_tx, c));
                let _ = spool_tx.send(spool);
            })
            .context("starting the uplink's thread")?;
    }

    let (obs_tx, mut obs_rx) = mpsc::channel(4096);
    let sources_cancel = CancellationToken::new();
    let test_requests = sources::test_requests(&config);
    let source_tasks = sources::spawn_all(&config, obs_tx, &test_requests, sources_cancel.clone());
    let self_test_file = config.data_dir.join("self_test_last");
    let mut self_test_last =
        std::fs::read_to_string(&self_test_file).ok().and_then(|s| chrono::DateTime::parse_from_rfc3339(s.trim()).ok());
    let mut self_test_skipped_on = None;
    // First 10 s after start (the UPS has been read by then), then every minute.
    #[allow(clippy::disallowed_methods)] // a timer on tokio's clock
    let first_check = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut self_test_check = tokio::time::interval_at(first_check, Duration::from_secs(60));
    self_test_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut monitor = Monitor::new(specs, config.thresholds, &now);
    let mut started = Map::new();
    started.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    let _ = up_tx
        .send(ToUplink::Event(to_event(
            NewEvent { kind: EventKind::AgentStarted, source: None, ts: now.wall, mono_ms: now.mono_ms, data: started },
            &boot,
            &config.clock,
        )))
        .await;

    // The local alarm.
    let mut alarm = config
        .local_alarm
        .as_ref()
        .map(|a| LocalAlarm::new(u64::from(a.unreachable_after_s) * 1000, u64::from(a.silence_min) * 60_000));
    let mut situation = Situation { unreachable_since_ms: Some(now.mono_ms), ..Situation::default() };
    let (out_tx, out_rx) = watch::channel(Outputs::default());
    let (button_tx, mut button_rx) = mpsc::channel::<()>(4);
    let alarm_thread = config.local_alarm.clone().map(|cfg| {
        let c = cancel.clone();
        tokio::task::spawn_blocking(move || crate::gpio_alarm::drive(&cfg, out_rx, button_tx, &c))
    });

    let mut telemetry = tokio::time::interval(Duration::from_secs(u64::from(interval_s)));
    telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alarm_tick = tokio::time::interval(Duration::from_millis(50));
    alarm_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let watchdog_period = sd_notify::watchdog_enabled();
    let watchdog_on = watchdog_period.is_some();
    let mut watchdog =
        tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(2)).max(Duration::from_millis(200)) / 2);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    // One timer for the monitor's next deadline, re-armed when that deadline moves and after
    // it fires. (`Some(None)`: armed for "no deadline", a minute. A timer that fired must be
    // re-armed even when the deadline is still "none": polling an elapsed `Sleep` returns at
    // once, and the loop would spin on it, draining the battery it watches.)
    let sleep = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(sleep);
    let mut armed_for: Option<Option<u64>> = None;
    loop {
        let next = monitor.next_deadline_ms();
        if armed_for != Some(next) {
            let wait_ms = next.map_or(60_000, |d| d.saturating_sub(clock::now().mono_ms));
            #[allow(clippy::disallowed_methods)] // the timer that wakes the monitor, on tokio's clock
            sleep.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(wait_ms));
            armed_for = Some(next);
        }
        let mut events = Vec::new();
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(s) = obs_rx.recv() => events = monitor.observe(&s.source, s.observation, &s.at),
            () = &mut sleep => {
                events = monitor.tick(&clock::now());
                armed_for = None;
            }
            _ = telemetry.tick() => {
                let snap = snapshot(&mut monitor, interval_s, &config.clock);
                let _ = up_tx.send(ToUplink::Telemetry(snap)).await;
            }
            Some(m) = from_rx.recv() => match m {
                FromUplink::Connected(c) => {
                    situation.connected = c;
                    situation.unreachable_since_ms = (!c).then(|| clock::now().mono_ms);
                }
                FromUplink::Ack(_) => situation.last_ack_ms = Some(clock::now().mono_ms),
                FromUplink::SpoolDegraded(d) => {
                    situation.spool_degraded = d;
                    let kind = if d { EventKind::SpoolDegraded } else { EventKind::SpoolOk };
                    let now = clock::now();
                    events.push(NewEvent { kind, source: None, ts: now.wall, mono_ms: now.mono_ms, data: Map::new() });
                    if d {
                        tracing::error!("the spool cannot write to disk: events are held in memory");
                    }
                }
                FromUplink::Spooled(e) => tracing::info!(seq = e.seq, kind = e.kind.as_str(), source = ?e.source, "event"),
            },
            Some(()) = button_rx.recv() => {
                if let Some(a) = &mut alarm {
                    a.silence(&situation, clock::now().mono_ms);
                    tracing::info!("local sounder silenced by the button (remote escalation continues)");
                }
            }
            _ = alarm_tick.tick(), if alarm.is_some() => {
                let now = clock::now().mono_ms;
                let (m, b, d) = monitor.local_state();
                situation.mains_lost = m;
                situation.battery_low = b;
                situation.device_lost = d;
                if let Some(a) = &mut alarm {
                    let _ = out_tx.send(a.outputs(&situation, now));
                }
            }
            _ = self_test_check.tick(), if config.self_test.enabled => {
                let now = clock::now();
                // Not before the UPS has been read: the home's state is not known yet.
                if monitor.ups().is_some() && config.self_test.due(now.wall, self_test_last) {
                    let (on_battery, battery_low, device_lost) = monitor.local_state();
                    let trouble = device_lost
                        || monitor.conditions().iter().any(|(k, on)| *on && *k != EventKind::MainsLost && *k != EventKind::BatteryLow);
                    let home = crate::self_test::HomeNow {
                        on_battery,
                        battery_low,
                        charge_pct: monitor.ups().and_then(|u| u.battery_charge_pct),
                        trouble,
                        testing: monitor.self_testing(),
                        testable: !test_requests.is_empty(),
                    };
                    let today = now.wall.date_naive();
                    match crate::self_test::blocked(&config.self_test, &home) {
                        Some(reason) if self_test_skipped_on != Some(today) => {
                            self_test_skipped_on = Some(today);
                            tracing::warn!(reason, "battery self-test due but not run");
                            let test = BatteryTest {
                                result: Some(TestResult::Skipped),
                                reason: Some(reason.to_string()),
                                ..BatteryTest::default()
                            };
                            events.push(NewEvent { kind: EventKind::BatteryTest, source: None, ts: now.wall, mono_ms: now.mono_ms, data: to_data(&test) });
                        }
                        Some(_) => {}
                        None => {
                            for (id, flag) in &test_requests {
                                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                                monitor.self_test_started(id, &now, u64::from(config.self_test.max_s) * 1000);
                            }
                            self_test_last = Some(now.wall);
                            if let Err(e) = std::fs::write(&self_test_file, now.wall.to_rfc3339()) {
                                tracing::warn!(error = %e, file = %self_test_file.display(), "cannot record the battery self-test's time: it may run again after a restart");
                            }
                            armed_for = None; // the test's deadline is the monitor's now
                        }
                    }
                }
            }
            _ = watchdog.tick(), if watchdog_on => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
        let changed = !events.is_empty() && monitor.changed();
        for e in events {
            let _ = up_tx.send(ToUplink::Event(to_event(e, &boot, &config.clock))).await;
        }
        if changed {
            let snap = snapshot(&mut monitor, interval_s, &config.clock);
            let _ = up_tx.send(ToUplink::Telemetry(snap)).await;
        }
    }

    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let now = clock::now();
    let _ = up_tx
        .send(ToUplink::Event(to_event(
            NewEvent {
                kind: EventKind::AgentStopping,
                source: None,
                ts: now.wall,
                mono_ms: now.mono_ms,
                data: Map::new(),
            },
            &boot,
            &config.clock,
        )))
        .await;
    sources_cancel.cancel();
    uplink_cancel.cancel();
    let spool = spool_rx.await.context("the uplink's thread ended without its spool (it panicked)")?;
    tracing::info!(pending = spool.status().pending_events, "spool flushed");
    for t in source_tasks {
        t.abort();
    }
    if let Some(t) = alarm_thread {
        let _ = t.await;
    }
    Ok(())
}
