//! Floods of wrong passwords (issue 16, items 1 and 2), with Python's
//! smtplib as the attacker: password checks are bounded (the rest get
//! `454 4.7.0`, memory stays bounded, a normal client is served
//! meanwhile), and each address and user name has a failure budget with
//! growing delays and a lockout, logged once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::client::send_mail;
use crate::support::daemon::{Daemon, hash_password};

const WAIT: Duration = Duration::from_secs(30);
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

/// relayq capturing mail, with STARTTLS and AUTH for alice and bob; only
/// 127.0.0.1 (the "app") may relay without AUTH. `smtp` adds `[smtp]` keys.
fn start(dir: &Path, smtp: &str) -> Daemon {
    let cert = rcgen::generate_simple_self_signed(vec!["relayq.test".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("users"),
        format!(
            "alice:{}\nbob:{}\n",
            hash_password("alice's secret"),
            hash_password("bob's secret")
        ),
    )
    .unwrap();
    let config = format!(
        "hostname = \"relayq.test\"\n[capture]\nmaildir = \"{0}/Maildir\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"127.0.0.1/32\"]\ntls_cert = \"{0}/cert.pem\"\ntls_key = \"{0}/key.pem\"\nauth_users_file = \"{0}/users\"\n{smtp}\n",
        dir.display()
    );
    Daemon::start_in(dir, &config)
}

/// One session of the Python client: from `source`, as `user`, one AUTH
/// PLAIN per password.
fn plan(source: &str, user: &str, passwords: &[&str]) -> Value {
    serde_json::json!({"source": source, "user": user, "passwords": passwords})
}

/// Runs the sessions at once; returns each one's outcome.
fn attack(d: &Daemon, plans: &[Value]) -> Vec<Value> {
    attack_port(d.addr.port(), plans)
}

fn attack_port(port: u16, plans: &[Value]) -> Vec<Value> {
    let out = Command::new("python3")
        .arg(Path::new(PEERS).join("auth_client.py"))
        .arg(port.to_string())
        .arg(serde_json::to_string(plans).unwrap())
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "auth_client.py: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn codes(session: &Value) -> Vec<u64> {
    session["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_u64().unwrap())
        .collect()
}

fn vm_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

fn captured(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("Maildir/new"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_is_bounded_and_the_app_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    // No lockouts: this is the distributed attack that budgets per address
    // and user do not stop; only the bound on checks at once protects.
    let d = start(
        tmp.path(),
        "auth_failure_limit = 0\nauth_user_failure_limit = 0\nauth_failure_delay = \"0s\"\n",
    );
    let pid = d.pid().unwrap();
    let before = vm_kb(pid, "VmRSS:");

    // 48 attackers on 48 addresses, 3 wrong passwords each, all at once;
    // meanwhile the app on 127.0.0.1 sends its mail.
    let plans: Vec<Value> = (0..48)
        .map(|i| {
            plan(
                &format!("127.0.1.{}", i + 1),
                &format!("guess{i}"),
                &["a", "b", "c"],
            )
        })
        .collect();
    let flood = {
        let port = d.addr.port();
        std::thread::spawn(move || attack_port(port, &plans))
    };
    // The app is served while the flood runs (it needs no password check).
    let mut sent = 0;
    let started = Instant::now();
    while !flood.is_finished() || sent < 5 {
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            b"Subject: during the flood\r\n\r\nhi\r\n",
        )
        .await;
        assert!(r.starts_with("250 2.0.0"), "the app was refused: {r}");
        sent += 1;
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "flood never ended"
        );
    }
    let results = flood.join().unwrap();
    assert_eq!(results.len(), 48);
    let all: Vec<u64> = results.iter().flat_map(codes).collect();
    let busy = all.iter().filter(|&&c| c == 454).count();
    let refused = all.iter().filter(|&&c| c == 535).count();
    assert!(busy > 0, "no login was turned away with 454: {all:?}");
    assert!(refused > 0, "no password was checked: {all:?}");
    assert!(
        all.iter().all(|c| [454, 535].contains(c)),
        "unexpected replies: {all:?}"
    );
    // 48 checks of ~19 MiB each at once would be close to 1 GB; two at a
    // time stay far below this.
    let peak = vm_kb(pid, "VmHWM:");
    assert!(
        peak < before + 160 * 1024,
        "peak RSS {peak} KB (was {before} KB before the flood)"
    );
    let line = d.wait_log("answered 454 4.7.0", WAIT);
    assert!(line.contains("password checks running"), "{line}");
    assert!(
        d.count_log("answered 454 4.7.0") <= 2,
        "the busy line is logged at most once a minute:\n{}",
        d.log()
    );

    // Checks still work afterwards: the right password logs in.
    let ok = attack(&d, &[plan("127.0.2.1", "alice", &["alice's secret"])]);
    assert_eq!(codes(&ok[0]), vec![235], "{ok:?}");
    // Every message of the app arrived.
    let deadline = Instant::now() + WAIT;
    while captured(tmp.path()).len() < sent {
        assert!(
            Instant::now() < deadline,
            "{} of {sent} captured",
            captured(tmp.path()).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_from_one_address_lock_it_out_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start(
        tmp.path(),
        "auth_failure_limit = 3\nauth_user_failure_limit = 0\nauth_failure_delay = \"200ms\"\nauth_lockout = \"1h\"\n",
    );
    // Three guesses: two 535s, each after a growing delay, then 421 and
    // the connection is closed.
    let r = attack(&d, &[plan("127.0.0.5", "alice", &["x1", "x2", "x3", "x4"])]);
    assert_eq!(codes(&r[0]), vec![535, 535, 421], "{r:?}");
    assert_eq!(r[0]["closed"], true);
    let elapsed: Vec<f64> = r[0]["elapsed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_f64().unwrap())
        .collect();
    assert!(
        elapsed[0] >= 0.2 && elapsed[1] >= 0.4,
        "delays grow: {elapsed:?}"
    );

    // Locked: a new connection from it is refused at once, even with the
    // right password ready; and more attackers on it change nothing.
    let r = attack(
        &d,
        &[
            plan("127.0.0.5", "alice", &["alice's secret"]),
            plan("127.0.0.5", "bob", &["y"]),
        ],
    );
    for s in &r {
        assert_eq!(s["greeting"], 421, "{s}");
    }
    let line = d.wait_log("AUTH lockout: [127.0.0.5]", WAIT);
    assert!(line.contains("3 failed AUTH attempts within 10m"), "{line}");
    assert!(line.contains("refused for 60m"), "{line}");

    // Other addresses are not affected.
    let r = attack(&d, &[plan("127.0.0.6", "alice", &["alice's secret"])]);
    assert_eq!(codes(&r[0]), vec![235]);

    // The app's own address (in allow_networks) is locked for AUTH only:
    // it still connects and sends mail without AUTH.
    let r = attack(&d, &[plan("127.0.0.1", "bob", &["1", "2", "3"])]);
    assert_eq!(codes(&r[0]), vec![535, 535, 421], "{r:?}");
    let r = attack(&d, &[plan("127.0.0.1", "bob", &["bob's secret"])]);
    assert_eq!(r[0]["greeting"], 220, "{r:?}");
    assert_eq!(codes(&r[0]), vec![454], "AUTH stays locked: {r:?}");
    let reply = send_mail(
        d.addr,
        "app@example.com",
        &["carol@example.net"],
        b"Subject: app\r\n\r\nok\r\n",
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");

    assert_eq!(d.count_log("AUTH lockout: [127.0.0.5]"), 1, "{}", d.log());
    assert_eq!(d.count_log("AUTH lockout: [127.0.0.1]"), 1, "{}", d.log());

    // When the lockout is over, the address may log in again.
    d.advance_clock(3601);
    let r = attack(&d, &[plan("127.0.0.5", "alice", &["alice's secret"])]);
    assert_eq!(r[0]["greeting"], 220, "{r:?}");
    assert_eq!(codes(&r[0]), vec![235], "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_for_one_user_from_many_addresses_lock_the_user() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start(
        tmp.path(),
        "auth_failure_limit = 10\nauth_user_failure_limit = 4\nauth_failure_delay = \"0s\"\nauth_lockout = \"15m\"\n",
    );
    // One guess each from four addresses (a botnet, one try per host).
    for i in 0..3 {
        let r = attack(&d, &[plan(&format!("127.0.3.{i}"), "alice", &["guess"])]);
        assert_eq!(codes(&r[0]), vec![535], "{r:?}");
    }
    let r = attack(&d, &[plan("127.0.3.9", "alice", &["guess"])]);
    assert_eq!(codes(&r[0]), vec![421], "{r:?}");
    let line = d.wait_log("AUTH lockout: user alice", WAIT);
    assert!(
        line.contains("4 failed AUTH attempts within 10m from any address"),
        "{line}"
    );
    assert!(line.contains("refused for 15m"), "{line}");
    // alice is locked everywhere, even with her password; bob is not.
    let r = attack(
        &d,
        &[
            plan("127.0.4.1", "alice", &["alice's secret"]),
            plan("127.0.4.2", "bob", &["bob's secret"]),
        ],
    );
    let by_source = |s: &str| r.iter().find(|x| x["source"] == s).unwrap();
    assert_eq!(codes(by_source("127.0.4.1")), vec![454]);
    assert_eq!(codes(by_source("127.0.4.2")), vec![235]);
    assert_eq!(d.count_log("AUTH lockout: user alice"), 1);
    d.advance_clock(15 * 60 + 1);
    let r = attack(&d, &[plan("127.0.4.1", "alice", &["alice's secret"])]);
    assert_eq!(codes(&r[0]), vec![235], "{r:?}");
}
