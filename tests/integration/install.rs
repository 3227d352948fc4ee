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
    has_lines(
        &unit,
        &[
            "Type=notify",
            "User=relayq",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/spool/relayq",
            "NoNewPrivileges=yes",
            "SyslogFacility=mail",
        ],
    );
}

fn has_lines(unit: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            unit.lines().any(|l| l == *line),
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

/// `relayq check-config --require-relay`, the unit's ExecCondition: the
/// package enables the service before anyone named a relay, so it must
/// skip the start (exit 1, saying what to edit) while the config is the
/// shipped example or missing, fail the unit (255) on an invalid file, and
/// start (0) once a relay is named.
#[test]
fn the_units_start_condition() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |config: &Path| {
        let o = Command::new(BIN)
            .args(["check-config", "--require-relay", "--config"])
            .arg(config)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), said)
    };
    let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.toml"));
    let (code, said) = run(shipped);
    assert_eq!(code, Some(1), "{said}");
    for what in [
        "relayq is not started",
        "smtp.example.com is an example name",
        "systemctl restart relayq",
        "maildrop",
    ] {
        assert!(said.contains(what), "{what}: {said}");
    }
    let (code, said) = run(&tmp.path().join("missing.toml"));
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("there is no config file"), "{said}");

    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (code, said) = run(&write(
        "typo.toml",
        "[relay]\nhost = \"smtp.sendgrid.net\"\nprot = 587\n",
    ));
    assert_eq!(code, Some(255), "{said}");
    assert!(said.contains("line 3") && said.contains("prot"), "{said}");
    let edited = std::fs::read_to_string(shipped)
        .unwrap()
        .replace("\"smtp.example.com\"", "\"smtp.sendgrid.net\"");
    let (code, said) = run(&write("edited.toml", &edited));
    assert_eq!(code, Some(0), "{said}");
    let (code, said) = run(&write("capture.toml", "[capture]\nmaildir = \"/tmp/m\"\n"));
    assert_eq!(
        code,
        Some(0),
        "capture is a choice, not a missing relay: {said}"
    );
    // And relayq check says the same, without looking the example up.
    let o = Command::new(BIN)
        .args(["check", "--config"])
        .arg(shipped)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        out.contains("FAIL relay: the relay host smtp.example.com is an example name"),
        "{out}"
    );
    assert!(!out.contains("dns:"), "no lookup of an example name: {out}");
}

/// The unit the package ships: started by the condition above, logging
/// under the mail facility with relayq's name.
#[test]
fn the_unit_logs_to_mail_and_waits_for_a_relay() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.service"))
        .unwrap();
    has_lines(
        &unit,
        &[
            "ExecCondition=/usr/bin/relayq check-config --require-relay --config /etc/relayq/relayq.toml",
            "ExecStart=/usr/bin/relayq serve --config /etc/relayq/relayq.toml",
            "SyslogIdentifier=relayq",
            "SyslogFacility=mail",
        ],
    );
}

/// `relayq queue init` (the package's postinst, as user relayq) prepares
/// the maildrop, so `sendmail` works for every user before the daemon
/// first started; `newaliases` (a symlink, as the package installs it)
/// succeeds and says nothing.
#[test]
fn sendmail_works_before_the_daemon_first_started() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = tmp.path().join("spool");
    let config = tmp.path().join("relayq.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\nhostname = \"app1.example.com\"\n[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\n",
            spool.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let link = tmp.path().join("newaliases");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let o = Command::new(&link)
        .env("RELAYQ_CONFIG", &config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");

    // Twice is the same as once (every upgrade runs it).
    for _ in 0..2 {
        let o = Command::new(BIN)
            .args(["queue", "init", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("ready"),
            "{o:?}"
        );
        assert_eq!(mode(&spool), 0o711);
        assert_eq!(mode(&spool.join("maildrop")), 0o1733);
        for dir in ["queue", "hold", "tmp", "corrupt", "slots", "pickup"] {
            assert_eq!(mode(&spool.join(dir)), 0o700, "{dir}");
        }
    }

    if !crate::sendmail::can_switch_user() {
        return;
    }
    let mut cmd = crate::sendmail::as_nobody(BIN);
    cmd.args(["sendmail", "bob@example.net"])
        .env("RELAYQ_CONFIG", &config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"Subject: before the daemon\n\nwaits in the maildrop\n",
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let dropped: Vec<_> = std::fs::read_dir(spool.join("maildrop"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
}

/// The package's changelog names the version cargo-deb gives it.
#[test]
fn the_debian_changelog_names_this_version() {
    let changelog = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/debian/changelog"
    ))
    .unwrap();
    let first = changelog.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("relayq ({}-1) ", env!("CARGO_PKG_VERSION"))),
        "dist/debian/changelog's first entry is {first:?}: add an entry for {}-1",
        env!("CARGO_PKG_VERSION")
    );
}

/// The real thing, as root (issue 16, item 8): `install.sh` without
/// `--destdir` (it creates the user relayq, chowns the spool, links
/// /usr/sbin/sendmail, has relayq make its queue directories), then
/// `sendmail` run as www-data, as nobody (PHP's mail(), a cron job) and as
/// root (cron's own mail), and root's `mailq`, must work before the daemon
/// ever ran, while the relay password stays unreadable to the users; then
/// relayq, run as its user, relays the three messages with that password
/// (it relayed none when root's mailq had made the queue directories
/// root's).
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
# Root too (cron's mail), and root looking at the queue, which must
# leave the spool to relayq.
if printf 'Subject: from root\n\nhello\n' | /usr/sbin/sendmail bob@example.net; then
    echo "sendmail as root: ok"
fi
if /usr/bin/mailq >&2; then
    echo "mailq as root: ok"
fi
stat -c 'mode %a %U:%G %n' /var/spool/relayq/queue /var/spool/relayq/pickup || true
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
        .wait_for_messages(3, std::time::Duration::from_secs(60))
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
        "sendmail as root: ok",
        "mailq as root: ok",
        // Made by install.sh (`relayq queue init` as relayq), so root's
        // tools find them and leave them relayq's.
        "mode 700 relayq:relayq /var/spool/relayq/queue",
        "mode 700 relayq:relayq /var/spool/relayq/pickup",
    ] {
        assert!(said.contains(line), "{line:?} missing:\n{said}\n{log}");
    }
    assert!(!said.contains("secret readable"), "{said}");
    let mut senders: Vec<&str> = got.iter().map(|m| m.mail_from.as_str()).collect();
    senders.sort();
    assert_eq!(
        senders,
        [
            "nobody@relayq.test",
            "root@relayq.test",
            "www-data@relayq.test"
        ],
        "{log}"
    );
    let auths = up.auths();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| a.username == "apikey"),
        "{log}"
    );
    assert!(!log.contains(SECRET), "the secret reached the log:\n{log}");
}

/// The config the package installs, edited as README "Install" says (its
/// [relay] only): local users' mail (cron's, root's) goes out under this
/// machine's name, not the example's (`app1.example.com`, a domain nobody
/// here owns: a provider refuses the sender, bounces go nowhere). An
/// example name left as hostname or myorigin fails `relayq check`.
#[test]
fn the_shipped_config_sends_under_this_hosts_name() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.toml")).unwrap();
    let spool_line = format!("spool_dir = \"{}\"", spool.display());
    let edited = shipped
        .replace("\"smtp.example.com\"", "\"127.0.0.1\"")
        .replace("spool_dir = \"/var/spool/relayq\"", &spool_line);
    assert!(edited.contains(&spool_line) && edited.contains("\"127.0.0.1\""));
    let config = tmp.path().join("relayq.toml");
    std::fs::write(&config, &edited).unwrap();
    let o = crate::sendmail::sendmail(&config, &["bob@example.net"], b"Subject: cron\n\ndone\n");
    assert!(o.status.success(), "{}", crate::sendmail::stderr(&o));
    let queued: Vec<_> = std::fs::read_dir(spool.join("queue"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let file = String::from_utf8_lossy(&std::fs::read(&queued[0]).unwrap()).into_owned();
    let text = |cmd: &str, arg: &str| {
        let o = Command::new(cmd).arg(arg).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let want = format!("sender {}@{}", text("id", "-un"), text("uname", "-n"));
    assert!(file.lines().any(|l| l == want), "{want:?} missing:\n{file}");
    assert!(!file.contains("example.com"), "{file}");

    let check = |top: &str| {
        let p = tmp.path().join("check.toml");
        std::fs::write(
            &p,
            format!(
                "{top}\n{spool_line}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[relay]\nhost = \"127.0.0.1\"\nport = 9\ntls = \"none\"\nconnect_timeout = \"2s\"\n"
            ),
        )
        .unwrap();
        let o = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for (top, named) in [
        (
            "hostname = \"app1.example.com\"",
            "hostname app1.example.com is an example name",
        ),
        (
            "hostname = \"app1.example.com\"",
            "as user@app1.example.com",
        ),
        ("hostname = \"mx1.invalid\"", "as user@mx1.invalid"),
        (
            "hostname = \"relayq.test\"\nmyorigin = \"mail.example.org\"",
            "as user@mail.example.org (myorigin)",
        ),
    ] {
        let out = check(top);
        let line = out
            .lines()
            .find(|l| l.starts_with("FAIL hostname:"))
            .unwrap_or_else(|| panic!("{top}: no FAIL hostname line:\n{out}"));
        assert!(line.contains(named), "{top}: {named:?} missing in {line}");
    }
    let out = check("hostname = \"relayq.test\"\nmyorigin = \"mail.relayq.test\"");
    assert!(!out.contains("FAIL hostname"), "{out}");
}

/// A config that still names an example host or origin (an install from
/// before the shipped config left hostname out): the daemon says so at
/// start, in the log admins read.
#[test]
fn the_daemon_warns_of_an_example_mail_name() {
    use crate::support::daemon::{Daemon, relay_config};
    let relay = "127.0.0.1:9".parse().unwrap();
    let d = Daemon::start(&relay_config(relay, "myorigin = \"example.org\""));
    let line = d.wait_log(
        "as user@example.org (myorigin)",
        std::time::Duration::from_secs(30),
    );
    assert!(line.contains("warning") || line.contains("WARN"), "{line}");
}

/// The spool is the relayq user's, so anything in it, the maildrop
/// included, that user can replace with a link (to /etc, say). install.sh
/// runs as root, again at each upgrade: it must never chmod 1733 (nor
/// chown to relayq) what such a link points to, which would hand that
/// directory or file to the relayq user. It refuses, naming the link, and
/// leaves the target alone.
#[test]
fn install_script_never_follows_a_link_in_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    install(&root, &[]);
    let maildrop = root.join("var/spool/relayq/maildrop");
    std::fs::remove_dir(&maildrop).unwrap();
    let dir = tmp.path().join("etc-like");
    std::fs::create_dir(&dir).unwrap();
    let file = tmp.path().join("shadow-like");
    std::fs::write(&file, "x").unwrap();
    let dangling = tmp.path().join("not-there");
    for victim in [&dir, &file, &dangling] {
        let existed = victim.exists();
        if existed {
            std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o750)).unwrap();
        }
        std::os::unix::fs::symlink(victim, &maildrop).unwrap();
        let out = Command::new("sh")
            .arg(SCRIPT)
            .arg("--destdir")
            .arg(&root)
            .args(["--binary", BIN])
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{}: {said}", victim.display());
        assert!(
            said.contains("/var/spool/relayq/maildrop is a symbolic link"),
            "{}: {said}",
            victim.display()
        );
        if existed {
            assert_eq!(mode(victim), 0o750, "{}", victim.display());
        } else {
            assert!(!victim.exists(), "install.sh created {}", victim.display());
        }
        std::fs::remove_file(&maildrop).unwrap();
    }
    // With the link gone, install.sh makes the maildrop again.
    install(&root, &[]);
    assert_eq!(mode(&maildrop), 0o1733);
}
