//! Secrets in configuration errors (issue 16, item 6): a typo on a
//! password line, a missing quote or a wrong type must not print the
//! secret, through any command that reads the config: `check-config`,
//! `check`, `serve`, a failed SIGHUP reload, `sendmail` and the queue
//! tools. Every output is searched for the secret; each must still name
//! the line.

use std::process::Command;
use std::time::Duration;

use crate::sendmail::sendmail;
use crate::support::daemon::{BIN, Daemon};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "Zq7-hunter2-SeCrEt";
const NUMBER: &str = "8472019384";

/// Broken `[relay]` lines (or top-level lines), each with the secret the
/// output must not contain and the line the error is on (in the relay
/// section below, line 1 is `[relay]`).
fn mistakes() -> Vec<(String, &'static str)> {
    vec![
        (format!("pasword = \"{SECRET}\""), SECRET),
        (format!("password = \"{SECRET}"), SECRET),
        (format!("password = {SECRET}"), SECRET),
        (format!("password = {NUMBER}"), NUMBER),
        (format!("password \"{SECRET}\""), SECRET),
        (format!("password = [\"{SECRET}\"]"), SECRET),
        (format!("oauth2_client_secret = \"{SECRET}\""), SECRET),
        (
            format!("password = '''{SECRET}\n{SECRET}2'''\nport = \"x\""),
            SECRET,
        ),
        (format!("pass = {{ word = \"{SECRET}\" }}"), SECRET),
    ]
}

/// A config whose `[relay]` section ends with `broken`; valid otherwise.
fn config(dir: &std::path::Path, top: &str, broken: &str) -> String {
    format!(
        "spool_dir = \"{}\"\nhostname = \"relayq.test\"\n{top}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[relay]\nhost = \"127.0.0.1\"\nport = 2\ntls = \"none\"\nusername = \"u\"\npassword_env = \"X\"\n{broken}\n",
        dir.join("spool").display()
    )
}

fn output(out: std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every command that reads the config, run on `path`: (command, output).
fn every_command(path: &std::path::Path) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for args in [
        vec!["check-config"],
        vec!["check"],
        vec!["serve"],
        vec!["queue", "list"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--config")
            .arg(path)
            .env("RELAYQ_LOG", "debug")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted a broken config");
        all.push((args.join(" "), output(out)));
    }
    let out = sendmail(path, &["-t"], b"To: bob@example.net\n\nhi\n");
    assert_eq!(out.status.code(), Some(78), "sendmail: EX_CONFIG");
    all.push(("sendmail".into(), output(out)));
    all
}

#[test]
fn config_errors_never_print_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("relayq.toml");
    for (broken, secret) in mistakes() {
        std::fs::write(&path, config(tmp.path(), "", &broken)).unwrap();
        for (cmd, out) in every_command(&path) {
            assert!(
                !out.contains(secret),
                "{cmd} printed the secret for {broken:?}:\n{out}"
            );
            assert!(
                out.contains("line "),
                "{cmd} does not name the line for {broken:?}:\n{out}"
            );
        }
    }
    // A Redis URL's password, with the value unquoted or of a wrong type.
    for top in [
        format!("limits_backend = redis://:{SECRET}@127.0.0.1:6379"),
        format!("limits_backend = [\"redis://:{SECRET}@127.0.0.1:6379\"]"),
        format!("limits_backend = \"redis://:{SECRET}@127.0.0.1:6379\"\nlimits_backnd = 1"),
    ] {
        std::fs::write(&path, config(tmp.path(), &top, "")).unwrap();
        for (cmd, out) in every_command(&path) {
            assert!(
                !out.contains(SECRET),
                "{cmd} printed the Redis password for {top:?}:\n{out}"
            );
            assert!(out.contains("line "), "{cmd}: {out}");
        }
    }
}

#[test]
fn a_failed_reload_never_logs_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(tmp.path(), &config(tmp.path(), "", ""));
    for (n, (broken, secret)) in mistakes().into_iter().enumerate() {
        let mark = d.log_mark();
        std::fs::write(&d.config, config(tmp.path(), "", &broken)).unwrap();
        unsafe {
            libc::kill(d.pid().unwrap() as i32, libc::SIGHUP);
        }
        let line = d.wait_log_since(mark, "reload failed", WAIT);
        assert!(line.contains("line "), "{line}");
        assert!(
            !d.log().contains(secret),
            "mistake {n} ({broken:?}) leaked:\n{}",
            d.log()
        );
    }
    assert!(d.stop());
}

#[test]
fn serve_warns_of_a_secret_in_a_config_every_user_reads() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "", "")
        .replace("password_env = \"X\"", &format!("password = \"{SECRET}\""));
    let mut d = Daemon::start_in(tmp.path(), &text);
    // As install.sh leaves it: readable by every user.
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "is readable by every user and holds a secret", WAIT);
    assert!(
        line.contains("(relay.password)") && line.contains("password_file"),
        "{line}"
    );
    assert!(!d.log().contains(SECRET));

    // Not when only its owner can read it.
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mark = d.log_mark();
    d.restart();
    d.wait_log_since(mark, "started:", WAIT);
    assert!(
        !d.log()[mark..].contains("is readable by every user"),
        "{}",
        d.log()
    );
}
