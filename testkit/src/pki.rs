//! A small PKI for tests, made with the `openssl` command (installed by `scripts/test`).

use std::path::Path;
use std::process::Command;

use anyhow::Result;

/// Make, in `dir`: `ca.pem`/`ca.key` and `other-ca.pem`/`other-ca.key` (a stranger's CA),
/// `server.pem`/`server.key` for 127.0.0.1 and `localhost` signed by `ca`, and
/// `home.pem`/`home.key` (mode 0600), a client certificate for `test-home` signed by `ca`.
pub fn make(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).output()?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")?;
    for (name, subj) in [("ca", "/CN=mamori test CA"), ("other-ca", "/CN=someone else's CA")] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            subj,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ])?;
    }
    for (name, cn, ext) in [("server", "127.0.0.1", "server.ext"), ("home", "test-home", "client.ext")] {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &format!("{name}.pem"),
        ])?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("home.key"), std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
