//! What an operator sees: the per-message log lines in both formats, the
//! Prometheus metrics, and the status JSON, from a real relayq relaying to
//! the fake upstream.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::http::{get, get_with_host, status_addr};
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(20);

/// One event, normalized from either log format: `event`, `queue_id`, and
/// the event's fields as text.
type Ev = BTreeMap<String, String>;

/// Splits "key=value, key=value" text at the given separators, in order.
fn take<'a>(rest: &mut &'a str, prefix: &str, until: &str) -> Option<&'a str> {
    let s = rest.strip_prefix(prefix)?;
    let end = s.find(until)?;
    *rest = &s[end..];
    Some(&s[..end])
}

/// Parses the Postfix-style text lines that carry a queue id.
fn text_events(log: &str) -> Vec<Ev> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(rest) = ["  INFO ", "  WARN ", " ERROR "]
            .iter()
            .find_map(|lvl| line.split_once(lvl).map(|(_, r)| r))
        else {
            continue;
        };
        let Some((id, body)) = rest.split_once(": ") else {
            continue;
        };
        if id.len() != 26 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        let mut ev = Ev::new();
        ev.insert("queue_id".into(), id.into());
        let mut r = body;
        if body.starts_with("to=<") {
            ev.insert("event".into(), "delivery".into());
            let to = take(&mut r, "to=<", ">, relay=").expect(line);
            let relay = take(&mut r, ">, relay=", ", delay=").expect(line);
            let delay = take(&mut r, ", delay=", ", delays=").expect(line);
            let delays = take(&mut r, ", delays=", ", dsn=").expect(line);
            let dsn = take(&mut r, ", dsn=", ", status=").expect(line);
            let status = take(&mut r, ", status=", " (").expect(line);
            let reply = r
                .strip_prefix(" (")
                .and_then(|x| x.strip_suffix(')'))
                .expect(line);
            let status = match status {
                "expired, returned to sender" => "expired",
                "sent" | "deferred" | "bounced" => status,
                other => panic!("unexpected status {other:?} in {line}"),
            };
            for (k, v) in [
                ("to", to),
                ("relay", relay),
                ("delay", delay),
                ("delays", delays),
                ("dsn", dsn),
                ("status", status),
                ("reply", reply),
            ] {
                ev.insert(k.into(), v.into());
            }
        } else if body.starts_with("client=[") {
            ev.insert("event".into(), "accepted".into());
            let client = take(&mut r, "client=[", "], from=<").expect(line);
            let from = take(&mut r, "], from=<", ">, size=").expect(line);
            let size = take(&mut r, ">, size=", ", nrcpt=").expect(line);
            let nrcpt = take(&mut r, ", nrcpt=", " (queue active)").expect(line);
            assert_eq!(r, " (queue active)", "{line}");
            for (k, v) in [
                ("client", client),
                ("from", from),
                ("size", size),
                ("nrcpt", nrcpt),
            ] {
                ev.insert(k.into(), v.into());
            }
        } else if body == "removed" {
            ev.insert("event".into(), "removed".into());
        } else if let Some(bid) = body.strip_prefix("sender non-delivery notification: ") {
            ev.insert("event".into(), "bounce".into());
            ev.insert("bounce_id".into(), bid.into());
        } else {
            continue;
        }
        out.push(ev);
    }
    out
}

/// Parses every line as JSON (all must parse) and keeps those with a
/// queue id. Numbers must be JSON numbers.
fn json_events(log: &str) -> Vec<Ev> {
    let mut out = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(
            obj.contains_key("timestamp") && obj.contains_key("level"),
            "{line}"
        );
        if !obj.contains_key("queue_id") {
            continue;
        }
        for numeric in ["delay", "size", "nrcpt"] {
            if let Some(n) = obj.get(numeric) {
                assert!(n.is_number(), "{numeric} is not a number: {line}");
            }
        }
        let mut ev = Ev::new();
        for (k, val) in obj {
            if matches!(k.as_str(), "timestamp" | "level" | "target" | "message") {
                continue;
            }
            let text = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            ev.insert(k.clone(), text);
        }
        // The message is the same Postfix line, for grep.
        let msg = obj["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(&format!("{}: ", ev["queue_id"])), "{line}");
        out.push(ev);
    }
    out
}

fn find<'a>(evs: &'a [Ev], want: &[(&str, &str)]) -> Vec<&'a Ev> {
    evs.iter()
        .filter(|e| {
            want.iter()
                .all(|(k, v)| e.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn one<'a>(evs: &'a [Ev], want: &[(&str, &str)]) -> &'a Ev {
    let found = find(evs, want);
    assert_eq!(
        found.len(),
        1,
        "expected one event {want:?}, got {found:#?}"
    );
    found[0]
}

/// Sent, bounced, deferred and expired recipients, and the accepted,
/// bounce and removed lines around them; returns the parsed events.
async fn every_outcome(json: bool) -> Vec<Ev> {
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt(
                "bad@example.net",
                550,
                "5.1.1 <bad@example.net>: no such user",
            )
            .rcpt("busy@example.net", 451, "4.2.1 mailbox busy, try later"),
    )
    .await;
    let extra = if json { "log_format = \"json\"" } else { "" };
    let d = Daemon::start(&relay_config(up.addr(), extra));
    let body = b"Subject: outcomes\r\n\r\nhello\r\n";
    let r1 = send_mail(
        d.addr,
        "app@example.com",
        &["good@example.net", "bad@example.net"],
        body,
    )
    .await;
    let id1 = queue_id(&r1);
    let r2 = send_mail(d.addr, "app@example.com", &["busy@example.net"], body).await;
    let id2 = queue_id(&r2);

    // The JSON lines carry the Postfix text as their message, so the same
    // needles find them.
    d.wait_log(&format!("{id1}: removed"), WAIT);
    d.wait_log(&format!("{id2}: to=<busy@example.net>"), WAIT);
    let bounce1 = d.wait_log(&format!("{id1}: sender non-delivery notification: "), WAIT);
    let bid1 = bounce1
        .split("notification: ")
        .nth(1)
        .and_then(|s| s.get(..26))
        .expect("bounce id")
        .to_string();
    d.wait_log(&format!("{bid1}: removed"), WAIT);

    // Past max_lifetime (5d): the next attempt expires it.
    d.advance_clock(6 * 86_400);
    d.flush();
    d.wait_log(&format!("{id2}: removed"), WAIT);
    let log = d.log();
    let evs = if json {
        json_events(&log)
    } else {
        text_events(&log)
    };

    let relay = format!("127.0.0.1[127.0.0.1]:{}", up.port());
    let got = up.messages();
    let fake_id = |rcpt: &str| {
        got.iter()
            .find(|m| m.rcpts == [rcpt])
            .map(|m| m.queue_id.clone())
            .unwrap_or_else(|| panic!("upstream got nothing for {rcpt}"))
    };

    let acc = one(&evs, &[("event", "accepted"), ("queue_id", &id1)]);
    assert_eq!(acc["client"], "127.0.0.1");
    assert_eq!(acc["from"], "app@example.com");
    assert_eq!(acc["nrcpt"], "2");
    assert!(acc["size"].parse::<usize>().unwrap() > body.len());

    let sent = one(&evs, &[("queue_id", &id1), ("to", "good@example.net")]);
    assert_eq!(sent["event"], "delivery");
    assert_eq!(sent["relay"], relay);
    assert_eq!(sent["status"], "sent");
    assert_eq!(sent["dsn"], "2.0.0");
    // Verbatim, with the upstream's own message id.
    assert_eq!(
        sent["reply"],
        format!("250 2.0.0 Ok: queued as {}", fake_id("good@example.net"))
    );
    let delay: f64 = sent["delay"].parse().unwrap();
    assert!(delay >= 0.0);
    let parts: Vec<&str> = sent["delays"].split('/').collect();
    assert_eq!(parts.len(), 3, "{sent:?}");
    for p in parts {
        let (_, frac) = p.split_once('.').expect("two decimals");
        assert_eq!(frac.len(), 2, "{sent:?}");
        p.parse::<f64>().expect("a number");
    }

    let bounced = one(&evs, &[("queue_id", &id1), ("to", "bad@example.net")]);
    assert_eq!(bounced["status"], "bounced");
    assert_eq!(bounced["dsn"], "5.1.1");
    assert_eq!(
        bounced["reply"],
        "550 5.1.1 <bad@example.net>: no such user"
    );
    one(
        &evs,
        &[
            ("event", "bounce"),
            ("queue_id", &id1),
            ("bounce_id", &bid1),
        ],
    );
    let bounce_sent = one(&evs, &[("queue_id", &bid1), ("event", "delivery")]);
    assert_eq!(bounce_sent["to"], "app@example.com");
    assert_eq!(bounce_sent["status"], "sent");
    one(&evs, &[("event", "removed"), ("queue_id", &bid1)]);
    one(&evs, &[("event", "removed"), ("queue_id", &id1)]);

    let tries = find(&evs, &[("queue_id", &id2), ("to", "busy@example.net")]);
    let (last, earlier) = tries.split_last().expect("attempts at busy@");
    assert!(
        !earlier.is_empty(),
        "deferred before it expired: {tries:#?}"
    );
    for t in earlier {
        assert_eq!(t["status"], "deferred");
        assert_eq!(t["dsn"], "4.2.1");
        assert_eq!(t["reply"], "451 4.2.1 mailbox busy, try later");
        assert_eq!(t["relay"], relay);
    }
    assert_eq!(last["status"], "expired");
    assert_eq!(last["reply"], "451 4.2.1 mailbox busy, try later");
    assert!(last["delay"].parse::<f64>().unwrap() >= 6.0 * 86_400.0);
    let bounce2 = find(&evs, &[("event", "bounce"), ("queue_id", &id2)]);
    assert_eq!(bounce2.len(), 1, "{bounce2:#?}");
    one(&evs, &[("event", "removed"), ("queue_id", &id2)]);

    // One grep for the queue id tells the message's whole story, in order.
    let story: Vec<&str> = log.lines().filter(|l| l.contains(&id1)).collect();
    assert!(
        story.first().unwrap().contains("client=[127.0.0.1]"),
        "{story:#?}"
    );
    assert!(
        story.last().unwrap().contains(&format!("{id1}: removed")),
        "{story:#?}"
    );
    evs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_for_every_outcome_text() {
    let evs = every_outcome(false).await;
    assert!(evs.len() >= 10, "{evs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_for_every_outcome_json() {
    let evs = every_outcome(true).await;
    // JSON names the event kind, which the text leaves implicit.
    assert!(evs.iter().all(|e| e.contains_key("event")), "{evs:#?}");
}

fn scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of one sample, by name and labels; panics if absent.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one sample {name} {labels:?}, got {found:#?}"
    );
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count)
            .expect("+Inf bucket"),
        other => panic!("unexpected value {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_what_was_sent() {
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt("bad@example.net", 550, "5.1.1 no such user")
            .rcpt("busy@example.net", 451, "4.2.1 mailbox busy"),
    )
    .await;
    let upstream_addr = up.addr();
    let d = Daemon::start(&relay_config(
        upstream_addr,
        "status_listen = \"127.0.0.1:0\"",
    ));
    let http = status_addr(&d);
    let relay = format!("127.0.0.1:{}", upstream_addr.port());
    let by_relay = [("relay", relay.as_str())];

    // Before any mail: the counters exist at zero.
    let s = scrape(&get(http, "/metrics").await.body);
    assert_eq!(value(&s, "relayq_accepted_messages_total", &[]), 0.0);
    assert_eq!(
        value(&s, "relayq_delivered_recipients_total", &by_relay),
        0.0
    );
    assert_eq!(
        value(&s, "relayq_queue_messages", &[("area", "queue")]),
        0.0
    );

    let body = b"Subject: m\r\n\r\nhi\r\n";
    let a = queue_id(&send_mail(d.addr, "app@example.com", &["a@example.net"], body).await);
    let b = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["b@example.net", "bad@example.net"],
            body,
        )
        .await,
    );
    let c = queue_id(&send_mail(d.addr, "app@example.com", &["busy@example.net"], body).await);
    d.wait_log(&format!("{a}: removed"), WAIT);
    d.wait_log(&format!("{b}: removed"), WAIT);
    let notice = d.wait_log(&format!("{b}: sender non-delivery notification: "), WAIT);
    let bounce = notice.rsplit(' ').next().unwrap().to_string();
    d.wait_log(&format!("{bounce}: removed"), WAIT);
    d.wait_log(&format!("{c}: to=<busy@example.net>"), WAIT);

    let res = get(http, "/metrics").await;
    assert_eq!(res.status, 200);
    assert!(
        res.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let s = scrape(&res.body);
    assert_eq!(value(&s, "relayq_accepted_messages_total", &[]), 3.0);
    // a, b, and the bounce to app@example.com.
    assert_eq!(
        value(&s, "relayq_delivered_recipients_total", &by_relay),
        3.0
    );
    assert_eq!(value(&s, "relayq_bounced_recipients_total", &by_relay), 1.0);
    assert_eq!(
        value(&s, "relayq_deferred_recipients_total", &by_relay),
        1.0
    );
    assert_eq!(value(&s, "relayq_expired_recipients_total", &by_relay), 0.0);
    assert_eq!(value(&s, "relayq_delivery_delay_seconds", &[]), 3.0);
    assert_eq!(value(&s, "relayq_delivery_delay_seconds_count", &[]), 3.0);
    assert_eq!(value(&s, "relayq_relay_up", &by_relay), 1.0);
    assert_eq!(
        value(&s, "relayq_queue_messages", &[("area", "queue")]),
        1.0
    );
    assert_eq!(value(&s, "relayq_queue_messages", &[("area", "hold")]), 0.0);
    let file = d.dir.join("spool").join("queue").join(&c);
    let size = std::fs::metadata(&file).expect("c is queued").len();
    assert_eq!(value(&s, "relayq_spool_bytes", &[]), size as f64);
    assert!(value(&s, "relayq_queue_oldest_message_age_seconds", &[]) >= 0.0);
    assert!(
        s.samples
            .iter()
            .all(|x| x.metric != "relayq_upstream_errors_total"),
        "no upstream errors yet"
    );

    // The upstream goes away: a connection error, counted by kind.
    up.stop().await;
    let e = queue_id(&send_mail(d.addr, "app@example.com", &["e@example.net"], body).await);
    d.wait_log(&format!("{e}: to=<e@example.net>"), WAIT);
    let s = scrape(&get(http, "/metrics").await.body);
    assert_eq!(value(&s, "relayq_accepted_messages_total", &[]), 4.0);
    assert_eq!(
        value(
            &s,
            "relayq_upstream_errors_total",
            &[("relay", relay.as_str()), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(value(&s, "relayq_relay_up", &by_relay), 0.0);
    assert_eq!(
        value(&s, "relayq_deferred_recipients_total", &by_relay),
        2.0
    );
    assert_eq!(
        value(&s, "relayq_queue_messages", &[("area", "queue")]),
        2.0
    );

    let res = get(http, "/status").await;
    assert_eq!(res.status, 200);
    let st: serde_json::Value = serde_json::from_str(&res.body).expect("JSON");
    assert_eq!(st["hostname"], "relayq.test");
    assert_eq!(st["queue"]["messages"], 2);
    assert_eq!(st["queue"]["held"], 0);
    let relays = st["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0]["relay"], relay.as_str());
    assert_eq!(relays[0]["state"], "down");
    assert!(relays[0]["since"].as_str().unwrap().ends_with('Z'));
    let last_error = relays[0]["last_error"].as_str().unwrap();
    assert!(last_error.contains("Connection refused"), "{last_error}");
    let msgs = st["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["queue_id"], c.as_str(), "oldest first");
    assert_eq!(msgs[0]["recipients"][0]["address"], "busy@example.net");
    assert_eq!(msgs[0]["recipients"][0]["reason"], "451 4.2.1 mailbox busy");
    assert_eq!(msgs[1]["queue_id"], e.as_str());
    assert_eq!(st["recent_deliveries"].as_array().unwrap().len(), 3);
    let failures = st["recent_failures"].as_array().unwrap();
    assert_eq!(failures.len(), 3, "bad, busy, e: {failures:#?}");
    assert_eq!(failures[0]["queue_id"], e.as_str(), "newest first");
    assert!(
        failures
            .iter()
            .any(|f| f["to"] == "bad@example.net" && f["status"] == "bounced")
    );

    let res = get(http, "/healthz").await;
    assert_eq!((res.status, res.body.as_str()), (200, "ok\n"));
    let res = get(http, "/nothing-here").await;
    assert_eq!(res.status, 404);
    // A page in a browser that resolved some name to 127.0.0.1 (DNS
    // rebinding) is refused.
    let res = get_with_host(http, "/status", "attacker.example:9325").await;
    assert_eq!(res.status, 421);
    assert!(!res.body.contains("busy@example.net"));
    let res = get_with_host(http, "/status", &format!("localhost:{}", http.port())).await;
    assert_eq!(res.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_endpoint_is_off_by_default_and_loopback_only() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    assert_eq!(d.count_log("status endpoint"), 0);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relayq.toml");
    std::fs::write(
        &config,
        format!(
            "status_listen = \"0.0.0.0:9325\"\nspool_dir = \"{}\"\n[capture]\nmaildir = \"{}\"\n",
            dir.path().join("spool").display(),
            dir.path().join("Maildir").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::daemon::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("status_listen") && err.contains("not a loopback address"),
        "{err}"
    );
}

/// Under systemd (`Type=notify`) relayq says READY=1 only once it accepts
/// mail, and STOPPING=1 when it begins to shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_when_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;

    let dir = tempfile::tempdir().unwrap();
    let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("relayq.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[capture]\nmaildir = \"{}\"\n",
            dir.path().join("spool").display(),
            dir.path().join("Maildir").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(crate::support::daemon::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from relayq");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means ready: the SMTP port answers at once.
    let (_c, greeting) =
        crate::support::client::Client::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let n = notify.recv(&mut buf).expect("STOPPING=1 from relayq");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
