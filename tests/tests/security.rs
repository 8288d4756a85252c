//! Provisioning and the broker's lock-down, against a real Mosquitto started by the test with
//! the configuration `mamori-gateway pki init` generates: the TLS listener, the password file
//! and the per-home ACL. Credentials come from the bundles `homes provision` writes, read
//! with the agent's own config loader.
#![allow(clippy::disallowed_methods)] // the tests wait with their own clock

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mamori_tests::{Deadline, Mosquitto};
use rumqttc::{Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");
const LIMIT: Duration = Duration::from_secs(20);

struct Deployment {
    dir: tempfile::TempDir,
    config: PathBuf,
    broker: Mosquitto,
}

impl Deployment {
    fn pki(&self) -> PathBuf {
        self.dir.path().join("data").join("pki")
    }

    fn bundles(&self) -> PathBuf {
        self.dir.path().join("bundles")
    }
}

fn cli(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(BIN).args(args).output()?)
}

fn ok(out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// `pki init`, a broker on the generated listener config, and the reload command pointed at it.
fn deploy() -> Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    let base = "data_dir = \"data\"\nhomes_file = \"homes.toml\"\npublic_url = \"http://127.0.0.1:1\"\n\
                link_secret = { value = \"a-test-secret-long-enough\" }\n[broker]\nhost = \"127.0.0.1\"\nport = 1\nclient_id = \"gw\"\n";
    std::fs::write(&config, base)?;
    // The homes provisioning may issue credentials for: registered ones.
    let homes: String = ["home-a", "home-b"]
        .iter()
        .map(|id| {
            format!(
                "[[home]]\nid = \"{id}\"\nmunicipality = \"431001\"\nlabel = \"{id}\"\n\
                 contacts = [{{ role = \"family\", name = \"家族\", channels = [{{ console = \"family\" }}] }}]\n"
            )
        })
        .collect();
    std::fs::write(dir.path().join("homes.toml"), homes)?;
    let c = config.to_str().context("path")?;
    ok(cli(&["pki", "init", "--config", c, "--broker-host", "127.0.0.1", "--broker-host", "localhost"])?)?;
    let pki = dir.path().join("data").join("pki");
    assert!(std::fs::read_to_string(pki.join("mosquitto.conf"))?.contains("require_certificate true"));
    let broker = mamori_tests::chain::generated_broker(&pki)?;
    let pid = broker.pid().context("broker pid")?;
    std::fs::write(&config, format!("{base}[pki]\nreload_command = [\"kill\", \"-HUP\", \"{pid}\"]\n"))?;
    Ok(Deployment { dir, config, broker })
}

fn provision(d: &Deployment, homes: &[&str]) -> Result<()> {
    let mut args = vec![
        "homes",
        "provision",
        "--config",
        d.config.to_str().context("path")?,
        "--broker-host",
        "127.0.0.1",
        "--broker-port",
    ];
    let port = d.broker.port().to_string();
    args.push(&port);
    let out = d.bundles();
    args.extend(["--out", out.to_str().context("path")?]);
    args.extend(homes);
    ok(cli(&args)?)?;
    Ok(())
}

/// TLS material and credentials for one MQTT identity.
#[derive(Clone)]
struct Identity {
    ca: Vec<u8>,
    client_auth: Option<(Vec<u8>, Vec<u8>)>,
    user: Option<(String, String)>,
}

/// A home's identity, from its bundle, through the agent's own loader (with a device added,
/// as the installer does).
fn home(d: &Deployment, id: &str) -> Result<Identity> {
    let path = d.bundles().join(format!("{id}.toml"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o600, "the bundle is private");
    let installed = d.dir.path().join(format!("{id}-installed.toml"));
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(
        &installed,
        format!("{text}\n[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"/dev/null\"\n"),
    )?;
    std::fs::set_permissions(&installed, std::fs::Permissions::from_mode(0o600))?;
    let c = mamori_agent::config::Config::load(&installed)?;
    let tls = c.broker.tls.context("tls")?;
    let password = c.broker.password.context("password")?.resolve().map_err(|e| anyhow::anyhow!(e))?;
    Ok(Identity {
        ca: tls.ca().map_err(|e| anyhow::anyhow!(e))?,
        client_auth: Some((
            tls.client_cert_pem.context("cert")?.into_bytes(),
            tls.client_key_pem.context("key")?.into_bytes(),
        )),
        user: Some((c.home_id.clone(), password)),
    })
}

fn gateway_identity(d: &Deployment) -> Result<Identity> {
    let p = d.pki();
    Ok(Identity {
        ca: std::fs::read(p.join("ca.pem"))?,
        client_auth: Some((std::fs::read(p.join("gateway.pem"))?, std::fs::read(p.join("gateway.key"))?)),
        user: Some(("mamori-gateway".into(), std::fs::read_to_string(p.join("gateway-password"))?)),
    })
}

/// Connect; Ok(client and its connection) after CONNACK accepted, Err with what happened.
fn connect(port: u16, id: &Identity, client_id: &str, tls: bool) -> Result<(Client, rumqttc::Connection)> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    if tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: id.ca.clone(),
            alpn: None,
            client_auth: id.client_auth.clone(),
        }));
    }
    if let Some((u, p)) = &id.user {
        o.set_credentials(u.clone(), p.clone());
    }
    let (client, mut conn) = Client::new(o, 100);
    match conn.recv_timeout(LIMIT) {
        Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => Ok((client, conn)),
        Ok(Ok(ev)) => bail!("refused: {ev:?}"),
        Ok(Err(e)) => bail!("refused: {e}"),
        Err(e) => bail!("no answer: {e:?}"),
    }
}

/// Whether a refusal from [`connect`] came from the broker's CONNACK (after the handshake),
/// as rumqttc words it, or a CONNACK arrived as an event.
fn by_broker(refusal: &str) -> bool {
    refusal.contains("return code") || refusal.contains("ConnAck")
}

/// Messages arriving on `conn` until `last` arrives (in order on one connection).
fn until(conn: &mut rumqttc::Connection, last: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let deadline = Deadline::after(LIMIT);
    let mut got = Vec::new();
    loop {
        deadline.check(&format!("{last} (got {:?})", got.iter().map(|(t, _)| t).collect::<Vec<_>>()))?;
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) = conn.recv_timeout(Duration::from_millis(200)) {
            let done = p.topic == last;
            got.push((p.topic.clone(), p.payload.to_vec()));
            if done {
                return Ok(got);
            }
        }
    }
}

/// Drive a connection until it has sent everything (PUBACKs for QoS 1).
fn flush(conn: &mut rumqttc::Connection, pubacks: usize) -> Result<()> {
    let deadline = Deadline::after(LIMIT);
    let mut n = 0;
    while n < pubacks {
        deadline.check("PUBACKs")?;
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => n += 1,
            Ok(Err(e)) => bail!("connection: {e}"),
            _ => {}
        }
    }
    Ok(())
}

fn subscribe(client: &Client, conn: &mut rumqttc::Connection, filter: &str) -> Result<()> {
    client.subscribe(filter, QoS::AtLeastOnce)?;
    let deadline = Deadline::after(LIMIT);
    loop {
        deadline.check("SUBACK")?;
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) = conn.recv_timeout(Duration::from_millis(200)) {
            return Ok(());
        }
    }
}

fn spawn_driver(mut conn: rumqttc::Connection) {
    std::thread::spawn(move || for _ in conn.iter() {});
}

#[test]
fn a_provisioned_home_publishes_only_as_itself_and_reads_only_its_own_acks() -> Result<()> {
    let d = deploy()?;
    provision(&d, &["home-a", "home-b"])?;
    let port = d.broker.port();
    let (gw, mut gw_conn) = connect(port, &gateway_identity(&d)?, "gw", true)?;
    subscribe(&gw, &mut gw_conn, "mamori/v1/+/event")?;

    // Home A: its own topic arrives; B's topic, sent first on the same connection, does not.
    let a = home(&d, "home-a")?;
    let (a_client, mut a_conn) = connect(port, &a, "home-a", true)?;
    subscribe(&a_client, &mut a_conn, "mamori/v1/home-b/ack")?;
    subscribe(&a_client, &mut a_conn, "mamori/v1/home-a/ack")?;
    a_client.publish("mamori/v1/home-b/event", QoS::AtLeastOnce, false, b"as B".to_vec())?;
    a_client.publish("mamori/v1/home-a/event", QoS::AtLeastOnce, false, b"as A".to_vec())?;
    flush(&mut a_conn, 2)?;
    let got = until(&mut gw_conn, "mamori/v1/home-a/event")?;
    assert_eq!(got, [("mamori/v1/home-a/event".to_string(), b"as A".to_vec())], "A's message only");

    // Acks: the gateway writes B's and then A's; A, subscribed to both, gets only its own.
    spawn_driver(gw_conn);
    gw.publish("mamori/v1/home-b/ack", QoS::AtLeastOnce, false, b"for B".to_vec())?;
    gw.publish("mamori/v1/home-a/ack", QoS::AtLeastOnce, false, b"for A".to_vec())?;
    let got = until(&mut a_conn, "mamori/v1/home-a/ack")?;
    assert_eq!(got, [("mamori/v1/home-a/ack".to_string(), b"for A".to_vec())], "A reads only its own ack");

    // A home may not write acks, nor anything outside mamori/v1/<its id>/.
    let (gw2, mut gw2_conn) = connect(port, &gateway_identity(&d)?, "gw-2", true)?;
    subscribe(&gw2, &mut gw2_conn, "#")?;
    a_client.publish("mamori/v1/home-a/ack", QoS::AtLeastOnce, false, b"forged".to_vec())?;
    a_client.publish("elsewhere", QoS::AtLeastOnce, false, b"x".to_vec())?;
    a_client.publish("mamori/v1/home-a/status", QoS::AtLeastOnce, false, b"{}".to_vec())?;
    flush(&mut a_conn, 3)?;
    let got = until(&mut gw2_conn, "mamori/v1/home-a/status")?;
    assert_eq!(got.len(), 1, "only A's status got through: {got:?}");
    Ok(())
}

#[test]
fn revoked_stranger_ca_and_plain_tcp_are_refused() -> Result<()> {
    let d = deploy()?;
    provision(&d, &["home-a"])?;
    let port = d.broker.port();
    let a = home(&d, "home-a")?;
    drop(connect(port, &a, "home-a", true)?);

    // A certificate from another CA, with A's valid password: refused at the handshake.
    let other = tempfile::tempdir()?;
    mamori_tests::pki::make(other.path())?;
    let stranger = Identity {
        client_auth: Some((
            std::fs::read(other.path().join("home.pem"))?,
            std::fs::read(other.path().join("home.key"))?,
        )),
        ..a.clone()
    };
    let e = connect(port, &stranger, "home-a", true).err().context("a stranger's certificate was accepted")?;
    // Refused at the TLS handshake, not by the broker after it (A's password is valid).
    let e = e.to_string();
    // (rumqttc reports a broker's refusal as "Connection refused, return code: …".)
    assert!(e.starts_with("refused: ") && !by_broker(&e), "{e}");
    // Each refusal is a refusal (an answer), not a broker that stopped answering, and comes
    // where it should: at the TLS handshake, or from the broker after it.
    let refused = |id: &Identity, tls: bool, what: &str| -> Result<String> {
        let e = connect(port, id, "home-a", tls).err().with_context(|| format!("{what} was accepted"))?.to_string();
        anyhow::ensure!(e.starts_with("refused: "), "{what}: not refused but {e}");
        Ok(e)
    };
    // No client certificate at all: refused at the handshake.
    let bare = Identity { client_auth: None, ..a.clone() };
    let e = refused(&bare, true, "no certificate")?;
    assert!(!by_broker(&e), "{e}");
    // Plain MQTT on the TLS listener: refused.
    let e = refused(&a, false, "plain TCP")?;
    assert!(!by_broker(&e), "{e}");
    // A wrong password with a good certificate: refused by the broker, after the handshake.
    let wrong = Identity { user: Some(("home-a".into(), "not-the-password".into())), ..a.clone() };
    let e = refused(&wrong, true, "a wrong password")?;
    assert!(by_broker(&e), "{e}");

    // Revoked: the broker reloads (SIGHUP, no restart) and refuses A's next connection.
    let out = cli(&["homes", "revoke", "--config", d.config.to_str().context("path")?, "home-a"])?;
    let text = ok(out)?;
    assert!(text.contains("broker reloaded"), "{text}");
    let deadline = Deadline::after(LIMIT);
    while connect(port, &a, "home-a", true).is_ok() {
        deadline.check("the revoked home to be refused")?;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.broker.pid().is_some(), "the same broker process, not a restart");
    let crl = std::fs::read_to_string(d.pki().join("crl.pem"))?;
    assert!(crl.contains("BEGIN X509 CRL"));
    Ok(())
}

#[test]
fn provisioning_refuses_bad_ids_and_a_missing_pki_clearly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\npublic_url = \"http://127.0.0.1:1\"\nlink_secret = { value = \"a-test-secret-long-enough\" }\n\
         [broker]\nhost = \"127.0.0.1\"\nport = 1\nclient_id = \"gw\"\n",
    )?;
    let c = config.to_str().context("path")?;
    let out = dir.path().join("b");
    let o = out.to_str().context("path")?;
    let r = cli(&["homes", "provision", "--config", c, "--broker-host", "h", "--out", o, "--force", "k-01"])?;
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("pki init"), "{}", String::from_utf8_lossy(&r.stderr));
    // A home not registered (a typo): refused, nothing issued, unless forced.
    let d = deploy()?;
    let dc = d.config.to_str().context("path")?;
    let bundles = d.bundles();
    let b = bundles.to_str().context("path")?;
    let r = cli(&["homes", "provision", "--config", dc, "--broker-host", "h", "--out", b, "home-a", "home-z"])?;
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("not registered: home-z") && err.contains("--force"), "{err}");
    assert!(!bundles.exists(), "nothing written");
    assert!(!std::fs::read_to_string(d.pki().join("passwords"))?.contains("home-a"), "nothing issued");
    ok(cli(&["homes", "provision", "--config", dc, "--broker-host", "h", "--out", b, "--force", "home-z"])?)?;
    assert!(bundles.join("home-z.toml").exists());
    let r = cli(&["homes", "provision", "--config", c, "--broker-host", "h", "--out", o, "Bad Id"])?;
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("expected a home id"));
    assert!(!Path::new(&out).exists(), "nothing written");
    Ok(())
}

#[test]
fn the_gateway_connects_with_its_own_identity_and_a_provisioned_home_is_heard_end_to_end() -> Result<()> {
    let d = deploy()?;
    provision(&d, &["home-a"])?;
    let hook = mamori_tests::webhook::WebhookReceiver::start("hook-secret")?;
    let pki = d.pki();
    std::fs::write(
        d.dir.path().join("homes.toml"),
        "[[home]]\nid = \"home-a\"\nmunicipality = \"431001\"\nlabel = \"A\"\n\
         contacts = [{ role = \"family\", name = \"家族\", channels = [{ webhook = \"family\" }] }]\n",
    )?;
    let http = mamori_tests::free_port()?;
    let config = d.dir.path().join("gateway-tls.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\nhomes_file = \"homes.toml\"\npublic_url = \"http://127.0.0.1:{http}\"\n\
             link_secret = {{ value = \"link-secret-value\" }}\n\
             [broker]\nhost = \"localhost\"\nport = {port}\nclient_id = \"gw-tls\"\nusername = \"mamori-gateway\"\n\
             password = {{ file = \"{p}/gateway-password\" }}\n\
             [broker.tls]\nca_file = \"{p}/ca.pem\"\nclient_cert_file = \"{p}/gateway.pem\"\nclient_key_file = \"{p}/gateway.key\"\n\
             [http]\nbind = \"127.0.0.1:{http}\"\n\
             [endpoints.family]\nurl = \"{hook}/family\"\nsecret = {{ value = \"hook-secret\" }}\n",
            port = d.broker.port(),
            p = pki.display(),
            hook = hook.url()
        ),
    )?;
    // A key others can read: the gateway refuses to start and says why.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pki.join("gateway.key"), std::fs::Permissions::from_mode(0o644))?;
    mamori_tests::gateway_init(std::path::Path::new(BIN), &config)?;
    let out = Command::new(BIN).args(["run", "--config"]).arg(&config).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gateway.key") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(pki.join("gateway.key"), std::fs::Permissions::from_mode(0o600))?;

    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config);
    let gw = mamori_tests::process::Process::spawn("gateway", cmd)?;
    gw.wait_line("subscribed", LIMIT, |l| l.contains("\"subscribed\""))?;
    // Home A, with its bundle's credentials, reports an outage; its family hears.
    let (a_client, mut a_conn) = connect(d.broker.port(), &home(&d, "home-a")?, "home-a", true)?;
    subscribe(&a_client, &mut a_conn, "mamori/v1/home-a/ack")?;
    let ts = chrono::Utc::now().to_rfc3339();
    let ev = format!(r#"{{"id":"a:1","seq":1,"ts":"{ts}","kind":"mains_lost","severity":"critical"}}"#);
    a_client.publish("mamori/v1/home-a/event", QoS::AtLeastOnce, false, ev.into_bytes())?;
    flush(&mut a_conn, 1)?;
    let d2 = hook.wait("the family", LIMIT, |x| x.iter().any(|r| r.path == "/family" && r.accepted))?;
    let alert = d2[0].body["alert_id"].as_str().context("alert id")?.to_string();
    // Acknowledged from the shell: the gateway writes A's ack topic, and A reads it.
    let out = cli(&[
        "alerts",
        "ack",
        "--config",
        config.to_str().context("path")?,
        &alert,
        "--role",
        "family",
        "--by",
        "test",
    ])?;
    ok(out)?;
    let got = until(&mut a_conn, "mamori/v1/home-a/ack")?;
    assert!(String::from_utf8_lossy(&got[0].1).contains(&alert));
    // No secret in the gateway's log.
    let password = std::fs::read_to_string(pki.join("gateway-password"))?;
    for line in gw.lines() {
        for secret in [password.as_str(), "hook-secret", "link-secret-value"] {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }
    Ok(())
}
