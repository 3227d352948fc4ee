//! Logs where admins look. `log_to = "syslog"` (hosts without systemd):
//! a real relayq relays a message and its lines arrive on a syslog socket
//! the test listens on (datagram, as rsyslog's and journald's /dev/log
//! are, or stream with NUL framing, as syslog-ng may have it), facility
//! mail unless configured, severity by level, tagged `relayq[PID]`, the
//! text the Postfix-style line without a timestamp of ours. A syslog that
//! is not there yet gets nothing lost: the lines go to stderr until it is.
//! Under systemd (stderr is the journal, `JOURNAL_STREAM`), each line
//! carries its priority as `<N>` and no timestamp.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{BIN, relay_config};
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(30);

/// Lines received, from syslog or from stderr.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn push(&self, l: String) {
        self.0.lock().unwrap().push(l);
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// Waits for a line containing every needle.
    fn wait(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .all()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?} within {WAIT:?}; got:\n{}",
                self.all().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A syslog daemon's datagram socket (what /dev/log is under rsyslog and
/// journald): every datagram is one message.
fn datagram_syslog(path: &Path) -> Lines {
    let sock = UnixDatagram::bind(path).expect("bind the syslog socket");
    let lines = Lines::default();
    let out = lines.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    lines
}

/// A stream socket: messages are NUL-terminated.
fn stream_syslog(path: &Path) -> Lines {
    let listener = UnixListener::bind(path).expect("bind the syslog socket");
    let lines = Lines::default();
    let out = lines.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let out = out.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                let mut msg = Vec::new();
                while r.read_until(0, &mut msg).is_ok_and(|n| n > 0) {
                    if msg.last() == Some(&0) {
                        msg.pop();
                    }
                    out.push(String::from_utf8_lossy(&msg).into_owned());
                    msg.clear();
                }
            });
        }
    });
    lines
}

/// `<PRI>`: (facility, severity).
fn pri(msg: &str) -> (u8, u8) {
    let p: u8 = msg[1..msg.find('>').expect(msg)].parse().expect(msg);
    (p >> 3, p & 7)
}

/// The text after `relayq[PID]: `, checking the tag and the timestamp.
fn text(msg: &str, pid: u32) -> &str {
    let tag = format!(" relayq[{pid}]: ");
    let at = msg
        .find(&tag)
        .unwrap_or_else(|| panic!("no {tag:?} in {msg}"));
    let stamp = &msg[msg.find('>').unwrap() + 1..at];
    // "Nov 29 11:42:20": RFC 3164's local time.
    assert_eq!(stamp.len(), 15, "timestamp {stamp:?} in {msg}");
    assert!(
        stamp.as_bytes()[3] == b' ' && stamp.as_bytes()[12] == b':',
        "{msg}"
    );
    &msg[at + tag.len()..]
}

struct Relayq {
    child: Child,
    stderr: Lines,
}

impl Drop for Relayq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, upstream: SocketAddr, top: &str) -> PathBuf {
    let config = format!(
        "spool_dir = \"{}\"\n{}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n",
        dir.join("spool").display(),
        relay_config(upstream, top)
    );
    let path = dir.join("relayq.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A config with `log_to = "syslog"` on `socket`, plus `extra` top keys.
fn syslog_config(dir: &Path, upstream: SocketAddr, socket: &Path, extra: &str) -> PathBuf {
    let top = format!(
        "log_to = \"syslog\"\nsyslog_socket = \"{}\"\n{extra}",
        socket.display()
    );
    write_config(dir, upstream, &top)
}

/// Adds a relay login whose password file others can read (relayq warns
/// about it at start: a warning line to look for).
fn with_readable_secret(dir: &Path, config: &Path) {
    let secret = dir.join("relay-password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = std::fs::read_to_string(config).unwrap().replace(
        "tls = \"none\"\n",
        &format!(
            "tls = \"none\"\nusername = \"apikey\"\npassword_file = \"{}\"\n",
            secret.display()
        ),
    );
    std::fs::write(config, text).unwrap();
}

/// Sends one message to `addr`; returns its queue id.
async fn send_one(addr: SocketAddr, subject: &str) -> String {
    let body = format!("Subject: {subject}\r\n\r\nhello\r\n");
    let reply = send_mail(
        addr,
        "app@example.com",
        &["bob@example.net"],
        body.as_bytes(),
    )
    .await;
    queue_id(&reply)
}

fn start(config: &Path) -> Relayq {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("RELAYQ_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relayq");
    let stderr = Lines::default();
    let out = stderr.clone();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            out.push(line);
        }
    });
    Relayq { child, stderr }
}

/// The listen address from the start line.
fn listening(started: &str) -> SocketAddr {
    started
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split([' ', ',']).next())
        .expect(started)
        .parse()
        .expect(started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_lines_reach_syslog_with_facility_mail() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("log");
    let syslog = datagram_syslog(&socket);
    let up = FakeUpstream::start_with(Script {
        auth: Some(("apikey".into(), "s3cret".into())),
        ..Script::default()
    })
    .await;
    let config = syslog_config(tmp.path(), up.addr(), &socket, "");
    with_readable_secret(tmp.path(), &config);
    let r = start(&config);
    let pid = r.child.id();

    let started = syslog.wait(&["started:"]);
    assert_eq!(pri(&started), (2, 6), "mail.info: {started}");
    assert!(
        text(&started, pid).starts_with("relayq 0.1.0 started: config"),
        "no timestamp or level of ours: {started}"
    );
    let warning = syslog.wait(&["readable by other users"]);
    assert_eq!(pri(&warning), (2, 4), "mail.warning: {warning}");
    assert!(
        text(&warning, pid).starts_with("warning: "),
        "Postfix's prefix: {warning}"
    );

    let id = send_one(listening(&started), "to syslog").await;
    up.wait_for_messages(1, WAIT).await;
    let accepted = syslog.wait(&[&id, "client=[127.0.0.1]"]);
    assert_eq!(pri(&accepted), (2, 6), "{accepted}");
    assert!(
        text(&accepted, pid)
            .starts_with(&format!("{id}: client=[127.0.0.1], from=<app@example.com>")),
        "{accepted}"
    );
    let sent = syslog.wait(&[&id, "to=<bob@example.net>", "status=sent"]);
    assert_eq!(pri(&sent), (2, 6), "{sent}");
    assert!(
        text(&sent, pid).starts_with(&format!("{id}: to=<bob@example.net>, relay=127.0.0.1[")),
        "{sent}"
    );
    // Nothing went to stderr: every line went to syslog.
    assert!(r.stderr.all().is_empty(), "stderr: {:?}", r.stderr.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_socket_and_another_facility() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("log");
    let syslog = stream_syslog(&socket);
    let up = FakeUpstream::start().await;
    let config = syslog_config(
        tmp.path(),
        up.addr(),
        &socket,
        "syslog_facility = \"local3\"",
    );
    let r = start(&config);
    let started = syslog.wait(&["started:"]);
    assert_eq!(pri(&started), (19, 6), "local3.info: {started}");
    let id = send_one(listening(&started), "over a stream").await;
    let sent = syslog.wait(&[&id, "status=sent"]);
    assert_eq!(pri(&sent), (19, 6), "{sent}");
    assert!(text(&sent, r.child.id()).starts_with(&format!("{id}: to=<bob@example.net>")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_syslog_yet_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("log");
    let up = FakeUpstream::start().await;
    let config = syslog_config(tmp.path(), up.addr(), &socket, "");
    let r = start(&config);
    let said = r.stderr.wait(&["cannot log to syslog at"]);
    assert!(
        said.contains(&socket.display().to_string())
            && said.contains("logging to standard error until it answers"),
        "{said}"
    );
    let started = r.stderr.wait(&["started:"]);
    let addr = listening(&started);
    let reply = send_mail(
        addr,
        "app@example.com",
        &["bob@example.net"],
        b"\r\none\r\n",
    )
    .await;
    r.stderr.wait(&[&queue_id(&reply), "status=sent"]);

    // syslogd comes up: the next lines go there (it is tried again at most
    // once a second; each message brings a line).
    let syslog = datagram_syslog(&socket);
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    while !syslog.all().iter().any(|l| l.contains("status=sent")) {
        assert!(Instant::now() < deadline, "nothing reached syslog");
        let body = format!("\r\nmessage {n}\r\n");
        send_mail(
            addr,
            "app@example.com",
            &["bob@example.net"],
            body.as_bytes(),
        )
        .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let line = syslog.wait(&["status=sent"]);
    assert_eq!(pri(&line), (2, 6), "{line}");
}

/// Under systemd, stderr is the journal: `<N>` priorities, no timestamps.
/// Only when JOURNAL_STREAM names the stderr relayq really has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_carry_their_priority_when_stderr_is_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let config = write_config(tmp.path(), up.addr(), "");
    with_readable_secret(tmp.path(), &config);

    for journal in [true, false] {
        let log_path = tmp.path().join(format!("stderr-{journal}"));
        let log = std::fs::File::create(&log_path).unwrap();
        let meta = log.metadata().unwrap();
        // Inherited from a parent whose stderr was the journal, but not
        // ours: a stream that is not this one.
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RELAYQ_LOG", "info")
            .env("JOURNAL_STREAM", &stream)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let read = || {
            let mut s = String::new();
            std::fs::File::open(&log_path)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        let deadline = Instant::now() + WAIT;
        while !read().contains("started:") {
            assert!(Instant::now() < deadline, "not started: {}", read());
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let out = read();
        let started = out.lines().find(|l| l.contains("started:")).unwrap();
        let warning = out
            .lines()
            .find(|l| l.contains("readable by other users"))
            .unwrap();
        if journal {
            assert!(started.starts_with("<6>relayq 0.1.0 started:"), "{out}");
            assert!(warning.starts_with("<4>warning: "), "{out}");
        } else {
            // Our own timestamp and level, as on a terminal.
            assert!(
                started.starts_with("20") && started.contains("  INFO relayq 0.1.0 started:"),
                "{out}"
            );
            assert!(warning.contains("  WARN "), "{out}");
        }
    }
}
