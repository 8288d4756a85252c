//! A PostgreSQL database of a test's own, on the server `MAMORI_TEST_POSTGRES` names (libpq
//! settings; default the local server, `host=127.0.0.1 port=5432 user=postgres
//! dbname=postgres`), dropped when the value goes. `scripts/test` makes sure a server is there
//! and sets the variable.

use anyhow::{Context, Result};
use postgres::{Client, NoTls};

/// The test server's settings.
pub fn server() -> String {
    std::env::var("MAMORI_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

fn connect(settings: &str) -> Result<Client> {
    settings
        .parse::<postgres::Config>()
        .and_then(|c| c.connect(NoTls))
        .with_context(|| format!("PostgreSQL for the tests ({settings}); scripts/test starts one"))
}

/// A database created for one test.
pub struct TestDb {
    name: String,
}

impl TestDb {
    /// Create it (named after the process and a random number).
    pub fn new() -> Result<TestDb> {
        let name = format!("mamori_test_{}_{:x}", std::process::id(), rand::random::<u32>());
        connect(&server())?.batch_execute(&format!("CREATE DATABASE {name}"))?;
        Ok(TestDb { name })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// libpq settings that reach it (the server's, with this database), without the
    /// password: the gateway takes that apart ([`TestDb::password`]).
    pub fn settings(&self) -> String {
        let server = server();
        let rest: Vec<&str> =
            server.split_whitespace().filter(|kv| !kv.starts_with("dbname=") && !kv.starts_with("password=")).collect();
        format!("{} dbname={}", rest.join(" "), self.name)
    }

    /// The server's port (from its settings; 5432 when they name none).
    pub fn port(&self) -> u16 {
        server().split_whitespace().find_map(|kv| kv.strip_prefix("port=")).and_then(|p| p.parse().ok()).unwrap_or(5432)
    }

    /// [`TestDb::settings`] through another loopback port (a [`crate::netcut::Link`] to the
    /// server, which the test can cut).
    pub fn settings_via(&self, port: u16) -> String {
        let rest: Vec<String> = self
            .settings()
            .split_whitespace()
            .filter(|kv| !kv.starts_with("host=") && !kv.starts_with("port="))
            .map(str::to_string)
            .collect();
        format!("host=127.0.0.1 port={port} {}", rest.join(" "))
    }

    /// The server's password, when its settings have one.
    pub fn password(&self) -> Option<String> {
        server().split_whitespace().find_map(|kv| kv.strip_prefix("password=")).map(str::to_string)
    }

    /// A gateway config's `[store]` section for this database.
    pub fn store_toml(&self) -> String {
        let password =
            self.password().map(|p| format!("postgres_password = {{ value = \"{p}\" }}\n")).unwrap_or_default();
        format!("[store]\npostgres = \"{}\"\n{password}", self.settings())
    }

    /// End every connection to it: a database restart, as its clients see it.
    pub fn cut_connections(&self) -> Result<()> {
        connect(&server())?
            .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&self.name])?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = connect(&server()) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// A PostgreSQL server of a test's own, with TLS on: Debian's binaries
/// (`/usr/lib/postgresql/<version>/bin`), a fresh cluster in a temporary folder, trust
/// authentication for `postgres` on 127.0.0.1, and `ssl = on` with the `server.pem` and
/// `server.key` that [`crate::pki::make`] wrote to `pki` (for 127.0.0.1, signed by its
/// `ca.pem`). Run as the `postgres` user when the test runs as root (PostgreSQL refuses root),
/// by switching user in the child itself, so the server stays in the process group the
/// harness kills. Stopped cleanly (a fast shutdown) when dropped, before its folder goes.
pub struct TlsServer {
    process: crate::process::Process,
    port: u16,
    // Last: the server is stopped before its folder goes.
    _dir: tempfile::TempDir,
}

impl TlsServer {
    /// Start it and wait until it accepts connections.
    pub fn start(pki: &std::path::Path) -> Result<TlsServer> {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        use std::process::Command;
        // The newest version (by number: 9.6 is older than 16).
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's binaries under /usr/lib/postgresql (apt-get install postgresql)")?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v: Vec<u32> = e.file_name().to_str()?.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, p)| p.join("postgres").exists() && p.join("initdb").exists())
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, p)| p)
            .context("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let id = |args: &[&str]| -> Option<u32> {
            let o = Command::new("id").args(args).output().ok()?;
            String::from_utf8(o.stdout).ok()?.trim().parse().ok()
        };
        let root = id(&["-u"]) == Some(0);
        let postgres_ids = if root {
            Some((id(&["-u", "postgres"]).context("a `postgres` user")?, id(&["-g", "postgres"]).context("its group")?))
        } else {
            None
        };
        let as_postgres = |program: &std::path::Path| {
            let mut c = Command::new(program);
            if let Some((uid, gid)) = postgres_ids {
                c.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql");
            }
            c
        };
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let as_postgres = |program: &std::path::Path| {
            let mut c = as_postgres(program);
            c.current_dir(dir.path());
            c
        };
        let give = |path: &std::path::Path| -> Result<()> {
            if root {
                let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status()?.success();
                anyhow::ensure!(ok, "chown {} to postgres", path.display());
            }
            Ok(())
        };
        give(dir.path())?;
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()?;
        anyhow::ensure!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key")] {
            std::fs::copy(pki.join(from), data.join(to))?;
            std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))?;
            give(&data.join(to))?;
        }
        let port = crate::free_port()?;
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D").arg(&data).arg("-p").arg(port.to_string()).arg("-k").arg(dir.path()).args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
            "-c",
            "fsync=off",
        ]);
        let process = crate::process::Process::spawn("postgres (TLS)", cmd)?;
        process.wait_line("PostgreSQL to accept connections", std::time::Duration::from_secs(60), |l| {
            l.contains("ready to accept connections")
        })?;
        Ok(TlsServer { process, port, _dir: dir })
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// libpq settings that reach it (trust authentication: no password).
    pub fn settings(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> Vec<String> {
        self.process.lines()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT): it frees its port and shared memory; the harness's kill
        // follows if it does not stop in time.
        let _ = self.process.signal("INT");
        let _ = self.process.wait_exit(std::time::Duration::from_secs(10));
    }
}
