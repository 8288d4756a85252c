//! What ships in `deploy/` is what the gateway accepts and generates.

#[test]
fn the_shipped_example_configs_are_valid() {
    use std::path::Path;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway");
    let config = mamori_gateway::config::Config::load(&dir.join("gateway.toml")).expect("gateway.toml");
    let homes =
        mamori_gateway::domain::homes::HomesFile::load(&dir.join("homes.toml"), &config.known()).expect("homes.toml");
    assert_eq!(homes.homes.len(), 1);
    let yaml =
        mamori_gateway::domain::homes::HomesFile::load(&dir.join("homes.yaml"), &config.known()).expect("homes.yaml");
    assert_eq!(yaml.homes, homes.homes, "homes.yaml says what homes.toml says");
}

#[test]
fn the_shipped_mosquitto_config_and_acl_are_what_pki_init_generates() {
    use std::path::Path;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto");
    let lines = |text: &str| -> Vec<String> {
        text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_string).collect()
    };
    let shipped = std::fs::read_to_string(dir.join("mosquitto.conf")).expect("mosquitto.conf");
    let generated = format!(
        "{}{}",
        mamori_gateway::admin::pki::mosquitto_listener(8883, "0.0.0.0", Path::new("/etc/mamori/pki")),
        mamori_gateway::admin::pki::mosquitto_service(Path::new("/var/lib/mosquitto"))
    );
    assert_eq!(lines(&shipped), lines(&generated));
    let acl = std::fs::read_to_string(dir.join("acl")).expect("acl");
    assert_eq!(lines(&acl), lines(&mamori_gateway::admin::pki::acl()));
}
