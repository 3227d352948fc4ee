//! The queue tools against a real queue of deferred mail (the upstream is
//! down): list, --json, show, hold/release, requeue, delete, flush; and
//! the same tools with the daemon stopped, under the spool lock.

use std::os::unix::io::AsRawFd;
use std::process::Output;
use std::time::Duration;

use crate::sendmail::{as_nobody, can_switch_user, open_to_others, stderr};
use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        stderr(o)
    );
    stdout(o)
}

/// Queues `n` messages that the down upstream defers; returns their ids.
async fn deferred(d: &Daemon, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            format!("Subject: m{i}\r\n\r\nmessage {i}\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
        ids.push(queue_id(&r));
    }
    for id in &ids {
        d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    }
    ids
}

fn in_dir(d: &Daemon, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.dir.join("spool").join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_tools_on_deferred_mail() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, ""));
    let ids = deferred(&d, 3).await;

    let list = ok(&d.cli(&["queue", "list"]));
    assert!(list.starts_with("-Queue ID-"), "{list}");
    for id in &ids {
        let row = list.lines().find(|l| l.starts_with(id.as_str())).expect(id);
        assert!(row.ends_with(" app@example.com"), "{row}");
    }
    let indent = " ".repeat(58);
    assert!(
        list.contains(&format!("\n{indent}bob@example.net\n")),
        "{list}"
    );
    assert!(
        list.contains(&format!("\n{indent}(")),
        "reason shown: {list}"
    );
    assert!(list.contains("in 3 Requests."), "{list}");

    let json = ok(&d.cli(&["queue", "list", "--json"]));
    let all: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    // One object per message, then one per relay (its state and limits).
    let rows: Vec<&serde_json::Value> =
        all.iter().filter(|r| r.get("queue_id").is_some()).collect();
    assert_eq!(rows.len(), 3);
    assert!(all.iter().any(|r| r.get("relay").is_some()), "{json}");
    for (row, id) in rows.iter().zip(&ids) {
        assert_eq!(row["queue_id"], id.as_str());
        assert_eq!(row["queue_name"], "deferred");
        assert_eq!(row["sender"], "app@example.com");
        assert!(row["message_size"].as_u64().unwrap() > 0);
        assert_eq!(row["recipients"][0]["address"], "bob@example.net");
        assert!(row["recipients"][0]["delay_reason"].is_string(), "{row}");
    }

    let show = ok(&d.cli(&["queue", "show", &ids[0]]));
    assert!(
        show.contains(&format!("queue id:    {} (queue)", ids[0])),
        "{show}"
    );
    assert!(show.contains("sender:      <app@example.com>"), "{show}");
    assert!(show.contains("  pending   bob@example.net  ("), "{show}");
    assert!(show.contains("attempts:    1"), "{show}");
    assert!(show.contains("\n  Subject: m0\n"), "{show}");
    assert!(show.contains("\n  Received: from client.test"), "{show}");
    assert!(!show.contains("message 0"), "headers only: {show}");

    // hold / release
    let out = ok(&d.cli(&["queue", "hold", &ids[0]]));
    assert!(out.contains("put on hold: 1 message"), "{out}");
    assert_eq!(in_dir(&d, "hold"), vec![ids[0].clone()]);
    let list = ok(&d.cli(&["queue", "list"]));
    assert!(list.contains(&format!("{}!", ids[0])), "{list}");
    let json = ok(&d.cli(&["queue", "list", "--json"]));
    assert!(
        json.lines()
            .next()
            .unwrap()
            .contains("\"queue_name\":\"hold\"")
    );
    let show = ok(&d.cli(&["queue", "show", &ids[0]]));
    assert!(show.contains("(hold)"), "{show}");
    ok(&d.cli(&["queue", "release", &ids[0]]));
    assert!(in_dir(&d, "hold").is_empty());
    assert_eq!(in_dir(&d, "queue").len(), 3);

    // requeue makes one due now: it is tried (and deferred) again.
    ok(&d.cli(&["queue", "requeue", &ids[1]]));
    let tries = |id: &str| d.count_log(&format!("{id}: to=<bob@example.net>"));
    let deadline = std::time::Instant::now() + WAIT;
    while tries(&ids[1]) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "requeue did not retry"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // delete, and a clear error for an unknown id
    let out = ok(&d.cli(&["queue", "delete", &ids[2]]));
    assert!(out.contains("deleted: 1 message"), "{out}");
    d.wait_log(&format!("{}: removed", ids[2]), WAIT);
    let o = d.cli(&["queue", "delete", "01ZZZZZZZZZZZZZZZZZZZZZZZZ"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no such message"), "{}", stderr(&o));
    assert!(ok(&d.cli(&["queue", "list"])).contains("in 2 Requests."));

    // flush with the upstream back delivers the rest.
    let up = FakeUpstream::start_on(addr).await.expect("upstream back");
    let out = ok(&d.cli(&["queue", "flush"]));
    assert!(out.contains("flushed"), "{out}");
    let got = up.wait_for_messages(2, WAIT).await;
    assert_eq!(got.len(), 2);
    for id in &ids[..2] {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let empty = ok(&d.cli(&["queue", "list"]));
    assert!(empty.starts_with("Mail queue is empty\n"), "{empty}");
}

/// Tries to take the daemon lock without waiting.
fn lock_is_free(d: &Daemon) -> bool {
    let f = std::fs::File::open(d.dir.join("spool").join("daemon.lock")).unwrap();
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_work_on_the_spool_while_the_daemon_is_down() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let mut d = Daemon::start(&relay_config(addr, ""));
    let ids = deferred(&d, 5).await;
    assert!(!lock_is_free(&d), "the running daemon holds daemon.lock");
    ok(&d.cli(&["queue", "hold", &ids[4]]));
    assert!(d.stop());
    assert!(lock_is_free(&d));

    let list = ok(&d.cli(&["queue", "list"]));
    assert!(list.contains("in 5 Requests."), "{list}");
    let out = ok(&d.cli(&["queue", "release", &ids[4]]));
    assert!(
        out.contains("released: 1 message (relayq is not running"),
        "{out}"
    );
    assert_eq!(in_dir(&d, "queue").len(), 5);
    let out = ok(&d.cli(&["queue", "hold", &ids[3]]));
    assert!(out.contains("put on hold: 1 message"), "{out}");
    assert_eq!(in_dir(&d, "hold"), vec![ids[3].clone()]);
    let out = ok(&d.cli(&["queue", "requeue", &ids[0]]));
    assert!(out.contains("requeued: 1 message"), "{out}");
    let out = ok(&d.cli(&["queue", "flush"]));
    assert!(
        out.contains("4 message(s) will be tried as soon as it starts"),
        "{out}"
    );
    let show = ok(&d.cli(&["queue", "show", &ids[0]]));
    assert!(show.contains("pending"), "{show}");

    let out = ok(&d.cli(&["queue", "delete", "ALL"]));
    assert!(
        out.contains("deleted: 5 messages (relayq is not running"),
        "{out}"
    );
    assert!(in_dir(&d, "queue").is_empty() && in_dir(&d, "hold").is_empty());
    let empty = ok(&d.cli(&["queue", "list"]));
    assert!(empty.starts_with("Mail queue is empty\n"), "{empty}");
    assert!(lock_is_free(&d), "the tool released the lock");

    // A daemon started afterwards finds nothing to send.
    d.restart();
    let deadline = std::time::Instant::now() + WAIT;
    while d.count_log("recovered queue: 0 queued, 0 on hold") < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_all_through_the_daemon() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, ""));
    let ids = deferred(&d, 250).await;
    ok(&d.cli(&["queue", "hold", &ids[0], &ids[1]]));
    assert_eq!(in_dir(&d, "hold").len(), 2);
    // On a terminal (script(1) gives it one) a long operation shows a
    // progress bar.
    let tty = std::process::Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{BIN} queue requeue ALL --config {}",
            d.config.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    let out = ok(&tty);
    assert!(out.contains("requeued: 248 messages"), "{out}");
    assert!(
        out.contains("requeued [") && out.contains("/248"),
        "{out:?}"
    );
    let o = d.cli(&["queue", "delete", "ALL"]);
    let out = ok(&o);
    assert!(out.contains("deleted: 250 messages"), "{out}");
    assert_eq!(stderr(&o), "", "no progress bar without a terminal");
    assert!(!out.contains("not running"), "{out}");
    assert!(in_dir(&d, "queue").is_empty() && in_dir(&d, "hold").is_empty());
    // The daemon forgot them too: nothing is retried.
    d.advance_clock(3600);
    let up = FakeUpstream::start_on(addr).await.expect("upstream back");
    d.flush();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(up.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_or_the_owner_may_change_the_queue() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, ""));
    open_to_others(&d);
    let ids = deferred(&d, 1).await;
    std::fs::set_permissions(
        &d.config,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    for verb in ["hold", "release", "delete", "requeue"] {
        let o = as_nobody(BIN)
            .args(["queue", verb, &ids[0], "--config"])
            .arg(&d.config)
            .output()
            .unwrap();
        assert!(!o.status.success(), "nobody could {verb}");
        let e = stderr(&o);
        assert!(
            e.contains("permission denied: only root or the owner of") && e.contains("(root)"),
            "{e}"
        );
    }
    let o = as_nobody(BIN)
        .args(["queue", "list", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("only root and the owner"),
        "{}",
        stderr(&o)
    );
    assert_eq!(in_dir(&d, "queue"), ids);
}

/// Mail an ordinary user handed to `sendmail` while the daemon is stopped
/// waits in the maildrop: the listing shows it, marked as such, with the
/// sender it will go out with, in text and in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_shows_what_waits_in_the_maildrop() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    // Senders restricted, so that the listing has a sender to replace.
    let mut d = Daemon::start(&relay_config(addr, "[sendmail]\ntrusted_users = []\n"));
    open_to_others(&d);
    let ids = deferred(&d, 1).await;
    assert!(d.stop());
    for (to, from) in [
        ("carol@example.net", None),
        ("dave@example.net", Some("ceo@bank.example")),
    ] {
        let mut cmd = as_nobody(BIN);
        cmd.arg("sendmail");
        if let Some(f) = from {
            cmd.args(["-f", f]);
        }
        cmd.arg("-C").arg(&d.config).arg(to);
        let o = crate::sendmail::run(cmd, b"Subject: waiting\n\nlater\n");
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // A drop file written by hand, claiming another sender: the listing
    // shows the sender the pickup will let stand.
    let forged = "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender ceo@bank.example\nflags -\nrcpt erin@example.net\nsize 12\n\nSubject: x\r\nend\n";
    crate::sendmail::drop_as_nobody(&d, "01BBBBBBBBBBBBBBBBBBBBBBBB", forged);
    let waiting: Vec<String> = in_dir(&d, "maildrop");
    assert_eq!(waiting.len(), 3, "{waiting:?}");

    let out = ok(&d.cli(&["queue", "list"]));
    assert!(!out.contains("Mail queue is empty"), "{out}");
    assert!(out.contains(&ids[0]), "{out}");
    for name in &waiting {
        let entry = out
            .split("\n\n")
            .find(|e| e.lines().any(|l| l.starts_with(name.as_str())))
            .unwrap_or_else(|| panic!("{name} is listed:\n{out}"));
        assert!(
            entry.contains("nobody@relayq.test") && entry.contains("(waiting in the maildrop"),
            "{entry}"
        );
        assert!(
            !entry.contains("ceo@bank.example"),
            "the sender that stands: {entry}"
        );
    }
    assert!(out.contains("in 4 Requests."), "{out}");
    let o = crate::sendmail::sendmail(&d.config, &["-bp"], b"");
    assert_eq!(stdout(&o), out, "mailq says the same");

    let json = ok(&d.cli(&["queue", "list", "--json"]));
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let dropped: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["queue_name"] == "maildrop")
        .collect();
    assert_eq!(dropped.len(), 3, "{json}");
    for v in &dropped {
        assert!(waiting.iter().any(|n| v["queue_id"] == n.as_str()), "{v}");
        assert_eq!(v["sender"], "nobody@relayq.test", "{v}");
    }
    assert!(
        lines
            .iter()
            .any(|v| v["queue_id"] == ids[0].as_str() && v["queue_name"] == "deferred")
    );

    // Picked up at start: they move to the queue, under queue ids.
    d.restart();
    d.wait_log("uid=65534 (nobody)", WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    while !in_dir(&d, "maildrop").is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = ok(&d.cli(&["queue", "list"]));
    assert!(!out.contains("waiting in the maildrop"), "{out}");
    assert!(out.contains("in 4 Requests."), "{out}");
}

/// A drop file is any local user's to write: its recipients reach root's
/// terminal through `mailq` only as printable text (no escape sequences
/// that retitle the window, recolour or clear it), while the JSON listing
/// keeps them exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_prints_no_control_characters_from_a_drop_file() {
    if !can_switch_user() {
        return;
    }
    let mut d = Daemon::start(&relay_config("127.0.0.1:9".parse().unwrap(), ""));
    open_to_others(&d);
    assert!(d.stop());
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31mred\u{9b}0m\u{8}\u{8}@example.net";
    let file = format!(
        "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender nobody@relayq.test\nflags -\nrcpt {evil}\nsize 12\n\nSubject: x\r\nend\n"
    );
    crate::sendmail::drop_as_nobody(&d, "01BBBBBBBBBBBBBBBBBBBBBBBB", &file);

    let out = ok(&d.cli(&["queue", "list"]));
    assert!(out.contains("01BBBBBBBBBBBBBBBBBBBBBBBB"), "{out}");
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    assert!(
        out.contains("?]0;pwned??[2J?[31mred?0m??@example.net"),
        "{out:?}"
    );
    let o = crate::sendmail::sendmail(&d.config, &["-bp"], b"");
    assert_eq!(stdout(&o), out, "mailq says the same");

    let json = ok(&d.cli(&["queue", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(v["recipients"][0]["address"], evil, "{json}");
}

/// Runs `relayq serve` on `config` and returns its stderr once it exits;
/// panics if it is still running after a while (it started).
fn serve_refused(config: &std::path::Path) -> String {
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "relayq serve is running without its sockets:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The daemon's control socket (and the pickup's) live in the spool. When
/// one cannot be made (a spool_dir too long for a socket's path, a file
/// system without sockets such as some FUSE ones, something else in its
/// place), relayq serve used to run without it, silently: every queue
/// tool then said the spool was "locked by another relayq process", and
/// mail its owner's `sendmail` queued waited for the next restart. It
/// refuses to start instead, naming the socket, the cause and the fix.
#[test]
fn a_spool_without_room_for_its_sockets_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relayq.toml");
    let write = |spool: &std::path::Path| {
        std::fs::write(
            &config,
            format!(
                "spool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[capture]\nmaildir = \"{}\"\n",
                spool.display(),
                dir.path().join("Maildir").display()
            ),
        )
        .unwrap();
    };
    // Longer than a socket path may be (108 bytes with its NUL).
    let long = dir.path().join("a".repeat(50)).join("b".repeat(50));
    write(&long);
    let err = serve_refused(&config);
    assert!(
        err.contains("spool_dir") && err.contains("too long") && err.contains("control.sock"),
        "{err}"
    );
    let o = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("too long"), "{}", stderr(&o));

    // Something in the socket's place that is not ours to remove.
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(spool.join("control.sock").join("keep")).unwrap();
    write(&spool);
    let err = serve_refused(&config);
    assert!(
        err.contains("cannot create the control socket") && err.contains("control.sock"),
        "{err}"
    );
    std::fs::remove_dir_all(spool.join("control.sock")).unwrap();
    std::fs::create_dir_all(spool.join("pickup.sock").join("keep")).unwrap();
    let err = serve_refused(&config);
    assert!(
        err.contains("cannot create the pickup socket") && err.contains("pickup.sock"),
        "{err}"
    );
}
