use super::*;

#[test]
fn commands_and_scenarios() {
    let w: Shared = Arc::new(Mutex::new(World::default()));
    apply(&w, "mains off").unwrap();
    apply(&w, "spo2 none").unwrap();
    apply(&w, "garbage ups 10").unwrap();
    assert!(!lock(&w).mains_on);
    assert_eq!(lock(&w).spo2, None);
    assert!(apply(&w, "fly away").is_err());
    assert!(apply(&w, "battery x").is_err());
    for name in ["steady", "outage", "faults", "bedside"] {
        parse_scenario(builtin(name).unwrap()).unwrap();
    }
    assert!(parse_scenario("5 mains sideways").unwrap_err().contains("line 1"));
    assert!(parse_scenario("soon mains off").is_err());
}

#[test]
fn the_ups_status_follows_the_world() {
    let w: Shared = Arc::new(Mutex::new(World::default()));
    let s = ups_status(&w);
    assert!(!s.bits.utility_fail && !s.bits.battery_low);
    assert_eq!(s.encode().len(), 47);
    apply(&w, "mains off").unwrap();
    apply(&w, "battery 21.5").unwrap();
    let s = ups_status(&w);
    assert!(s.bits.utility_fail && s.bits.battery_low);
    apply(&w, "mains on").unwrap();
    apply(&w, "glitch").unwrap();
    assert_eq!(ups_status(&w).input_fault_voltage_v, Some(12.0));
    assert_eq!(ups_status(&w).input_fault_voltage_v, Some(100.4), "a glitch shows once");
}

#[test]
fn an_aged_pack_drains_by_energy_and_its_runtime_is_estimated_as_if_new() {
    let w: Shared = Arc::new(Mutex::new(World::default()));
    // 100 Wh nameplate (80 usable), holding half of it: 40 Wh at 20 % of 300 W = 40 min.
    apply(&w, "pack 100 50").unwrap();
    apply(&w, "load 20").unwrap();
    apply(&w, "mains off").unwrap();
    assert_eq!(runtime_min(&lock(&w)), 80, "the firmware says 80 min, as if new");
    // 20 minutes of the battery: 80 ticks of 15 s.
    for _ in 0..80 {
        tick(&mut lock(&w), 15.0);
    }
    let charge = charge_pct(lock(&w).battery_v);
    assert!((49.0..=51.0).contains(&charge), "half of what it holds is left: {charge}");
    // The firmware still believes in 80 Wh: half of that at 60 W is 40 min, while the
    // truth is 20 min.
    let claimed = charge / 100.0 * 80.0 / 60.0 * 60.0;
    assert!((claimed - 40.0).abs() < 4.0, "{claimed}");
    assert!(apply(&w, "pack 0 50").is_err() && apply(&w, "pack 100 900").is_err() && apply(&w, "speed 0").is_err());
    // At speed 60, a second is a minute.
    apply(&w, "speed 60").unwrap();
    let before = lock(&w).pack.unwrap().soc;
    tick(&mut lock(&w), 1.0);
    let after = lock(&w).pack.unwrap().soc;
    assert!((before - after - 1.0 / 40.0).abs() < 1e-9, "one minute of forty: {before} → {after}");
}
