//! Adaptive concurrency against a real relayq: it opens more connections
//! while mail waits (up to `max_connections`), settles at what an upstream
//! allows when that upstream refuses one more connection with 421, halves
//! it when connects are refused or time out while other connections work,
//! loses and bounces nothing doing so, and shows its concurrency and the
//! reason for the last change in `queue list --json` and `/metrics`. (The
//! controller's decisions step by step, with an injected clock, are unit
//! tests in `src/routing/concurrency.rs`; the falling-rate signal is in
//! `rate.rs`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::pipelining::{
    arrived_intact, arrived_once, body, queue_then_flow_on, queue_then_flow_with, queue_while_down,
};
use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::Daemon;
use crate::support::http::{get, status_addr};
use crate::support::pki::{CertKind, TestCa};
use crate::support::upstream::{FakeUpstream, Script, UpstreamTls};

/// Adaptive (no `concurrency` key), with `extra` in `[relay]`.
pub(crate) fn config(port: u16, extra: &str) -> String {
    format!(
        "hostname = \"relayq.test\"\nstatus_listen = \"127.0.0.1:0\"\n[relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nconnect_timeout = \"5s\"\nidle_timeout = \"60s\"\n{extra}\n",
        port
    )
}

/// Queues `n` messages while the upstream is down, brings it back with
/// `script`, and flushes: every message is ready at once, a backlog.
async fn backlog(
    n: usize,
    extra: &str,
    script: Script,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    let config = |addr: SocketAddr| config(addr.port(), extra);
    queue_then_flow_with(
        config,
        n,
        script,
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await
}

/// The relay's line of `queue list --json`.
pub(crate) fn relay_state(d: &Daemon) -> serde_json::Value {
    let out = d.cli(&["queue", "list", "--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    let line = json
        .lines()
        .find(|l| l.contains("\"relay\":"))
        .unwrap_or_else(|| panic!("no relay object in {json}"));
    serde_json::from_str(line).unwrap()
}

/// Every message arrived once, none was deferred or bounced and the relay
/// was not paused; relayq tried one more connection than the upstream
/// allows (maybe a few, opening fast at first), kept the three it was
/// served (no churn), and logged its concurrency going to 3 for `refusal`.
fn settled_at_three(d: &Daemon, up: &FakeUpstream, ids: &[String], mark: usize, refusal: &str) {
    arrived_once(d, up, ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=bounced"), "{after}");
    assert!(
        !after.contains("status=deferred"),
        "a refused extra connection must not defer a message:\n{after}"
    );
    assert!(
        !after.contains("paused by the circuit breaker"),
        "its other connections work: no pause:\n{after}"
    );
    assert!(up.refused_sessions() >= 1, "a fourth connection was tried");
    assert_eq!(
        up.connections() - up.refused_sessions(),
        3,
        "connections served: {} of {} ({} at once at most)",
        up.connections() - up.refused_sessions(),
        up.connections(),
        up.peak_sessions()
    );
    let lowered = after
        .lines()
        .find(|l| l.contains(": concurrency ") && l.contains(" -> 3: "))
        .unwrap_or_else(|| panic!("no change to 3 in the log:\n{after}"));
    assert!(
        lowered.contains(&format!(" -> 3: the relay refused one more connection ({refusal}) while 3 were open; at most 3 for 5 min")),
        "{lowered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_three_connections_gets_three_and_loses_nothing() {
    let n = 60;
    let script = Script::default()
        .max_sessions(3)
        .reply_delay(Duration::from_millis(5));
    let (d, up, ids, mark) = backlog(n, "", script).await;
    settled_at_three(
        &d,
        &up,
        &ids,
        mark,
        "greeting rejected: 421 4.7.0 Too many concurrent SMTP connections",
    );
    let v = relay_state(&d);
    assert_eq!(v["state"], "up", "{v}");
    assert_eq!(v["adaptive"], true, "{v}");
    assert_eq!(v["concurrency"], 3, "{v}");
    assert_eq!(v["max_connections"], 25, "{v}");
    assert_eq!(v["concurrency_change"]["reason"], "refused", "{v}");
    assert_eq!(v["concurrency_change"]["to"], 3, "{v}");
    // /status, the page, the metrics and the listing say the same.
    let status = status_addr(&d);
    let json = get(status, "/status").await.body;
    let v: serde_json::Value = serde_json::from_str(&json).expect("/status is JSON");
    let relay = v["routing"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "default"))
        .unwrap_or_else(|| panic!("no relay \"default\" in /status routing: {json}"));
    assert_eq!(relay["concurrency"], 3, "{relay}");
    assert_eq!(relay["adaptive"], true, "{relay}");
    assert_eq!(relay["max_connections"], 25, "{relay}");
    assert_eq!(relay["concurrency_change"]["reason"], "refused", "{relay}");
    assert!(
        relay["concurrency_change"]["from"].as_u64() > Some(3),
        "{relay}"
    );
    assert_eq!(relay["concurrency_change"]["to"], 3, "{relay}");
    assert!(
        relay["concurrency_change"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("the relay refused one more connection")),
        "{relay}"
    );
    let metrics = get(status, "/metrics").await.body;
    let endpoint = format!("127.0.0.1:{}", up.port());
    for want in [
        format!("relayq_relay_concurrency{{relay=\"{endpoint}\",name=\"default\"}} 3"),
        format!("relayq_relay_max_connections{{relay=\"{endpoint}\",name=\"default\"}} 25"),
        format!(
            "relayq_relay_concurrency_reason{{relay=\"{endpoint}\",name=\"default\",reason=\"refused\"}} 1"
        ),
        format!(
            "relayq_relay_concurrency_reason{{relay=\"{endpoint}\",name=\"default\",reason=\"backlog\"}} 0"
        ),
    ] {
        assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    }
    let page = get(status, "/").await.body;
    assert!(
        page.contains("concurrency 3 of at most 25 (adaptive): ")
            && page.contains(" -&gt; 3: the relay refused one more connection"),
        "{page}"
    );
    let listing = String::from_utf8_lossy(&d.cli(&["queue", "list"]).stdout).to_string();
    assert!(
        listing.contains("concurrency 3/25 (adaptive)")
            && listing.contains(" -> 3: the relay refused one more connection"),
        "{listing}"
    );
}

/// A backlog to an upstream that serves `allowed` connections at once,
/// more than slow start's first four and fewer than its first step opens
/// together (4 -> 12), with `script` (its limit set) and `config`: each
/// connection the step opened beyond `allowed` is refused once, no more,
/// and relayq settles at `allowed` from the first refusals, keeping the
/// connections it was served and losing and deferring nothing. Each refusal must count the connections the
/// upstream let as far as the refused one got, not those refused with it
/// (the relay never counted those): else the first says 11, the others
/// are taken as stale, and relayq comes down one refusal a round, opening
/// more connections it is refused (a provider may block a client that
/// keeps trying). Seen so before: 10 refused against 8 (12 -> 11 -> 10 ->
/// 9 -> 8, one round each).
async fn learns_from_the_first_refusals(
    allowed: usize,
    config: impl Fn(SocketAddr) -> String,
    back: impl FnOnce(&FakeUpstream),
    refusal: &str,
) {
    let n = 200;
    let (d, up, ids, mark) = queue_then_flow_on(
        config,
        n,
        back,
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    assert!(!after.contains("status=bounced"), "{after}");
    let changes: Vec<&str> = after
        .lines()
        .filter(|l| l.contains(": concurrency "))
        .collect();
    let told = || {
        format!(
            "{} connections refused ({} served, {} at once at most); changes:\n{}",
            up.refused_sessions(),
            up.connections() - up.refused_sessions(),
            up.peak_sessions(),
            changes.join("\n")
        )
    };
    let step = 12;
    assert!(
        up.refused_sessions() >= 1 && up.refused_sessions() <= step - allowed,
        "{}",
        told()
    );
    assert_eq!(
        up.connections() - up.refused_sessions(),
        allowed,
        "it kept the connections it was served: {}",
        told()
    );
    let refused: Vec<&&str> = changes
        .iter()
        .filter(|l| l.contains("the relay refused one more connection"))
        .collect();
    assert!(!refused.is_empty(), "{}", told());
    for l in &refused {
        assert!(
            l.contains(&format!(" -> {allowed}: the relay refused one more connection ({refusal}) while {allowed} were open; at most {allowed} for 5 min")),
            "every refusal says what the upstream allows:\n{}",
            told()
        );
    }
    let v = relay_state(&d);
    assert_eq!(v["concurrency"], allowed, "{v}\n{}", told());
    assert_eq!(v["concurrency_change"]["reason"], "refused", "{v}");
}

/// [`learns_from_the_first_refusals`] from an upstream refusing at the
/// greeting what it cannot serve, greeting what it serves after `setup`.
async fn greeting_refusals(allowed: usize, setup: Duration) {
    let script = Script::default()
        .max_sessions(allowed)
        .setup_delay(setup)
        .reply_delay(Duration::from_millis(10));
    learns_from_the_first_refusals(
        allowed,
        |addr| config(addr.port(), ""),
        |up| up.set_script(script),
        "greeting rejected: 421 4.7.0 Too many concurrent SMTP connections",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_eight_connections_learns_it_from_the_first_refusals() {
    greeting_refusals(8, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_six_connections_learns_it_from_the_first_refusals() {
    greeting_refusals(6, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_ten_connections_learns_it_from_the_first_refusals() {
    greeting_refusals(10, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slow_to_greet_what_it_serves_learns_it_from_the_first_refusals() {
    // It refuses at once what it cannot serve, and greets what it serves
    // only after its checks (DNS, reputation): a refusal comes long
    // before the greetings of those opened with it, and waits for them,
    // while the connections at work deliver. Seen before: slow start
    // grew meanwhile (4 -> 12 -> 24), 16 refused.
    greeting_refusals(8, Duration::from_millis(400)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_at_ehlo_allowing_eight_learns_it_from_the_first_refusals() {
    // Greeted, then refused at EHLO: what counts is how far the others
    // got when it was answered, past their greeting.
    let allowed = 8;
    let refusal = "4.7.0 Too many connections from your host";
    let script = Script::default()
        .max_sessions_at_ehlo(allowed, 421, refusal)
        .reply_delay(Duration::from_millis(10));
    learns_from_the_first_refusals(
        allowed,
        |addr| config(addr.port(), ""),
        |up| up.set_script(script),
        &format!("ehlo rejected: 421 {refusal}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_eight_logins_learns_it_from_the_first_refusals() {
    // A provider counting logins refuses at AUTH, once every connection
    // opened with the refused one was greeted: what counts is how far
    // the others got, not whether they were greeted.
    let allowed = 8;
    let refusal = "4.7.0 Temporary authentication failure";
    let relay = LoginRelay::new();
    let script = relay
        .script()
        .max_logins(allowed, 454, refusal)
        .reply_delay(Duration::from_millis(10));
    learns_from_the_first_refusals(
        allowed,
        |addr| relay.config(addr),
        |up| relay.serve(up, script),
        &format!("authentication rejected: 454 {refusal}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_grows_while_mail_waits_up_to_max_connections() {
    let n = 80;
    // Replies take a while, as from a provider far away: more connections
    // drain faster, so relayq opens them, but never more than 7.
    let script = Script::default().reply_delay(Duration::from_millis(10));
    let (d, up, ids, mark) = backlog(n, "max_connections = 7", script).await;
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    assert!(
        up.peak_sessions() > 4,
        "it never opened more than it started with: {}",
        up.peak_sessions()
    );
    assert!(
        up.peak_sessions() <= 7,
        "{} connections at once, max_connections is 7",
        up.peak_sessions()
    );
    let v = relay_state(&d);
    assert_eq!(v["max_connections"], 7, "{v}");
    assert_eq!(v["concurrency"], 7, "{v}");
    assert_eq!(v["concurrency_change"]["reason"], "backlog", "{v}");
    // Slow start opens what the four earned once they are measured: all
    // the way to the cap at once.
    assert_eq!(
        v["concurrency_change"]["text"], "4 -> 7: mail waiting and the relay answering well",
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_a_fourth_login_with_454_gets_three() {
    // A provider that counts logins, not connections: the fourth is let
    // in, offered STARTTLS, and refused at AUTH with a 454 whose text
    // says nothing of "too many" (Microsoft's words): the code is the
    // pushback.
    let refusal = "4.7.0 Temporary authentication failure";
    let relay = LoginRelay::new();
    let script = relay
        .script()
        .max_logins(3, 454, refusal)
        .reply_delay(Duration::from_millis(5));
    let n = 60;
    let (d, up, ids, mark) = queue_then_flow_on(
        |addr| relay.config(addr),
        n,
        |up| relay.serve(up, script),
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    settled_at_three(
        &d,
        &up,
        &ids,
        mark,
        &format!("authentication rejected: 454 {refusal}"),
    );
    let v = relay_state(&d);
    assert_eq!(v["concurrency"], 3, "{v}");
    assert_eq!(v["concurrency_change"]["reason"], "refused", "{v}");
}

/// An upstream that wants STARTTLS and a login (user "apikey"), and the
/// relayq config for it: a provider that may count logins.
struct LoginRelay {
    _dir: tempfile::TempDir,
    ca: TestCa,
    cert: crate::support::pki::ServerCert,
    secret: std::path::PathBuf,
}

impl LoginRelay {
    fn new() -> LoginRelay {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(&dir.path().join("pki"));
        let cert = ca.server_cert(CertKind::Good);
        let secret = dir.path().join("relay-password");
        std::fs::write(&secret, "the-password\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        LoginRelay {
            _dir: dir,
            ca,
            cert,
            secret,
        }
    }

    fn script(&self) -> Script {
        Script::default().require_auth("apikey", "the-password")
    }

    fn config(&self, addr: SocketAddr) -> String {
        format!(
            "hostname = \"relayq.test\"\nstatus_listen = \"127.0.0.1:0\"\n[relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = {:?}\nusername = \"apikey\"\npassword_file = {:?}\nconnect_timeout = \"5s\"\nidle_timeout = \"60s\"\n",
            addr.port(),
            self.ca.ca_file.display().to_string(),
            self.secret.display().to_string()
        )
    }

    /// The upstream, back, runs `script` with STARTTLS.
    fn serve(&self, up: &FakeUpstream, script: Script) {
        up.set_script(script);
        up.set_tls(UpstreamTls::StartTls, &self.cert);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_on_a_connection_in_use_halves_concurrency_and_loses_nothing() {
    // The relay answers one message with 421 and closes that connection
    // while the others work: half the connections, not a paused relay,
    // and the message goes again.
    let n = 60;
    let script = Script::default()
        .reply_delay(Duration::from_millis(10))
        .throttle_body(30);
    let (d, up, ids, mark) = backlog(n, "max_connections = 8", script).await;
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=bounced"), "{after}");
    assert!(
        !after.contains("paused by the circuit breaker"),
        "its other connections work: no pause:\n{after}"
    );
    let (halved, from, to) = throttle_cut(&after);
    assert!(
        halved.contains("421 4.7.0 Too many messages, slow down)"),
        "{halved}"
    );
    // The message answered 421 went again a second later, on another
    // connection (arrived_once saw it arrive).
    assert_eq!(to, (from / 2).max(1), "halved: {halved}");
}

/// The cut a 421 on a connection in use made, from the log: its line, and
/// the concurrency before and after.
fn throttle_cut(after: &str) -> (String, usize, usize) {
    cut_for(after, ": the relay throttled a connection (")
}

/// The first change of the concurrency whose reason says `why`, from the
/// log: its line, and the concurrency before and after.
pub(crate) fn cut_for(after: &str, why: &str) -> (String, usize, usize) {
    let line = after
        .lines()
        .find(|l| l.contains(": concurrency ") && l.contains(why))
        .unwrap_or_else(|| panic!("no change for {why:?} in the log:\n{after}"));
    let (from, to) = line
        .split(": concurrency ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .and_then(|t| t.split_once(" -> "))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("{line}"));
    (line.to_string(), from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_cut_take_no_more_mail_while_mail_waits() {
    // A 421 halves the concurrency in the middle of a backlog. The
    // connections over the new number must finish what they carry and
    // close, not go on taking message after message behind it until the
    // backlog is gone (the cut would then be a number on the status page,
    // not fewer connections to a relay that asked for fewer).
    let n = 120;
    let script = Script::default()
        .reply_delay(Duration::from_millis(20))
        .throttle_body(30);
    let (d, up, ids, mark) = backlog(n, "max_connections = 8", script).await;
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    let (_, _, to) = throttle_cut(&after);
    let (at, opened) = up.throttled().expect("the 421 went out");
    // Per connection opened before the 421, the messages it carried after.
    let mut carried: HashMap<usize, usize> = HashMap::new();
    for m in up
        .messages()
        .iter()
        .filter(|m| m.conn <= opened && m.at > at)
    {
        *carried.entry(m.conn).or_default() += 1;
    }
    eprintln!(
        "cut to {to}; carried after the 421 by connections opened before: {carried:?} (opened {opened})"
    );
    assert!(!carried.is_empty(), "nothing was on its way at the 421");
    // One over the cut may still finish what was on its way when relayq
    // read the 421: the message in flight, the one whose envelope went
    // behind its end of data, one more written meanwhile.
    let went_on = carried.values().filter(|&&k| k > 3).count();
    assert!(
        went_on <= to,
        "{went_on} connections open before the cut to {to} went on taking mail: {carried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_before_the_transaction_of_a_message_behind_another_is_not_its_attempt() {
    // The relay answers a message normally, then the RSET or MAIL of the
    // message behind it on that connection with 421 and closes. That
    // message's transaction never began: it goes back untouched (no
    // deferral logged, no attempt counted) and arrives once. The relay had
    // just served the connection: its limit per connection, not pushback,
    // so the concurrency is not cut. With DATA (the envelope pipelined
    // behind the dot: MAIL) and in a BDAT window (RSET or MAIL).
    for (case, after) in behind_a_body_421(60, 30, "max_connections = 8").await {
        assert!(
            after.contains("421 4.7.0 Too many messages, closing"),
            "{case}: the 421 was read:\n{after}"
        );
        let cuts = after
            .lines()
            .filter(|l| l.contains(": concurrency ") && l.contains("throttled"))
            .count();
        assert_eq!(cuts, 0, "{case}: no cut for the relay's limit:\n{after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_while_others_work_cut_concurrency_and_defer_nothing() {
    // The upstream takes the four connections relayq starts with, then
    // its port refuses more (the kernel answers RST): each connect refused
    // while the four work is pushback on the concurrency ("failed"), not
    // an outage, and the message it was for waits for a working one.
    let n = 60;
    let script = Script::default()
        .reply_delay(Duration::from_millis(10))
        .accept_at_most(4);
    let (d, up, ids, mark) = backlog(n, "max_connections = 8", script).await;
    arrived_once(&d, &up, &ids);
    assert_eq!(up.connections(), 4, "only four were ever let in");
    let after = d.log()[mark..].to_string();
    let (cut, _, _) = failed_connects_cut_only(&after, "");
    assert!(cut.contains("Connection refused"), "{cut}");
    // On /metrics, the last change: that cut, or a step up after it (the
    // two working connections busy with mail waiting), never more than
    // the cap; never an outage's reason.
    let metrics = get(status_addr(&d), "/metrics").await.body;
    let endpoint = format!("127.0.0.1:{}", up.port());
    let last = ["failed", "backlog"].iter().any(|reason| {
        metrics.contains(&format!(
            "relayq_relay_concurrency_reason{{relay=\"{endpoint}\",name=\"default\",reason=\"{reason}\"}} 1"
        ))
    });
    assert!(last, "{metrics}");
    let v = relay_state(&d);
    assert!(
        v["concurrency"]
            .as_u64()
            .is_some_and(|c| (1..=8).contains(&c)),
        "{v}"
    );
    assert_eq!(v["state"], "up", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_connects_while_others_work_cut_concurrency_and_defer_nothing() {
    // The upstream serves the four connections relayq starts with, then
    // stops accepting with its listen queue full: a connection after them
    // gets no answer (its SYNs are dropped) and times out after
    // connect_timeout. Each timeout while the four work is pushback on the
    // concurrency ("failed"), not an outage: nothing deferred, nothing
    // paused, every message arrives once, byte for byte. With DATA and
    // with BDAT streams.
    for chunking in [false, true] {
        let n = 60;
        let mut script = Script::default()
            .reply_delay(Duration::from_millis(10))
            .stall_accept_after(4);
        if chunking {
            script = script.chunking();
        }
        // A short connect timeout, so the timeouts come while mail flows.
        let config = |addr: SocketAddr| {
            config(addr.port(), "max_connections = 8")
                .replace("connect_timeout = \"5s\"", "connect_timeout = \"1s\"")
        };
        let (d, up, ids, mark) = queue_then_flow_with(
            config,
            n,
            script,
            |_| "app@example.com",
            |_| vec!["bob@example.net"],
        )
        .await;
        let case = format!("chunking {chunking}");
        for m in arrived_intact(&d, &up, &ids).values() {
            assert_eq!(m.via, if chunking { "BDAT" } else { "DATA" }, "{case}");
        }
        assert_eq!(up.connections(), 4, "{case}: only four were ever let in");
        let after = d.log()[mark..].to_string();
        let (cut, from, to) = failed_connects_cut_only(&after, &case);
        eprintln!("{case}: {cut}");
        let endpoint = format!("127.0.0.1:{}", up.port());
        assert!(
            cut.contains(&format!("(connect to {endpoint} timed out after 1s)")),
            "{case}: {cut}"
        );
        assert_eq!(to, (from / 2).max(1), "{case}: halved: {cut}");
        let v = relay_state(&d);
        assert_eq!(v["state"], "up", "chunking {chunking}: {v}");
        assert!(
            v["concurrency"]
                .as_u64()
                .is_some_and(|c| (1..=8).contains(&c)),
            "{v}"
        );
        // /status says the same: the relay up, and its last change that
        // cut or a step up after it (never an outage's reason).
        let json = get(status_addr(&d), "/status").await.body;
        let v: serde_json::Value = serde_json::from_str(&json).expect("/status is JSON");
        let relay = v["routing"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == "default"))
            .unwrap_or_else(|| panic!("no relay \"default\" in /status routing: {json}"));
        let reason = relay["concurrency_change"]["reason"].as_str().unwrap_or("");
        assert!(["failed", "backlog"].contains(&reason), "{relay}");
    }
}

/// Connections that could not be opened while others worked (the log
/// since the flush: `after`) cut the concurrency and did nothing else:
/// nothing deferred or bounced, the relay neither paused nor down. The
/// cut's line, and the concurrency before and after.
fn failed_connects_cut_only(after: &str, case: &str) -> (String, usize, usize) {
    assert!(!after.contains("status=deferred"), "{case}:\n{after}");
    assert!(!after.contains("status=bounced"), "{case}:\n{after}");
    assert!(
        !after.contains("paused by the circuit breaker") && !after.contains("is down"),
        "{case}: others work: not an outage:\n{after}"
    );
    cut_for(after, "a connection failed while others worked (")
}

/// For DATA (the envelope pipelined behind the dot: MAIL) and in a BDAT
/// window (RSET or MAIL): `n` messages to a relay (`extra`) that answers
/// the `kth` body, then the RSET or MAIL behind it with 421 and closes.
/// Each arrived once, none deferred or bounced, the one behind the 421
/// handed back untouched; the case and the log since the flush.
async fn behind_a_body_421(n: usize, kth: usize, extra: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    for (chunking, at_rset) in [(false, false), (true, true), (true, false)] {
        let mut script = Script::default()
            .reply_delay(Duration::from_millis(10))
            .throttle_after_body(kth, at_rset);
        if chunking {
            script = script.chunking();
        }
        let case = format!("{extra}, chunking {chunking}, 421 at RSET {at_rset}");
        let (d, up, ids, mark) = backlog(n, extra, script).await;
        arrived_once(&d, &up, &ids);
        assert!(up.throttled().is_some(), "{case}: the 421 went out");
        let after = d.log()[mark..].to_string();
        assert!(
            !after.contains("status=deferred"),
            "{case}: a message the relay never began was logged deferred:\n{after}"
        );
        assert!(!after.contains("status=bounced"), "{case}:\n{after}");
        assert!(
            after.contains("the relay ended the session before this message's transaction began")
                || after.contains("the connection ended before the relay took anything of it"),
            "{case}: the message behind the 421 was not handed back:\n{after}"
        );
        seen.push((case, after));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_behind_a_body_on_a_relays_only_connection_pauses_nothing() {
    // As above, with one connection: the relay served it a message just
    // before, so the 421 is its limit per connection or its pushback on
    // that connection, not an outage: a new connection takes the message
    // at once, and the relay is not paused (which would hold and defer
    // every message for the circuit breaker's pause).
    for (case, after) in behind_a_body_421(30, 10, "max_connections = 1").await {
        assert!(
            !after.contains("paused by the circuit breaker"),
            "{case}: one connection's 421 paused the relay:\n{after}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_to_the_first_mail_on_a_new_connection_is_that_messages_attempt_with_data_and_bdat() {
    // The relay answers the first MAIL on the first connection relayq
    // opens with 421 and closes: it refuses service, and the message
    // whose MAIL it was is deferred, its attempt counted, the same with
    // DATA as in a BDAT stream (where messages were written behind it:
    // they go back untouched, no attempt counted). Once the relay takes
    // mail, every message arrives once.
    let mut seen = Vec::new();
    for chunking in [false, true] {
        let case = format!("chunking {chunking}");
        let mut script = Script::default()
            .reply_delay(Duration::from_millis(10))
            .refuse_first_mail_on(1);
        if chunking {
            script = script.chunking();
        }
        let config = |addr: SocketAddr| {
            crate::support::daemon::relay_config(addr, "")
                .replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\"")
                .replace("concurrency = 2", "concurrency = 1")
        };
        let (d, addr, ids) = queue_while_down(
            config,
            6,
            |_| "app@example.com",
            |_| vec!["bob@example.net"],
            body,
        )
        .await;
        // Attempts counted while the relay was down, before it serves.
        let before = attempts(&d, &ids);
        let up = FakeUpstream::start_on(addr).await.expect("upstream back");
        up.set_script(script);
        let mark = d.log_mark();
        d.flush();
        for id in &ids {
            d.wait_log_since(mark, &format!("{id}: to=<"), Duration::from_secs(30));
        }
        let after = d.log()[mark..].to_string();
        let refused: Vec<&str> = after
            .lines()
            .filter(|l| l.contains("status=deferred") && !l.contains("relay=none"))
            .collect();
        assert_eq!(
            refused.len(),
            1,
            "{case}: the message refused service is deferred, once:\n{after}"
        );
        let first = ids
            .iter()
            .find(|id| refused[0].contains(&format!("{id}: ")))
            .expect("a queued message");
        // Attempts counted by the 421, per message: (the first?, how many).
        let attempts: Vec<(bool, u32)> = ids
            .iter()
            .zip(attempts(&d, &ids).iter().zip(&before))
            .map(|(id, (now, then))| (id == first, now - then))
            .collect();
        for (is_first, counted) in &attempts {
            assert_eq!(
                *counted,
                u32::from(*is_first),
                "{case}: attempts {attempts:?}\n{after}"
            );
        }
        assert!(
            !after.contains("may arrive twice"),
            "{case}: a 421 before the transaction leaves no doubt:\n{after}"
        );
        if chunking {
            assert!(
                after.contains("the connection ended before the relay took anything of it"),
                "{case}: nothing was written behind it:\n{after}"
            );
        }
        // The relay serves again: the deferred message's retry time and
        // the pause the 421 caused pass.
        d.advance_clock(600);
        let by_index = arrived_once(&d, &up, &ids);
        assert!(
            by_index
                .values()
                .all(|m| m.via == if chunking { "BDAT" } else { "DATA" }),
            "{case}"
        );
        let after = d.log()[mark..].to_string();
        let first_lines: Vec<&str> = after
            .lines()
            .filter(|l| l.contains(&format!("{first}: to=<")) && !l.contains("relay=none"))
            .collect();
        assert_eq!(
            first_lines.len(),
            2,
            "{case}: deferred, then sent:\n{after}"
        );
        assert!(
            first_lines[1].contains("status=sent"),
            "{case}: {}",
            first_lines[1]
        );
        seen.push((case, outcome_fields(refused[0], up.port()), attempts));
    }
    // DATA and BDAT agree: the same deferral, logged the same way, and
    // the same attempts counted.
    let mut attempts: Vec<Vec<(bool, u32)>> = seen.iter().map(|s| s.2.clone()).collect();
    for a in &mut attempts {
        a.sort();
    }
    assert_eq!(attempts[0], attempts[1], "{seen:?}");
    assert_eq!(seen[0].1, seen[1].1, "{seen:?}");
}

/// Each message's attempts, from `relayq queue show`.
fn attempts(d: &Daemon, ids: &[String]) -> Vec<u32> {
    ids.iter()
        .map(|id| {
            let show = d.cli(&["queue", "show", id]);
            let show = String::from_utf8_lossy(&show.stdout).to_string();
            show.lines()
                .find_map(|l| l.strip_prefix("attempts:"))
                .and_then(|a| a.trim().split(',').next()?.parse().ok())
                .unwrap_or_else(|| panic!("{id} not queued: {show}"))
        })
        .collect()
}

/// An attempt's log line without its queue id, times and port: relay,
/// dsn and status.
fn outcome_fields(line: &str, port: u16) -> String {
    let relay = line
        .split("relay=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("")
        .replace(&port.to_string(), "PORT");
    let rest = line.split(", dsn=").nth(1).unwrap_or("");
    format!("relay={relay}, dsn={rest}")
}

/// A relay with a limit of messages per connection (it answers the MAIL
/// after the fifth message on a connection "421 ... Too many messages in
/// this session" and closes, as a kept connection's idle timeout does):
/// that is no pushback, whether the next message came on the connection
/// after it sat idle (relayq says so) or went out behind the fifth's end
/// of data under a backlog. With DATA and with BDAT: nothing deferred,
/// nothing lost, and the concurrency never cut for it.
async fn a_limit_of_messages_per_connection(chunking: bool) {
    let n = 120;
    let script = Script::default()
        .reply_delay(Duration::from_millis(5))
        .messages_per_connection(5);
    let script = if chunking { script.chunking() } else { script };
    let (d, up, ids, mark) = backlog(n, "max_connections = 8", script).await;
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    let cuts: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("concurrency") && l.contains("throttled"))
        .collect();
    assert!(
        cuts.is_empty(),
        "chunking {chunking}: {} cuts for the relay's limit per connection, the first: {:?}",
        cuts.len(),
        cuts.first()
    );
    assert!(!after.contains("status=deferred"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_limit_of_messages_per_connection_is_no_pushback_with_data() {
    a_limit_of_messages_per_connection(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_limit_of_messages_per_connection_is_no_pushback_with_bdat() {
    a_limit_of_messages_per_connection(true).await;
}

/// A relay that allows one connection, and ends a kept one with a 421
/// (`script`): relayq closes the connection it ended before it opens the
/// one that replaces it, so the relay, which counts a connection until
/// the client closes it, never sees two and refuses none, and every
/// message goes out at once, none deferred. `chunking`: the relay offers
/// CHUNKING (the stream replaces the connection; else DATA does).
async fn a_kept_connection_the_relay_ended_is_closed_first(script: Script, chunking: bool) {
    let wait = Duration::from_secs(30);
    let script = if chunking { script.chunking() } else { script };
    let up = FakeUpstream::start_with(script.max_sessions(1)).await;
    let d = Daemon::start(&config(up.port(), "max_connections = 1"));
    for i in 0..3 {
        let body = format!("Subject: {i}\r\n\r\nmessage {i}\r\n");
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            body.as_bytes(),
        )
        .await;
        let id = queue_id(&r);
        let line = d.wait_log(&format!("{id}: to=<bob@example.net>"), wait);
        assert!(
            line.contains("status=sent"),
            "chunking {chunking}, message {i}: {line}\n{}",
            d.log()
        );
    }
    assert_eq!(
        (
            up.refused_sessions(),
            up.peak_sessions(),
            up.messages().len()
        ),
        (0, 1, 3),
        "chunking {chunking}: (refused, most at once, taken)"
    );
    assert!(!d.log().contains("status=deferred"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_ended_at_its_limit_of_messages_is_closed_before_another_opens() {
    // The MAIL after its one message gets "421 4.7.0 Too many messages
    // in this session".
    for chunking in [false, true] {
        let script = Script::default().messages_per_connection(1);
        a_kept_connection_the_relay_ended_is_closed_first(script, chunking).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_ended_at_its_rset_is_closed_before_another_opens() {
    // The RSET after the first message gets "421 4.7.0 Too many messages,
    // closing".
    for chunking in [false, true] {
        let script = Script::default().throttle_after_body(1, true);
        a_kept_connection_the_relay_ended_is_closed_first(script, chunking).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_the_relay_is_at_its_limit_does_not_stop_the_mail() {
    // An upstream allowing three, at its limit with relayq's connections
    // when a reload (SIGHUP) builds new pools: the old pool's connections
    // finish the mail they carry and close (idle ones at once), so that
    // the new pool gets the relay's three; until then its refusals count
    // them. Seen before: the old pool's idle connections stayed open for
    // good (nothing reaps a pool a reload replaced), the relay refused
    // every new connection, and the mail stopped (26 of 200 delivered a
    // minute later; refused together, counted as none open: the circuit
    // breaker paused the relay, again at each probe).
    let wait = Duration::from_secs(60);
    let n = 200;
    let script = Script::default()
        .max_sessions(3)
        .reply_delay(Duration::from_millis(20));
    // A pause costs 1 s here (see below), not the default 30.
    let (d, up, ids, mark) = backlog(n, "breaker_pause = \"1s\"", script).await;
    let pid = d.pid().expect("daemon running") as i32;
    for (i, at) in [20, 70].into_iter().enumerate() {
        let deadline = std::time::Instant::now() + wait;
        while up.messages().len() < at {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {at} arrived after reload {i}; {} refused ({} connections):\n{}",
                up.messages().len(),
                up.refused_sessions(),
                up.connections(),
                &d.log()[mark..]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = std::fs::read_to_string(&d.config).unwrap();
        std::fs::write(&d.config, format!("{text}\n# reload {i}\n")).unwrap();
        let since = d.log_mark();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        d.wait_log_since(since, "reloaded ", wait);
    }
    arrived_once(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=bounced"), "{after}");
    // A new connection that reaches the relay while the old ones are
    // being closed (QUIT) is refused: the old ones are gone from what
    // relayq holds by the time it counts, so it must count those closed
    // while the refused one was being opened, or it finds none open and
    // the circuit breaker pauses the relay, deferring the whole queue
    // (seen in 6 runs of 7 before).
    assert!(!after.contains("paused by the circuit breaker"), "{after}");
}
