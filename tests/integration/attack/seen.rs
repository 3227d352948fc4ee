//! The smaller things seen in the torture run (issue 16, item 10): an
//! upstream that drops the line right after the final dot (the message may
//! now arrive twice, and the log says so, as Postfix's does), and a daemon
//! started with less free space than `min_free_space` (it says so at
//! start). The third, what the maildrop may leave in `corrupt/`, is in
//! [`super::maildrop`].

use std::time::Duration;

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Script, Stage};

const WAIT: Duration = Duration::from_secs(30);
const TWICE: &str = "after the end of data -- message may be sent more than once";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_dropped_after_the_dot_warns_of_a_duplicate() {
    // Once the whole message and its dot are sent, a lost connection is
    // ambiguous: the upstream may have taken it. Before that it is not.
    for (stage, warned) in [
        (Stage::DataEnd, true),
        (Stage::Data, false),
        (Stage::Rcpt, false),
    ] {
        let up = FakeUpstream::start_with(Script::default().drop_at(stage)).await;
        let d = Daemon::start(&relay_config(up.addr(), ""));
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            b"Subject: x\r\n\r\nbody\r\n",
        )
        .await;
        let line = d.wait_log(&format!("{}: to=<bob@example.net>", queue_id(&r)), WAIT);
        assert!(
            line.contains("status=deferred") && line.contains("dsn=4.4.2"),
            "{stage:?}: {line}"
        );
        assert_eq!(line.contains(TWICE), warned, "{stage:?}: {line}");
        if !warned {
            assert!(!line.contains("more than once"), "{stage:?}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_at_start_when_free_space_is_already_short() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmin_free_space = \"1000000GB\"\n",
    ));
    let line = d.wait_log("less than smtp.min_free_space", WAIT);
    assert!(
        line.contains("new mail is refused with 452 4.3.1 until space is freed"),
        "{line}"
    );
    // And it is not said when there is room.
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    d.wait_log("recovered queue", WAIT);
    assert!(!d.log().contains("smtp.min_free_space"), "{}", d.log());
}
