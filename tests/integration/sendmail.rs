//! The sendmail command end to end: real clients (PHP's mail(), Python's
//! subprocess, bsd-mailx) run the real binary, the running relayq relays
//! to the fake upstream, and the message must arrive intact.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::peers::require_program;
use crate::support::upstream::{FakeUpstream, Received};

const WAIT: Duration = Duration::from_secs(20);

/// Runs `relayq sendmail -C <config> ARGS` with `input` on stdin.
pub fn sendmail(config: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("sendmail").arg("-C").arg(config).args(args);
    run(cmd, input)
}

/// Runs a command with `input` on stdin and collects its output.
pub fn run(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // A writer thread: the child may exit before reading everything.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        stderr(o)
    );
}

/// Whether we can run commands as `nobody` (only root can).
pub fn can_switch_user() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: not root, cannot run sendmail as user nobody (setpriv)");
    }
    root
}

/// `setpriv` to uid/gid 65534 (nobody/nogroup), then PROGRAM ARGS. For
/// relayq itself pass [`BIN`]: a copy that nobody may run is used, since
/// the build directory may sit where nobody cannot reach it.
pub fn as_nobody(program: &str) -> Command {
    let program = if program == BIN {
        nobody_bin()
    } else {
        program.to_string()
    };
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        &program,
    ]);
    c
}

/// Runs `relayq sendmail -C <config> ARGS` as `uid` (its gid the same),
/// with `input` on stdin.
pub fn as_nobody_uid(uid: u32, config: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "--",
        &nobody_bin(),
        "sendmail",
        "-C",
    ])
    .arg(config)
    .args(args);
    run(c, input)
}

pub fn nobody_bin() -> String {
    // A copy that `nobody` can reach wherever the checkout lives (CI may
    // build under a 0700 home). One fixed place per build, replaced on each
    // run: a static's TempDir is never dropped, so a fresh temp dir per run
    // leaked a 170 MB binary into /tmp every time the suite ran.
    static COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        BIN.hash(&mut h);
        let dir = std::env::temp_dir().join(format!("relayq-test-bin-{:016x}", h.finish()));
        std::fs::create_dir_all(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("relayq");
        // Copy then rename, so a concurrent run never executes a half-written file.
        let part = dir.join(format!("relayq.{}", std::process::id()));
        std::fs::copy(BIN, &part).expect("copy relayq");
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&part, &bin).expect("rename relayq");
        bin.display().to_string()
    })
    .clone()
}

/// The header section of a received message, as text.
fn headers(m: &Received) -> String {
    let t = m.text();
    t.split("\r\n\r\n").next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_into_sendmail_works_like_postfix() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let o = sendmail(&d.config, &["you@example.com"], b"Oh hi there\n");
    ok(&o);
    let got = up.wait_for_messages(1, WAIT).await;
    let m = &got[0];
    assert_eq!(m.mail_from, "root@relayq.test");
    assert_eq!(m.rcpts, vec!["you@example.com"]);
    let h = headers(m);
    assert!(
        h.starts_with("Received: by relayq.test (relayq, from userid 0)\r\n\tid "),
        "{h}"
    );
    assert!(h.contains("\r\n\tfor <you@example.com>; "), "{h}");
    assert!(h.contains("\r\nMessage-ID: <"), "{h}");
    assert!(h.contains("\r\nDate: "), "{h}");
    assert!(h.contains("\r\nFrom: root <root@relayq.test>"), "{h}");
    assert!(m.data.ends_with(b"\r\n\r\nOh hi there\r\n"), "{}", m.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_mail_delivers_intact() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let path = format!("{BIN} sendmail -t -i -C {}", d.config.display());
    let script = r#"
        $ok = mail("bob@example.net", "Hello from PHP", "Line one\nLine two\n.\nafter a dot",
                   "From: Shop <shop@example.com>\r\nCc: carol@example.org", "-fbounce@example.com");
        exit($ok ? 0 : 1);
    "#;
    require_program("PHP's command line", "php", "apt-get install -y php-cli");
    let o = Command::new("php")
        .args(["-n", "-d", &format!("sendmail_path={path}"), "-r", script])
        .output()
        .expect("php-cli is installed by .ci/run");
    ok(&o);
    let got = up.wait_for_messages(1, WAIT).await;
    let m = &got[0];
    assert_eq!(m.mail_from, "bounce@example.com");
    assert_eq!(m.rcpts, vec!["bob@example.net", "carol@example.org"]);
    let text = m.text();
    assert!(text.contains("\r\nTo: bob@example.net\r\n"), "{text}");
    assert!(text.contains("\r\nSubject: Hello from PHP\r\n"), "{text}");
    assert!(
        text.contains("\r\nFrom: Shop <shop@example.com>\r\n"),
        "{text}"
    );
    assert_eq!(text.matches("From:").count(), 1, "{text}");
    assert!(
        text.ends_with("\r\n\r\nLine one\r\nLine two\r\n.\r\nafter a dot\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_subprocess_like_django_and_rails() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    // Rails' :sendmail delivery runs `sendmail -i -f FROM -- RCPTS`;
    // Django-style scripts pipe a message to `sendmail -t -i`.
    let script = r#"
import subprocess, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "app@example.com"
m["To"] = "Bob <bob@example.net>"
m["Bcc"] = "audit@example.org"
m["Subject"] = "Gr\u00fc\u00dfe"
m.set_content("Gr\u00fc\u00dfe aus Python\n.\nEnde\n", cte="8bit")
data = m.as_bytes()
bin, cfg = sys.argv[1], sys.argv[2]
r = subprocess.run([bin, "sendmail", "-t", "-i", "-C", cfg], input=data)
r2 = subprocess.run([bin, "sendmail", "-i", "-f", "rails@example.com", "-C", cfg, "--", "dave@example.net"], input=data)
sys.stdout.buffer.write(data)
sys.exit(r.returncode or r2.returncode)
"#;
    let o = Command::new("python3")
        .args(["-c", script, BIN])
        .arg(&d.config)
        .output()
        .expect("python3");
    ok(&o);
    let sent = o.stdout;
    let got = up.wait_for_messages(2, WAIT).await;
    let t = got
        .iter()
        .find(|m| m.rcpts.len() == 2)
        .expect("the -t message");
    assert_eq!(t.rcpts, vec!["bob@example.net", "audit@example.org"]);
    assert_eq!(t.mail_from, "root@relayq.test");
    assert!(!t.text().contains("audit@example.org"), "Bcc removed");
    assert!(t.mail_params.contains("BODY=8BITMIME"), "{}", t.mail_params);
    // Intact: the message Python wrote, with CRLF, minus the Bcc line.
    let expected: Vec<u8> = String::from_utf8(sent.clone())
        .unwrap()
        .replace("Bcc: audit@example.org\n", "")
        .replace('\n', "\r\n")
        .into_bytes();
    assert!(t.data.ends_with(&expected), "{}", t.text());
    let r = got
        .iter()
        .find(|m| m.rcpts == vec!["dave@example.net"])
        .expect("the Rails-style message");
    assert_eq!(r.mail_from, "rails@example.com");
    assert!(
        r.text().contains(".\r\nEnde\r\n"),
        "-i keeps the dot line: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bsd_mailx_through_a_sendmail_symlink() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let rc = dir.path().join("mailrc");
    std::fs::write(&rc, format!("set sendmail={}\n", link.display())).unwrap();
    require_program("bsd-mailx", "bsd-mailx", "apt-get install -y bsd-mailx");
    let mut cmd = Command::new("bsd-mailx");
    cmd.args(["-s", "Subject via mailx", "bob@example.net"])
        .env("MAILRC", &rc)
        .env("HOME", dir.path())
        .env("RELAYQ_CONFIG", &d.config);
    let o = run(cmd, b"Hello from mailx\n.dotted line\n");
    ok(&o);
    let got = up.wait_for_messages(1, WAIT).await;
    let m = &got[0];
    assert_eq!(m.rcpts, vec!["bob@example.net"]);
    let text = m.text();
    assert!(text.contains("Subject: Subject via mailx\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nHello from mailx\r\n.dotted line\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_down_message_kept_then_delivered() {
    let up = FakeUpstream::start().await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    assert!(d.stop());
    let o = sendmail(
        &d.config,
        &["-v", "bob@example.net"],
        b"Subject: while down\n\nkept\n",
    );
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("queued as "), "{err}");
    assert!(err.contains("relayq is not running"), "{err}");
    assert_eq!(d.queued(), 1, "stored durably while the daemon is down");
    assert!(up.messages().is_empty());
    d.restart();
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(
        got[0]
            .text()
            .ends_with("Subject: while down\r\n\r\nkept\r\n")
    );
}

/// `sendmail` run by the spool's owner queues the message itself, then
/// tells the daemon. Killed in between (a PHP time limit, Ctrl-C, the OOM
/// killer), or unable to reach the daemon, it leaves the message in
/// queue/ where the running daemon never looked again: `mailq` listed it,
/// `queue flush` said "0 deferred", `queue requeue ID` said "no such
/// message", until the next restart. The daemon now takes up such files:
/// at `queue flush`, at `queue requeue ID`, and on its own once a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sendmail_queued_without_telling_the_daemon_is_not_stranded() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let sock = d.spool().join("control.sock");
    let away = d.spool().join("control.sock.away");
    let mut ids = Vec::new();
    for n in 0..2 {
        // The daemon cannot be told (as if sendmail died before it could).
        std::fs::rename(&sock, &away).unwrap();
        let o = sendmail(
            &d.config,
            &["-v", "bob@example.net"],
            format!("Subject: untold {n}\n\nqueued\n").as_bytes(),
        );
        std::fs::rename(&away, &sock).unwrap();
        ok(&o);
        let err = stderr(&o);
        let id = err
            .split("queued as ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("{err}"))
            .to_string();
        ids.push(id);
    }
    let list = String::from_utf8_lossy(&d.cli(&["queue", "list"]).stdout).into_owned();
    assert!(ids.iter().all(|id| list.contains(id.as_str())), "{list}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(up.messages().is_empty(), "sent without being told?");

    // requeue names one; flush takes the other.
    let o = d.cli(&["queue", "requeue", &ids[0]]);
    ok(&o);
    up.wait_for_messages(1, WAIT).await;
    let o = d.cli(&["queue", "flush"]);
    ok(&o);
    let got = up.wait_for_messages(2, WAIT).await;
    let mut subjects: Vec<String> = got.iter().map(crate::durability::subject).collect();
    subjects.sort();
    assert_eq!(subjects, vec!["untold 0", "untold 1"]);
    for id in &ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
        assert_eq!(d.count_log(&format!("{id}: uid=")), 1, "{}", d.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flag() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let c = &d.config;
    // -f and -r set the envelope sender; -F names the From: we add.
    ok(&sendmail(
        c,
        &["-f", "f@example.com", "-F", "Web Shop", "r1@example.net"],
        b"Subject: f\n\nx\n",
    ));
    ok(&sendmail(
        c,
        &["-rr@example.com", "r2@example.net"],
        b"From: Mine <mine@example.com>\nSubject: r\n\nx\n",
    ));
    // Without -i a lone dot ends the message; -i and -oi keep it.
    ok(&sendmail(
        c,
        &["r3@example.net"],
        b"Subject: dot\n\na\n.\nb\n",
    ));
    ok(&sendmail(
        c,
        &["-i", "r4@example.net"],
        b"Subject: i\n\na\n.\nb\n",
    ));
    ok(&sendmail(
        c,
        &["-oi", "r5@example.net"],
        b"Subject: oi\n\na\n.\nb\n",
    ));
    // -bm is the default mode; the ignored options are accepted.
    ok(&sendmail(
        c,
        &[
            "-bm",
            "-odi",
            "-odb",
            "-oem",
            "-oep",
            "-oQ/x",
            "-B",
            "8BITMIME",
            "-N",
            "never",
            "-R",
            "hdrs",
            "-V",
            "envid",
            "-X",
            "/dev/null",
            "r6@example.net",
        ],
        "Subject: 8bit\n\nGr\u{fc}\u{df}e\r\nbare lf\n".as_bytes(),
    ));
    // -v says what happened.
    let v = sendmail(c, &["-v", "r7@example.net"], b"Subject: v\n\nx\n");
    ok(&v);
    assert!(stderr(&v).contains("queued as "), "{}", stderr(&v));
    // A line too long for SMTP is re-encoded, not refused (PHP sends these).
    let mut long = b"Subject: long\n\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 1500));
    long.push(b'\n');
    ok(&sendmail(c, &["r8@example.net"], &long));
    let got = up.wait_for_messages(8, WAIT).await;
    let by = |r: &str| {
        got.iter()
            .find(|m| m.rcpts == vec![r.to_string()])
            .unwrap_or_else(|| panic!("{r} not received"))
            .clone()
    };
    let m = by("r1@example.net");
    assert_eq!(m.mail_from, "f@example.com");
    assert!(
        m.text().contains("\r\nFrom: Web Shop <f@example.com>\r\n"),
        "{}",
        m.text()
    );
    let m = by("r2@example.net");
    assert_eq!(m.mail_from, "r@example.com");
    assert!(m.text().contains("\r\nFrom: Mine <mine@example.com>\r\n"));
    assert_eq!(m.text().matches("From:").count(), 1);
    assert!(by("r3@example.net").data.ends_with(b"\r\n\r\na\r\n"));
    assert!(
        by("r4@example.net")
            .data
            .ends_with(b"\r\n\r\na\r\n.\r\nb\r\n")
    );
    assert!(
        by("r5@example.net")
            .data
            .ends_with(b"\r\n\r\na\r\n.\r\nb\r\n")
    );
    let m = by("r6@example.net");
    assert!(
        m.data
            .ends_with("\r\n\r\nGr\u{fc}\u{df}e\r\nbare lf\r\n".as_bytes()),
        "{}",
        m.text()
    );
    assert!(m.mail_params.contains("BODY=8BITMIME"), "{}", m.mail_params);
    assert!(!m.data.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    let m = by("r8@example.net");
    crate::support::mime::assert_conformant(&m.data);
    let decoded = crate::support::mime::decode(&m.data);
    assert_eq!(decoded.parts[0].cte, "quoted-printable");
    assert_eq!(
        decoded.parts[0].payload,
        [&vec![b'x'; 1500][..], b"\r\n"].concat()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_takes_recipients_from_headers_and_removes_bcc() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let msg = b"From: app@example.com\nTo: Alice <alice@example.com>, bob@example.net\nCc: carol@example.org\nBcc: hidden@example.org,\n  also-hidden@example.org\nSubject: t\n\nbody\n";
    ok(&sendmail(&d.config, &["-t", "extra@example.com"], msg));
    let got = up.wait_for_messages(1, WAIT).await;
    let m = &got[0];
    assert_eq!(
        m.rcpts,
        vec![
            "extra@example.com",
            "alice@example.com",
            "bob@example.net",
            "carol@example.org",
            "hidden@example.org",
            "also-hidden@example.org"
        ]
    );
    let text = m.text();
    assert!(!text.contains("Bcc") && !text.contains("hidden"), "{text}");
    assert!(text.ends_with("From: app@example.com\r\nTo: Alice <alice@example.com>, bob@example.net\r\nCc: carol@example.org\r\nSubject: t\r\n\r\nbody\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_follow_sysexits() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 2000\n",
    ));
    let c = &d.config;
    let code = |o: &Output| o.status.code();
    let o = sendmail(c, &["-Z", "a@example.com"], b"x\n");
    assert_eq!(code(&o), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("-Z"), "{}", stderr(&o));
    let o = sendmail(c, &[], b"Subject: x\n\nx\n");
    assert_eq!(code(&o), Some(64));
    assert!(stderr(&o).contains("no recipients"), "{}", stderr(&o));
    let o = sendmail(c, &["-t"], b"Subject: x\n\nx\n");
    assert_eq!(code(&o), Some(64));
    let o = sendmail(c, &["bad address@example..com"], b"x\n");
    assert_eq!(code(&o), Some(67), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("bad recipient address"),
        "{}",
        stderr(&o)
    );
    let o = sendmail(c, &["-t"], b"To: ok@example.com, a@b@c\n\nx\n");
    assert_eq!(code(&o), Some(67), "{}", stderr(&o));
    let big = vec![b'x'; 900];
    let mut input = b"Subject: big\n\n".to_vec();
    for _ in 0..4 {
        input.extend_from_slice(&big);
        input.push(b'\n');
    }
    let o = sendmail(c, &["a@example.com"], &input);
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("too big"), "{}", stderr(&o));
    let o = sendmail(c, &["a@example.com"], b"Subject: nul\n\na\0b\n");
    assert_eq!(code(&o), Some(65));
    // -bi (newaliases) has nothing to do and says so by succeeding.
    ok(&sendmail(c, &["-bi"], b""));
    let bad_config = d.dir.join("bad.toml");
    std::fs::write(&bad_config, "[smtp]\nnope = 1\n").unwrap();
    let o = sendmail(&bad_config, &["a@example.com"], b"x\n");
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    // An unwritable spool: its path goes through a regular file.
    let unwritable = d.dir.join("unwritable.toml");
    std::fs::write(
        &unwritable,
        "spool_dir = \"/dev/null/spool\"\n[capture]\nmaildir = \"/tmp/x\"\n",
    )
    .unwrap();
    let o = sendmail(&unwritable, &["a@example.com"], b"x\n");
    assert_eq!(code(&o), Some(73), "{}", stderr(&o));
    assert!(stderr(&o).contains("/dev/null/spool"), "{}", stderr(&o));
    // One line on stderr, named after the command.
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(stderr(&o).starts_with("sendmail: "));
    // Nothing of the refused attempts got queued or sent.
    assert!(up.messages().is_empty());
    assert_eq!(d.queued(), 0);
    if can_switch_user() {
        // A spool that no daemon has prepared (no maildrop, mode 0700):
        // root may write it, an ordinary user may not.
        open_to_others(&d);
        let fresh = d.dir.join("fresh.toml");
        std::fs::write(
            &fresh,
            format!(
                "spool_dir = \"{}\"\n[capture]\nmaildir = \"/tmp/x\"\n",
                d.dir.join("fresh-spool").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o644)).unwrap();
        ok(&sendmail(&fresh, &["a@example.com"], b"x\n"));
        let mut cmd = as_nobody(BIN);
        cmd.args(["sendmail", "-C"])
            .arg(&fresh)
            .arg("a@example.com");
        let o = run(cmd, b"x\n");
        assert_eq!(code(&o), Some(73), "{}", stderr(&o));
        assert!(stderr(&o).contains("maildrop"), "{}", stderr(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bs_speaks_smtp_on_stdin_and_stdout() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let dialogue = b"EHLO client.test\r\nMAIL FROM:<bs@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nSubject: bs\r\n\r\nvia -bs\r\n..dot\r\n.\r\nQUIT\r\n";
    let o = sendmail(&d.config, &["-bs"], dialogue);
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("220 relayq.test ESMTP"), "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as "), "{out}");
    assert!(out.trim_end().ends_with("221 2.0.0 Bye"), "{out}");
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].mail_from, "bs@example.com");
    assert!(
        got[0]
            .text()
            .starts_with("Received: by relayq.test (relayq, from userid 0)"),
        "{}",
        got[0].text()
    );
    assert!(
        got[0]
            .data
            .ends_with(b"Subject: bs\r\n\r\nvia -bs\r\n.dot\r\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bp_lists_and_q_flushes() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, ""));
    let o = sendmail(&d.config, &["-v", "bob@example.net"], b"Subject: q\n\nx\n");
    ok(&o);
    let id = stderr(&o)
        .split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("id")
        .to_string();
    d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    let o = sendmail(&d.config, &["-bp"], b"");
    ok(&o);
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        list.contains(&id) && list.contains("bob@example.net"),
        "{list}"
    );
    // `mailq` through a symlink says the same.
    let dir = tempfile::tempdir().unwrap();
    let mailq = dir.path().join("mailq");
    std::os::unix::fs::symlink(BIN, &mailq).unwrap();
    let o = Command::new(&mailq)
        .env("RELAYQ_CONFIG", &d.config)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), list);
    let up = FakeUpstream::start_on(addr).await.expect("upstream back");
    let o = sendmail(&d.config, &["-q"], b"");
    ok(&o);
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].text().contains("Subject: q\r\n"));
    d.wait_log(&format!("{id}: removed"), WAIT);
}

/// `[sendmail] trusted_users = []`: ordinary users may not choose the
/// envelope sender.
const RESTRICTED: &str = "[sendmail]\ntrusted_users = []\n";

/// Writes a drop file by hand into the daemon's maildrop, as `nobody`
/// (what a hostile user could do instead of running sendmail).
pub fn drop_as_nobody(d: &Daemon, name: &str, content: &str) {
    let drop = d.spool().join("maildrop");
    let o = as_nobody("sh")
        .args([
            "-c",
            &format!("printf '%s' \"$1\" > {}/{name}", drop.display()),
            "sh",
            content,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Writes a drop file holding `body` for `rcpt` by hand, as `nobody`
/// (bytes on stdin: `body` may be too big for an argument). `extra` are
/// header lines of the queue file (each ending in a LF), e.g. `dsn-envid`.
pub fn drop_message_as_nobody(d: &Daemon, name: &str, rcpt: &str, extra: &str, body: &[u8]) {
    let file = [
        format!(
            "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender nobody@relayq.test\nflags -\nrcpt {rcpt}\n{extra}size {}\n\n",
            body.len()
        )
        .as_bytes(),
        body,
        b"end\n",
    ]
    .concat();
    // Written under the unfinished name and renamed, as `sendmail` does:
    // a scan that meets the final name while `cat` still writes would
    // refuse a half-written file (seen as a flake under load, where the
    // daemon's start-up scan came late enough to meet it).
    let dir = d.spool().join("maildrop");
    let (tmp, path) = (dir.join(format!(".tmp.{name}")), dir.join(name));
    let mut cmd = as_nobody("sh");
    cmd.args([
        "-c",
        &format!("cat > {0} && mv {0} {1}", tmp.display(), path.display()),
    ]);
    let o = run(cmd, &file);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Wakes the pickup the way any local user can: by running sendmail
/// (for poke@example.net).
pub fn poke_pickup_as_nobody(d: &Daemon) {
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("poke@example.net");
    let o = run(cmd, b"Subject: poke\n\nx\n");
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Makes a test's directory and config reachable for `nobody`.
pub fn open_to_others(d: &Daemon) {
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_user_submits_through_the_maildrop() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    // The sender restriction, as an explicit option: only root and the
    // spool's owner may choose the sender.
    let mut d = Daemon::start(&relay_config(up.addr(), RESTRICTED));
    open_to_others(&d);
    let spool = d.dir.join("spool");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&spool), 0o711);
    assert_eq!(mode(&spool.join("queue")), 0o700);
    assert_eq!(mode(&spool.join("maildrop")), 0o1733);

    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-f", "ceo@bank.example", "-C"])
        .arg(&d.config)
        .arg("bob@example.net");
    let o = run(cmd, b"Subject: from nobody\n\nhello\n");
    ok(&o);
    assert!(
        stderr(&o).contains("-f <ceo@bank.example> ignored"),
        "{}",
        stderr(&o)
    );
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].mail_from, "nobody@relayq.test", "sender forced");
    assert!(
        got[0]
            .text()
            .starts_with("Received: by relayq.test (relayq, from userid 65534)"),
        "{}",
        got[0].text()
    );
    assert!(
        got[0]
            .text()
            .ends_with("Subject: from nobody\r\n\r\nhello\r\n")
    );

    // -bs as nobody: the SMTP sender is forced the same way.
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
    let o = run(
        cmd,
        b"HELO x\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<dave@example.net>\r\nDATA\r\nSubject: bs as nobody\r\n\r\nx\r\n.\r\nQUIT\r\n",
    );
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("250 2.0.0 Ok: queued as "),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let got = up.wait_for_messages(2, WAIT).await;
    assert_eq!(got[1].rcpts, vec!["dave@example.net"]);
    assert_eq!(got[1].mail_from, "nobody@relayq.test");

    // Nobody cannot look into the queue or the maildrop.
    for dir in ["queue", "maildrop"] {
        let o = as_nobody("ls").arg(spool.join(dir)).output().unwrap();
        assert!(!o.status.success(), "nobody could list {dir}/");
    }

    // With the daemon down the drop file waits; the daemon picks it up.
    assert!(d.stop());
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("carol@example.net");
    let o = run(cmd, b"Subject: while down\n\nlater\n");
    ok(&o);
    let waiting = std::fs::read_dir(spool.join("maildrop")).unwrap().count();
    assert_eq!(waiting, 1);
    let mark = d.log_mark();
    d.restart();
    let got = up.wait_for_messages(3, WAIT).await;
    assert!(got[2].text().contains("Subject: while down\r\n"));
    assert_eq!(got[2].rcpts, vec!["carol@example.net"]);
    d.wait_log_since(mark, "uid=65534 (nobody), from=<nobody@relayq.test>", WAIT);
    assert_eq!(
        std::fs::read_dir(spool.join("maildrop")).unwrap().count(),
        0
    );
}

/// What a crash in the middle of the pickup leaves in `pickup/`
/// (durability rule 6 of the spool; the real crashes, at each step, are
/// `powerloss::lazyfs_pickup_crash_delivers_each_drop_file_once`): a drop
/// file moved there whose message was committed goes at the next start,
/// and the message is sent once; one whose message was not goes back to
/// the maildrop (listed by mailq meanwhile) and is sent once; one whose
/// message `relayq queue delete` deleted meanwhile (daemon stopped) goes
/// with it, and is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_files_a_crash_left_in_pickup_are_delivered_once() {
    use crate::support::upstream::Script;
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start_with(Script::default().mail_reply(451, "4.3.0 down for the test"))
        .await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    open_to_others(&d);
    let spool = d.spool();
    let only_entry = |dir: &str| {
        let names: Vec<String> = std::fs::read_dir(spool.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{dir}: {names:?}");
        names[0].clone()
    };
    let config = d.config.clone();
    let send_to = |rcpt: &str, subject: &str| {
        let o = as_nobody_uid(
            65534,
            &config,
            &[rcpt],
            format!("Subject: {subject}\n\nonce\n").as_bytes(),
        );
        ok(&o);
    };
    let send = |subject: &str| send_to("carol@example.net", subject);
    // Committed: queued (the upstream defers it), then its drop file put
    // back into pickup/ under its id, as a crash before the removal left it.
    send("committed");
    let line = d.wait_log("to=<carol@example.net>", WAIT);
    assert!(line.contains("status=deferred"), "{line}");
    let queued = only_entry("queue");
    // The same, for a message deleted below.
    send_to("dave@example.net", "deleted");
    let line = d.wait_log("to=<dave@example.net>", WAIT);
    assert!(line.contains("status=deferred"), "{line}");
    assert!(d.stop());
    let deleted = std::fs::read_dir(spool.join("queue"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| *n != queued)
        .unwrap();
    for (rcpt, subject, id) in [
        ("carol@example.net", "committed", &queued),
        ("dave@example.net", "deleted", &deleted),
    ] {
        send_to(rcpt, subject);
        std::fs::rename(
            spool.join("maildrop").join(only_entry("maildrop")),
            spool.join("pickup").join(id),
        )
        .unwrap();
    }
    ok(&d.cli(&["queue", "delete", &deleted]));
    assert!(!spool.join("pickup").join(&deleted).exists());
    // Not committed: moved to pickup/ under a fresh id, nothing queued.
    send("not committed");
    let fresh = "01M8KR32M2CWMS496RFBW5448A";
    std::fs::rename(
        spool.join("maildrop").join(only_entry("maildrop")),
        spool.join("pickup").join(fresh),
    )
    .unwrap();
    let o = sendmail(&d.config, &["-bp"], b"");
    ok(&o);
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        list.contains(&queued) && list.contains(fresh) && list.contains("waiting in the maildrop"),
        "mailq lists the queued message and the drop file, each once:\n{list}"
    );
    assert_eq!(list.matches("carol@example.net").count(), 2, "{list}");
    assert!(!list.contains("dave@example.net"), "{list}");

    up.set_script(Script::default());
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "were being queued when relayq stopped", WAIT);
    assert!(
        line.contains("2 drop file(s)")
            && line.contains("1 had been queued")
            && line.contains("1 had not"),
        "{line}"
    );
    d.flush();
    let got = up.wait_for_messages(2, WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    while ["maildrop", "pickup", "queue"]
        .iter()
        .any(|dir| std::fs::read_dir(spool.join(dir)).unwrap().count() > 0)
    {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(d.stop());
    let mut subjects: Vec<String> = up
        .messages()
        .iter()
        .map(crate::durability::subject)
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["committed", "not committed"], "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_maildrop_entries_are_refused() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), RESTRICTED));
    open_to_others(&d);
    let drop = d.dir.join("spool").join("maildrop");
    // A hand-made drop file claiming another sender, and a symlink to a
    // file nobody may not read, both written as nobody.
    let forged = String::from(
        "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender ceo@bank.example\nflags -\nrcpt victim@example.net\nsize 22\n\nSubject: forged\r\n\r\nx\r\nend\n",
    );
    let script = format!(
        "printf '%s' \"$1\" > {d}/01BBBBBBBBBBBBBBBBBBBBBBBB && ln -s /etc/shadow {d}/01CCCCCCCCCCCCCCCCCCCCCCCC && printf junk > {d}/01DDDDDDDDDDDDDDDDDDDDDDDD",
        d = drop.display()
    );
    let o = as_nobody("sh")
        .args(["-c", &script, "sh", &forged])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Any sendmail run pokes the pickup.
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("bob@example.net");
    ok(&run(cmd, b"Subject: legit\n\nx\n"));
    let got = up.wait_for_messages(2, WAIT).await;
    let forged = got
        .iter()
        .find(|m| m.text().contains("Subject: forged"))
        .expect("forged file queued");
    assert_eq!(forged.mail_from, "nobody@relayq.test");
    d.wait_log("a symbolic link", WAIT);
    d.wait_log("kept as corrupt/maildrop/", WAIT);
    assert_eq!(std::fs::read_dir(&drop).unwrap().count(), 0);
    assert!(!up.messages().iter().any(|m| m.text().contains("root:")));
}
