use super::*;

const MIN: &str = r#"
home_id = "test-01"
data_dir = "/tmp/x"
[broker]
host = "127.0.0.1"
port = 1883
[[ups]]
id = "ups"
protocol = "megatec"
port = "/dev/ttyUSB0"
"#;

fn err(text: &str) -> String {
    Config::parse(text, Path::new("agent.toml")).unwrap_err().to_string()
}

#[test]
fn every_number_has_bounds() {
    let with = |extra: &str| format!("{MIN}{extra}\n");
    for (extra, key) in [
        ("lost_after_missed_polls = 4000000000", "ups[0].lost_after_missed_polls"),
        ("glitch_below_v = 1e300", "ups[0].glitch_below_v"),
        ("[contacts]\nmains_line = 4\npoll_interval_ms = 18446744073709551615", "contacts.poll_interval_ms"),
        ("[[bridge]]\nid = \"b\"\nport = \"/dev/x\"\nlost_after_ms = 0", "bridge[0].lost_after_ms"),
        ("[spool]\ncapacity_bytes = 18446744073709551615", "spool.capacity_bytes"),
        ("[thresholds]\nspo2_delay_s = 4294967295", "thresholds"),
    ] {
        let e = err(&with(extra));
        assert!(e.contains(&format!("key `{key}`")), "{extra}: {e}");
    }
}

#[test]
fn failover_brokers_are_host_and_port_with_tls_beyond_loopback() {
    let with = |line: &str| {
        Config::parse(&MIN.replace("port = 1883\n", &format!("port = 1883\n{line}\n")), Path::new("a.toml"))
    };
    assert_eq!(with("failover = [\"127.0.0.1:1884\"]").unwrap().broker.failover, ["127.0.0.1:1884"]);
    for bad in ["\"127.0.0.1\"", "\"127.0.0.1:0\"", "\"127.0.0.1:x\"", "\":1883\""] {
        let e = with(&format!("failover = [{bad}]")).unwrap_err().to_string();
        assert!(e.contains("broker.failover[0]") && e.contains("host:port"), "{bad}: {e}");
    }
    // Plain MQTT to another machine: refused, as for the first broker.
    let e = with("failover = [\"mq2.example.lg.jp:1883\"]").unwrap_err().to_string();
    assert!(e.contains("broker.failover[0]") && e.contains("tls"), "{e}");
    assert_eq!(parse_host_port("mq2.example.lg.jp:8883"), Ok(("mq2.example.lg.jp".into(), 8883)));
}

#[test]
fn minimal_config_with_defaults() {
    let c = Config::parse(MIN, Path::new("agent.toml")).unwrap();
    assert_eq!(c.ups[0].poll_interval_ms, 250);
    assert_eq!(c.ups[0].baud, 2400);
    assert_eq!(c.telemetry.interval_s, 10);
    assert_eq!(c.thresholds.spo2_low_pct, 90);
    assert_eq!(c.thresholds.pulse_high_bpm, 180);
}

#[test]
fn errors_name_file_key_and_expectation() {
    let e = err(&MIN.replace("poll", "x").replace("port = \"/dev", "polll_interval_ms = 3\nport = \"/dev"));
    assert!(e.starts_with("agent.toml: "), "{e}");
    assert!(e.contains("unknown field `polll_interval_ms`"), "{e}");
    let e = err(&format!("{MIN}poll_interval_ms = 5\n"));
    assert_eq!(e, "agent.toml: key `ups[0].poll_interval_ms`: expected between 50 and 60000");
    let e = err(&MIN.replace("test-01", "Yamada Taro"));
    assert!(e.contains("key `home_id`"), "{e}");
    let e = err(&MIN.replace("127.0.0.1", "mqtt.example.jp"));
    assert!(e.contains("key `broker.tls`"), "{e}");
    let e = err(&MIN.replace("protocol = \"megatec\"", "protocol = \"pigeon\""));
    assert!(e.contains("unknown variant `pigeon`"), "{e}");
    let e = err(&MIN.replace("id = \"ups\"", "id = \"Grandma's UPS\""));
    assert!(e.contains("key `ups[0].id`"), "{e}");
    let e = err(&format!("{MIN}[contacts]\nventilator_no_line = 17\n"));
    assert!(e.contains("key `contacts.ventilator_nc_line`"), "{e}");
    let e = err(&MIN.replace("port = 1883", "port = 99999"));
    assert!(e.contains("port"), "{e}");
}

#[test]
fn secrets_resolve_and_never_print() {
    let s = Secret::Value("hunter2".into());
    assert!(!format!("{s:?}").contains("hunter2"));
    std::env::set_var("MAMORI_TEST_SECRET", "from-env");
    assert_eq!(Secret::Env("MAMORI_TEST_SECRET".into()).resolve().unwrap(), "from-env");
    assert!(Secret::Env("MAMORI_TEST_SECRET_UNSET".into()).resolve().is_err());
}
