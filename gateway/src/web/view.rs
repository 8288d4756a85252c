//! What a user may see, as plain data: the pages render it and the API serialises it.
//! Pure: a snapshot, a user and the time go in.

use mamori_protocol::bridge::ContactState;
use mamori_protocol::mqtt::Severity;
use serde::Serialize;

use crate::admin::accounts::{AccountRole, User};
use crate::domain::engine::{AckInfo, Alert, AlertKind, Connectivity, Engine, HomeState, Power, Time, TriageRow};
use crate::domain::forecast::Band;
use crate::domain::homes::{BackupKind, Home};
use crate::domain::policy::Tier;

/// One home, as the overview and `GET /api/v1/homes` show it.
#[derive(Debug, Clone, Serialize)]
pub struct HomeView {
    /// Opaque id.
    pub id: String,
    /// The label from the care plan.
    pub label: String,
    /// Municipality code.
    pub municipality: String,
    /// The municipality's name, when the care plan gives it.
    pub municipality_name: Option<String>,
    /// `mains`, `battery` or `unknown`.
    pub power: &'static str,
    /// On battery since.
    pub on_battery_since: Option<Time>,
    /// Time left on backup power, s (while on battery): the forecast's middle.
    pub time_left_s: Option<i64>,
    /// Time left on the pessimistic (P10) and the optimistic (P90) bound, s.
    pub time_left_range_s: Option<(i64, i64)>,
    /// When everything runs out (the ventilator's own battery included): P10, P50, P90.
    pub runs_out: Option<Band>,
    /// When the external backup runs out: P10, P50, P90.
    pub external_runs_out: Option<Band>,
    /// The time of the reading the forecast was made from.
    pub forecast_as_of: Option<Time>,
    /// On battery with a destination: when the child must leave at the latest (the
    /// pessimistic time everything runs out, less the travel time).
    pub leave_by: Option<Time>,
    /// Whether the battery's capacity was measured (false: assumed for a battery never
    /// measured).
    pub forecast_verified: Option<bool>,
    /// What the forecast rests on.
    pub basis: Option<&'static str>,
    /// What earlier outages showed of the backup batteries (one per source measured).
    pub batteries: Vec<BatteryView>,
    /// Readings refused as impossible, by reason, in all.
    pub readings_rejected: std::collections::BTreeMap<String, u64>,
    /// The external backup is exhausted: only the ventilator's own battery is left.
    pub on_last_battery: bool,
    /// `online`, `silent` or `never`.
    pub connectivity: &'static str,
    /// Offline or stale.
    pub silent: bool,
    /// When the gateway last heard from the home.
    pub last_heard: Option<Time>,
    /// Sources the home reports.
    pub devices: Vec<String>,
    /// Sources that stopped answering.
    pub devices_lost: Vec<String>,
    /// What kind each source is (`ups`, `oximeter`, `bridge`, `power_monitor`, `contacts`).
    pub device_kinds: std::collections::BTreeMap<String, mamori_protocol::mqtt::DeviceKind>,
    /// SpO2, %.
    pub spo2_pct: Option<u8>,
    /// Pulse, bpm.
    pub pulse_bpm: Option<u16>,
    /// The ventilator's remote-alarm contact: `normal`, `alarm`, `cable_fault`.
    pub ventilator: Option<&'static str>,
    /// Evacuation destination and travel time, min.
    pub evacuation: Option<(String, u32)>,
    /// Active alerts.
    pub alerts: Vec<AlertView>,
    #[serde(skip)]
    rank: (u8, i64),
}

/// A backup battery as measured.
#[derive(Debug, Clone, Serialize)]
pub struct BatteryView {
    /// `ups` or `power_station`.
    pub source: BackupKind,
    /// Usable energy delivered ÷ the care plan's, %.
    pub health_pct: f64,
    /// The care plan's usable energy it was measured against, Wh.
    pub plan_wh: f64,
    /// The UPS's runtime claim ÷ what the battery could give (above 1: optimistic).
    pub ups_optimism: Option<f64>,
    /// Discharges measured.
    pub discharges: u32,
    /// Enough measured to be used by the forecast.
    pub in_use: bool,
    /// When last measured.
    pub measured_at: Time,
}

/// An alert.
#[derive(Debug, Clone, Serialize)]
pub struct AlertView {
    /// Id.
    pub id: String,
    /// Home id.
    pub home: String,
    /// Kind.
    pub kind: AlertKind,
    /// Severity.
    pub severity: Severity,
    /// Current tier.
    pub tier: Tier,
    /// When it began at the home.
    pub since: Time,
    /// When the gateway raised it.
    pub raised_at: Time,
    /// The current acknowledgement.
    pub acknowledged: Option<AckInfo>,
    /// Every acknowledgement.
    pub acks: Vec<AckInfo>,
    /// When it cleared.
    pub cleared_at: Option<Time>,
    /// Who cleared it by hand.
    pub cleared_by: Option<String>,
}

impl AlertView {
    /// From an alert.
    pub fn of(a: &Alert) -> AlertView {
        AlertView {
            id: a.id.clone(),
            home: a.home.as_str().to_string(),
            kind: a.kind,
            severity: a.severity,
            tier: a.tier(),
            since: a.since,
            raised_at: a.raised_at,
            acknowledged: a.acknowledged.clone(),
            acks: a.acks.clone(),
            cleared_at: a.cleared_at,
            cleared_by: a.cleared_by.clone(),
        }
    }
}

/// One home's view.
pub fn home_view(plan: &Home, st: Option<&HomeState>, now: Time) -> HomeView {
    let default = HomeState::default();
    let st = st.unwrap_or(&default);
    let (power, since) = match st.power {
        Power::Unknown => ("unknown", None),
        Power::Mains => ("mains", None),
        Power::Battery { since } => ("battery", Some(since)),
    };
    let forecast = st.forecast_at(now).filter(|_| since.is_some());
    let time_left_s = forecast.map(|f| f.time_left(now).num_seconds());
    let plan_wh = plan.external_wh();
    let silent = st.conn.silent();
    let mut alerts: Vec<AlertView> = st.alerts.values().map(AlertView::of).collect();
    alerts.sort_by(|a, b| b.severity.cmp(&a.severity).then(b.tier.cmp(&a.tier)).then(a.raised_at.cmp(&b.raised_at)));
    let critical = alerts.iter().any(|a| a.severity == Severity::Critical);
    // Every home on battery, silent or not, by when it must leave (its pessimistic time left
    // without a destination); then silent homes, critical alerts, other alerts, never heard.
    let leave_by = forecast
        .zip(plan.evacuation.as_ref())
        .map(|(f, e)| f.runs_out.p10 - chrono::Duration::minutes(i64::from(e.travel_min)));
    let rank = match (since.is_some(), silent) {
        (true, _) => 0,
        (false, true) => 2,
        _ if critical => 3,
        _ if !alerts.is_empty() => 4,
        _ if st.conn == Connectivity::Never => 5,
        _ => 6,
    };
    // Not clamped at zero: a home past its time sorts by how far past.
    let urgency = leave_by
        .map(|l| (l - now).num_seconds())
        .or_else(|| forecast.map(|f| (f.runs_out.p10 - now).num_seconds()))
        .unwrap_or(i64::MIN);
    HomeView {
        id: plan.id.as_str().to_string(),
        label: plan.label.clone(),
        municipality: plan.municipality.clone(),
        municipality_name: plan.municipality_name.clone(),
        power,
        on_battery_since: since,
        time_left_s,
        time_left_range_s: forecast.map(|f| (f.time_left_p10(now).num_seconds(), f.time_left_p90(now).num_seconds())),
        runs_out: forecast.map(|f| f.runs_out),
        external_runs_out: forecast.map(|f| f.external),
        forecast_as_of: forecast.map(|f| f.as_of),
        leave_by,
        forecast_verified: forecast.map(|f| f.verified),
        basis: forecast.map(|f| f.basis.as_str()),
        batteries: st
            .battery
            .iter()
            .map(|l| BatteryView {
                source: l.source,
                health_pct: (l.health * 1000.0).round() / 10.0,
                plan_wh: l.plan_wh,
                ups_optimism: l.optimism.map(|o| (o * 100.0).round() / 100.0),
                discharges: l.discharges,
                in_use: l.usable() && plan_wh.is_some_and(|w| (w - l.plan_wh).abs() < 0.5),
                measured_at: l.updated_at,
            })
            .collect(),
        readings_rejected: st.rejected_readings.clone(),
        on_last_battery: forecast.is_some_and(|f| f.on_last_battery(now)),
        connectivity: match st.conn {
            Connectivity::Never => "never",
            Connectivity::Online => "online",
            _ => "silent",
        },
        silent,
        last_heard: st.last_heard,
        devices: st.devices.iter().cloned().collect(),
        devices_lost: st.devices_lost.iter().cloned().collect(),
        device_kinds: st.device_kinds.clone(),
        spo2_pct: st.oximeter.as_ref().and_then(|o| o.spo2_pct),
        pulse_bpm: st.oximeter.as_ref().and_then(|o| o.pulse_bpm),
        ventilator: st.ventilator.as_ref().map(|v| match v.alarm {
            ContactState::Normal => "normal",
            ContactState::Alarm => "alarm",
            ContactState::CableFault => "cable_fault",
        }),
        evacuation: plan.evacuation.as_ref().map(|e| (e.destination.clone(), e.travel_min)),
        alerts,
        rank: (rank, if rank == 0 { urgency } else { i64::MAX }),
    }
}

/// Whether the user may see this home: their scope, and — when the config requires consent —
/// the guardian's current consent to share the child's data with a contact of the account's
/// role (a coordinator account: a coordinator contact; a facility account: a facility
/// contact). An administrator (the centre running the service, audited) and the family (the
/// guardian) need none.
pub fn sees(engine: &Engine, user: &User, plan: &Home) -> bool {
    user.may_see(plan) && consented(engine, user, plan)
}

fn consented(engine: &Engine, user: &User, plan: &Home) -> bool {
    if !engine.require_consent() {
        return true;
    }
    let today = engine.today(crate::edge::clock::now());
    let role = match user.role {
        AccountRole::Admin | AccountRole::Family => return true,
        AccountRole::Coordinator => mamori_protocol::mqtt::Role::Coordinator,
        AccountRole::Facility => mamori_protocol::mqtt::Role::Facility,
    };
    plan.contacts_for(role).any(|c| c.consent.as_ref().is_some_and(|k| k.current(today)))
}

/// How many homes in the user's scope are not shown for want of consent (the dashboard says
/// so, without saying which).
pub fn withheld(engine: &Engine, user: &User) -> usize {
    engine.states_and_plans().filter(|(p, _)| user.may_see(p) && !consented(engine, user, p)).count()
}

/// Every home the user may see, worst first: on battery (silent or not) by the time it must
/// leave, silent, critical alerts, other alerts, never heard, fine.
pub fn homes(engine: &Engine, user: &User, now: Time) -> Vec<HomeView> {
    let mut v: Vec<HomeView> =
        engine.states_and_plans().filter(|(p, _)| sees(engine, user, p)).map(|(p, st)| home_view(p, st, now)).collect();
    v.sort_by(|a, b| a.rank.cmp(&b.rank).then_with(|| a.label.cmp(&b.label)));
    v
}

/// One home, if the user may see it (`None` either way: not there, or not theirs).
pub fn home<'a>(engine: &'a Engine, user: &User, id: &str) -> Option<&'a Home> {
    let id = mamori_protocol::mqtt::HomeId::new(id).ok()?;
    engine.plan(&id).filter(|p| sees(engine, user, p))
}

/// An open incident.
#[derive(Debug, Clone, Serialize)]
pub struct IncidentView {
    /// Id.
    pub id: String,
    /// Municipality code.
    pub municipality: String,
    /// The municipality's name, when a care plan gives it.
    pub municipality_name: Option<String>,
    /// When it opened.
    pub opened_at: Time,
    /// Triage: soonest out first, silent homes included.
    pub rows: Vec<TriageRow>,
    /// Acknowledgements of the incident.
    pub acks: Vec<AckInfo>,
}

/// Open incidents the user may see (coordinators of the municipality and admins).
pub fn incidents(engine: &Engine, user: &User, now: Time) -> Vec<IncidentView> {
    let mut v: Vec<IncidentView> = engine
        .incidents()
        .filter(|i| i.closed_at.is_none() && user.may_see_municipality(&i.municipality))
        .map(|i| IncidentView {
            id: i.id.clone(),
            municipality: i.municipality.clone(),
            municipality_name: engine.municipality_name(&i.municipality),
            opened_at: i.opened_at,
            rows: engine
                .incident_triage(&i.id, now)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| engine.plan(&r.home).is_some_and(|p| sees(engine, user, p)))
                .collect(),
            acks: i.acks.clone(),
        })
        .collect();
    v.sort_by_key(|i| i.opened_at);
    v
}

/// Active alerts across the user's homes, most urgent first.
pub fn open_alerts(engine: &Engine, user: &User, now: Time) -> Vec<OpenAlert> {
    let mut v: Vec<OpenAlert> = engine
        .states_and_plans()
        .filter(|(p, _)| sees(engine, user, p))
        .flat_map(|(p, st)| {
            let h = home_view(p, st, now);
            let on_battery = h.power == "battery";
            let leave_in_s = on_battery.then_some(h.rank.1).filter(|x| *x != i64::MIN && *x != i64::MAX);
            h.alerts
                .into_iter()
                .map(move |a| OpenAlert {
                    label: p.label.clone(),
                    on_battery,
                    leave_in_s,
                    has_destination: p.evacuation.is_some(),
                    alert: a,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    // Critical alerts and homes that must leave within three hours first (a ventilator alarm
    // at a home on mains is not buried under an outage with a day left), by when they must
    // leave; then the other homes on battery by the same; then the rest; each by tier and
    // severity.
    v.sort_by(|a, b| {
        let key = |x: &OpenAlert| {
            let critical = x.alert.severity == Severity::Critical;
            match x.leave_in_s {
                Some(s) if critical || s < 3 * 3600 => (0, s),
                // On battery without a forecast, or a critical alert at a home on mains: now.
                None if critical || x.on_battery => (0, i64::MIN),
                Some(s) => (1, s),
                None => (2, 0),
            }
        };
        key(a)
            .cmp(&key(b))
            .then(b.alert.tier.cmp(&a.alert.tier))
            .then(b.alert.severity.cmp(&a.alert.severity))
            .then(a.alert.raised_at.cmp(&b.alert.raised_at))
    });
    v
}

/// Who is handling a home now: the latest coordinator who took it on during its open alerts.
pub fn handler(h: &HomeView) -> Option<&crate::domain::engine::AckInfo> {
    h.alerts
        .iter()
        .flat_map(|a| a.acks.iter())
        .filter(|k| k.answer == Some(crate::domain::engine::Answer::Handling))
        .max_by_key(|k| k.at)
}

/// An open alert with what its list shows beside it.
#[derive(Debug, Clone)]
pub struct OpenAlert {
    /// The home's label.
    pub label: String,
    /// Its home on battery: how long until the child must leave, s (negative: overdue), or
    /// without a destination until the power runs out.
    pub leave_in_s: Option<i64>,
    /// Its home's care plan names a destination.
    pub has_destination: bool,
    /// Its home is on battery.
    pub on_battery: bool,
    /// The alert.
    pub alert: AlertView,
}

/// The active alert with this id, if the user may see its home.
pub fn alert<'a>(engine: &'a Engine, user: &User, id: &str) -> Option<&'a Alert> {
    engine
        .states_and_plans()
        .filter(|(p, _)| sees(engine, user, p))
        .flat_map(|(_, st)| st.into_iter().flat_map(|s| s.alerts.values()))
        .find(|a| a.id == id)
}

/// The alert a home's answers are about: the most urgent active one, an outage before the rest.
pub fn main_alert(h: &HomeView) -> Option<&AlertView> {
    h.alerts.iter().filter(|a| a.kind != AlertKind::Drill).max_by_key(|a| {
        let power = matches!(crate::domain::message::concern(a.kind), crate::domain::message::Concern::Power);
        (power, a.tier, a.severity as u8)
    })
}
