//! An upstream nobody here wrote: Python's aiosmtpd with STARTTLS and AUTH
//! required, started from `support/aiosmtpd_upstream.py` and killed when
//! dropped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

pub struct Aiosmtpd {
    child: tokio::process::Child,
    pub port: u16,
}

impl Aiosmtpd {
    /// Requires AUTH as `user` with `password`, and with `tokens_file` also
    /// AUTH XOAUTH2 with a bearer token listed in that file (read at each
    /// login). Each message lands in `outdir` (see the script).
    pub async fn start(
        cert: &Path,
        key: &Path,
        user: &str,
        password: &str,
        outdir: &Path,
        tokens_file: Option<&Path>,
    ) -> Aiosmtpd {
        let how = "install it with `python3 -m pip install aiosmtpd` (or `apt-get install python3-aiosmtpd`); .ci/run does this";
        let probe = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match probe {
            Ok(s) if s.success() => {}
            Ok(_) => panic!("python3 cannot import aiosmtpd: {how}"),
            Err(e) => panic!("python3 is not available ({e}): {how}"),
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/integration/support/aiosmtpd_upstream.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .arg(cert)
            .arg(key)
            .args([user, password])
            .arg(outdir)
            .args(tokens_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("aiosmtpd did not start in time")
            .expect("read aiosmtpd's stdout")
            .expect("aiosmtpd exited before it was ready");
        let port = ready
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from aiosmtpd: {ready:?}"));
        Aiosmtpd { child, port }
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
