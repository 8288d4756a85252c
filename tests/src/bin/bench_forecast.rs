//! `bench-forecast`: does the forecast page the facility in time when the batteries are older
//! and the loads heavier than the care plans say? Not a test: it prints figures for
//! `docs/benchmarks.md` and `docs/forecast.md`.
//!
//! ```sh
//! cargo run --release -p mamori-tests --bin bench-forecast -- [--homes 400] [--seed 1]
//! ```
//!
//! Each simulated home has a care plan (its battery's usable energy, its devices' watts, the
//! ventilator's internal battery, the travel time to its powered destination) and a truth
//! that differs from it the ordinary way: six homes in ten have an aged battery (45–75 % of
//! the plan) and a heavier load (100–160 %, with a humidifier's or a suction pump's spikes);
//! four in ten are honest and healthy (95–105 %, the planned load). What each reports:
//! a UPS's charge and its runtime estimated as if the battery were new (APC, NUT), a charge
//! only, a lead-acid voltage only (Megatec), a power station's power meter, or nothing. The
//! charge is rounded to 1 % with ±1 point of noise; a lithium pack's charge reads up to 15 %
//! off. Telemetry every minute, through the gateway's own engine (`mamori_gateway::domain::engine`,
//! its default settings: T2 when the pessimistic time left is under travel × 2 + 6 h), time
//! compressed (the engine takes time as an input). When the external battery is empty the
//! home unit, on the same UPS, goes silent; the ventilator's internal battery runs on. "Paged"
//! is the forecast's own crossing into T2 (the policy's time-based steps, which bring the
//! facility into any outage nobody acknowledges after about 45 minutes, are left out).
//!
//! Reported, per what the home reports:
//! - the forecast's error, |P50 − truth| ÷ truth of the external backup's time left, at 25, 50
//!   and 75 % of the true discharge (target: p90 ≤ 10 % for homes reporting charge or
//!   runtime);
//! - homes whose facility (T2) was paged later than it needed to be: after the true end less
//!   travel × 2 + margin, by more than one telemetry period (target: none); a home whose
//!   battery could not give that lead even at the outage's start is reported apart, with the
//!   minutes from the start to its page (the time its discharge took to be seen);
//! - for homes that could be paged in time, the lead the facility had ÷ the lead required
//!   (target: at most 1.5 for an honest, healthy home that reports its charge).
//!
//! `BENCH_VERBOSE=1` prints each home that missed a target; `BENCH_TRACE=bench-0042` prints
//! that home's forecast each minute of its first hour (`BENCH_TRACE_S` for longer).

#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mamori_gateway::domain::engine::{Engine, Input, Settings};
use mamori_gateway::domain::homes::{Backup, BackupKind, Contact, Device, Evacuation, Home, Lang};
use mamori_gateway::domain::policy::Policies;
use mamori_protocol::mqtt::{ClockInfo, Event, EventKind, HomeId, PowerMeterReading, Role, Telemetry, Timestamp};
use mamori_protocol::reading::UpsReading;
use mamori_tests::args::{self, arg};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reports {
    ChargeAndRuntime,
    Charge,
    Voltage,
    Meter,
    Nothing,
}

impl Reports {
    fn name(self) -> &'static str {
        match self {
            Reports::ChargeAndRuntime => "UPS charge + runtime (APC, NUT)",
            Reports::Charge => "charge only",
            Reports::Voltage => "lead-acid voltage only (Megatec)",
            Reports::Meter => "power station + power meter",
            Reports::Nothing => "nothing",
        }
    }
}

struct Sim {
    id: HomeId,
    reports: Reports,
    plan_wh: f64,
    plan_load: f64,
    health: f64,
    load_factor: f64,
    spikes: bool,
    charge_bias: f64,
    internal_min: f64,
    travel_min: u32,
    honest: bool,
}

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
}

fn ts(s: i64) -> Timestamp {
    t(s).fixed_offset()
}

fn plan(s: &Sim) -> Home {
    let kind = if s.reports == Reports::Meter { BackupKind::PowerStation } else { BackupKind::Ups };
    let contact = |role, name: &str| Contact {
        role,
        name: name.into(),
        language: Lang::Ja,
        channels: vec![mamori_gateway::domain::homes::ChannelRef::Console(name.into())],
        quiet_hours: None,
        phone: None,
        consent: None,
        then: vec![],
    };
    Home {
        id: s.id.clone(),
        municipality: "431001".into(),
        municipality_name: None,
        label: s.id.as_str().into(),
        devices: vec![Device { name: "ventilator+humidifier".into(), watts: s.plan_load }],
        backup: vec![
            Backup { kind, usable_wh: Some(s.plan_wh), nameplate_wh: None, runtime_min: None, chemistry: None },
            Backup {
                kind: BackupKind::VentilatorInternal,
                usable_wh: None,
                nameplate_wh: None,
                runtime_min: Some(s.internal_min),
                chemistry: None,
            },
        ],
        evacuation: Some(Evacuation { destination: "病院".into(), travel_min: s.travel_min }),
        contacts: vec![
            contact(Role::Family, "family"),
            contact(Role::Coordinator, "coordinator"),
            contact(Role::Facility, "facility"),
            contact(Role::SupportCentre, "centre"),
        ],
        escalation: Default::default(),
    }
}

struct Outcome {
    reports: Reports,
    honest: bool,
    /// |P50 − truth| ÷ truth at 25, 50, 75 % of the discharge.
    errors: [Option<f64>; 3],
    /// Minutes the facility was paged later than needed (None: not late), for a home whose
    /// battery could give the facility its lead.
    late_min: Option<f64>,
    /// For a home whose battery could not give the facility its lead even at the outage's
    /// start: minutes from the start to the page.
    short_paged_min: Option<f64>,
    /// Lead had ÷ lead required, when the home could be paged in time.
    lead_ratio: Option<f64>,
}

/// Two outages of one home in one engine: the first with its battery never measured, the
/// second after the gateway learned from the first (a week later, the battery recharged).
fn run(s: &Sim, settings: &Settings, rng: &mut rand::rngs::StdRng) -> [Outcome; 2] {
    let mut e = Engine::new(settings.clone(), Policies::default());
    e.upsert_home(plan(s));
    e.set_uplink(true, t(-3600));
    let first = outage(&mut e, s, settings, rng, 0, 1);
    let second = outage(&mut e, s, settings, rng, 7 * 86_400, 3);
    [first, second]
}

fn outage(e: &mut Engine, s: &Sim, settings: &Settings, rng: &mut rand::rngs::StdRng, start: i64, seq: u64) -> Outcome {
    let t = |x: i64| t(start + x);
    let ts = |x: i64| ts(start + x);
    let step = 60i64;
    let cap = s.plan_wh * s.health;
    let mut energy = cap;
    // The true end of the external backup (s from the outage's start).
    let mut second = 0i64;
    let event = |seq: u64, at: i64, kind| Event {
        id: format!("b-{seq}"),
        seq,
        ts: ts(at),
        kind,
        severity: kind.default_severity(),
        source: None,
        data: Default::default(),
        clock: None,
    };
    e.handle(Input::Event(s.id.clone(), event(seq, 0, EventKind::MainsLost)), t(0)).unwrap();
    // First, the whole truth: the load each minute.
    let mut loads = Vec::new();
    while energy > 0.0 {
        let spike = s.spikes && (second / 60) % 20 < 2;
        let load = s.plan_load * s.load_factor * if spike { 1.8 } else { 1.0 };
        loads.push(load);
        energy -= load * step as f64 / 3600.0;
        second += step;
        if second > 14 * 86_400 {
            break;
        }
    }
    let ext_end_s = second as f64;
    let true_internal = s.internal_min * 60.0 * rng.random_range(0.85..1.0);
    let truly_out = ext_end_s + true_internal;
    let required = f64::from(s.travel_min * 2) * 60.0 + settings.t2_margin_min as f64 * 60.0;
    // Then the home's reports, minute by minute, with the engine polled.
    let mut energy = cap;
    let mut errors = [None; 3];
    let mut paged_at = None;
    let mut minute = 0i64;
    let marks = [0.25, 0.5, 0.75];
    loop {
        let at = minute * step;
        let alive = (at as f64) < ext_end_s;
        if alive {
            let load = loads[minute as usize];
            let soc = (energy / cap * 100.0).clamp(0.0, 100.0);
            let charge = ((soc * (1.0 + s.charge_bias)).clamp(0.0, 100.0) + rng.random_range(-1.0..1.0))
                .round()
                .clamp(0.0, 100.0);
            let mut tel = Telemetry {
                ts: ts(at),
                interval_s: step as u32,
                mains_present: Some(false),
                ups: None,
                power_meter: None,
                oximeter: None,
                ventilator: None,
                devices: vec![],
                spool: None,
                conditions: Default::default(),
                // The agent's clocks: this boot of the home unit, up an hour before the outage.
                clock: Some(ClockInfo {
                    boot: format!("boot-{seq}"),
                    uptime_ms: u64::try_from(3600 + at).unwrap_or(0) * 1000,
                    synced: Some(true),
                }),
                kept: false,
            };
            let load_pct = (load / 5.0 * 10.0).round() / 10.0;
            match s.reports {
                Reports::ChargeAndRuntime => {
                    tel.ups = Some(UpsReading {
                        battery_charge_pct: Some(charge),
                        // As if new: the charge of the care plan's battery at this load.
                        runtime_s: Some((charge / 100.0 * s.plan_wh / load * 3600.0) as u32),
                        load_pct: Some(load_pct),
                        on_battery: Some(true),
                        ..Default::default()
                    })
                }
                Reports::Charge => {
                    tel.ups = Some(UpsReading {
                        battery_charge_pct: Some(charge),
                        on_battery: Some(true),
                        ..Default::default()
                    })
                }
                Reports::Voltage => {
                    let sag = load / s.plan_load * 0.3;
                    tel.ups = Some(UpsReading {
                        battery_voltage_v: Some(
                            ((12.0 * (1.75 + 0.53 * soc / 100.0) - sag + rng.random_range(-0.1..0.1)) * 10.0).round()
                                / 10.0,
                        ),
                        load_pct: Some(load_pct),
                        on_battery: Some(true),
                        ..Default::default()
                    })
                }
                Reports::Meter => {
                    tel.power_meter = Some(PowerMeterReading {
                        battery_voltage_v: Some(12.8),
                        current_a: Some(load / 12.8),
                        power_w: Some(load * rng.random_range(0.97..1.03)),
                    });
                    tel.ups = Some(UpsReading { battery_charge_pct: Some(charge), ..Default::default() });
                }
                Reports::Nothing => {}
            }
            e.handle(Input::Telemetry(s.id.clone(), tel), t(at)).unwrap();
            energy -= load * step as f64 / 3600.0;
        }
        e.poll(t(at));
        e.take_outputs();
        let st = e.home_state(&s.id).unwrap();
        for (i, m) in marks.iter().enumerate() {
            if errors[i].is_none() && (at as f64) >= ext_end_s * m && alive {
                if let Some(f) = st.forecast {
                    let p50 = (f.external.p50 - t(at)).num_seconds() as f64;
                    let truth = ext_end_s - at as f64;
                    errors[i] = Some((p50 - truth).abs() / truth);
                    if std::env::var_os("BENCH_VERBOSE").is_some()
                        && (p50 - truth).abs() / truth > 0.2
                        && s.reports != Reports::Nothing
                    {
                        eprintln!(
                            "{} {:?} at {m}: P50 {:.1} h truth {:.1} h basis {:?} bias {:.2} health {:.2} load x{:.2} plan {:.0} Wh",
                            s.id.as_str(), s.reports, p50 / 3600.0, truth / 3600.0, f.basis, s.charge_bias, s.health, s.load_factor, s.plan_wh
                        );
                    }
                }
            }
        }
        // The forecast's own crossing (the engine's rule: T2 when the pessimistic time left is
        // under travel × 2 + margin, or the external backup may be exhausted). The policy's
        // time-based steps (an outage nobody acknowledges reaches the facility after about
        // 45 minutes whatever the forecast) are left out: they are not the forecast's doing.
        let trace_s = std::env::var("BENCH_TRACE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(3600);
        if std::env::var("BENCH_TRACE").ok().as_deref() == Some(s.id.as_str()) && at < trace_s {
            if let Some(f) = st.forecast_at(t(at)) {
                eprintln!(
                    "{} min: ext p10 {:.2} p50 {:.2} total p10 {:.2} basis {:?} req {:.2}",
                    at / 60,
                    (f.external.p10 - t(at)).num_seconds() as f64 / 3600.0,
                    (f.external.p50 - t(at)).num_seconds() as f64 / 3600.0,
                    f.time_left_p10(t(at)).num_seconds() as f64 / 3600.0,
                    f.basis,
                    required / 3600.0
                );
            }
        }
        let crossed = st.forecast_at(t(at)).is_some_and(|f| {
            f.may_be_on_last_battery(t(at)) || f.time_left_p10(t(at)).num_seconds() as f64 <= required
        });
        if paged_at.is_none() && crossed {
            paged_at = Some(at as f64);
        }
        // Until the home, silent since its battery died, has been seen to be silent.
        if paged_at.is_some() && (at as f64) > ext_end_s + 600.0 || (at as f64) > truly_out {
            break;
        }
        minute += 1;
        if minute as usize >= loads.len() + 24 * 60 {
            break;
        }
    }
    // Power comes back (a recharged battery for the next outage).
    let back = (minute + 1) * step;
    // The home unit, on the same backup, died with it: it comes back as a new boot.
    let mut restored = event(seq + 1, back, EventKind::MainsRestored);
    restored.clock = Some(ClockInfo { boot: format!("boot-{}", seq + 1), uptime_ms: 30_000, synced: Some(true) });
    e.handle(Input::Event(s.id.clone(), restored), t(back)).unwrap();
    e.poll(t(back));
    e.take_outputs();
    let needed_by = (truly_out - required).max(0.0);
    let short = needed_by <= 0.0;
    let late_min = match paged_at {
        _ if short => None,
        Some(p) if p > needed_by + step as f64 => Some((p - needed_by) / 60.0),
        Some(_) => None,
        None => Some((truly_out - needed_by) / 60.0),
    };
    let short_paged_min = short.then(|| paged_at.unwrap_or(truly_out) / 60.0);
    let lead_ratio = paged_at.filter(|_| truly_out > required).map(|p| (truly_out - p) / required);
    if std::env::var_os("BENCH_VERBOSE").is_some()
        && (late_min.is_some()
            || short_paged_min.is_some_and(|m| m > 1.0)
            || lead_ratio.is_some_and(|r| r > 1.5 && s.honest))
    {
        eprintln!(
            "{} {:?} honest={} plan {:.0} Wh / {:.0} W = {:.1} h, health {:.2}, load x{:.2}, ext {:.1} h, out {:.1} h, required {:.1} h, paged at {:?} h, late {:?} min, ratio {:?}",
            s.id.as_str(), s.reports, s.honest, s.plan_wh, s.plan_load, s.plan_wh / s.plan_load, s.health, s.load_factor,
            ext_end_s / 3600.0, truly_out / 3600.0, required / 3600.0, paged_at.map(|p| (p / 360.0).round() / 10.0), late_min.map(|l| l.round()), lead_ratio.map(|r| (r * 100.0).round() / 100.0)
        );
    }
    Outcome { reports: s.reports, honest: s.honest, errors, late_min, short_paged_min, lead_ratio }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    args::check(&["--homes", "--seed"], &[])?;
    let homes = arg("--homes", 400)? as usize;
    let seed = arg("--seed", 1)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let settings = Settings::default();
    let started = std::time::Instant::now();
    let (mut outcomes, mut learned) = (Vec::new(), Vec::new());
    for i in 0..homes {
        let reports =
            [Reports::ChargeAndRuntime, Reports::Charge, Reports::Voltage, Reports::Meter, Reports::Nothing][i % 5];
        let honest = rng.random_bool(0.4);
        let (plan_wh, plan_load) = if reports == Reports::Meter {
            (rng.random_range(500.0..3000.0), rng.random_range(40.0..150.0))
        } else {
            (rng.random_range(200.0..1500.0), rng.random_range(40.0..150.0))
        };
        let s = Sim {
            id: HomeId::new(&format!("bench-{i:04}")).unwrap(),
            reports,
            plan_wh,
            plan_load,
            health: if honest { rng.random_range(0.95..1.05) } else { rng.random_range(0.45..0.75) },
            load_factor: if honest { 1.0 } else { rng.random_range(1.0..1.6) },
            spikes: !honest && rng.random_bool(0.5),
            charge_bias: if reports == Reports::Meter { rng.random_range(-0.15..0.15) } else { 0.0 },
            internal_min: rng.random_range(60.0..480.0),
            travel_min: rng.random_range(20..=60),
            honest,
        };
        let [a, b] = run(&s, &settings, &mut rng);
        outcomes.push(a);
        learned.push(b);
    }
    println!("bench-forecast: {homes} homes, seed {seed}, {:.1} s", started.elapsed().as_secs_f64());
    report("First outage: every battery unverified", &outcomes);
    report("Second outage: each battery as the first one measured it", &learned);
    Ok(())
}

fn report(title: &str, outcomes: &[Outcome]) {
    println!("\n## {title}");
    println!("\nForecast error |P50 − truth| ÷ truth of the external backup's time left (p50 / p90 / max):");
    println!("| reports | homes | at 25 % | at 50 % | at 75 % |\n|---|---|---|---|---|");
    let mut groups: BTreeMap<Reports, Vec<&Outcome>> = BTreeMap::new();
    for o in outcomes {
        groups.entry(o.reports).or_default().push(o);
    }
    for (r, os) in &groups {
        let mut cells = Vec::new();
        for i in 0..3 {
            let mut v: Vec<f64> = os.iter().filter_map(|o| o.errors[i]).collect();
            v.sort_by(f64::total_cmp);
            cells.push(format!(
                "{:.0} / {:.0} / {:.0} %",
                pct(&v, 0.5) * 100.0,
                pct(&v, 0.9) * 100.0,
                v.last().copied().unwrap_or(f64::NAN) * 100.0
            ));
        }
        println!("| {} | {} | {} |", r.name(), os.len(), cells.join(" | "));
    }
    println!("\nThe facility (T2) paged later than needed (after the true end less travel × 2 + 6 h, by more than a minute), for homes whose battery could give it that lead; and for homes whose battery could not even at the outage's start, minutes from the start to the page:");
    println!("| reports | homes | late | worst, min | short from the start | paged after, p50 / max min |\n|---|---|---|---|---|---|");
    for (r, os) in &groups {
        let late: Vec<f64> = os.iter().filter_map(|o| o.late_min).collect();
        let worst = late.iter().copied().fold(0.0, f64::max);
        let mut short: Vec<f64> = os.iter().filter_map(|o| o.short_paged_min).collect();
        short.sort_by(f64::total_cmp);
        let after = if short.is_empty() {
            "—".to_string()
        } else {
            format!("{:.0} / {:.0}", pct(&short, 0.5), short[short.len() - 1])
        };
        println!("| {} | {} | {} | {:.0} | {} | {} |", r.name(), os.len(), late.len(), worst, short.len(), after);
    }
    println!("\nLead the facility had ÷ lead required, for homes that could be paged in time (p50 / p90 / max):");
    println!("| reports | all homes | honest, healthy homes |\n|---|---|---|");
    for (r, os) in &groups {
        let stats = |honest_only: bool| {
            let mut v: Vec<f64> = os.iter().filter(|o| !honest_only || o.honest).filter_map(|o| o.lead_ratio).collect();
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                return "—".to_string();
            }
            format!("{:.2} / {:.2} / {:.2} ({} homes)", pct(&v, 0.5), pct(&v, 0.9), v[v.len() - 1], v.len())
        };
        println!("| {} | {} | {} |", r.name(), stats(false), stats(true));
    }
}
