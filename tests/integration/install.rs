//! `dist/install.sh` staged into a temporary root (`--destdir`): what it
//! creates, with which modes, and that it never overwrites an operator's
//! config or another MTA's sendmail. Nothing outside the temp dir is
//! touched (with --destdir no user is created and systemd is not told).

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
    assert_eq!(mode(&root.join("var/spool/relayq")), 0o700);

    let config = root.join("etc/relayq/relayq.toml");
    assert_eq!(mode(&config), 0o644);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.toml");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(example).unwrap()
    );
    // The installed example config is valid as shipped, and every user
    // can read it: their sendmail does (PHP's mail() runs as www-data).
    // Secrets go in password_file instead (warned about, below).
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

/// An inline relay password in a config every user can read (as they
/// must, for sendmail) is warned about at start, with the fix.
#[test]
fn an_inline_password_in_a_readable_config_is_warned_about() {
    use crate::support::daemon::{Daemon, relay_config};
    const WARNING: &str = "holds the relay password inline";

    let config = relay_config("127.0.0.1:9".parse().unwrap(), "").replace(
        "tls = \"none\"\n",
        "tls = \"none\"\nusername = \"u\"\npassword = \"inline-secret\"\n",
    );
    let mut d = Daemon::start(&config);
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "started:", std::time::Duration::from_secs(20));
    assert!(line.contains("started:"));
    let log = d.log();
    let warning = log[mark..]
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("relay.password_file") && !warning.contains("inline-secret"),
        "{warning}"
    );

    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mark = d.log_mark();
    d.restart();
    d.wait_log_since(mark, "started:", std::time::Duration::from_secs(20));
    assert!(
        !d.log()[mark..].contains(WARNING),
        "not when only its owner can read it: {}",
        d.log()
    );
}
