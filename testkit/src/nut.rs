//! Network UPS Tools for the scenarios: `nutdrv_qx` and `upsd` from Debian's `nut-server`,
//! started with a generated configuration in a temporary directory, on a free port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, Deadline};

/// Where NUT's programs are.
#[derive(Debug, Clone)]
pub struct Nut {
    /// `nutdrv_qx`.
    pub driver: PathBuf,
    /// `upsd`.
    pub upsd: PathBuf,
    /// `upsmon`.
    pub upsmon: PathBuf,
}

impl Nut {
    /// Find an installed NUT (Debian puts drivers in /lib/nut).
    pub fn find() -> Option<Nut> {
        let first = |c: &[&str]| c.iter().map(PathBuf::from).find(|p| p.exists());
        Some(Nut {
            driver: first(&["/lib/nut/nutdrv_qx", "/usr/lib/nut/nutdrv_qx"])?,
            // Debian's /usr/sbin/upsd and upsmon are wrappers that refuse to run unless the
            // system's /etc/nut/nut.conf enables them; the programs themselves are in /lib/nut.
            upsd: first(&["/lib/nut/upsd", "/usr/lib/nut/upsd", "/usr/sbin/upsd"])?,
            upsmon: first(&["/lib/nut/upsmon", "/usr/lib/nut/upsmon", "/usr/sbin/upsmon"])?,
        })
    }

    /// Start `nutdrv_qx` on `port` (a serial device path) as UPS `sim`, and `upsd` on a free
    /// loopback port.
    pub fn start(&self, port: &Path, protocol: &str) -> Result<NutServer> {
        self.start_with(port, protocol, "pollinterval = 1\n")
    }

    /// The same with extra driver settings for `ups.conf`.
    pub fn start_with(&self, port: &Path, protocol: &str, extra: &str) -> Result<NutServer> {
        self.start_with_users(port, protocol, extra, "")
    }

    /// The same with `upsd.users` (e.g. a user allowed instant commands).
    pub fn start_with_users(&self, port: &Path, protocol: &str, extra: &str, users: &str) -> Result<NutServer> {
        let dir = tempfile::tempdir()?;
        let listen = free_port()?;
        let conf = dir.path();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(conf, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::write(
            conf.join("ups.conf"),
            format!("[sim]\n  driver = nutdrv_qx\n  port = {}\n  protocol = {protocol}\n  {extra}", port.display()),
        )?;
        std::fs::write(conf.join("upsd.conf"), format!("LISTEN 127.0.0.1 {listen}\n"))?;
        std::fs::write(conf.join("upsd.users"), users)?;
        std::fs::write(conf.join("nut.conf"), "MODE=standalone\n")?;
        let env = |c: &mut Command| {
            c.env("NUT_CONFPATH", conf).env("NUT_STATEPATH", conf).env("NUT_ALTPIDPATH", conf);
        };
        use std::os::unix::process::CommandExt;
        let mut drv = Command::new(&self.driver);
        drv.process_group(0);
        drv.args(["-a", "sim", "-u", "root", "-F"]).stdout(Stdio::null()).stderr(Stdio::null());
        env(&mut drv);
        let driver = drv.spawn().context("starting nutdrv_qx")?;
        let mut upsd = Command::new(&self.upsd);
        upsd.process_group(0);
        upsd.args(["-u", "root", "-F"]).stdout(Stdio::null()).stderr(Stdio::null());
        env(&mut upsd);
        // upsd needs the driver's socket; retry until it stays up and listens.
        let deadline = Deadline::after(Duration::from_secs(20));
        let server = loop {
            let mut child = upsd.spawn().context("starting upsd")?;
            std::thread::sleep(Duration::from_millis(300));
            if child.try_wait()?.is_none() && std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok() {
                break child;
            }
            let _ = child.kill();
            let _ = child.wait();
            deadline.check("upsd to start")?;
        };
        Ok(NutServer { children: vec![driver, server], port: listen, dir })
    }
}

/// Running NUT processes; killed when dropped.
pub struct NutServer {
    children: Vec<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NutServer {
    /// `upsd`'s port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configuration directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process ids (driver, upsd).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for NutServer {
    fn drop(&mut self) {
        for c in &mut self.children {
            // The whole process group: NUT's daemons may fork.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).stderr(Stdio::null()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
