//! SIGHUP: the config is re-read without dropping queued mail or open
//! sessions; an invalid file changes nothing.

use std::time::Duration;

use crate::support::client::{Client, queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

fn hup(d: &Daemon) {
    let pid = d.pid().expect("daemon running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_losing_mail_or_sessions() {
    let old_up = FakeUpstream::start().await;
    let old_addr = old_up.addr();
    old_up.stop().await;
    let new_up = FakeUpstream::start().await;
    let smtp = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_recipients = 2\n";
    let d = Daemon::start(&format!("{}{smtp}", relay_config(old_addr, "")));

    // Mail deferred while the old relay is down stays queued across the reload.
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["a@example.net"],
        b"Subject: m0\r\n\r\n0\r\n",
    )
    .await;
    let m0 = queue_id(&r);
    d.wait_log(&format!("{m0}: to=<a@example.net>"), WAIT);
    assert_eq!(d.queued(), 1);

    // A session opened before the reload.
    let (mut before, _) = Client::connect(d.addr).await;
    assert!(before.cmd("EHLO early.test").await.starts_with("250"));

    let text = std::fs::read_to_string(&d.config).unwrap();
    let text = text
        .replace(
            &format!("port = {}", old_addr.port()),
            &format!("port = {}", new_up.addr().port()),
        )
        .replace("max_recipients = 2", "max_recipients = 5");
    std::fs::write(&d.config, &text).unwrap();
    hup(&d);
    d.wait_log("reloaded ", WAIT);

    // The open session goes on, under the limits it started with.
    assert!(
        before
            .cmd("MAIL FROM:<app@example.com>")
            .await
            .starts_with("250")
    );
    for rcpt in ["b@example.net", "c@example.net"] {
        assert!(
            before
                .cmd(&format!("RCPT TO:<{rcpt}>"))
                .await
                .starts_with("250")
        );
    }
    assert!(
        before
            .cmd("RCPT TO:<d@example.net>")
            .await
            .starts_with("452 4.5.3")
    );
    assert!(before.cmd("DATA").await.starts_with("354"));
    before.send(b"Subject: m1\r\n\r\n1\r\n.\r\n").await;
    assert!(before.reply().await.starts_with("250 2.0.0"));

    // New sessions get the new limits.
    let five = ["e@x.net", "f@x.net", "g@x.net", "h@x.net", "i@x.net"];
    let r = send_mail(
        d.addr,
        "app@example.com",
        &five,
        b"Subject: m2\r\n\r\n2\r\n",
    )
    .await;
    assert!(r.starts_with("250"), "{r}");

    // Deliveries go to the new relay; the deferred message too, on a flush.
    d.flush();
    let got = new_up.wait_for_messages(3, WAIT).await;
    let mut subjects: Vec<String> = got
        .iter()
        .filter_map(|m| {
            m.text()
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["m0", "m1", "m2"]);
    d.wait_log(&format!("{m0}: removed"), WAIT);

    // An invalid file changes nothing and says so.
    std::fs::write(
        &d.config,
        text.replace("max_recipients = 5", "max_recipients = \"lots\""),
    )
    .unwrap();
    hup(&d);
    let line = d.wait_log("reload failed, the running configuration stays", WAIT);
    assert!(line.contains("max_recipients"), "{line}");
    let r = send_mail(
        d.addr,
        "app@example.com",
        &five,
        b"Subject: m3\r\n\r\n3\r\n",
    )
    .await;
    assert!(
        r.starts_with("250"),
        "still running with the last good config: {r}"
    );
    new_up.wait_for_messages(4, WAIT).await;
}
