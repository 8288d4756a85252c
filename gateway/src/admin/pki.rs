//! The deployment's own PKI and broker credentials: one home can never speak for another.
//!
//! `pki init` creates, in the PKI folder (`data_dir/pki` unless `[pki] dir` says otherwise):
//! - `ca.pem`, `ca.key`: the deployment's CA (ECDSA P-256, 10 years);
//! - `broker.pem`, `broker.key`: the broker's server certificate for the names it is reached by;
//! - `gateway.pem`, `gateway.key`, `gateway-password`: the gateway's own identity;
//! - `passwords`: Mosquitto's password file (PBKDF2-SHA512, Mosquitto 2's `$7$` format);
//! - `acl`: the per-home ACL (patterns on the username, which is the home id);
//! - `crl.pem`: the revocation list (empty at first);
//! - `issued.tsv`: every certificate issued (home, serial, issued, revoked).
//!
//! A home authenticates with **both** a client certificate from this CA and its own username
//! and password (`require_certificate true`, `use_identity_as_username false`). The
//! certificate keeps strangers off the TLS listener; the password is what revocation removes,
//! because Mosquitto 2.0 re-reads its password file on SIGHUP but keeps its CA and CRL until
//! a restart. `homes revoke` therefore removes the password (effective at the reload,
//! without a restart: a revoked home's next connection is refused), adds the serial to
//! `crl.pem` (effective from the next restart), and runs `[pki] reload_command`.
//!
//! The same users are kept for a NATS cluster (`nats-passwords`, bcrypt; `nats-users.conf`),
//! see [`crate::admin::nats`].
//!
//! Every private key and password file is written with mode 0600. Pure functions take the
//! time as an input; only the file helpers do I/O.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use mamori_protocol::mqtt::HomeId;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};

use crate::domain::engine::Time;

/// The gateway's MQTT username (never a home id: home ids are checked against it).
pub const GATEWAY_USER: &str = "mamori-gateway";

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The PKI folder is not in the expected state.
    #[error("{0}")]
    State(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn to_time(t: Time) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(now: Time) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mamori deployment CA");
    dn.push(DnType::OrganizationName, "mamori");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = to_time(now - chrono::Duration::hours(1));
    p.not_after = to_time(now + chrono::Duration::days(3650));
    p
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
    /// Its serial, hex.
    pub serial_hex: String,
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<String>,
    usage: &[ExtendedKeyUsagePurpose],
    now: Time,
    days: i64,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = usage.to_vec();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let serial = serial();
    p.serial_number = Some(serial.clone());
    p.not_before = to_time(now - chrono::Duration::hours(1));
    p.not_after = to_time(now + chrono::Duration::days(days));
    let cert = p.signed_by(&key, issuer)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial_hex: hex::encode(serial.to_bytes()) })
}

/// A strong random password (24 random bytes, URL-safe base64).
pub fn random_password() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// bcrypt hashes of `(user, password)` pairs for NATS, on every core, in their order.
fn hash_all(users: &[(&str, &str)]) -> Result<Vec<(String, String)>, PkiError> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).max(1);
    let chunk = users.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<(String, String)>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(u, p)| crate::admin::nats::password_hash(p).map(|h| (u.to_string(), h)))
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("bcrypt: a thread panicked".into()))).collect()
    });
    let mut out = Vec::with_capacity(users.len());
    for p in parts {
        out.extend(p.map_err(PkiError::State)?);
    }
    Ok(out)
}

/// One line of Mosquitto 2's password file: `user:$7$101$<salt>$<hash>` (PBKDF2-HMAC-SHA512,
/// 101 iterations, a 12-byte salt, a 64-byte hash, standard base64), as `mosquitto_passwd`
/// writes it.
pub fn password_line(user: &str, password: &str, salt: &[u8; 12]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, 101, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("{user}:$7$101${}${}", b64.encode(salt), b64.encode(hash))
}

/// The Mosquitto ACL: each home (username = home id) may publish only under its own
/// `mamori/v1/<id>/` status, telemetry and event topics and read only its own `ack`; the
/// gateway reads every home's and writes every `ack`. Nothing else is allowed to anyone.
pub fn acl() -> String {
    format!(
        "# mamori: generated by `mamori-gateway pki init`. %u is the MQTT username (the home id).\n\
         user {GATEWAY_USER}\n\
         topic read mamori/v1/+/status\n\
         topic read mamori/v1/+/telemetry\n\
         topic read mamori/v1/+/event\n\
         topic write mamori/v1/+/ack\n\
         \n\
         pattern write mamori/v1/%u/status\n\
         pattern write mamori/v1/%u/telemetry\n\
         pattern write mamori/v1/%u/event\n\
         pattern read mamori/v1/%u/ack\n"
    )
}

/// The TLS listener and authentication lines for `mosquitto.conf` (Mosquitto 2.x), with the
/// PKI files under `dir`.
pub fn mosquitto_listener(port: u16, bind: &str, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {d}/passwords\n\
         acl_file {d}/acl\n\
         listener {port} {bind}\n\
         protocol mqtt\n\
         cafile {d}/ca.pem\n\
         certfile {d}/broker.pem\n\
         keyfile {d}/broker.key\n\
         crlfile {d}/crl.pem\n\
         require_certificate true\n\
         use_identity_as_username false\n\
         tls_version tlsv1.2\n"
    )
}

/// The rest of `mosquitto.conf`: persistence and queues sized for a fleet.
pub fn mosquitto_service(persistence_dir: &Path) -> String {
    format!(
        "persistence true\n\
         persistence_location {}/\n\
         autosave_on_changes true\n\
         autosave_interval 1\n\
         persistent_client_expiration 14d\n\
         max_inflight_messages 1000\n\
         max_queued_messages 1000000\n\
         max_packet_size 65536\n",
        persistence_dir.display()
    )
}

/// The PKI folder.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let mut name = path.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Pki {
    /// The PKI in `dir` (made by [`Pki::init`]).
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        if !dir.join("ca.key").exists() {
            return Err(PkiError::State(format!(
                "{}: no CA here; create it with `mamori-gateway pki init`",
                dir.display()
            )));
        }
        Ok(Pki { dir: dir.to_path_buf() })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Create the CA, the broker's certificate for `broker_names` (host names or IP
    /// addresses), the gateway's identity, an empty password file with the gateway in it, the
    /// ACL and an empty CRL. Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, broker_names: &[String], now: Time) -> Result<Pki, PkiError> {
        if dir.join("ca.key").exists() {
            return Err(PkiError::State(format!("{}: a CA already exists; not overwriting it", dir.display())));
        }
        if broker_names.is_empty() {
            return Err(PkiError::State("the broker's host names or addresses are needed (--broker-host)".into()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca_key = KeyPair::generate()?;
        let ca = ca_params(now).self_signed(&ca_key)?;
        write_file(&dir.join("ca.pem"), &ca.pem(), 0o644)?;
        write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
        let pki = Pki { dir: dir.to_path_buf() };
        let issuer = pki.issuer(now)?;
        let broker =
            leaf(&issuer, &broker_names[0], broker_names.to_vec(), &[ExtendedKeyUsagePurpose::ServerAuth], now, 825)?;
        write_file(&dir.join("broker.pem"), &broker.cert_pem, 0o644)?;
        write_file(&dir.join("broker.key"), &broker.key_pem, 0o600)?;
        let gw = leaf(&issuer, GATEWAY_USER, Vec::new(), &[ExtendedKeyUsagePurpose::ClientAuth], now, 825)?;
        write_file(&dir.join("gateway.pem"), &gw.cert_pem, 0o644)?;
        write_file(&dir.join("gateway.key"), &gw.key_pem, 0o600)?;
        let password = random_password();
        write_file(&dir.join("gateway-password"), &password, 0o600)?;
        write_file(&dir.join("passwords"), "", 0o600)?;
        pki.set_password(GATEWAY_USER, Some(&password))?;
        write_file(&dir.join("acl"), &acl(), 0o644)?;
        write_file(&dir.join("issued.tsv"), "# home\tserial\tissued\trevoked\n", 0o644)?;
        pki.write_crl(now)?;
        Ok(pki)
    }

    fn issuer(&self, now: Time) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let path = self.dir.join("ca.key");
        let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
        // The issuer is its name and key: the same parameters as at `init`.
        Ok(Issuer::new(ca_params(now), KeyPair::from_pem(&pem)?))
    }

    /// Add, replace (`Some`) or remove (`None`) a user in the password file.
    fn set_password(&self, user: &str, password: Option<&str>) -> Result<(), PkiError> {
        self.set_passwords(&[(user, password)])
    }

    /// Add, replace or remove many users at once: each password file is read and written
    /// once whatever the number (provisioning a prefecture is linear, not quadratic), and the
    /// NATS hashes (bcrypt, ~50 ms each by design) are made on every core.
    fn set_passwords(&self, users: &[(&str, Option<&str>)]) -> Result<(), PkiError> {
        let changed: std::collections::HashSet<&str> = users.iter().map(|(u, _)| *u).collect();
        if changed.len() != users.len() {
            return Err(PkiError::State("a home is named twice: nothing was changed".into()));
        }
        // The slow part first (bcrypt, minutes for a prefecture): an interruption there leaves
        // every file as it was, never one file changed and not the other.
        let to_hash: Vec<(&str, &str)> = users.iter().filter_map(|(u, p)| p.map(|p| (*u, p))).collect();
        let hashed = hash_all(&to_hash)?;
        let path = self.dir.join("passwords");
        let old = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut text = String::with_capacity(old.len() + users.len() * 140);
        for line in old.lines().filter(|l| !l.is_empty() && !l.split(':').next().is_some_and(|u| changed.contains(u))) {
            let _ = writeln!(text, "{line}");
        }
        for (user, p) in users {
            if let Some(p) = p {
                let mut salt = [0u8; 12];
                rand::rng().fill_bytes(&mut salt);
                let _ = writeln!(text, "{}", password_line(user, p, &salt));
            }
        }
        write_file(&path, &text, 0o600)?;
        // The same users for a NATS cluster (bcrypt, which NATS reads), and its users file.
        let mut nats: Vec<(String, String)> =
            self.nats_passwords()?.into_iter().filter(|(u, _)| !changed.contains(u.as_str())).collect();
        nats.extend(hashed);
        let text: String = nats.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
        write_file(&self.dir.join("nats-passwords"), &text, 0o600)?;
        write_file(&self.dir.join("nats-users.conf"), &crate::admin::nats::users_conf(&nats), 0o600)
    }

    /// The NATS password file: (user, bcrypt hash). Empty in a PKI made before NATS was
    /// supported (its homes need provisioning again to reach a NATS cluster).
    fn nats_passwords(&self) -> Result<Vec<(String, String)>, PkiError> {
        let path = self.dir.join("nats-passwords");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(PkiError::Io { path, source: e }),
        };
        Ok(text.lines().filter_map(|l| l.split_once(':')).map(|(u, h)| (u.to_string(), h.to_string())).collect())
    }

    /// Generate a NATS cluster's configs (see [`crate::admin::nats`]): a server certificate for the
    /// MQTT listeners and a route certificate, both naming every node's host (made again at
    /// each call, so a changed node list is covered), a route password (made once, kept
    /// after), and one `nats-<node>.conf` per node into `out`. `pki_on_nodes`: where the PKI folder's files
    /// are on the nodes. Returns the homes that were provisioned before this PKI kept NATS
    /// passwords (they cannot connect to the cluster until provisioned again).
    pub fn nats(
        &self,
        nodes: &[crate::admin::nats::Node],
        out: &Path,
        pki_on_nodes: &Path,
        store_dir: &Path,
        bind: &str,
        now: Time,
    ) -> Result<Vec<String>, PkiError> {
        crate::admin::nats::check_cluster(nodes).map_err(PkiError::State)?;
        let hosts: Vec<String> =
            nodes.iter().map(|n| n.host.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let route = leaf(
            &self.issuer(now)?,
            "mamori NATS route",
            hosts.clone(),
            &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            now,
            825,
        )?;
        write_file(&self.dir.join("nats-route.pem"), &route.cert_pem, 0o644)?;
        write_file(&self.dir.join("nats-route.key"), &route.key_pem, 0o600)?;
        // The MQTT listeners' own certificate: `broker.pem` names the hosts `pki init` was
        // given (a Mosquitto's), and an agent failing over to a node checks that node's name.
        let server =
            leaf(&self.issuer(now)?, &hosts[0], hosts.clone(), &[ExtendedKeyUsagePurpose::ServerAuth], now, 825)?;
        write_file(&self.dir.join("nats-broker.pem"), &server.cert_pem, 0o644)?;
        write_file(&self.dir.join("nats-broker.key"), &server.key_pem, 0o600)?;
        let pw_path = self.dir.join("nats-route-password");
        let route_password = match std::fs::read_to_string(&pw_path) {
            Ok(p) if !p.trim().is_empty() => p.trim().to_string(),
            _ => {
                let p = random_password();
                write_file(&pw_path, &p, 0o600)?;
                p
            }
        };
        let mut users = self.nats_passwords()?;
        if !users.iter().any(|(u, _)| u == GATEWAY_USER) {
            // A PKI from before NATS: the gateway's password is in its own file.
            let path = self.dir.join("gateway-password");
            let pw = std::fs::read_to_string(&path).map_err(io(&path))?;
            self.set_password(GATEWAY_USER, Some(pw.trim()))?;
            users = self.nats_passwords()?;
        }
        std::fs::create_dir_all(out).map_err(io(out))?;
        for n in nodes {
            let text = crate::admin::nats::node_conf(n, nodes, pki_on_nodes, store_dir, bind, &route_password);
            write_file(&out.join(format!("nats-{}.conf", n.name)), &text, 0o600)?;
        }
        let mut missing: Vec<String> = self
            .issued()?
            .into_iter()
            .filter(|r| r.get(3).is_none_or(|x| x.is_empty()))
            .filter_map(|r| r.first().cloned())
            .filter(|h| !users.iter().any(|(u, _)| u == h))
            .collect();
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    fn issued(&self) -> Result<Vec<Vec<String>>, PkiError> {
        let path = self.dir.join("issued.tsv");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect())
    }

    fn write_issued(&self, rows: &[Vec<String>]) -> Result<(), PkiError> {
        let mut text = "# home\tserial\tissued\trevoked\n".to_string();
        for r in rows {
            let _ = writeln!(text, "{}", r.join("\t"));
        }
        write_file(&self.dir.join("issued.tsv"), &text, 0o644)
    }

    fn write_crl(&self, now: Time) -> Result<(), PkiError> {
        let revoked = self
            .issued()?
            .into_iter()
            .filter(|r| r.get(3).is_some_and(|x| !x.is_empty()))
            .filter_map(|r| {
                let serial = hex::decode(r.get(1)?).ok()?;
                let at = chrono::DateTime::parse_from_rfc3339(r.get(3)?).ok()?.to_utc();
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: to_time(at),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<Vec<_>>();
        let crl = CertificateRevocationListParams {
            this_update: to_time(now - chrono::Duration::minutes(5)),
            next_update: to_time(now + chrono::Duration::days(365)),
            crl_number: SerialNumber::from(u64::try_from(now.timestamp()).unwrap_or(1)),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer(now)?)?;
        write_file(&self.dir.join("crl.pem"), &crl.pem()?, 0o644)
    }

    /// Issue a home's credentials: a client certificate (CN = the home id) and a new
    /// password, replacing any earlier password (an earlier certificate stays valid until
    /// it is revoked; its password no longer works).
    pub fn provision(&self, home: &HomeId, now: Time) -> Result<(Issued, String), PkiError> {
        self.provision_many(std::slice::from_ref(home), now)?
            .pop()
            .ok_or_else(|| PkiError::State("nothing was issued".into()))
    }

    /// [`Pki::provision`] for many homes at once, in their order; each file is written once.
    /// Nothing is written when any id is refused.
    pub fn provision_many(&self, homes: &[HomeId], now: Time) -> Result<Vec<(Issued, String)>, PkiError> {
        if homes.iter().any(|h| h.as_str() == GATEWAY_USER) {
            return Err(PkiError::State(format!("`{GATEWAY_USER}` is the gateway's own name, not a home id")));
        }
        let issuer = self.issuer(now)?;
        let mut out = Vec::with_capacity(homes.len());
        for home in homes {
            let cert = leaf(&issuer, home.as_str(), Vec::new(), &[ExtendedKeyUsagePurpose::ClientAuth], now, 825)?;
            out.push((cert, random_password()));
        }
        let users: Vec<(&str, Option<&str>)> =
            homes.iter().zip(&out).map(|(h, (_, p))| (h.as_str(), Some(p.as_str()))).collect();
        self.set_passwords(&users)?;
        let mut rows = self.issued()?;
        for (home, (cert, _)) in homes.iter().zip(&out) {
            rows.push(vec![home.as_str().to_string(), cert.serial_hex.clone(), now.to_rfc3339(), String::new()]);
        }
        self.write_issued(&rows)?;
        Ok(out)
    }

    /// Revoke a home: its password is removed and every certificate issued to it goes into
    /// the CRL. Returns how many certificates were revoked.
    pub fn revoke(&self, home: &HomeId, now: Time) -> Result<usize, PkiError> {
        Ok(self.revoke_many(std::slice::from_ref(home), now)?.first().copied().unwrap_or(0))
    }

    /// [`Pki::revoke`] for many homes at once (how many certificates each); each file is
    /// written once. Nothing is written when any of them was never issued credentials.
    pub fn revoke_many(&self, homes: &[HomeId], now: Time) -> Result<Vec<usize>, PkiError> {
        let mut rows = self.issued()?;
        let issued: std::collections::HashSet<&str> =
            rows.iter().filter_map(|r| r.first().map(String::as_str)).collect();
        if let Some(h) = homes.iter().find(|h| !issued.contains(h.as_str())) {
            return Err(PkiError::State(format!("no credentials were ever issued to `{}`", h.as_str())));
        }
        let users: Vec<(&str, Option<&str>)> = homes.iter().map(|h| (h.as_str(), None)).collect();
        self.set_passwords(&users)?;
        let index: HashMap<&str, usize> = homes.iter().enumerate().map(|(i, h)| (h.as_str(), i)).collect();
        let mut counts = vec![0; homes.len()];
        for r in &mut rows {
            let Some(&i) = r.first().and_then(|h| index.get(h.as_str())) else { continue };
            if r.get(3).is_none_or(|x| x.is_empty()) {
                r.resize(4, String::new());
                r[3] = now.to_rfc3339();
                counts[i] += 1;
            }
        }
        self.write_issued(&rows)?;
        self.write_crl(now)?;
        Ok(counts)
    }
}

/// The one file an installer carries to the home: an agent config with the home id, the
/// broker, the CA, the client certificate and key, and the password inline. Device sections
/// are added at the home (`mamori-agent probe` finds them). Written with mode 0600.
pub fn agent_bundle(
    home: &HomeId,
    broker_host: &str,
    broker_port: u16,
    failover: &[String],
    ca_pem: &str,
    issued: &Issued,
    password: &str,
) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "# mamori agent credentials for home `{id}`. Keep this file secret (mode 0600): it holds a\n\
         # private key and a password. Add the home's devices below (`mamori-agent probe` finds them),\n\
         # then install it as /etc/mamori/agent.toml.\n\
         home_id = {idq}\n\
         data_dir = \"/var/lib/mamori\"\n\
         \n\
         [broker]\n\
         host = {host}\n\
         port = {broker_port}\n\
         {failover}\
         username = {idq}\n\
         password = {{ value = {pw} }}\n\
         \n\
         [broker.tls]\n\
         ca_pem = {ca}\n\
         client_cert_pem = {cert}\n\
         client_key_pem = {key}\n\
         \n\
         # [[ups]]\n\
         # id = \"ups\"\n\
         # protocol = \"megatec\"\n\
         # port = \"/dev/ttyUSB0\"\n",
        id = home.as_str(),
        idq = q(home.as_str()),
        host = q(broker_host),
        failover = if failover.is_empty() {
            String::new()
        } else {
            format!("failover = [{}]\n", failover.iter().map(|f| q(f)).collect::<Vec<_>>().join(", "))
        },
        pw = q(password),
        ca = q(ca_pem),
        cert = q(&issued.cert_pem),
        key = q(&issued.key_pem),
    )
}

/// Write a bundle with mode 0600.
pub fn write_bundle(path: &Path, text: &str) -> Result<(), PkiError> {
    write_file(path, text, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Time {
        chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap()
    }

    #[test]
    fn the_password_line_is_mosquittos_pbkdf2_format() {
        let line = password_line("k-01", "secret", &[7u8; 12]);
        let parts: Vec<&str> = line.split('$').collect();
        assert_eq!(parts[0], "k-01:");
        assert_eq!((parts[1], parts[2]), ("7", "101"));
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(b64.decode(parts[3]).unwrap(), [7u8; 12]);
        assert_eq!(b64.decode(parts[4]).unwrap().len(), 64);
        assert_ne!(line, password_line("k-01", "secret2", &[7u8; 12]));
    }

    #[test]
    fn provision_and_revoke_keep_files_private_and_the_password_file_consistent() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), &["127.0.0.1".into()], now()).unwrap();
        assert!(Pki::init(dir.path(), &["127.0.0.1".into()], now()).is_err(), "never overwrites a CA");
        let a = HomeId::new("k-01").unwrap();
        let (issued, password) = pki.provision(&a, now()).unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE") && password.len() >= 32);
        for f in [
            "ca.key",
            "broker.key",
            "gateway.key",
            "gateway-password",
            "passwords",
            "nats-passwords",
            "nats-users.conf",
        ] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{f} is private");
        }
        let passwords = std::fs::read_to_string(dir.path().join("passwords")).unwrap();
        assert!(passwords.lines().any(|l| l.starts_with("k-01:$7$")));
        assert!(passwords.lines().any(|l| l.starts_with("mamori-gateway:$7$")));
        let nats = std::fs::read_to_string(dir.path().join("nats-users.conf")).unwrap();
        assert!(nats.contains("user: \"k-01\", password: \"$2a$04$") && nats.contains("mamori-gateway"), "{nats}");
        assert_eq!(pki.revoke(&a, now()).unwrap(), 1);
        let passwords = std::fs::read_to_string(dir.path().join("passwords")).unwrap();
        assert!(!passwords.contains("k-01:"), "{passwords}");
        let nats = std::fs::read_to_string(dir.path().join("nats-users.conf")).unwrap();
        assert!(!nats.contains("k-01") && nats.contains("mamori-gateway"), "revoked on NATS too: {nats}");
        assert!(passwords.contains("mamori-gateway:"));
        let crl = std::fs::read_to_string(dir.path().join("crl.pem")).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"));
        assert!(pki.revoke(&HomeId::new("never").unwrap(), now()).is_err());
        assert!(pki.provision(&HomeId::new(GATEWAY_USER).unwrap(), now()).is_err());
    }

    #[test]
    fn many_homes_are_provisioned_and_revoked_at_once_with_every_file_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), &["127.0.0.1".into()], now()).unwrap();
        pki.provision(&HomeId::new("k-00").unwrap(), now()).unwrap();
        let homes: Vec<HomeId> = (1..=40).map(|i| HomeId::new(&format!("k-{i:02}")).unwrap()).collect();
        let issued = pki.provision_many(&homes, now()).unwrap();
        assert_eq!(issued.len(), 40);
        let passwords = std::fs::read_to_string(dir.path().join("passwords")).unwrap();
        let nats = std::fs::read_to_string(dir.path().join("nats-passwords")).unwrap();
        for (h, (cert, password)) in homes.iter().zip(&issued) {
            // Each home's line in each file, once, and its own password verifies against both.
            let line = passwords.lines().filter(|l| l.starts_with(&format!("{}:", h.as_str()))).collect::<Vec<_>>();
            assert_eq!(line.len(), 1, "{}", h.as_str());
            let parts: Vec<&str> = line[0].split('$').collect();
            let b64 = base64::engine::general_purpose::STANDARD;
            let salt: [u8; 12] = b64.decode(parts[3]).unwrap().try_into().unwrap();
            assert_eq!(password_line(h.as_str(), password, &salt), line[0]);
            let hash = nats.lines().find_map(|l| l.strip_prefix(&format!("{}:", h.as_str()))).unwrap();
            assert!(bcrypt::verify(password, hash).unwrap(), "{}", h.as_str());
            assert!(cert.cert_pem.contains("BEGIN CERTIFICATE"));
        }
        assert!(passwords.contains("k-00:") && passwords.contains("mamori-gateway:"), "the others are kept");
        assert_eq!(pki.issued().unwrap().len(), 41);
        // An id never issued refuses the whole revocation, and nothing changes.
        let mut some: Vec<HomeId> = homes[..10].to_vec();
        some.push(HomeId::new("never").unwrap());
        assert!(pki.revoke_many(&some, now()).is_err());
        assert_eq!(std::fs::read_to_string(dir.path().join("passwords")).unwrap(), passwords);
        assert_eq!(pki.revoke_many(&homes[..10], now()).unwrap(), vec![1; 10]);
        let after = std::fs::read_to_string(dir.path().join("passwords")).unwrap();
        assert_eq!(after.lines().count(), passwords.lines().count() - 10);
        assert!(!after.contains("k-01:") && after.contains("k-11:") && after.contains("k-00:"));
        let nats_after = std::fs::read_to_string(dir.path().join("nats-users.conf")).unwrap();
        assert!(!nats_after.contains("\"k-10\"") && nats_after.contains("\"k-40\""), "{nats_after}");
        assert!(pki.provision_many(&[HomeId::new(GATEWAY_USER).unwrap()], now()).is_err());
        // A home named twice is refused before anything is written (NATS refuses a users file
        // with a user twice, which would cut every home off).
        let before = std::fs::read_to_string(dir.path().join("passwords")).unwrap();
        let twice = [HomeId::new("k-50").unwrap(), HomeId::new("k-50").unwrap()];
        assert!(pki.provision_many(&twice, now()).is_err());
        assert_eq!(std::fs::read_to_string(dir.path().join("passwords")).unwrap(), before);
        assert!(pki.issued().unwrap().iter().all(|r| r[0] != "k-50"));
    }

    fn rustls_pki_types_der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }

    #[test]
    fn a_nats_cluster_gets_a_config_per_node_and_names_homes_without_a_nats_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), &["127.0.0.1".into()], now()).unwrap();
        pki.provision(&HomeId::new("k-01").unwrap(), now()).unwrap();
        // A home provisioned before the PKI kept NATS passwords.
        let mut rows = pki.issued().unwrap();
        rows.push(vec!["k-old".into(), "01".into(), now().to_rfc3339(), String::new()]);
        pki.write_issued(&rows).unwrap();
        let nodes: Vec<crate::admin::nats::Node> =
            ["a=10.0.0.1", "b=10.0.0.2", "c=10.0.0.3"].iter().map(|n| n.parse().unwrap()).collect();
        let out = dir.path().join("out");
        let missing =
            pki.nats(&nodes, &out, Path::new("/etc/nats"), Path::new("/var/lib/nats"), "0.0.0.0", now()).unwrap();
        assert_eq!(missing, ["k-old"]);
        let a = std::fs::read_to_string(out.join("nats-a.conf")).unwrap();
        let route_pw = std::fs::read_to_string(dir.path().join("nats-route-password")).unwrap();
        assert!(a.contains("server_name: \"a\"") && a.contains("stream_replicas: 3"), "{a}");
        assert!(
            a.contains(&format!("nats-route://route:{route_pw}@10.0.0.2:6222")) && !a.contains("10.0.0.1:6222"),
            "{a}"
        );
        assert!(a.contains("\"/etc/nats/nats-broker.pem\"") && a.contains("verify: true"), "{a}");
        // The listeners' certificate names every node (an agent checks the name of the one it
        // fails over to), though `pki init` named only 127.0.0.1.
        let pem = std::fs::read_to_string(dir.path().join("nats-broker.pem")).unwrap();
        let der = rustls_pki_types_der(&pem);
        for host in [&[10u8, 0, 0, 1][..], &[10, 0, 0, 2], &[10, 0, 0, 3]] {
            assert!(der.windows(4).any(|w| w == host), "the certificate names {host:?}");
        }
        assert_eq!(std::fs::metadata(out.join("nats-a.conf")).unwrap().permissions().mode() & 0o077, 0);
        // Generated again: the same route password.
        pki.nats(&nodes, &out, Path::new("/etc/nats"), Path::new("/var/lib/nats"), "0.0.0.0", now()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("nats-route-password")).unwrap(), route_pw);
        let two = &nodes[..2];
        assert!(pki.nats(two, &out, Path::new("/etc/nats"), Path::new("/v"), "0.0.0.0", now()).is_err());
    }
}
