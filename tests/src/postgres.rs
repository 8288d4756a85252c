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
