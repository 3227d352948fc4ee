//! Passwords: a wrong one keeps mail queued and is logged (without the
//! secret) once per attempt; the secret never shows in logs or
//! `check-config`; `password_env` works; a readable `password_file` is
//! warned about; clear text to a remote relay is refused before start.

use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::*;
use crate::support::daemon::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_keeps_mail_queued_and_is_never_shown() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(
        UpstreamTls::StartTls,
        &cert,
        Script::default().require_auth(USER, "the-right-one"),
    )
    .await;
    let lines = format!("{}{}", ca_line(&f), password_file_lines(&f));
    // The most verbose log there is: a secret must not leak at any level.
    let d = Daemon::start_in_with_env(
        f.path(),
        &config(&up, "starttls", &lines),
        &[("RELAYQ_LOG", "trace")],
    );
    let id = send(&d, 1).await;
    let relay = format!("relay {}", relay_name(&up));
    let rejected = "authentication rejected: 535 5.7.8 Authentication credentials invalid";
    let errors = wait_lines(&d, &[&relay, rejected], 1).await;
    assert!(
        errors[0].contains("ERROR"),
        "an error, not a warning: {}",
        errors[0]
    );
    let deferred = status_line(&d, &id, "deferred", 1).await;
    assert!(deferred.contains("535 5.7.8"), "{deferred}");

    d.flush();
    status_line(&d, &id, "deferred", 2).await;
    // Once per attempt: two attempts, two error lines, two logins.
    assert_eq!(wait_lines(&d, &[&relay, rejected], 2).await.len(), 2);
    let auths = up.auths();
    assert_eq!(auths.len(), 2, "{auths:?}");
    assert!(auths.iter().all(|a| a.tls && !a.ok && a.username == USER));
    assert_secrets_only_over_tls(&up);
    assert!(up.messages().is_empty());
    assert_still_queued(&d, &id);

    // The secret in any form relayq could have written it.
    let plain_blob = BASE64.encode(format!("\0{USER}\0{PASSWORD}"));
    let forms = [PASSWORD.to_string(), BASE64.encode(PASSWORD), plain_blob];
    let log = d.log();
    assert!(log.lines().count() > 10, "trace log captured: {log}");
    for form in &forms {
        assert!(
            !log.contains(form.as_str()),
            "secret form {form:?} in the log:\n{log}"
        );
    }
    for args in [
        &["check-config"][..],
        &["queue", "list"][..],
        &["queue", "list", "--json"][..],
    ] {
        let out = d.cli(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        for form in &forms {
            assert!(
                !text.contains(form.as_str()),
                "{args:?} shows the secret: {text}"
            );
        }
    }
}

#[test]
fn check_config_never_prints_an_inline_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    let relay = format!(
        "username = \"{USER}\"\npassword = \"{PASSWORD}\"\nca_file = \"/nonexistent/ca.pem\"\n"
    );
    std::fs::write(&good, config_for("127.0.0.1", 2587, "starttls", &relay)).unwrap();
    // Two sources for one secret: refused, and the message must not quote it.
    let both = format!("{relay}password_env = \"RELAYQ_PW\"\n");
    std::fs::write(&bad, config_for("127.0.0.1", 2587, "starttls", &both)).unwrap();
    for (path, ok) in [(&good, true), (&bad, false)] {
        let out = Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(path)
            .output()
            .expect("run check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), ok, "{}: {text}", path.display());
        assert!(
            !text.contains(PASSWORD),
            "check-config shows the password: {text}"
        );
        if !ok {
            assert!(text.contains("relay.password"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_an_environment_variable_delivers() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let lines = format!(
        "{}username = \"{USER}\"\npassword_env = \"RELAYQ_TEST_RELAY_PASSWORD\"\n",
        ca_line(&f)
    );
    let d = Daemon::start_in_with_env(
        f.path(),
        &config(&up, "starttls", &lines),
        &[("RELAYQ_TEST_RELAY_PASSWORD", PASSWORD)],
    );
    let id = send(&d, 1).await;
    up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    let auths = up.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].ok && auths[0].tls);
    assert!(!d.log().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_readable_by_others_warns_at_start() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let file = f.secret_file("world-readable-password", PASSWORD, 0o644);
    let lines = format!(
        "{}username = \"{USER}\"\npassword_file = {}\n",
        ca_line(&f),
        toml_path(&file)
    );
    let d = f.start(&config(&up, "starttls", &lines));
    let warning = d.wait_log("readable by other users", WAIT);
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&file.display().to_string()), "{warning}");
    assert!(
        warning.contains("chmod 600"),
        "says how to fix it: {warning}"
    );
    // A warning, not a refusal: mail still goes out.
    let id = send(&d, 1).await;
    status_line(&d, &id, "sent", 1).await;
    assert!(!d.log().contains(PASSWORD));
}

#[test]
fn clear_text_to_a_remote_relay_is_refused_by_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relayq.toml");
    // TEST-NET-1 (RFC 5737): only ever written into the file; check-config
    // does not connect.
    let run = |relay_lines: &str| {
        let text = format!(
            "spool_dir = {}\n{}",
            toml_path(&dir.path().join("spool")),
            config_for("192.0.2.1", 25, "none", relay_lines)
        );
        std::fs::write(&path, text).unwrap();
        Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run check-config")
    };
    let out = run("");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted clear text to 192.0.2.1");
    assert!(stderr.contains("relay.tls"), "names the key: {stderr}");
    assert!(
        stderr.contains("insecure = true"),
        "says the way out: {stderr}"
    );
    // The explicit opt-out is accepted.
    let out = run("insecure = true\n");
    assert!(out.status.success(), "{out:?}");

    // `serve` refuses the same file before listening or connecting.
    std::fs::write(
        &path,
        format!(
            "spool_dir = {}\n{}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n",
            toml_path(&dir.path().join("spool")),
            config_for("192.0.2.1", 25, "none", "")
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relayq serve");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for relayq") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relayq serve started with tls = \"none\" to 192.0.2.1");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("read stderr");
    }
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("relay.tls"), "{stderr}");
}
