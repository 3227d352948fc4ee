//! `relayq check` against the fake upstream, in each failure mode (down,
//! not SMTP, 5xx greeting, no STARTTLS, bad certificate, bad password):
//! the right FAIL line, and exit code 1; and all `ok`
//! with exit code 0 when the config is right, including a real test
//! message with `--send-to`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Script};

struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Checked {
    /// The line of the check `name` ("tcp", "tls", ...).
    fn line(&self, name: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| {
                l.strip_prefix("ok   ")
                    .or_else(|| l.strip_prefix("FAIL "))
                    .is_some_and(|r| r.starts_with(&format!("{name}:")))
            })
            .unwrap_or_else(|| panic!("no {name} line in:\n{}", self.stdout))
    }

    fn has(&self, name: &str) -> bool {
        self.stdout
            .lines()
            .any(|l| l.contains(&format!(" {name}: ")) || l.starts_with(&format!("{name}:")))
    }

    /// Exactly one FAIL line, for `name`; returns it.
    fn only_failure(&self, name: &str) -> &str {
        let fails: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.starts_with("FAIL "))
            .collect();
        assert_eq!(fails.len(), 1, "one failure expected:\n{}", self.stdout);
        assert!(
            fails[0].starts_with(&format!("FAIL {name}: ")),
            "{name} should fail:\n{}",
            self.stdout
        );
        assert_eq!(self.code, 1, "exit code: {}", self.stderr);
        assert!(
            fails[0].contains(" -> fix: "),
            "says what to change: {}",
            fails[0]
        );
        fails[0]
    }
}

/// Writes a config in `dir` relaying to `upstream` with `tls`, listening on
/// a free loopback port.
fn write_config(dir: &Path, upstream: SocketAddr, tls: &str, extra: &str) -> PathBuf {
    let path = dir.join("relayq.toml");
    std::fs::write(
        &path,
        format!(
            "hostname = \"relayq.test\"\nspool_dir = \"{}\"\n{extra}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[relay]\nhost = \"{}\"\nport = {}\ntls = \"{tls}\"\nconnect_timeout = \"3s\"\ncommand_timeout = \"5s\"\n",
            dir.join("spool").display(),
            upstream.ip(),
            upstream.port()
        ),
    )
    .unwrap();
    path
}

async fn check(config: &Path, extra_args: &[&str]) -> Checked {
    let out = tokio::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(extra_args)
        .output()
        .await
        .expect("run relayq check");
    Checked {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_ok_exits_zero() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let c = check(&config, &[]).await;
    assert_eq!(c.code, 0, "{}\n{}", c.stdout, c.stderr);
    assert!(!c.stdout.contains("FAIL"), "{}", c.stdout);
    for name in [
        "config",
        "spool",
        "listen 127.0.0.1:0",
        "dns",
        "tcp",
        "greeting",
        "ehlo",
        "tls",
        "auth",
    ] {
        assert!(c.line(name).starts_with("ok   "), "{}", c.stdout);
    }
    assert!(c.line("dns").contains("127.0.0.1 is an IP address"));
    assert!(
        c.line("greeting").contains("220 fake.upstream.test ESMTP"),
        "{}",
        c.stdout
    );
    let ehlo = c.line("ehlo");
    for cap in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"] {
        assert!(ehlo.contains(cap), "{ehlo}");
    }
    assert!(c.line("tls").contains("clear text"), "{}", c.stdout);
    assert!(
        c.line("spool").contains("creates it with mode 0700"),
        "{}",
        c.stdout
    );
    // Nothing was sent without --send-to.
    assert!(up.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_delivers_a_test_message_and_prints_the_reply() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let c = check(
        &config,
        &["--send-to", "ops@example.net", "--from", "app@example.com"],
    )
    .await;
    assert_eq!(c.code, 0, "{}\n{}", c.stdout, c.stderr);
    let got = up.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].mail_from, "app@example.com");
    assert_eq!(got[0].rcpts, ["ops@example.net"]);
    assert!(
        got[0]
            .text()
            .contains("Subject: relayq check: test message from relayq.test")
    );
    // The upstream's reply, verbatim, with its own message id.
    let send = c.line("send");
    assert!(
        send.starts_with("ok   ")
            && send.ends_with(&format!("250 2.0.0 Ok: queued as {}", got[0].queue_id)),
        "{send}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_a_refused_recipient_fails_with_the_reply() {
    let up = FakeUpstream::start_with(Script::default().rcpt(
        "nobody@example.net",
        550,
        "5.1.1 <nobody@example.net>: Recipient address rejected",
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let c = check(&config, &["--send-to", "nobody@example.net"]).await;
    let line = c.only_failure("send");
    assert!(
        line.contains("550 5.1.1 <nobody@example.net>: Recipient address rejected"),
        "{line}"
    );
    assert!(up.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), addr, "none", "");
    let c = check(&config, &[]).await;
    let line = c.only_failure("tcp");
    assert!(
        line.contains(&format!("connect to {addr} failed")),
        "{line}"
    );
    assert!(line.contains("Connection refused"), "{line}");
    assert!(line.contains("relay.port"), "{line}");
    assert!(c.line("dns").starts_with("ok"));
    // Nothing is claimed about steps that could not run.
    assert!(!c.has("ehlo") && !c.has("auth"), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_port_not_smtp() {
    // Something that is not a mail server, e.g. a web server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), addr, "none", "");
    let c = check(&config, &[]).await;
    let line = c.only_failure("greeting");
    assert!(line.contains("not an SMTP server"), "{line}");
    assert!(line.contains("HTTP/1.1 400 Bad Request"), "{line}");
    assert!(line.contains("587") && line.contains("465"), "{line}");
    assert!(c.line("tcp").starts_with("ok"));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_5xx() {
    let up = FakeUpstream::start_with(
        Script::default().greeting(554, "5.7.1 fake.upstream.test: access denied for your IP"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let c = check(&config, &[]).await;
    let line = c.only_failure("greeting");
    assert!(
        line.contains("554 5.7.1 fake.upstream.test: access denied for your IP"),
        "{line}"
    );
    assert!(line.contains("IP address"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_not_offered() {
    // The fake upstream does not offer STARTTLS.
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "starttls", "");
    let c = check(&config, &[]).await;
    let line = c.only_failure("tls");
    assert!(line.contains("does not offer STARTTLS"), "{line}");
    assert!(
        line.contains("(tls = \"starttls\" is configured)"),
        "{line}"
    );
    // What the server does offer, so the operator sees STARTTLS missing.
    let ehlo = c.line("ehlo");
    assert!(
        ehlo.starts_with("ok") && ehlo.contains("PIPELINING"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    // No mail transaction was started in clear text.
    assert!(
        up.commands()
            .iter()
            .all(|c| !c.contains("MAIL FROM") && !c.contains("AUTH")),
        "{:?}",
        up.commands()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relayq.toml");
    std::fs::write(&path, "[relay]\nhost = \"127.0.0.1\"\nport = \"twenty\"\n").unwrap();
    let c = check(&path, &[]).await;
    let line = c.only_failure("config");
    assert!(line.contains("line 3") && line.contains("port"), "{line}");
    assert_eq!(c.stdout.lines().count(), 1, "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_writable_by_others() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let c = check(&config, &[]).await;
    let line = c.only_failure("spool");
    assert!(
        line.contains("mode 0777") && line.contains("chmod 700"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_port_taken_by_another_mta() {
    let up = FakeUpstream::start().await;
    // Another MTA holds the port we are configured to listen on.
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = other.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = other.accept().await {
            let _ = s
                .write_all(b"220 mail.example ESMTP Postfix (Debian)\r\n")
                .await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), up.addr(), "none", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", &taken.to_string());
    std::fs::write(&config, text).unwrap();
    let c = check(&config, &[]).await;
    let line = c.only_failure(&format!("listen {taken}"));
    assert!(line.contains("ESMTP Postfix"), "{line}");
    assert!(line.contains("smtp.listen"), "{line}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_relayq_is_recognised() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    // The daemon's own ports, as the operator would configure them.
    let status = crate::support::http::status_addr(&d);
    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("127.0.0.1:0\"]", &format!("{}\"]", d.addr))
        .replace(
            "status_listen = \"127.0.0.1:0\"",
            &format!("status_listen = \"{status}\""),
        );
    let config = d.dir.join("check.toml");
    std::fs::write(&config, text).unwrap();
    let c = check(&config, &[]).await;
    assert_eq!(c.code, 0, "{}\n{}", c.stdout, c.stderr);
    let listen = c.line(&format!("listen {}", d.addr));
    assert!(listen.contains("a running relayq answers"), "{listen}");
    let status = c.line(&format!("status_listen {status}"));
    assert!(
        status.contains("a running relayq answers /healthz"),
        "{status}"
    );
}

/// A config for a TLS relay on the fake upstream, with `relay_extra` lines
/// in the `[relay]` section.
fn write_tls_config(dir: &Path, upstream: SocketAddr, relay_extra: &str) -> PathBuf {
    let path = write_config(dir, upstream, "starttls", "");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(relay_extra);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate() {
    use crate::support::pki::{CertKind, TestCa};
    use crate::support::upstream::UpstreamTls;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let cert = ca.server_cert(CertKind::SelfSigned);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, Script::default()).await;
    let config = write_tls_config(
        dir.path(),
        up.addr(),
        &format!("ca_file = \"{}\"\n", ca.ca_file.display()),
    );
    let c = check(&config, &[]).await;
    let line = c.only_failure("tls");
    assert!(line.contains("certificate verification failed"), "{line}");
    assert!(
        line.contains("ca_file"),
        "the fix names the key to change: {line}"
    );
    // With the right certificate the same config passes.
    let good = ca.server_cert(CertKind::Good);
    up.set_tls(UpstreamTls::StartTls, &good);
    let c = check(&config, &[]).await;
    assert_eq!(c.code, 0, "{}", c.stdout);
    assert!(c.line("tls").contains("TLSv1."), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_password() {
    use crate::support::pki::{CertKind, TestCa};
    use crate::support::upstream::UpstreamTls;
    const SECRET: &str = "Wrong-Pass-9f1e";
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let cert = ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(
        UpstreamTls::StartTls,
        &cert,
        Script::default().require_auth("apikey", "the-right-one"),
    )
    .await;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = write_tls_config(
        dir.path(),
        up.addr(),
        &format!(
            "ca_file = \"{}\"\nusername = \"apikey\"\npassword_file = \"{}\"\n",
            ca.ca_file.display(),
            secret.display()
        ),
    );
    let c = check(&config, &[]).await;
    let line = c.only_failure("auth");
    assert!(line.contains("535"), "the upstream's rejection: {line}");
    assert!(c.line("tls").starts_with("ok"), "{}", c.stdout);
    assert!(
        !c.stdout.contains(SECRET) && !c.stderr.contains(SECRET),
        "the password was printed:\n{}\n{}",
        c.stdout,
        c.stderr
    );
}

/// `check` predicts `serve`: as a user without CAP_NET_BIND_SERVICE, a
/// privileged listen port fails the check, and `serve` indeed cannot bind
/// it; with the capability (as dist/relayq.service grants it) both pass.
/// Each run is in a fresh network namespace, where unprivileged ports
/// start at 1024 whatever this machine says.
#[test]
fn check_says_fail_where_serve_cannot_listen() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    if !crate::sendmail::can_switch_user() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.join("relayq");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let config = dir.join("relayq.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"relayq.test\"\nspool_dir = \"{h}/spool\"\n[smtp]\nlisten = [\"127.0.0.1:26\"]\n[capture]\nmaildir = \"{h}/Maildir\"\n",
            h = home.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    // setpriv to nobody, with CAP_NET_BIND_SERVICE or without.
    let nobody = |cap: bool, args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        if cap {
            c.args([
                "--inh-caps=+net_bind_service",
                "--ambient-caps=+net_bind_service",
            ]);
        }
        c.arg("--")
            .arg(crate::sendmail::nobody_bin())
            .args(args)
            .arg("--config")
            .arg(&config);
        crate::support::netns::isolate(&mut c);
        c
    };
    let listen_line = |out: &str| {
        out.lines()
            .find(|l| l.contains(" listen 127.0.0.1:26: "))
            .unwrap_or_else(|| panic!("no listen line:\n{out}"))
            .to_string()
    };
    // Runs `serve` until it says it started (true) or exits (false).
    let serves = |mut c: Command| -> (bool, String) {
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        let started = loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap_or(0);
            log.push_str(&line);
            if line.contains("started:") {
                break true;
            }
            if n == 0 {
                break false;
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        (started, log)
    };

    let o = nobody(false, &["check"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = listen_line(&out);
    assert!(
        line.starts_with("FAIL listen 127.0.0.1:26: port 26 is privileged")
            && line.contains("uid 65534, without CAP_NET_BIND_SERVICE, net.ipv4.ip_unprivileged_port_start = 1024")
            && line.contains(" -> fix: ")
            && line.contains("CAP_NET_BIND_SERVICE"),
        "{line}"
    );
    assert_eq!(o.status.code(), Some(1), "{out}");
    let (started, log) = serves(nobody(false, &["serve"]));
    assert!(!started && log.contains("Permission denied"), "{log}");

    let o = nobody(true, &["check"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = listen_line(&out);
    assert!(
        line.starts_with("ok   listen 127.0.0.1:26: ") && line.contains("the port is free"),
        "{line}"
    );
    assert_eq!(o.status.code(), Some(0), "{out}");
    let (started, log) = serves(nobody(true, &["serve"]));
    assert!(started, "{log}");
}

/// A config file `check` cannot read, or none at all without a home for
/// the development default, fails with a fix for that, not the advice for
/// a typo ("correct the key named above").
#[test]
fn an_unreadable_config_is_not_a_typo() {
    use std::os::unix::fs::PermissionsExt;

    if !crate::sendmail::can_switch_user() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = tmp.path().join("relayq.toml");
    std::fs::write(&config, "hostname = \"relayq.test\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = crate::sendmail::as_nobody(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = out.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("FAIL config: cannot read config file")
            && line.contains("Permission denied"),
        "{line}"
    );
    let fix = line.split(" -> fix: ").nth(1).unwrap_or_default();
    assert!(
        fix.contains("chmod 644") && !fix.contains("key named above"),
        "{fix}"
    );

    let o = std::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(tmp.path().join("missing.toml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let fix = out.split(" -> fix: ").nth(1).unwrap_or_default();
    assert!(
        out.starts_with("FAIL config: cannot read config file") && fix.contains("path"),
        "{out}"
    );

    if !std::path::Path::new("/etc/relayq/relayq.toml").exists() {
        let o = std::process::Command::new(BIN)
            .arg("check")
            .env_clear()
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let fix = out.split(" -> fix: ").nth(1).unwrap_or_default();
        assert!(fix.contains("set HOME") && !fix.contains("key"), "{out}");
    }
}

/// A spool that `relayq serve` made as root (the README's `sudo relayq
/// serve`), then handed to the service's user by its top directory only
/// (as `dist/install.sh` did): the daemon cannot open `queue/` and the
/// rest, so `check` run as that user must fail it, as `serve` fails.
#[test]
fn check_fails_a_spool_whose_insides_belong_to_another_user() {
    use std::process::Stdio;

    if !crate::sendmail::can_switch_user() {
        return;
    }
    let mut d = Daemon::start(&relay_config("127.0.0.1:9".parse().unwrap(), ""));
    crate::sendmail::open_to_others(&d);
    let o = crate::sendmail::sendmail(&d.config, &["a@example.net"], b"Subject: x\n\nx\n");
    assert!(o.status.success(), "{}", crate::sendmail::stderr(&o));
    assert!(d.stop());
    let spool = d.spool();
    std::os::unix::fs::chown(&spool, Some(65534), Some(65534)).unwrap();

    let as_nobody = |args: &[&str]| {
        let mut c = crate::sendmail::as_nobody(BIN);
        c.args(args).arg("--config").arg(&d.config);
        c
    };
    let o = as_nobody(&["check"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = out
        .lines()
        .find(|l| l.contains(" spool: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAIL spool: ")
            && line.contains("belongs to uid 0")
            && line.contains(&format!(
                "chown nobody: {s} {s}/* {s}/corrupt/maildrop && chown -R nobody: {s}/queue {s}/hold {s}/slots {s}/tmp",
                s = spool.display()
            )),
        "{line}"
    );
    assert_eq!(o.status.code(), Some(1), "{out}");
    let o = as_nobody(&["serve"]).stdin(Stdio::null()).output().unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "serve fails as check says: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // What the fix says makes both work.
    let fix = line
        .split(" -> fix: while relayq is stopped, ")
        .nth(1)
        .unwrap();
    let fix = fix.split("; or run").next().unwrap();
    let o = std::process::Command::new("sh")
        .args(["-c", fix])
        .output()
        .unwrap();
    assert!(o.status.success(), "{fix}: {o:?}");
    let o = as_nobody(&["check"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.lines().any(|l| l.starts_with("ok   spool: ")), "{out}");

    // Only corrupt/maildrop/ left to root: the pickup could keep no
    // refused drop file there, so check names it.
    let kept = spool.join("corrupt/maildrop");
    std::os::unix::fs::chown(&kept, Some(0), Some(0)).unwrap();
    let o = as_nobody(&["check"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.lines().any(|l| l.starts_with("FAIL spool: ")
            && l.contains(&format!("{} belongs to uid 0", kept.display()))),
        "{out}"
    );
}
