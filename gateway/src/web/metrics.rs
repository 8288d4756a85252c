//! Prometheus `/metrics` (text format 0.0.4).
//!
//! Aggregates only: no home id, label or name appears, so the endpoint needs no account
//! (scrapers rarely carry one). Put it behind the reverse proxy's access rules if even
//! fleet-wide counts should stay internal.
//!
//! | metric | what |
//! |---|---|
//! | `mamori_messages_total{result}` | messages from homes: `ingested`, `rejected`, `unknown_home`, `duplicate` |
//! | `mamori_homes{power,connectivity}` | homes by power (`mains`, `battery`, `unknown`) and connectivity |
//! | `mamori_open_alerts{tier}` | active alerts by current tier |
//! | `mamori_notification_attempts_total{result}` | delivery attempts: `delivered`, `failed` |
//! | `mamori_outbox{status}` | outbox rows by status (`pending` is the depth) |
//! | `mamori_notify_latency_seconds` | histogram: outbox row written (the decision, in the same transaction as the message that caused it) to the receiver's acceptance |
//! | `mamori_service_turn_seconds` | histogram: one turn of the service (an input taken, stored and decided, and what was due done); long turns delay everything the service does |
//! | `mamori_gateway_healthy` | 1 when `/healthz` says ok |
//! | `mamori_gateway_degraded` | 1 while the store refuses writes |
//! | `mamori_broker_connected` | 1 while the broker connection is up |
//! | `mamori_store_errors_total` | failed store transactions |
//! | `mamori_held_messages` | messages held in memory, not acknowledged, while degraded |
//! | `mamori_unrecorded_results` | delivery results waiting to be recorded |
//! | `mamori_open_breakers` | destinations not tried for now (failing in a row) |
//! | `mamori_standbys` | several gateways: standbys the active sees (0: its failure would not be taken over) |
//! | `mamori_live_streams` | dashboard live streams open |
//! | `mamori_readings_rejected_total{reason}` | power readings from homes set aside as impossible (sentinels, out of range, a runtime rising on battery, a stuck charge); the forecast used the next basis |
//! | `mamori_deliveries{channel,role,status}` | outbox rows within the retention by channel (`webhook`, `sms`, `email`, `line`, `voice`, `console`), role and status |
//! | `mamori_delivery_failed_attempts{channel,role}` | failed attempts within the retention |
//! | `mamori_acknowledged{role}`, `mamori_ack_seconds_median{role}` | alerts a role acknowledged after a message reached it, and the median time from that message to the acknowledgement |
//! | `mamori_outbound_dropped_total` | PUBACKs and agent acknowledgements dropped on a full outbound queue (the broker resends) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::App;
use crate::domain::policy::Tier;

/// Counters since start (exported by `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages accepted.
    pub ingested: AtomicU64,
    /// Messages refused (bad topic, payload or schema).
    pub rejected: AtomicU64,
    /// Messages from homes that are not registered.
    pub unknown_home: AtomicU64,
    /// Events already stored.
    pub duplicates: AtomicU64,
    /// Telemetry dropped while the store refused writes.
    pub dropped_degraded: AtomicU64,
    /// Notifications delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts.
    pub failed_attempts: AtomicU64,
    /// Attempts not made because the destination's breaker was open.
    pub skipped_attempts: AtomicU64,
    /// PUBACKs and agent acknowledgements dropped because the outbound queue was full.
    pub outbound_dropped: AtomicU64,
    /// Outbox row written to the receiver's acceptance, s.
    pub notify_latency: Histogram,
    /// One turn of the service, s (buckets [`TURN_BUCKETS_S`]).
    pub service_turn: Histogram,
}

/// Upper bounds of the service turn histogram's buckets, s.
pub const TURN_BUCKETS_S: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds of the latency histogram's buckets, s.
pub const LATENCY_BUCKETS_S: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A latency histogram (lock-free).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 10],
    over: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Record one observation, s, in the latency buckets.
    pub fn observe(&self, s: f64) {
        self.observe_in(&LATENCY_BUCKETS_S, s);
    }

    /// Record one observation, s, in these buckets (the same ones every time).
    pub fn observe_in(&self, bounds: &[f64; 10], s: f64) {
        let s = s.max(0.0);
        match bounds.iter().position(|b| s <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        self.render_in(&LATENCY_BUCKETS_S, name, out);
    }

    fn render_in(&self, bounds: &[f64; 10], name: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in bounds.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<App>) -> Response {
    let c = &app.counters;
    let mut out = String::new();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    out.push_str(
        "# HELP mamori_messages_total Messages from homes, by result.\n# TYPE mamori_messages_total counter\n",
    );
    for (k, v) in [
        ("ingested", &c.ingested),
        ("rejected", &c.rejected),
        ("unknown_home", &c.unknown_home),
        ("duplicate", &c.duplicates),
        ("dropped_degraded", &c.dropped_degraded),
    ] {
        let _ = writeln!(out, "mamori_messages_total{{result=\"{k}\"}} {}", load(v));
    }

    let snap = app.snap();
    let now = crate::edge::clock::now();
    let mut homes = std::collections::BTreeMap::new();
    let mut tiers = std::collections::BTreeMap::new();
    for p in ["mains", "battery", "unknown"] {
        for cn in ["online", "silent", "never"] {
            homes.insert((p, cn), 0u64);
        }
    }
    for t in [Tier::T0, Tier::T1, Tier::T2, Tier::T3] {
        tiers.insert(format!("{t:?}"), 0u64);
    }
    let mut rejected: std::collections::BTreeMap<String, u64> =
        crate::domain::forecast::reject::ALL.iter().map(|r| (r.to_string(), 0)).collect();
    for (plan, st) in snap.engine.states_and_plans() {
        for (r, n) in st.map(|s| &s.rejected_readings).into_iter().flatten() {
            *rejected.entry(r.clone()).or_default() += n;
        }
        let v = super::view::home_view(plan, st, now);
        *homes.entry((v.power, v.connectivity)).or_default() += 1;
        for a in &v.alerts {
            *tiers.entry(format!("{:?}", a.tier)).or_default() += 1;
        }
    }
    out.push_str("# HELP mamori_homes Registered homes by power and connectivity.\n# TYPE mamori_homes gauge\n");
    for ((p, cn), n) in homes {
        let _ = writeln!(out, "mamori_homes{{power=\"{p}\",connectivity=\"{cn}\"}} {n}");
    }
    out.push_str("# HELP mamori_open_alerts Active alerts by current tier.\n# TYPE mamori_open_alerts gauge\n");
    for (t, n) in tiers {
        let _ = writeln!(out, "mamori_open_alerts{{tier=\"{t}\"}} {n}");
    }
    out.push_str(
        "# HELP mamori_readings_rejected_total Power readings set aside as impossible, by reason.\n# TYPE mamori_readings_rejected_total counter\n",
    );
    for (r, n) in &rejected {
        let _ = writeln!(out, "mamori_readings_rejected_total{{reason=\"{r}\"}} {n}");
    }
    out.push_str(
        "# HELP mamori_notification_attempts_total Delivery attempts by result.\n# TYPE mamori_notification_attempts_total counter\n",
    );
    let _ = writeln!(out, "mamori_notification_attempts_total{{result=\"delivered\"}} {}", load(&c.delivered));
    let _ = writeln!(out, "mamori_notification_attempts_total{{result=\"failed\"}} {}", load(&c.failed_attempts));
    let _ = writeln!(out, "mamori_notification_attempts_total{{result=\"skipped\"}} {}", load(&c.skipped_attempts));
    let h = &app.health;
    let flag = |b: bool| u8::from(b);
    for (name, help, kind, v) in [
        ("mamori_gateway_healthy", "1 when /healthz says ok.", "gauge", u64::from(flag(h.problems(now).is_empty()))),
        (
            "mamori_gateway_degraded",
            "1 while the store refuses writes.",
            "gauge",
            u64::from(flag(h.degraded().is_some())),
        ),
        (
            "mamori_broker_connected",
            "1 while the broker connection is up.",
            "gauge",
            u64::from(flag(h.broker_down_since().is_none())),
        ),
        ("mamori_store_errors_total", "Failed store transactions.", "counter", load(&h.store_errors)),
        (
            "mamori_held_messages",
            "Messages held in memory, not acknowledged, while degraded.",
            "gauge",
            load(&h.held_messages),
        ),
        ("mamori_unrecorded_results", "Delivery results waiting to be recorded.", "gauge", load(&h.unrecorded_results)),
        ("mamori_open_breakers", "Destinations not tried for now.", "gauge", load(&h.open_breakers)),
        ("mamori_standbys", "Standby gateways the active one sees.", "gauge", load(&h.standbys)),
        (
            "mamori_gateway_active",
            "1 on the gateway that sends; 0 on a standby, which serves the dashboard only.",
            "gauge",
            u64::from(flag(h.standby().is_none())),
        ),
        (
            "mamori_outbound_dropped_total",
            "PUBACKs and agent acknowledgements dropped on a full outbound queue.",
            "counter",
            load(&c.outbound_dropped),
        ),
        (
            "mamori_live_streams",
            "Dashboard live streams open.",
            "gauge",
            app.live_streams.load(Ordering::Relaxed) as u64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    match app.db(|s| Ok(s.outbox_counts()?)).await {
        Ok(counts) => {
            out.push_str(
                "# HELP mamori_outbox Outbox rows by status (pending: the depth).\n# TYPE mamori_outbox gauge\n",
            );
            for status in ["pending", "delivered", "abandoned", "not_needed"] {
                let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "mamori_outbox{{status=\"{status}\"}} {n}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: outbox counts"),
    }
    match app.db(|s| Ok(s.delivery_inputs()?)).await {
        Ok((sent, acked)) => render_delivery(&crate::domain::stats::compute(&sent, &acked), &mut out),
        Err(e) => tracing::warn!(error = %e, "metrics: delivery statistics"),
    }
    out.push_str("# HELP mamori_notify_latency_seconds From the decision to notify to the receiver's acceptance.\n");
    c.notify_latency.render("mamori_notify_latency_seconds", &mut out);
    out.push_str("# HELP mamori_service_turn_seconds One turn of the service: an input taken, stored and decided, and what was due done.\n");
    c.service_turn.render_in(&TURN_BUCKETS_S, "mamori_service_turn_seconds", &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

/// The delivery statistics as metrics (roles and channels only: no home, no name).
pub fn render_delivery(stats: &crate::domain::stats::DeliveryStats, out: &mut String) {
    let role = |r: mamori_protocol::mqtt::Role| r.as_str();
    out.push_str("# HELP mamori_deliveries Outbox rows within the retention by channel, role and status.\n# TYPE mamori_deliveries gauge\n");
    for ((channel, r), c) in &stats.by {
        for (status, n) in [
            ("delivered", c.delivered),
            ("pending", c.pending),
            ("abandoned", c.abandoned),
            ("not_needed", c.not_needed),
        ] {
            let _ = writeln!(
                out,
                "mamori_deliveries{{channel=\"{channel}\",role=\"{}\",status=\"{status}\"}} {n}",
                role(*r)
            );
        }
    }
    out.push_str("# HELP mamori_delivery_failed_attempts Failed delivery attempts within the retention.\n# TYPE mamori_delivery_failed_attempts gauge\n");
    for ((channel, r), c) in &stats.by {
        let _ = writeln!(
            out,
            "mamori_delivery_failed_attempts{{channel=\"{channel}\",role=\"{}\"}} {}",
            role(*r),
            c.failed_attempts
        );
    }
    out.push_str("# HELP mamori_acknowledged Alerts a role acknowledged after a message reached it.\n# TYPE mamori_acknowledged gauge\n");
    for (r, a) in &stats.acks {
        let _ = writeln!(out, "mamori_acknowledged{{role=\"{}\"}} {}", role(*r), a.acknowledged);
    }
    out.push_str("# HELP mamori_ack_seconds_median From the first message delivered to a role to its acknowledgement, median.\n# TYPE mamori_ack_seconds_median gauge\n");
    for (r, a) in &stats.acks {
        if let Some(m) = a.median_s {
            let _ = writeln!(out, "mamori_ack_seconds_median{{role=\"{}\"}} {m}", role(*r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_with_an_inf_bucket() {
        let h = Histogram::default();
        for s in [0.05, 0.3, 0.3, 7.0, 1000.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render("x", &mut out);
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.5\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_count 5\n"), "{out}");
    }
}
