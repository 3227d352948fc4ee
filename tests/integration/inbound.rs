//! Inbound security (issue 3): never an open relay, STARTTLS and AUTH for
//! clients on other hosts, and the connection and header limits.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::support::client::Client;
use crate::support::daemon::{BIN, Daemon, hash_password};

const WAIT: Duration = Duration::from_secs(20);

/// A capture config where only 127.0.0.2 may relay without AUTH, so a
/// client on 127.0.0.1 plays "a host outside the allowed networks".
fn config(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "hostname = \"relayq.test\"\n[capture]\nmaildir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"127.0.0.2/32\"]\n{extra}\n",
        dir.join("Maildir").display()
    )
}

fn captured(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("Maildir/new"))
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_allow_networks_cannot_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &config(tmp.path(), ""));

    let (mut c, _) = Client::connect_from("127.0.0.1", d.addr).await;
    c.cmd("EHLO outsider.test").await;
    assert!(
        c.cmd("MAIL FROM:<spammer@example.com>")
            .await
            .starts_with("250")
    );
    let r = c.cmd("RCPT TO:<victim@example.net>").await;
    assert_eq!(r, "554 5.7.1 <victim@example.net>: Relay access denied");
    assert!(
        c.cmd("DATA").await.starts_with("503"),
        "no recipient, no DATA"
    );
    let line = d.wait_log("Relay access denied", WAIT);
    assert!(
        line.contains("RCPT from [127.0.0.1]") && line.contains("not in smtp.allow_networks"),
        "{line}"
    );

    let (mut c, _) = Client::connect_from("127.0.0.2", d.addr).await;
    c.cmd("EHLO insider.test").await;
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: ok\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    d.wait_log("status=sent", WAIT);
    let got = captured(tmp.path());
    assert_eq!(got.len(), 1, "only the allowed client's mail was accepted");
    assert!(got[0].contains("Delivered-To: bob@example.net"));
}

#[test]
fn a_listener_on_other_hosts_needs_a_relay_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("relayq.toml");
    std::fs::write(
        &path,
        "[smtp]\nlisten = [\"0.0.0.0:2525\"]\n[capture]\nmaildir = \"/tmp/x\"\n",
    )
    .unwrap();
    for cmd in ["check-config", "serve"] {
        let out = Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted an open listener");
        assert!(
            err.contains("smtp.listen")
                && err.contains("allow_networks")
                && err.contains("auth_users_file"),
            "{err}"
        );
    }
    std::fs::write(
        &path,
        "[smtp]\nallow_networks = [\"0.0.0.0/0\"]\n[capture]\nmaildir = \"/tmp/x\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("open relay"));
}

/// Python's smtplib as the remote client: STARTTLS, then AUTH, then mail.
fn python_send(addr: SocketAddr, user: Option<(&str, &str)>, starttls: bool) -> (bool, String) {
    let login = match user {
        Some((u, p)) => format!("s.login({u:?}, {p:?})"),
        None => String::new(),
    };
    let tls = if starttls {
        "ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE; s.starttls(context=ctx); s.ehlo()"
    } else {
        ""
    };
    let script = format!(
        "import smtplib, ssl\ns = smtplib.SMTP('127.0.0.1', {port}, local_hostname='remote.test')\ns.ehlo()\n{tls}\n{login}\ns.sendmail('app@example.com', ['bob@example.net'], 'Subject: over tls\\r\\n\\r\\nsecret body\\r\\n')\ns.quit()\n",
        port = addr.port()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 must be installed (CI installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_clients_relay_after_starttls_and_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["relayq.test".to_string()]).unwrap();
    std::fs::write(tmp.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(tmp.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(
        tmp.path().join("users"),
        format!("alice:{}\n", hash_password("correct horse")),
    )
    .unwrap();
    let extra = format!(
        "tls_cert = \"{0}/cert.pem\"\ntls_key = \"{0}/key.pem\"\nauth_users_file = \"{0}/users\"\n",
        tmp.path().display()
    );
    let d = Daemon::start_in(tmp.path(), &config(tmp.path(), &extra));

    // In clear text: STARTTLS offered, AUTH not, and AUTH refused.
    let (mut c, _) = Client::connect(d.addr).await;
    let ehlo = c.cmd("EHLO remote.test").await;
    assert!(
        ehlo.contains("250-STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let r = c.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=").await;
    assert!(r.starts_with("538 5.7.11"), "{r}");

    let (ok, err) = python_send(d.addr, Some(("alice", "wrong")), true);
    assert!(!ok && err.contains("535"), "wrong password: {err}");
    let (ok, err) = python_send(d.addr, None, true);
    assert!(
        !ok && err.contains("554") && err.contains("Relay access denied"),
        "no AUTH: {err}"
    );
    let (ok, err) = python_send(d.addr, Some(("alice", "correct horse")), false);
    assert!(
        !ok && err.contains("AUTH"),
        "AUTH without TLS must not be possible: {err}"
    );
    assert!(captured(tmp.path()).is_empty());

    let (ok, err) = python_send(d.addr, Some(("alice", "correct horse")), true);
    assert!(ok, "STARTTLS + AUTH: {err}");
    d.wait_log("status=sent", WAIT);
    let got = captured(tmp.path());
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("secret body"));
    let log = d.log();
    assert!(
        log.contains("sasl_method=PLAIN, sasl_username=alice"),
        "{log}"
    );
    assert!(
        log.contains("authentication failed for user alice"),
        "{log}"
    );
    assert!(
        !log.contains("correct horse") && !log.contains("wrong"),
        "a password reached the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_connection_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(
        tmp.path(),
        &config(tmp.path(), "max_connections_per_ip = 2\n"),
    );
    let (_a, g1) = Client::connect_from("127.0.0.1", d.addr).await;
    let (_b, g2) = Client::connect_from("127.0.0.1", d.addr).await;
    assert!(g1.starts_with("220") && g2.starts_with("220"));
    let (_c, g3) = Client::connect_from("127.0.0.1", d.addr).await;
    assert_eq!(
        g3,
        "421 4.7.0 relayq.test Error: too many connections from 127.0.0.1"
    );
    // Trusted networks are exempt.
    let mut trusted = Vec::new();
    for _ in 0..4 {
        let (c, g) = Client::connect_from("127.0.0.2", d.addr).await;
        assert!(g.starts_with("220"), "{g}");
        trusted.push(c);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_size_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(
        tmp.path(),
        &config(tmp.path(), "max_header_size = \"1KB\"\n"),
    );
    let (mut c, _) = Client::connect_from("127.0.0.2", d.addr).await;
    c.cmd("EHLO app.test").await;
    // One field of 2 KB (folded over many lines) is over the limit...
    let mut big = String::from("X-SMTPAPI: {\"to\": [");
    for i in 0..40 {
        big.push_str(&format!(
            "\r\n \"user{i:03}@example.com{}\",",
            "x".repeat(20)
        ));
    }
    big.push_str("]}\r\n\r\nbody\r\n");
    let r = c
        .mail("app@example.com", &["bob@example.net"], big.as_bytes())
        .await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // ...many small fields that add up to more are not (the limit is per
    // field, Postfix's header_size_limit).
    let mut many = String::new();
    for i in 0..40 {
        many.push_str(&format!("X-Filler-{i}: {}\r\n", "x".repeat(40)));
    }
    many.push_str("\r\nbody\r\n");
    let r = c
        .mail("app@example.com", &["bob@example.net"], many.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    // A big body with small headers is fine.
    let body = format!(
        "Subject: small header\r\n\r\n{}\r\n",
        "y".repeat(900).repeat(3).replace("yyy", "yy\r\n")
    );
    let r = c
        .mail("app@example.com", &["bob@example.net"], body.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
}
