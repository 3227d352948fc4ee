//! What a local user can do to the daemon through the maildrop (issue 16,
//! items 7 and 10): plant directories and odd files, make the daemon log
//! for every wake-up, fill `corrupt/`. relayq runs as its own user
//! (nobody here) and the attacker as another (uid 4242), as on a server:
//! whatever can be removed is removed, what cannot is renamed out of the
//! way and said so, each user's lines are budgeted, and `corrupt/maildrop/`
//! stays within its bounds.

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::sendmail::can_switch_user;
use crate::support::daemon::Daemon;

const WAIT: Duration = Duration::from_secs(30);
const ATTACKER: u32 = 4242;

/// Runs a shell script as the attacker, in the maildrop.
fn as_attacker(maildrop: &std::path::Path, script: &str) {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={ATTACKER}"),
            &format!("--regid={ATTACKER}"),
            "--clear-groups",
            "--",
            "sh",
            "-ec",
            script,
        ])
        .current_dir(maildrop)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wake(d: &Daemon) {
    let _ = UnixStream::connect(d.spool().join("pickup.sock"));
}

/// Lines about the attacker's uid.
fn attacker_lines(d: &Daemon) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| {
            l.contains(&format!("uid {ATTACKER}")) || l.contains(&format!("uid={ATTACKER}"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn planted_entries_are_cleared_truthfully_and_quietly() {
    if !can_switch_user() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "hostname = \"relayq.test\"\n[capture]\nmaildir = \"{}/Maildir\"\n",
        tmp.path().display()
    );
    let d = Daemon::start_in_as_nobody(tmp.path(), &config);
    let maildrop = d.spool().join("maildrop");
    // A directory named like a drop file, full and closed to others: the
    // daemon cannot empty it. An empty directory and a FIFO it can remove;
    // a drop file made unreadable; a stray name.
    as_attacker(
        &maildrop,
        "mkdir 01JAAAAAAAAAAAAAAAAAAAAAAA && touch 01JAAAAAAAAAAAAAAAAAAAAAAA/x && chmod 500 01JAAAAAAAAAAAAAAAAAAAAAAA
         mkdir emptydir
         mkfifo 01JBBBBBBBBBBBBBBBBBBBBBBB
         echo junk > 01JCCCCCCCCCCCCCCCCCCCCCCC && chmod 000 01JCCCCCCCCCCCCCCCCCCCCCCC
         echo junk > stray.txt",
    );
    wake(&d);
    let line = d.wait_log("maildrop/01JAAAAAAAAAAAAAAAAAAAAAAA", WAIT);
    assert!(
        line.contains("cannot be removed")
            && line.contains("renamed to maildrop/.junk.")
            && line.contains("remove it as root"),
        "{line}"
    );
    assert!(!line.contains(": removed"), "it claims a removal: {line}");
    for name in [
        "emptydir",
        "01JBBBBBBBBBBBBBBBBBBBBBBB",
        "01JCCCCCCCCCCCCCCCCCCCCCCC",
        "stray.txt",
    ] {
        let line = d.wait_log(&format!("maildrop/{name}"), WAIT);
        assert!(line.ends_with(": removed"), "{line}");
        assert!(line.contains(&format!("uid {ATTACKER}")), "{line}");
    }
    // What the log says is what happened.
    let left: Vec<String> = std::fs::read_dir(&maildrop)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".junk."), "{left:?}");

    // 300 wake-ups, and more junk: the attacker's lines stay within the
    // budget (10 per 10 minutes, then one line saying how many were left
    // out); the renamed directory is never reported again.
    for i in 0..300 {
        if i % 10 == 0 {
            as_attacker(&maildrop, &format!("mkdir junk{i}"));
        }
        wake(&d);
    }
    // A message of the attacker's own, picked up after all that: every
    // scan before it is done when it is accepted.
    let out = crate::sendmail::as_nobody_uid(
        ATTACKER,
        &d.config,
        &["bob@example.net"],
        b"Subject: last\n\nhi\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wake(&d);
    d.wait_log("uid=4242", WAIT);
    let lines = attacker_lines(&d);
    assert!(
        lines.len() <= 12,
        "{} lines about uid {ATTACKER}:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert_eq!(
        d.count_log("01JAAAAAAAAAAAAAAAAAAAAAAA"),
        1,
        "reported once:\n{}",
        d.log()
    );
}

#[test]
fn refused_drop_files_are_kept_within_bounds() {
    if !can_switch_user() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "hostname = \"relayq.test\"\n[capture]\nmaildir = \"{}/Maildir\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = \"1MB\"\n",
        tmp.path().display()
    );
    let d = Daemon::start_in_as_nobody(tmp.path(), &config);
    let maildrop = d.spool().join("maildrop");
    // A 1 GB sparse file and 105 files of garbage, named like drop files.
    let mut script = String::from("truncate -s 1G 01KAAAAAAAAAAAAAAAAAAAAAAA\n");
    for i in 0..105 {
        script.push_str(&format!("echo garbage > 01KB{i:022}\n"));
    }
    as_attacker(&maildrop, &script);
    wake(&d);
    let line = d.wait_log("maildrop file 01KAAAAAAAAAAAAAAAAAAAAAAA refused", WAIT);
    assert!(
        line.contains("removed: 1073741824 bytes, too large to keep"),
        "{line}"
    );
    let count = |p: &std::path::Path| std::fs::read_dir(p).unwrap().count();
    let deadline = std::time::Instant::now() + WAIT;
    while count(&maildrop) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the maildrop was not emptied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&d.spool().join("corrupt/maildrop")), 100);
    // 106 refusals, and room made for the last ones: within the user's
    // budget of lines all the same.
    let lines = attacker_lines(&d);
    assert!(lines.len() <= 10, "{}", lines.join("\n"));
    // Nothing but these bounded files was kept: no 1 GB file anywhere.
    let big = std::fs::read_dir(d.spool().join("corrupt/maildrop"))
        .unwrap()
        .flatten()
        .any(|e| e.metadata().unwrap().len() > 1 << 20);
    assert!(!big);
}
