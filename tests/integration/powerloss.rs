//! Power loss: what a machine crash can leave on disk, beyond `kill -9`
//! (see `durability`). Here: the states a lost directory operation leaves
//! (built by hand, exactly as a power cut can leave them), and, with the
//! spool on LazyFS, real losses of every unsynced write in every phase of
//! the daemon's work (`lazyfs_power_loss_rounds`, run by CI).

use std::path::Path;
use std::time::Duration;

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(30);

fn out(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// How a power loss left the names of a reused slot `S` that held OLD
/// (delivered: NUL written, `queue/OLD` unlinked, neither synced) and now
/// holds X (written and fdatasynced, `queue/X` linked, not synced, `250`).
#[derive(Debug, Clone, Copy)]
enum Names {
    /// The case: `queue/OLD` survived, `queue/X` did not.
    StaleInQueue,
    /// OLD had been deleted from hold: `hold/OLD` survived.
    StaleInHold,
    /// Both names survived.
    Both,
    /// Only `queue/X` was lost (no name at all).
    NoName,
}

fn sorted(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_name_left_by_a_power_loss_delivers_its_message_once() {
    for names in [
        Names::StaleInQueue,
        Names::StaleInHold,
        Names::Both,
        Names::NoName,
    ] {
        stale_name(names).await;
    }
}

async fn stale_name(names: Names) {
    let busy = Script::default().rcpt("bob@example.net", 451, "4.2.1 mailbox busy, try later");
    let up = FakeUpstream::start().await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let spool = d.spool();
    let old = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["carol@example.net"],
            b"Subject: old\r\n\r\ndelivered before the loss\r\n",
        )
        .await,
    );
    d.wait_log(&format!("{old}: removed"), WAIT);
    up.set_script(busy);
    let x = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            b"Subject: X\r\n\r\nacknowledged, then the power went\r\n",
        )
        .await,
    );
    let line = d.wait_log(&format!("{x}: to=<bob@example.net>"), WAIT);
    assert!(line.contains("status=deferred"), "{line}");
    assert!(d.stop());
    // X went into OLD's file: one slot, holding X.
    let slots = sorted(&spool.join("slots"));
    assert_eq!(slots.len(), 1, "{names:?}: {slots:?}");
    let q = spool.join("queue");
    match names {
        Names::StaleInQueue => std::fs::rename(q.join(&x), q.join(&old)).unwrap(),
        Names::StaleInHold => std::fs::rename(q.join(&x), spool.join("hold").join(&old)).unwrap(),
        Names::Both => std::fs::hard_link(q.join(&x), q.join(&old)).unwrap(),
        Names::NoName => std::fs::remove_file(q.join(&x)).unwrap(),
    }

    // With the daemon down, the tools find X by its id.
    let list = out(&d.cli(&["queue", "list"]));
    if !matches!(names, Names::NoName) {
        assert_eq!(list.matches(&x).count(), 1, "{names:?}: {list}");
        assert!(!list.contains(&old), "{names:?}: {list}");
        let show = out(&d.cli(&["queue", "show", &x]));
        assert!(show.contains(&format!("queue id:    {x}")), "{show}");
        assert!(show.contains("mailbox busy"), "{show}");
        assert!(show.contains("Subject: X"), "{show}");
    }
    if matches!(names, Names::StaleInHold) {
        // Changing it while the daemon is down puts the names right first.
        let r = out(&d.cli(&["queue", "requeue", &x]));
        assert!(r.starts_with("requeued: 1 message"), "{r}");
        assert_eq!(sorted(&q), vec![x.clone()]);
        assert!(sorted(&spool.join("hold")).is_empty());
    }

    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("1 queued, 0 on hold"), "{names:?}: {line}");
    assert_eq!(sorted(&q), vec![x.clone()], "{names:?}");
    let show = out(&d.cli(&["queue", "show", &x]));
    assert!(
        show.contains(&format!("queue id:    {x} (queue)")),
        "{show}"
    );
    up.set_script(Script::default());
    let flushed = out(&d.cli(&["queue", "flush"]));
    assert!(
        flushed.contains("flushed: 1 deferred"),
        "{names:?}: {flushed}"
    );
    d.wait_log_since(mark, &format!("{x}: removed"), WAIT);
    let subjects = |up: &FakeUpstream| -> Vec<String> {
        let mut v: Vec<String> = up
            .messages()
            .iter()
            .map(|m| {
                m.text()
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&up), vec!["X", "old"], "{names:?}");
    assert!(!d.log().contains("nothing to deliver"), "{}", d.log());

    // And once only: a restart finds nothing left to send.
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("0 queued"), "{names:?}: {line}");
    let c = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["dave@example.net"],
            b"Subject: control\r\n\r\nafter\r\n",
        )
        .await,
    );
    d.wait_log_since(mark, &format!("{c}: removed"), WAIT);
    assert_eq!(subjects(&up), vec!["X", "control", "old"], "{names:?}");
}
