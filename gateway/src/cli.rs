//! `mamori-gateway`: the centre service's command line.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 a bad config, file or argument.
//!
//! Over 800 lines for a reason: the whole command tree (`run`, `init`, `homes`, `pki`,
//! `users`, `alerts`, `audit`), each command a few lines that call the library and turn its
//! result into words and an exit code.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::admin::pki;
use crate::config::Config;
use crate::domain::homes::HomesFile;
use crate::edge::clock;
use crate::service::run;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mamori's gateway: decides who must know about a home on backup power, and keeps asking
/// until someone answers. A secondary, remote notification system: it never silences or
/// replaces a device's own alarm.
#[derive(Parser, Debug)]
#[command(name = "mamori-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service. It never creates its database: `init` does, once.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Create the database in `data_dir` (refused when one exists) and import the homes file.
    Init {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// This new database takes over the broker session of a gateway whose database was
        /// lost (otherwise `run` refuses to acknowledge a session it has no record of).
        #[arg(long)]
        adopt_broker_session: bool,
    },
    /// Check a config file (and its homes file): every problem with file, key and expectation.
    CheckConfig {
        /// The config file.
        config: PathBuf,
    },
    /// Homes and care plans.
    Homes {
        #[command(subcommand)]
        command: HomesCommand,
    },
    /// The deployment's PKI and broker configuration.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Alerts.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Dashboard and API accounts.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
enum HomesCommand {
    /// Validate a homes file and add or replace its homes in the store.
    Import {
        /// The gateway config (for the store and the endpoints the homes refer to).
        #[arg(long)]
        config: PathBuf,
        /// The homes file.
        file: PathBuf,
    },
    /// List the homes in the store.
    List {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Issue homes' credentials (client certificate and password) and write one agent config
    /// bundle per home (mode 0600) for the installer; then reload the broker.
    Provision {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// The broker's address as the homes reach it.
        #[arg(long)]
        broker_host: String,
        /// The broker's TLS port.
        #[arg(long, default_value_t = 8883)]
        broker_port: u16,
        /// More brokers the agent fails over to, `host:port` (repeat: the other nodes of a
        /// NATS cluster).
        #[arg(long)]
        failover: Vec<String>,
        /// Where the bundles go (`<home>.toml`).
        #[arg(long)]
        out: PathBuf,
        /// Issue credentials for homes not registered yet (`homes import` or `homes_file`);
        /// without it such an id is refused, since the gateway would ignore its messages.
        #[arg(long)]
        force: bool,
        /// Home ids.
        #[arg(required = true)]
        homes: Vec<String>,
    },
    /// Revoke homes' credentials (password removed, certificates into the CRL); then reload
    /// the broker, which refuses their next connection.
    Revoke {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Home ids.
        #[arg(required = true)]
        homes: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Create the deployment's CA, the broker's certificate, the gateway's identity, the
    /// password file, the ACL, an empty CRL and a `mosquitto.conf`, in the PKI folder.
    Init {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// The broker's host names or IP addresses (repeat for several).
        #[arg(long, required = true)]
        broker_host: Vec<String>,
        /// The broker's TLS port.
        #[arg(long, default_value_t = 8883)]
        broker_port: u16,
    },
    /// Write the configs of a NATS cluster (the clustered broker; see docs/operations.md):
    /// one `nats-<node>.conf` per node, the route certificate and password, and the users
    /// file `nats-users.conf` that provisioning keeps up to date.
    Nats {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// A node: `name=host[:mqtt_port[:cluster_port[:monitor_port]]]` (3 or 5 of them;
        /// ports 8883, 6222, 8222 unless given).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Where the node configs go (default: the PKI folder; a node config must sit beside
        /// `nats-users.conf`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the PKI folder's files are on the nodes (default: where they are here).
        #[arg(long)]
        pki_on_nodes: Option<PathBuf>,
        /// JetStream's folder on the nodes (a subfolder per node).
        #[arg(long, default_value = "/var/lib/nats")]
        store_dir: PathBuf,
        /// The address the MQTT and cluster listeners bind to.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
    },
}

#[derive(Subcommand, Debug)]
enum AlertsCommand {
    /// List alerts (active ones unless --all).
    List {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Cleared ones too.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge an alert or incident (applied by the running gateway).
    Ack {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// The alert or incident id.
        id: String,
        /// Your role (family, coordinator, visiting_nurse, facility, support_centre, admin).
        #[arg(long)]
        role: String,
        /// Who you are.
        #[arg(long)]
        by: String,
        /// What you are doing about it.
        #[arg(long)]
        note: Option<String>,
        /// Seconds to wait for the running gateway to apply it.
        #[arg(long, default_value_t = 10)]
        wait_s: u64,
    },
}

#[derive(Subcommand, Debug)]
enum UsersCommand {
    /// Add an account. The password is read from the first line of stdin (at least 12
    /// characters). An admin gets two-factor authentication at once: scan the printed URI.
    Add {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name (a-z, 0-9, '.', '_', '-').
        username: String,
        /// admin, coordinator, facility or family.
        #[arg(long)]
        role: String,
        /// Shown name (default: the username).
        #[arg(long)]
        name: Option<String>,
        /// A coordinator's municipality code (repeat for several).
        #[arg(long)]
        municipality: Vec<String>,
        /// A facility's or family's home id (repeat for several).
        #[arg(long)]
        home: Vec<String>,
    },
    /// Change an account's role and scope in place (not to or from admin); its sessions and
    /// API tokens go on with the new scope at their next request.
    Scope {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
        /// coordinator, facility or family.
        #[arg(long)]
        role: String,
        /// A coordinator's municipality code (repeat for several).
        #[arg(long)]
        municipality: Vec<String>,
        /// A facility's or family's home id (repeat for several).
        #[arg(long)]
        home: Vec<String>,
    },
    /// Set an account's password (from the first line of stdin); ends its sessions.
    Passwd {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
    },
    /// Disable an account: no login; its sessions and API tokens stop working.
    Disable {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
    },
    /// Enable a disabled account.
    Enable {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
    },
    /// List accounts.
    List {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Issue an API bearer token acting as an account (printed once; only its hash is kept).
    Token {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
        /// What the token is for.
        #[arg(long, default_value = "integration")]
        name: String,
    },
    /// List an account's API tokens (id, what for, made, revoked).
    Tokens {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
    },
    /// Revoke one API token of an account by its id (see `users tokens`); the others go on.
    RevokeToken {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
        /// Login name.
        username: String,
        /// The token's id.
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain: exit 0 and print the entry count and head hash when intact,
    /// exit 1 and name the first bad entry when not.
    Verify {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the whole log as CSV.
    Export {
        /// The gateway config.
        #[arg(long)]
        config: PathBuf,
    },
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn cli_actor() -> String {
    format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()))
}

fn users(command: UsersCommand) -> ExitCode {
    use crate::admin::accounts::{AccountError, AccountRole, Accounts, NewUser};
    let config = match &command {
        UsersCommand::Add { config, .. }
        | UsersCommand::Passwd { config, .. }
        | UsersCommand::Scope { config, .. }
        | UsersCommand::Disable { config, .. }
        | UsersCommand::Enable { config, .. }
        | UsersCommand::List { config }
        | UsersCommand::Token { config, .. }
        | UsersCommand::Tokens { config, .. }
        | UsersCommand::RevokeToken { config, .. } => config.clone(),
    };
    let c = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut store = match run::open_store(&c) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mamori-gateway: {e:#}");
            return ExitCode::from(1);
        }
    };
    let key = match run::style(&c) {
        Ok(style) => crate::admin::accounts::TotpKey::derive(&style.link_secret),
        Err(e) => {
            eprintln!("mamori-gateway: {e:#}");
            return ExitCode::from(2);
        }
    };
    let now = clock::now();
    let audit = |store: &mut dyn crate::edge::store::Store, action: &str, target: &str, detail: &str| {
        crate::admin::audit::append(store, now, &cli_actor(), "-", action, target, detail).map(|_| ())
    };
    let store = store.as_mut();
    let result: Result<(), AccountError> = (|| match command {
        UsersCommand::Add { username, role, name, municipality, home, .. } => {
            let role = AccountRole::parse(&role).ok_or_else(|| {
                AccountError::Invalid(format!("role {role:?}: expected admin, coordinator, facility or family"))
            })?;
            let new = NewUser {
                display_name: name.unwrap_or_else(|| username.clone()),
                username,
                role,
                municipalities: municipality,
                homes: home,
            };
            new.validate()?;
            let password = read_password()
                .map_err(|e| AccountError::Invalid(format!("cannot read the password from stdin: {e}")))?;
            let secret = (role == AccountRole::Admin).then(crate::admin::accounts::new_totp_secret);
            let u = Accounts::new(store).add(&new, &password, secret.as_deref(), &key, now)?;
            audit(store, "user_add", &u.username, &format!("{} {:?}{:?}", u.role.as_str(), u.municipalities, u.homes))?;
            println!("added {} ({})", u.username, u.role.as_str());
            if let Some(s) = secret {
                println!("two-factor secret (add it to an authenticator app now; it is not shown again): {s}");
                println!("{}", crate::admin::accounts::totp_uri(&u.username, &s));
            }
            Ok(())
        }
        UsersCommand::Scope { username, role, municipality, home, .. } => {
            let role = AccountRole::parse(&role).ok_or_else(|| {
                AccountError::Invalid(format!("role {role:?}: expected coordinator, facility or family"))
            })?;
            let u = Accounts::new(store).set_scope(&username, role, municipality, home)?;
            let detail = format!("{} {:?}{:?}", u.role.as_str(), u.municipalities, u.homes);
            audit(store, "user_scope", &u.username, &detail)?;
            println!("{}: {detail}", u.username);
            Ok(())
        }
        UsersCommand::Passwd { username, .. } => {
            let password = read_password()
                .map_err(|e| AccountError::Invalid(format!("cannot read the password from stdin: {e}")))?;
            Accounts::new(store).set_password(&username, &password)?;
            audit(store, "user_password", &username, "")?;
            println!("password set for {username}; its sessions ended");
            Ok(())
        }
        UsersCommand::Disable { username, .. } => {
            Accounts::new(store).set_disabled(&username, true)?;
            audit(store, "user_disable", &username, "")?;
            println!("{username} disabled; its sessions ended and its tokens stopped working");
            Ok(())
        }
        UsersCommand::Enable { username, .. } => {
            Accounts::new(store).set_disabled(&username, false)?;
            audit(store, "user_enable", &username, "")?;
            println!("{username} enabled");
            Ok(())
        }
        UsersCommand::List { .. } => {
            for u in Accounts::new(store).list()? {
                let scope = match u.role {
                    AccountRole::Admin => "*".to_string(),
                    AccountRole::Coordinator => u.municipalities.join(","),
                    _ => u.homes.join(","),
                };
                let flags = [(u.totp, "2fa"), (u.disabled, "disabled")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, f)| *f)
                    .collect::<Vec<_>>()
                    .join(",");
                println!("{}\t{}\t{}\t{}\t{}", u.username, u.role.as_str(), scope, u.display_name, flags);
            }
            Ok(())
        }
        UsersCommand::Token { username, name, .. } => {
            let token = Accounts::new(store).add_token(&username, &name, now)?;
            audit(store, "token_add", &username, &name)?;
            println!("{token}");
            Ok(())
        }
        UsersCommand::Tokens { username, .. } => {
            for t in Accounts::new(store).tokens(&username)? {
                println!("{}\t{}\t{}\t{}", t.id, t.name, t.created_at, if t.revoked { "revoked" } else { "active" });
            }
            Ok(())
        }
        UsersCommand::RevokeToken { username, id, .. } => {
            let name = Accounts::new(store).revoke_token(&username, id)?;
            audit(store, "token_revoke", &username, &format!("{id} {name}"))?;
            println!("token {id} ({name}) of {username} revoked");
            Ok(())
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(AccountError::Invalid(m)) => {
            eprintln!("mamori-gateway: {m}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("mamori-gateway: {e}");
            ExitCode::from(1)
        }
    }
}

fn audit_command(command: AuditCommand) -> ExitCode {
    let (AuditCommand::Verify { config } | AuditCommand::Export { config }) = &command;
    let c = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match c.store_location().map_err(anyhow::Error::msg).and_then(|at| Ok(crate::edge::store::open(&at)?)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mamori-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    match command {
        AuditCommand::Verify { .. } => match crate::admin::audit::verify(store.as_ref()) {
            Ok(crate::admin::audit::Verdict::Intact { entries, head }) => {
                println!("intact: {entries} entries, head {head}");
                ExitCode::SUCCESS
            }
            Ok(crate::admin::audit::Verdict::Broken { seq, reason }) => {
                eprintln!("BROKEN at entry {seq}: {reason}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("mamori-gateway: {e}");
                ExitCode::from(1)
            }
        },
        AuditCommand::Export { .. } => {
            let mut out = io::stdout().lock();
            exit_code(crate::admin::audit::export_csv(store.as_ref(), &mut out).map(|_| ()))
        }
    }
}

fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).with_ansi(false).json().init();
}

/// The config and the home ids of a command, or the exit code of the first problem.
fn config_and_homes(
    config: &std::path::Path,
    ids: &[String],
) -> Result<(Config, Vec<mamori_protocol::mqtt::HomeId>), ExitCode> {
    let c = load(config)?;
    Ok((c, parse_homes(ids)?))
}

/// 0, or 1 with the error's chain on stderr.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mamori-gateway: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_homes(ids: &[String]) -> Result<Vec<mamori_protocol::mqtt::HomeId>, ExitCode> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        // A list pasted with a home twice means that home once.
        .filter(|id| seen.insert(id.as_str()))
        .map(|id| {
            mamori_protocol::mqtt::HomeId::new(id).map_err(|_| {
                eprintln!("`{id}`: expected a home id (1-64 characters of a-z, 0-9 and '-')");
                ExitCode::from(2)
            })
        })
        .collect()
}

/// Make the broker re-read its password file (`[pki] reload_command`).
fn reload_broker(c: &Config) -> anyhow::Result<()> {
    let cmd = c.reload_command();
    let Some((program, args)) = cmd.split_first() else { return Ok(()) };
    let status = std::process::Command::new(program).args(args).status();
    match status {
        Ok(s) if s.success() => {
            println!("broker reloaded ({})", cmd.join(" "));
            Ok(())
        }
        Ok(s) => anyhow::bail!(
            "the broker reload `{}` failed ({s}): the change takes effect at its next reload",
            cmd.join(" ")
        ),
        Err(e) => anyhow::bail!(
            "the broker reload `{}` could not run ({e}): the change takes effect at its next reload",
            cmd.join(" ")
        ),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

async fn until_signal(cancel: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    cancel.cancel();
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

/// The command line: parse the arguments, run the command, return its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Users { command } => users(command),
        Command::Audit { command } => audit_command(command),
        Command::Run { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            logging();
            let Ok(rt) = runtime() else { return ExitCode::from(1) };
            rt.block_on(async move {
                let (console_tx, mut console_rx) = tokio::sync::mpsc::channel(crate::edge::delivery::CONSOLE_QUEUE);
                tokio::spawn(async move {
                    while let Some(text) = console_rx.recv().await {
                        println!("{text}\n");
                    }
                });
                let cancel = CancellationToken::new();
                tokio::spawn(until_signal(cancel.clone()));
                // Several gateways on one store: wait as a standby until this one holds the lease.
                let held = match (&config.cluster, config.store_location()) {
                    (Some(cluster), Ok(crate::edge::store::Location::Postgres(at))) => {
                        match crate::service::standby::stand_by(&config, &at, cluster, &cancel).await {
                            Ok(Some(h)) => Some(h),
                            Ok(None) => return ExitCode::SUCCESS,
                            Err(e) => {
                                eprintln!("mamori-gateway: {e:#}");
                                return ExitCode::from(1);
                            }
                        }
                    }
                    (Some(_), Ok(crate::edge::store::Location::Sqlite(_))) => {
                        eprintln!("mamori-gateway: [cluster] needs a [store] postgres database the gateways share");
                        return ExitCode::from(2);
                    }
                    (Some(_), Err(e)) => {
                        eprintln!("mamori-gateway: {e}");
                        return ExitCode::from(2);
                    }
                    (None, _) => None,
                };
                let service = match run::Service::new(config, console_tx) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("mamori-gateway: {e:#}");
                        // A database that fails (locked, an I/O error, a full disk during a
                        // migration) may work on the next try: exit 1, which systemd restarts.
                        // No database, a bad config or homes file: the operator's to fix (2).
                        let transient = e.chain().any(|c| {
                            c.downcast_ref::<crate::edge::store::StoreError>().is_some_and(|s| {
                                !matches!(
                                    s,
                                    crate::edge::store::StoreError::Missing { .. }
                                        | crate::edge::store::StoreError::NoSchema { .. }
                                )
                            })
                        });
                        return ExitCode::from(if transient { 1 } else { 2 });
                    }
                };
                let (held, listener) = match held {
                    Some((h, l)) => (Some(h), Some(l)),
                    None => (None, None),
                };
                let service = match &held {
                    Some(h) => service.with_lease(h.lease.clone()),
                    None => service,
                };
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<run::Ready>();
                tokio::spawn(async move {
                    if let Ok(r) = ready_rx.await {
                        println!("ready broker={} http={}", r.broker, r.http);
                        let _ = io::stdout().flush();
                    }
                });
                let result = service.run_on(listener, cancel, Some(ready_tx)).await;
                if let Some(h) = held {
                    h.release();
                }
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "gateway failed");
                        eprintln!("mamori-gateway: {e:#}");
                        // A store that is not the deployment's is the operator's to fix: exit
                        // 2, which the systemd unit does not restart.
                        let wrong_store = e.downcast_ref::<run::RunError>().is_some();
                        ExitCode::from(if wrong_store { 2 } else { 1 })
                    }
                }
            })
        }
        Command::Init { config, adopt_broker_session } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let at = match c.store_location() {
                Ok(at) => at,
                Err(e) => {
                    eprintln!("mamori-gateway: {e}");
                    return ExitCode::from(2);
                }
            };
            let file = at.describe();
            let existed = match at.exists() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("mamori-gateway: {e}");
                    return ExitCode::from(1);
                }
            };
            if existed && !adopt_broker_session {
                eprintln!("mamori-gateway: {file} exists already: nothing done");
                return ExitCode::from(2);
            }
            let result = run::open_store(&c).and_then(|mut s| {
                if adopt_broker_session {
                    s.set_meta(crate::edge::store::META_ADOPT_SESSION, &clock::now().to_rfc3339())?;
                }
                Ok(s.homes()?.len())
            });
            match result {
                Ok(homes) => {
                    if !existed {
                        println!("created {file} with {homes} homes");
                    }
                    if adopt_broker_session {
                        println!("{file} takes over the broker session of client id `{}`", c.broker.client_id);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mamori-gateway: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::CheckConfig { config } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let mut errors = Vec::new();
            if let Err(e) = run::style(&c) {
                errors.push(format!("{}: {e:#}", config.display()));
            }
            if let Some(h) = &c.homes_file {
                match HomesFile::load(h, &c.known()) {
                    Err(e) => errors.push(e.to_string()),
                    // Who hears nothing (or would, with consent required): not an error, a
                    // list of consent forms to get.
                    Ok(f) => {
                        let offset = c.offset().map_or(0, |o| o.local_minus_utc());
                        let today =
                            (crate::edge::clock::now() + chrono::Duration::seconds(i64::from(offset))).date_naive();
                        for home in &f.homes {
                            for k in home.contacts.iter().filter(|k| !k.may_receive(true, today)) {
                                let what = if c.privacy.require_consent {
                                    "is sent nothing ([privacy] require_consent)"
                                } else {
                                    "would be sent nothing with [privacy] require_consent = true"
                                };
                                println!(
                                    "{}: home `{}`: contact `{}` ({}) has no current consent: {what}",
                                    h.display(),
                                    home.id.as_str(),
                                    k.name,
                                    k.role.as_str()
                                );
                            }
                        }
                    }
                }
            }
            if errors.is_empty() {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", errors.join("\n"));
                ExitCode::from(2)
            }
        }
        Command::Homes { command: HomesCommand::Import { config, file } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let homes = match HomesFile::load(&file, &c.known()) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match run::open_store(&c).and_then(|mut s| s.upsert_homes(&homes.homes, "homes import").map_err(Into::into))
            {
                Ok(()) => {
                    println!("imported {} homes into {}", homes.homes.len(), c.data_dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mamori-gateway: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Pki { command: PkiCommand::Init { config, broker_host, broker_port } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let dir = c.pki_dir();
            match pki::Pki::init(&dir, &broker_host, clock::now()) {
                Ok(p) => {
                    let conf = format!(
                        "# Mosquitto 2.x for mamori, generated by `mamori-gateway pki init` (see docs/security.md).\n{}{}",
                        pki::mosquitto_listener(broker_port, "0.0.0.0", p.dir()),
                        pki::mosquitto_service(std::path::Path::new("/var/lib/mosquitto"))
                    );
                    if let Err(e) = std::fs::write(p.dir().join("mosquitto.conf"), conf) {
                        eprintln!("mamori-gateway: mosquitto.conf: {e}");
                        return ExitCode::from(1);
                    }
                    println!("PKI created in {}: ca.pem, broker.pem/.key, gateway.pem/.key, gateway-password, passwords, acl, crl.pem, mosquitto.conf", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mamori-gateway: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Pki { command: PkiCommand::Nats { config, nodes, out, pki_on_nodes, store_dir, bind } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let nodes = match nodes.iter().map(|n| n.parse::<crate::admin::nats::Node>()).collect::<Result<Vec<_>, _>>()
            {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("mamori-gateway: --node {e}");
                    return ExitCode::from(2);
                }
            };
            exit_code((|| -> anyhow::Result<()> {
                let p = pki::Pki::open(&c.pki_dir())?;
                let on_nodes = match &pki_on_nodes {
                    Some(d) => d.clone(),
                    None => std::fs::canonicalize(p.dir())?,
                };
                let out = out.clone().unwrap_or_else(|| p.dir().to_path_buf());
                let missing = p.nats(&nodes, &out, &on_nodes, &store_dir, &bind, clock::now())?;
                for n in &nodes {
                    println!("{}: {}", n.name, out.join(format!("nats-{}.conf", n.name)).display());
                }
                println!(
                    "copy {} (ca.pem, nats-broker.pem/.key, nats-route.pem/.key, nats-users.conf) to each node; \
                     start each with `nats-server -c nats-<node>.conf`",
                    on_nodes.display()
                );
                if !missing.is_empty() {
                    println!(
                        "these homes were provisioned before the PKI kept NATS passwords and cannot connect to the cluster \
                         until provisioned again: {}",
                        missing.join(", ")
                    );
                }
                Ok(())
            })())
        }
        Command::Homes {
            command: HomesCommand::Provision { config, broker_host, broker_port, failover, out, force, homes },
        } => {
            for f in &failover {
                if let Err(e) = mamori_connect::parse_host_port(f) {
                    eprintln!("mamori-gateway: --failover {e}");
                    return ExitCode::from(2);
                }
            }
            let (c, ids) = match config_and_homes(&config, &homes) {
                Ok(x) => x,
                Err(code) => return code,
            };
            if !force {
                let registered = match run::open_store(&c).and_then(|s| s.homes().map_err(Into::into)) {
                    Ok(h) => h.into_iter().map(|h| h.id).collect::<std::collections::BTreeSet<_>>(),
                    Err(e) => return exit_code(Err(e)),
                };
                let unknown: Vec<&str> =
                    ids.iter().filter(|id| !registered.contains(*id)).map(|id| id.as_str()).collect();
                if !unknown.is_empty() {
                    eprintln!(
                        "mamori-gateway: not registered: {}. Register them first (`homes import` or `homes_file`), \
                         or pass --force to issue credentials anyway; nothing was issued",
                        unknown.join(", ")
                    );
                    return ExitCode::from(2);
                }
            }
            exit_code((|| -> anyhow::Result<()> {
                let p = pki::Pki::open(&c.pki_dir())?;
                let ca = std::fs::read_to_string(p.dir().join("ca.pem"))?;
                std::fs::create_dir_all(&out)?;
                // All at once: each password file is written once, however many homes.
                let issued_all = p.provision_many(&ids, clock::now())?;
                for (id, (issued, password)) in ids.iter().zip(issued_all) {
                    let path = out.join(format!("{}.toml", id.as_str()));
                    let bundle = pki::agent_bundle(id, &broker_host, broker_port, &failover, &ca, &issued, &password);
                    pki::write_bundle(&path, &bundle)?;
                    println!("{}: certificate {} · bundle {}", id.as_str(), issued.serial_hex, path.display());
                }
                reload_broker(&c)
            })())
        }
        Command::Homes { command: HomesCommand::Revoke { config, homes } } => {
            let (c, ids) = match config_and_homes(&config, &homes) {
                Ok(x) => x,
                Err(code) => return code,
            };
            exit_code((|| -> anyhow::Result<()> {
                let p = pki::Pki::open(&c.pki_dir())?;
                let counts = p.revoke_many(&ids, clock::now())?;
                for (id, n) in ids.iter().zip(counts) {
                    println!("{}: password removed, {n} certificate(s) added to crl.pem", id.as_str());
                }
                reload_broker(&c)
            })())
        }
        Command::Homes { command: HomesCommand::List { config } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match run::open_store(&c).and_then(|s| s.homes().map_err(Into::into)) {
                Ok(homes) => {
                    for h in homes {
                        println!("{}\t{}\t{}\t{} contacts", h.id.as_str(), h.municipality, h.label, h.contacts.len());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mamori-gateway: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Alerts { command: AlertsCommand::List { config, all, json } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let alerts = match run::open_store(&c).and_then(|s| s.alerts(!all, 1000).map_err(Into::into)) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("mamori-gateway: {e:#}");
                    return ExitCode::from(1);
                }
            };
            for a in alerts {
                if json {
                    println!("{}", serde_json::to_string(&a).unwrap_or_default());
                } else {
                    let ack =
                        a.acknowledged.as_ref().map(|k| format!("ack by {} {}", k.role, k.by)).unwrap_or_default();
                    let state = if a.cleared_at.is_some() { "cleared" } else { "active" };
                    println!(
                        "{}\t{}\t{}\t{:?}\t{:?}\t{state}\tsince {}\t{ack}",
                        a.id,
                        a.home.as_str(),
                        a.kind,
                        a.severity,
                        a.tier(),
                        a.since.to_rfc3339()
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Command::Alerts { command: AlertsCommand::Ack { config, id, role, by, note, wait_s } } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Ok(role) = role.parse::<mamori_protocol::mqtt::Role>() else {
                eprintln!("--role: expected family, coordinator, visiting_nurse, facility, support_centre or admin");
                return ExitCode::from(2);
            };
            let mut store = match run::open_store(&c) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mamori-gateway: {e:#}");
                    return ExitCode::from(1);
                }
            };
            let req = match store.request_ack(&id, role, &format!("cli:{by}"), note.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mamori-gateway: {e}");
                    return ExitCode::from(1);
                }
            };
            let until = clock::now() + chrono::Duration::seconds(wait_s as i64);
            while clock::now() < until {
                match store.ack_result(req) {
                    Ok(Some(r)) if r == "ok" => {
                        println!("acknowledged {id}");
                        return ExitCode::SUCCESS;
                    }
                    Ok(Some(r)) => {
                        eprintln!("not acknowledged: {r}");
                        return ExitCode::from(1);
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => {
                        eprintln!("mamori-gateway: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            println!("queued: the gateway is not running or did not answer in {wait_s} s; it applies the acknowledgement when it runs");
            ExitCode::SUCCESS
        }
    }
}
