//! The open-relay guard judges what `allow_networks` covers, not how it is
//! spelt (issue 16, item 9): the whole Internet in halves, quarters, as
//! IPv4-mapped IPv6 or through NAT64 is refused like `0.0.0.0/0`, and more
//! public space than a /8 (IPv4) or a /32 (IPv6) needs
//! `allow_public_networks = true`, said in the error.

use std::process::Command;

use crate::support::daemon::BIN;

fn run(cmd: &str, path: &std::path::Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args([cmd, "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(path: &std::path::Path, networks: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "spool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = {networks}\n{extra}\n[capture]\nmaildir = \"/tmp/x\"\n",
            path.with_file_name("spool").display()
        ),
    )
    .unwrap();
}

#[test]
fn the_whole_internet_is_refused_in_any_spelling() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("relayq.toml");
    for networks in [
        r#"["0.0.0.0/1", "128.0.0.0/1"]"#,
        r#"["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2"]"#,
        r#"["::/1", "8000::/1"]"#,
        r#"["::ffff:0.0.0.0/96"]"#,
        r#"["64:ff9b::/96", "127.0.0.0/8"]"#,
        r#"["0.0.0.0/0"]"#,
    ] {
        // Not even with the override: that is an open relay.
        for extra in ["", "allow_public_networks = true"] {
            write(&path, networks, extra);
            for cmd in ["check-config", "serve"] {
                let (ok, err) = run(cmd, &path);
                assert!(!ok, "{cmd} accepted allow_networks = {networks} {extra}");
                assert!(
                    err.contains("smtp.allow_networks") && err.contains("open relay"),
                    "{cmd}, {networks}: {err}"
                );
            }
        }
    }
}

#[test]
fn wide_public_networks_need_the_override() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("relayq.toml");
    for networks in [
        r#"["2.0.0.0/7"]"#,
        r#"["8.0.0.0/8", "9.9.9.0/24"]"#,
        r#"["0.0.0.0/1"]"#,
        r#"["2000::/3"]"#,
        r#"["2a00::/24"]"#,
    ] {
        write(&path, networks, "");
        let (ok, err) = run("check-config", &path);
        assert!(!ok, "accepted {networks}");
        assert!(
            err.contains("smtp.allow_public_networks = true")
                && err.contains("relay through relayq"),
            "{networks}: {err}"
        );
        write(&path, networks, "allow_public_networks = true");
        let (ok, err) = run("check-config", &path);
        assert!(ok, "{networks} with the override: {err}");
    }
    // Your own networks need nothing.
    for networks in [
        r#"["127.0.0.0/8", "::1/128", "10.0.0.0/8", "192.168.0.0/16", "fc00::/7"]"#,
        r#"["8.0.0.0/8", "2a01:4f8::/32"]"#,
    ] {
        write(&path, networks, "");
        let (ok, err) = run("check-config", &path);
        assert!(ok, "{networks}: {err}");
    }
}
