//! The README's front door: its two commands, taken literally from its
//! "Try it" section (so the test follows the README when it changes).
//!
//! The run command runs as a newcomer runs it, from the checkout, with a
//! fresh home directory (so a clean development spool), in a network
//! namespace of its own (its fixed port 2525 meets no other test, and it
//! can reach no other host). A message goes in with Python's smtplib, the
//! README's own send commands run as written, and the message must be in
//! the Maildir the README names; Ctrl-C (SIGINT to the process group)
//! stops it. The test command is not run here (that would recurse): `.ci/run`
//! must run it literally, which is checked.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::netns::{self, Netns};
use crate::support::readme::{self, TryIt};

/// A release build from scratch on two busy cores takes minutes; `.ci/run`
/// builds it before the tests, so this is only a bound.
const START: Duration = Duration::from_secs(25 * 60);
const WAIT: Duration = Duration::from_secs(30);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The environment of a newcomer's shell: their PATH and toolchain, a
/// home of their own, nothing a test harness set.
fn newcomer(cmd: &mut Command, home: &Path) {
    let real_home = std::env::var_os("HOME").map(PathBuf::from);
    cmd.env_clear();
    for keep in [
        "PATH",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_JOBS",
        "TMPDIR",
        "LANG",
    ] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    // The toolchain stays where it is installed, whatever HOME says.
    if let Some(h) = &real_home {
        if std::env::var_os("CARGO_HOME").is_none() {
            cmd.env("CARGO_HOME", h.join(".cargo"));
        }
        if std::env::var_os("RUSTUP_HOME").is_none() {
            cmd.env("RUSTUP_HOME", h.join(".rustup"));
        }
    }
    cmd.env("HOME", home).current_dir(manifest_dir());
}

/// `~/x` in the README, for this test's home.
fn expand(path: &str, home: &Path) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(path),
    }
}

struct Running {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`; fails at once if the command
    /// exits first (a build or start-up error).
    fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "the README's run command exited ({status}) before saying {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ctrl-C, as in a terminal: SIGINT to the whole process group.
    fn interrupt(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let _ = self.child.wait();
        // Every process of the group is gone, not only the shell.
        while unsafe { libc::kill(-pgid, 0) } == 0 {
            assert!(
                Instant::now() < deadline,
                "still running 60s after Ctrl-C:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Starts the README's run command as written, in a shell of its own
/// process group and network namespace.
fn start(t: &TryIt, home: &Path) -> Running {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&t.run);
    newcomer(&mut cmd, home);
    netns::isolate(&mut cmd);
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the README's run command");
    let log = Arc::new(Mutex::new(String::new()));
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    Running { child, log }
}

/// Runs one README command line in the daemon's namespace, as a newcomer.
fn run_there(line: &str, ns: &Netns, home: &Path) -> std::process::Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line);
    newcomer(&mut cmd, home);
    ns.enter(&mut cmd);
    cmd.stdin(Stdio::null())
        .output()
        .expect("run a README command")
}

/// The files in a Maildir's `new/`, waiting up to `WAIT` for `n` of them.
fn wait_files(new: &Path, n: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + WAIT;
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(new)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if files.len() >= n || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_readme_two_commands_work_as_written() {
    let md = readme::text();
    let t = TryIt::parse(&md);

    // The test command: .ci/run runs it as written (running it here would
    // run this test again).
    let ci = std::fs::read_to_string(manifest_dir().join(".ci/run")).expect("read .ci/run");
    assert!(
        ci.lines().map(str::trim_start).any(|l| !l.starts_with('#')
            && l.strip_prefix(t.test.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))),
        ".ci/run must run the README's test command `{}` literally:\n{ci}",
        t.test
    );

    if !netns::available() {
        return;
    }
    assert!(
        !Path::new("/etc/relayq/relayq.toml").exists(),
        "this machine has /etc/relayq/relayq.toml, so the README's run command would not start in development mode"
    );
    let listen = t
        .run_comment
        .split("listens on ")
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("the run command's comment names its address: {t:?}"));
    let (host, port) = listen.rsplit_once(':').expect("host:port");
    let home = tempfile::tempdir().expect("home");
    let new = expand(t.listed.trim_end_matches('/'), home.path());
    let maildir = new.parent().expect("the Maildir").to_path_buf();
    assert!(
        t.run_comment
            .contains(&t.listed.replace("/new/", "").replace("/new", "")),
        "the run command's comment and the `ls` name the same Maildir: {t:?}"
    );

    let mut d = start(&t, home.path());
    let started = d.wait_line("started:", START);
    assert!(
        started.contains("development mode") && started.contains(&format!("listening on {listen}")),
        "{started}"
    );
    assert!(
        started.contains(&format!(
            "capturing mail into the Maildir {}",
            maildir.display()
        )),
        "the start-up line says where mail goes, and it is where the README says: {started}"
    );
    let ns = Netns::of(d.child.id());

    // An independent client: Python's smtplib.
    let script = r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
s.sendmail("newcomer@example.com", ["you@example.net"],
           "Subject: front door\r\nFrom: newcomer@example.com\r\n\r\nit works\r\n")
s.quit()
"#;
    let mut py = Command::new("python3");
    py.args(["-c", script, host, port]);
    ns.enter(&mut py);
    let o = py.output().expect("python3");
    assert!(
        o.status.success(),
        "smtplib: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let files = wait_files(&new, 1);
    assert_eq!(
        files.len(),
        1,
        "in {}: {files:?}\n{}",
        new.display(),
        d.log()
    );
    let first = files[0].clone();
    let got = std::fs::read_to_string(&first).unwrap();
    assert!(
        got.contains("Delivered-To: you@example.net\r\n")
            && got.contains("Subject: front door\r\n")
            && got.ends_with("\r\n\r\nit works\r\n"),
        "{got}"
    );

    // Then the README's own commands, as written; the `ls` lists what the
    // Maildir holds.
    let mut sent = 1;
    let mut listing = None;
    for line in &t.send {
        let o = run_there(line, &ns, home.path());
        assert!(
            o.status.success(),
            "`{line}` failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if line.starts_with("ls ") {
            listing = Some(String::from_utf8_lossy(&o.stdout).into_owned());
        } else {
            sent += 1;
        }
    }
    let files = wait_files(&new, sent);
    assert_eq!(files.len(), sent, "{files:?}\n{}", d.log());
    let listing = listing.expect("the ls output");
    let name = first.file_name().unwrap().to_str().unwrap();
    assert!(listing.contains(name), "`ls` shows {name}: {listing}");

    d.interrupt();
    assert!(d.log().contains("stopped"), "a clean stop:\n{}", d.log());
}
