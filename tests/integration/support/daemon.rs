//! Starts the real `relayq` binary with a config written for the test, and
//! watches its log.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_relayq");

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
    /// Extra environment for the daemon (after RELAYQ_LOG, so it may
    /// override it).
    env: Vec<(String, String)>,
    /// The open file limit (soft, hard) the daemon starts with.
    nofile: Option<(u64, u64)>,
    /// Runs the daemon as this uid (and gid) instead of ours.
    run_as: Option<u32>,
}

/// A config relaying to `upstream` in clear text (allowed: loopback).
pub fn relay_config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "hostname = \"relayq.test\"\n{extra}\n[relay]\nhost = \"{}\"\nport = {}\ntls = \"none\"\nconcurrency = 2\nidle_timeout = \"2s\"\nconnect_timeout = \"2s\"\n",
        upstream.ip(),
        upstream.port()
    )
}

/// `relayq hash-password`: an argon2 hash for an `auth_users_file` line.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run relayq hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_string()
}

impl Daemon {
    /// Starts relayq with `config` (spool_dir and listen are filled in
    /// unless `config` sets them).
    pub fn start(config: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut d = Daemon::start_in(&dir, config);
        d._tmp = Some(tmp);
        d
    }

    pub fn start_in(dir: &Path, config: &str) -> Daemon {
        Daemon::start_in_with_env(dir, config, &[])
    }

    /// Like [`Daemon::start_in`], with extra environment variables for the
    /// daemon process (e.g. a `password_env` secret, or `RELAYQ_LOG`).
    pub fn start_in_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in_with(dir, config, env, None)
    }

    /// Like [`Daemon::start_in`], with the open file limit (soft, hard)
    /// the daemon starts with, as `LimitNOFILE=` or `ulimit -n` would set.
    pub fn start_in_with_nofile(dir: &Path, config: &str, nofile: (u64, u64)) -> Daemon {
        Daemon::start_in_with(dir, config, &[], Some(nofile))
    }

    /// Like [`Daemon::start_in`], running as user nobody (65534), as a
    /// service runs as its own user: `dir` is handed to nobody. Needs root.
    pub fn start_in_as_nobody(dir: &Path, config: &str) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).expect("chown the test dir");
        // Other local users reach the maildrop through it, as through /var/spool.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the test dir");
        Daemon::start_in_with_run_as(dir, config, Some(65534))
    }

    fn start_in_with_run_as(dir: &Path, config: &str, run_as: Option<u32>) -> Daemon {
        let mut d = Daemon::new_in(dir, config, &[], None);
        d.run_as = run_as;
        d.spawn();
        d
    }

    fn start_in_with(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Daemon {
        let mut d = Daemon::new_in(dir, config, env, nofile);
        d.spawn();
        d
    }

    fn new_in(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Daemon {
        let mut text = String::new();
        if !config.contains("spool_dir") {
            text.push_str(&format!(
                "spool_dir = \"{}\"\n",
                dir.join("spool").display()
            ));
        }
        text.push_str(config);
        if !config.contains("[smtp]") {
            text.push_str("\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n");
        }
        let config_path = dir.join("relayq.toml");
        std::fs::write(&config_path, text).expect("write config");
        Daemon {
            child: None,
            dir: dir.to_path_buf(),
            config: config_path,
            addr: "127.0.0.1:0".parse().expect("addr"),
            log: Arc::new(Mutex::new(String::new())),
            _tmp: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nofile,
            run_as: None,
        }
    }

    fn spawn(&mut self) {
        let mut cmd = match self.run_as {
            None => Command::new(BIN),
            Some(_) => Command::new(crate::sendmail::nobody_bin()),
        };
        if let Some(id) = self.run_as {
            use std::os::unix::process::CommandExt;
            // std drops the supplementary groups too when root sets a uid.
            cmd.uid(id).gid(id);
        }
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RELAYQ_TEST_CLOCK", "1")
            .env("RELAYQ_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start relayq");
        let stderr = child.stderr.take().expect("stderr");
        let log = self.log.clone();
        let mark = log.lock().unwrap().len();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("RELAYQ_TEST_ECHO").is_some() {
                    eprintln!("relayq| {line}");
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        self.child = Some(child);
        let started = self.wait_log_after(mark, "started:", Duration::from_secs(20));
        let listen = started
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split([' ', ',']).next())
            .expect("listen address in start line");
        self.addr = listen.parse().expect("parse listen address");
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle`; returns that line.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_log_after(0, needle, timeout)
    }

    fn wait_log_after(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(line) = log[mark.min(log.len())..]
                    .lines()
                    .find(|l| l.contains(needle))
                {
                    return line.to_string();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current end of the log, for [`Daemon::wait_log_since`]: the log
    /// is kept across restarts, so a test that restarts looks past a mark.
    pub fn log_mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Like [`Daemon::wait_log`], but only lines written after `mark`.
    pub fn wait_log_since(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        self.wait_log_after(mark, needle, timeout)
    }

    /// Sends SIGTERM and returns at once (see [`Daemon::wait_exit`]).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process to exit; `None` if it is still running after
    /// `timeout` (it is then left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The spool directory (`<dir>/spool` unless the config set another).
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// Waits (without blocking the runtime a fake peer runs on) until `n`
    /// log lines contain all of `needles`; returns those lines.
    pub async fn wait_lines(&self, needles: &[&str], n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines: Vec<String> = self
                .log()
                .lines()
                .filter(|l| needles.iter().all(|k| l.contains(k)))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} log line(s) containing {needles:?} within {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same spool and config.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs `relayq ARGS --config <ours>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run relayq cli")
    }

    /// Moves the daemon's injected clock forward, then flushes the queue.
    pub fn advance_clock(&self, secs: u64) {
        let out = self.cli(&["clock-advance", &secs.to_string()]);
        assert!(
            out.status.success(),
            "clock-advance: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn flush(&self) {
        let out = self.cli(&["queue", "flush"]);
        assert!(
            out.status.success(),
            "flush: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Queue files currently in `queue/`.
    pub fn queued(&self) -> usize {
        std::fs::read_dir(self.dir.join("spool").join("queue"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
