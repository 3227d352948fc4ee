//! Development mode (no config file): one spool and Maildir per user, in
//! `$XDG_STATE_HOME/relayq` or `~/.local/state/relayq`, whatever directory
//! a command runs from, so mail handed to `sendmail` from elsewhere is
//! never stranded in a second spool. The daemon listens on the fixed
//! 127.0.0.1:2525, so it runs in a network namespace of its own.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sendmail::run;
use crate::support::daemon::BIN;
use crate::support::netns;

const WAIT: Duration = Duration::from_secs(20);

/// `relayq ARGS` as a user without a config file: only PATH and HOME
/// (and what `extra` adds), run from `cwd`.
fn user(args: &[&str], home: &Path, cwd: &Path, extra: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RELAYQ_LOG", "info")
        .current_dir(cwd);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Serving {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Serving {
    fn start(home: &Path, cwd: &Path) -> Serving {
        let mut cmd = user(&["serve"], home, cwd, &[]);
        netns::isolate(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("relayq serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Serving { child, log }
    }

    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .log
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains(needle))
            {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?}:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn wait_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + WAIT;
    loop {
        let f = files_in(dir);
        if f.len() >= n || Instant::now() > deadline {
            return f;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_spool_per_user_whatever_the_directory() {
    if !netns::available() || Path::new("/etc/relayq/relayq.toml").exists() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let state = home.path().join(".local/state/relayq");
    let maildir = state.join("Maildir");

    let d = Serving::start(home.path(), a.path());
    let started = d.wait_line("started:");
    assert!(
        started.contains(&format!(
            "capturing mail into the Maildir {}",
            maildir.display()
        )),
        "the start-up line says where mail goes: {started}"
    );
    assert!(
        started.contains(&format!("spool {}", state.join("spool").display())),
        "{started}"
    );

    // sendmail from another directory finds the running daemon's spool.
    let cmd = user(
        &["sendmail", "-v", "bob@example.net"],
        home.path(),
        b.path(),
        &[],
    );
    let o = run(cmd, b"Subject: from elsewhere\n\nhi\n");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("not running"),
        "the daemon runs: {}",
        text(&o)
    );
    let got = wait_files(&maildir.join("new"), 1);
    assert_eq!(got.len(), 1, "{}", d.log.lock().unwrap());
    let msg = std::fs::read_to_string(&got[0]).unwrap();
    assert!(msg.contains("Subject: from elsewhere\r\n"), "{msg}");

    // The queue tools from a third directory look at the same spool: they
    // see the message until the daemon removes it after delivery.
    let deadline = Instant::now() + WAIT;
    loop {
        let o = user(&["queue", "list"], home.path(), c.path(), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        if text(&o).contains("Mail queue is empty") {
            break;
        }
        assert!(
            text(&o).contains("bob@example.net") && Instant::now() < deadline,
            "{}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = user(&["check-config"], home.path(), c.path(), &[])
        .output()
        .unwrap();
    assert!(
        text(&o).contains(&maildir.display().to_string()),
        "check-config says where mail goes: {}",
        text(&o)
    );
    for dir in [a.path(), b.path(), c.path()] {
        assert_eq!(
            files_in(dir),
            Vec::<PathBuf>::new(),
            "nothing made in {dir:?}"
        );
    }

    // $XDG_STATE_HOME, when set, is the place.
    let xdg = tempfile::tempdir().unwrap();
    let o = user(
        &["check-config"],
        home.path(),
        c.path(),
        &[("XDG_STATE_HOME", xdg.path())],
    )
    .output()
    .unwrap();
    assert!(
        text(&o).contains(&xdg.path().join("relayq/Maildir").display().to_string()),
        "{}",
        text(&o)
    );
}

/// A development daemon reads only the spool in the home of whoever runs
/// it. `sendmail` run by another user, or under another home (`sudo`
/// sets root's), must not make a spool of its own there and exit 0: the
/// message would never be delivered. It says why and exits 78, making
/// nothing.
#[test]
fn sendmail_of_another_user_or_home_strands_nothing() {
    if !netns::available() || Path::new("/etc/relayq/relayq.toml").exists() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let d = Serving::start(home.path(), cwd.path());
    d.wait_line("started:");

    let other = tempfile::tempdir().unwrap();
    for args in [
        &["sendmail", "bob@example.net"][..],
        &["sendmail", "-bs"][..],
    ] {
        let o = run(
            user(args, other.path(), cwd.path(), &[]),
            b"Subject: lost?\n\nhi\n",
        );
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(&format!(
                "no development spool {}",
                other.path().join(".local/state/relayq/spool").display()
            )),
            "{}",
            text(&o)
        );
        assert_eq!(files_in(other.path()), Vec::<PathBuf>::new(), "{args:?}");
    }

    // Another user with a home of their own.
    if crate::sendmail::can_switch_user() {
        let theirs = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(theirs.path(), Some(65534), Some(65534)).unwrap();
        let mut cmd = crate::sendmail::as_nobody(BIN);
        cmd.args(["sendmail", "bob@example.net"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", theirs.path())
            .current_dir("/");
        let o = run(cmd, b"Subject: lost?\n\nhi\n");
        assert_eq!(o.status.code(), Some(78), "{}", text(&o));
        assert!(text(&o).contains("uid 65534 (nobody)"), "{}", text(&o));
        assert_eq!(files_in(theirs.path()), Vec::<PathBuf>::new());
    }
}
