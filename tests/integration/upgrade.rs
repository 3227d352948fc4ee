//! Upgrade safety: a newer relayq delivers the spool an older one left.
//! `tests/fixtures/spool-v1` was written by relayq 0.1 (queue file format
//! 1): a reused slot file with one recipient delivered and one deferred, an
//! 8-bit message with the null sender, a message on hold, one that
//! `sendmail` wrote into `queue/` itself, and one still in the maildrop.
//! This relayq must deliver each pending recipient exactly once, byte for
//! byte, send nothing twice, and keep the held one held until released.
//! (`.ci/package-test` does the same through the Debian package: mail
//! queued under an older .deb, delivered after the upgrade.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::FakeUpstream;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spool-v1");
const LINKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spool-v1.links");
const WAIT: Duration = Duration::from_secs(30);

/// Copies the fixture into `spool` as relayq 0.1 left it on disk: modes,
/// the slot files' second names, the drop file's owner.
fn lay_out(spool: &Path) {
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    std::fs::create_dir(spool).unwrap();
    mode(spool, 0o711).unwrap();
    for dir in ["queue", "hold", "slots", "maildrop"] {
        let to = spool.join(dir);
        std::fs::create_dir(&to).unwrap();
        mode(&to, 0o700).unwrap();
        let Ok(entries) = std::fs::read_dir(Path::new(FIXTURE).join(dir)) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            std::fs::copy(e.path(), &dest).unwrap();
            mode(&dest, if dir == "maildrop" { 0o444 } else { 0o600 }).unwrap();
        }
    }
    mode(&spool.join("maildrop"), 0o1733).unwrap();
    if rustix::process::geteuid().is_root() {
        // A drop file belongs to the user who ran sendmail (nobody).
        for e in std::fs::read_dir(spool.join("maildrop")).unwrap() {
            let p = e.unwrap().path();
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
    }
    let links = std::fs::read_to_string(LINKS).unwrap();
    for line in links
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, slot) = line.split_once(' ').unwrap();
        std::fs::hard_link(spool.join(slot), spool.join(name)).unwrap();
    }
}

/// The message content of a fixture queue file: `size` bytes after the
/// header's empty line.
fn content(file: &str) -> Vec<u8> {
    let bytes = std::fs::read(Path::new(FIXTURE).join(file)).unwrap();
    let head_end = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    let head = std::str::from_utf8(&bytes[..head_end]).unwrap();
    let size: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("size "))
        .unwrap()
        .parse()
        .unwrap();
    bytes[head_end..head_end + size].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_from_relayq_0_1_is_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out(&tmp.path().join("spool"));
    let up = FakeUpstream::start().await;
    // The fixture's messages were accepted in November 2026: a lifetime
    // long enough that they are delivered, not expired, whenever this runs.
    let config = relay_config(
        up.addr(),
        "myorigin = \"app1.example.com\"\n[queue]\nmax_lifetime = \"36500d\"",
    );
    let d = Daemon::start_in(tmp.path(), &config);
    d.wait_log("recovered queue: 3 queued, 1 on hold, 0 corrupt", WAIT);
    // Their next attempt was due 5 minutes after they were deferred: when
    // this runs within those minutes of the fixture's making, let them
    // come due (a run later finds them due already).
    d.advance_clock(600);
    let got = up.wait_for_messages(4, WAIT).await;
    let by_rcpt = |r: &str| {
        let m: Vec<_> = got.iter().filter(|m| m.rcpts == [r]).collect();
        assert_eq!(m.len(), 1, "one message to {r}: {got:#?}");
        m[0].clone()
    };
    // bob had it already: only carol gets the first message.
    let carol = by_rcpt("carol@example.net");
    assert_eq!(carol.mail_from, "app@example.com");
    assert_eq!(carol.data, content("slots/FPJCNRBQYFT9YYS30000000000"));
    let dave = by_rcpt("dave@example.net");
    assert_eq!(dave.mail_from, "");
    assert!(dave.mail_params.contains("BODY=8BITMIME"), "{dave:?}");
    assert_eq!(dave.data, content("slots/FPJCNRBQYFT9YYS30000000001"));
    let frank = by_rcpt("frank@example.net");
    assert_eq!(frank.mail_from, "root@app1.example.com");
    assert_eq!(frank.data, content("queue/01M8KHSZ8DC17TXERNBHV2T68C"));
    // The drop file went through the pickup: the sender is the one the
    // maildrop rule gives nobody.
    let grace = by_rcpt("grace@example.net");
    assert_eq!(grace.mail_from, "nobody@app1.example.com", "{grace:?}");
    let text = grace.text();
    assert!(text.contains("Subject: v1 fixture maildrop\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nFrom a local user, left in the maildrop.\r\n"),
        "{text}"
    );
    assert!(
        got.iter().all(|m| !m
            .rcpts
            .iter()
            .any(|r| r == "bob@example.net" || r == "erin@example.net")),
        "bob was delivered by 0.1, erin is on hold: {got:#?}"
    );

    // The held message is still held, and goes once released.
    let list = d.cli(&["queue", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("01M8KHSZ71ZEXW97Z6SMV2G7F0") && list.contains("erin@example.net"),
        "{list}"
    );
    let o = d.cli(&["queue", "release", "01M8KHSZ71ZEXW97Z6SMV2G7F0"]);
    assert!(o.status.success(), "{o:?}");
    let got = up.wait_for_messages(5, WAIT).await;
    let erin = &got[4];
    assert_eq!(erin.rcpts, ["erin@example.net"]);
    assert_eq!(erin.data, content("slots/FPJCNRBQYFT9YYS30000000002"));
    assert!(
        !d.log().contains("corrupt/"),
        "nothing moved to corrupt/:\n{}",
        d.log()
    );
}

/// A queue file from a newer relayq (a downgrade) is named as such, and
/// kept whole in corrupt/ for that relayq, not misread or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_from_a_newer_relayq_is_kept_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    lay_out(&spool);
    let newer = "relayq-queue 99\nid 01M8KHSZ8DC17TXERNBHV2T68D\nfuture field\n\nbody\nend\n";
    let path = spool.join("queue/01M8KHSZ8DC17TXERNBHV2T68D");
    std::fs::write(&path, newer).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let up = FakeUpstream::start().await;
    let config = relay_config(up.addr(), "[queue]\nmax_lifetime = \"36500d\"");
    let d = Daemon::start_in(tmp.path(), &config);
    let line = d.wait_log("01M8KHSZ8DC17TXERNBHV2T68D", WAIT);
    d.advance_clock(600);
    assert!(
        line.contains("newer relayq") && line.contains("format 99"),
        "{line}"
    );
    up.wait_for_messages(4, WAIT).await;
    assert_eq!(
        std::fs::read_to_string(spool.join("corrupt/01M8KHSZ8DC17TXERNBHV2T68D")).unwrap(),
        newer
    );
}
