//! `dist/install.sh` staged into a temporary root (`--destdir`): what it
//! creates, with which modes, and that it never overwrites an operator's
//! config or another MTA's sendmail. Nothing outside the temp dir is
//! touched (with --destdir no user is created and systemd is not told).
//! One test runs it for real, as root, inside a mount namespace of its own
//! (see [`install_script_works_for_every_local_user`]).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::daemon::BIN;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/install.sh");

fn install(root: &Path, extra: &[&str]) -> std::process::Output {
    let out = Command::new("sh")
        .arg(SCRIPT)
        .arg("--destdir")
        .arg(root)
        .args(["--binary", BIN])
        .args(extra)
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_script_stages_a_complete_service() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    install(root, &["--prefix", "/opt/relayq"]);

    let bin = root.join("opt/relayq/bin/relayq");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(BIN).unwrap());
    assert_eq!(mode(&root.join("var/spool/relayq")), 0o711);
    assert_eq!(mode(&root.join("var/spool/relayq/maildrop")), 0o1733);

    // Every user's sendmail reads the config; secrets go in files of their
    // own (see install_script_works_for_every_local_user; an inline one is
    // warned about, attack::config_secrets).
    let config = root.join("etc/relayq/relayq.toml");
    assert_eq!(mode(&config), 0o644);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.toml");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(example).unwrap()
    );
    // The installed example config is valid as shipped, and every user
    // can read it: their sendmail does (PHP's mail() runs as www-data).
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut readers = vec![Command::new(&bin)];
    if crate::sendmail::can_switch_user() {
        readers.push(crate::sendmail::as_nobody(BIN));
    }
    for mut cmd in readers {
        let out = cmd
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    for link in ["usr/sbin/sendmail", "usr/bin/mailq"] {
        let target = std::fs::read_link(root.join(link)).expect(link);
        assert_eq!(target, Path::new("/opt/relayq/bin/relayq"), "{link}");
    }

    let unit = std::fs::read_to_string(root.join("etc/systemd/system/relayq.service")).unwrap();
    assert!(
        unit.contains(
            "\nExecStart=/opt/relayq/bin/relayq serve --config /etc/relayq/relayq.toml\n"
        ),
        "{unit}"
    );
    assert!(
        !unit.contains("/usr/local/bin"),
        "prefix applied everywhere"
    );
    for line in [
        "Type=notify",
        "User=relayq",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/spool/relayq",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing in:\n{unit}"
        );
    }
}

#[test]
fn install_script_keeps_the_operators_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Another MTA's sendmail is there already.
    std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
    std::fs::write(root.join("usr/sbin/sendmail"), "#!/bin/sh\n# postfix\n").unwrap();
    install(root, &[]);
    let config = root.join("etc/relayq/relayq.toml");
    std::fs::write(
        &config,
        "# mine\n[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\n",
    )
    .unwrap();

    // A second run (an upgrade) keeps the config and the foreign sendmail.
    let out = install(root, &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("kept the existing /etc/relayq/relayq.toml"),
        "{said}"
    );
    assert!(said.contains("left /usr/sbin/sendmail alone"), "{said}");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .starts_with("# mine")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("usr/sbin/sendmail")).unwrap(),
        "#!/bin/sh\n# postfix\n"
    );
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/mailq")).unwrap(),
        Path::new("/usr/local/bin/relayq")
    );

    // --force-links takes sendmail over.
    install(root, &["--force-links"]);
    assert_eq!(
        std::fs::read_link(root.join("usr/sbin/sendmail")).unwrap(),
        Path::new("/usr/local/bin/relayq")
    );
}

/// The real thing, as root (issue 16, item 8): `install.sh` without
/// `--destdir` (it creates the user relayq, chowns the spool, links
/// /usr/sbin/sendmail), then `sendmail` run as www-data and as nobody
/// (PHP's mail(), a cron job) must queue mail, before the daemon ever ran,
/// while the relay password stays unreadable to them; then relayq, run as
/// its user, relays both messages with that password.
///
/// It runs in a private mount namespace with an overlay on /etc, /usr and
/// /var, so the real install touches nothing outside this test (parallel
/// test runs, the machine's own MTA) and leaves nothing behind: a --destdir
/// staging would skip the user, the ownership and the links, which are
/// exactly what decides whether www-data can send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_script_works_for_every_local_user() {
    use crate::support::upstream::{FakeUpstream, Script};
    use std::io::Read;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root, cannot run install.sh for real");
        return;
    }
    const SECRET: &str = "Relay-Pa55word-for-the-test";
    let up = FakeUpstream::start_with(Script::default().require_auth("apikey", SECRET)).await;
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        r#"set -eu
T={tmp}
for d in etc usr var; do
    mkdir -p "$T/$d.up" "$T/$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d.up,workdir=$T/$d.work" "/$d"
done
sh {script} --binary {bin} --force-links >&2
# What the operator does next (README): the relay, and its password in a
# file of its own that only relayq reads.
cat > /etc/relayq/relayq.toml <<'CONFIG'
hostname = "relayq.test"
[smtp]
listen = ["127.0.0.1:0"]
[relay]
host = "127.0.0.1"
port = {port}
tls = "none"
username = "apikey"
password_file = "/etc/relayq/relay-password"
CONFIG
(umask 077; printf '%s' '{secret}' > /etc/relayq/relay-password)
chown relayq: /etc/relayq/relay-password
stat -c 'mode %a %U:%G %n' /etc/relayq/relayq.toml /etc/relayq/relay-password /var/spool/relayq /var/spool/relayq/maildrop
for u in www-data nobody; do
    if printf 'Subject: from %s\n\nhello\n' "$u" | setpriv --reuid=$u --regid="$(id -g $u)" --clear-groups -- /usr/sbin/sendmail bob@example.net; then
        echo "sendmail as $u: ok"
    else
        echo "sendmail as $u: exit $?"
    fi
    if setpriv --reuid=$u --regid="$(id -g $u)" --clear-groups -- cat /etc/relayq/relay-password >/dev/null 2>&1; then
        echo "secret readable by $u"
    fi
done
setpriv --reuid=relayq --regid=relayq --init-groups -- env RELAYQ_LOG=info /usr/local/bin/relayq serve --config /etc/relayq/relayq.toml &
echo started
# Until the test is done (it closes our stdin).
cat >/dev/null || true
kill $! && wait $! || true
"#,
        tmp = tmp.path().display(),
        script = SCRIPT,
        bin = BIN,
        port = up.port(),
        secret = SECRET,
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    // The report, up to "started".
    let mut stdout = child.stdout.take().unwrap();
    let mut said = String::new();
    while !said.contains("started\n") {
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            drop(child.stdin.take());
            let out = child.wait_with_output().unwrap();
            panic!(
                "the install run ended early:\n{said}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        said.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let got = up
        .wait_for_messages(2, std::time::Duration::from_secs(60))
        .await;
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    for line in [
        "mode 644 root:root /etc/relayq/relayq.toml",
        "mode 600 relayq:relayq /etc/relayq/relay-password",
        "mode 711 relayq:relayq /var/spool/relayq",
        "mode 1733 relayq:relayq /var/spool/relayq/maildrop",
        "sendmail as www-data: ok",
        "sendmail as nobody: ok",
    ] {
        assert!(said.contains(line), "{line:?} missing:\n{said}\n{log}");
    }
    assert!(!said.contains("secret readable"), "{said}");
    let mut senders: Vec<&str> = got.iter().map(|m| m.mail_from.as_str()).collect();
    senders.sort();
    assert_eq!(
        senders,
        ["nobody@relayq.test", "www-data@relayq.test"],
        "{log}"
    );
    let auths = up.auths();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| a.username == "apikey"),
        "{log}"
    );
    assert!(!log.contains(SECRET), "the secret reached the log:\n{log}");
}
