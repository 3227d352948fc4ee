//! The status page in a real browser: headless Chromium (Debian's
//! `chromium` package, installed by `.ci/run`) loads `/` from a running
//! relayq with mail queued behind a dead upstream, and the test checks what
//! it shows; a screenshot is kept in `target/tmp/` as an artifact.
//!
//! Chromium only ever loads the 127.0.0.1 URL of the test daemon: every
//! other host name maps to "not found", and background networking,
//! component updates and sync are off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::http::status_addr;
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(20);

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAYQ_CHROMIUM") {
        return PathBuf::from(p);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "headless Chromium is needed for the status page test: apt-get install chromium (.ci/run does), or set RELAYQ_CHROMIUM"
    );
}

/// Runs Chromium headless on `url` with `mode` (e.g. `--dump-dom`) and
/// returns its stdout. Killed after 90 seconds.
fn run_chromium(url: &str, mode: &[&str]) -> String {
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "the browser only loads the local test daemon: {url}"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-proxy-server",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--hide-scrollbars",
            "--window-size=1200,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
    assert!(status.success(), "chromium failed: {status}\n{err}");
    out
}

/// Character references as a browser shows them (the page uses these).
fn decode(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&middot;", "\u{b7}")
        .replace("&amp;", "&")
}

/// HTML as a person sees it: tags gone (each a space), blanks collapsed,
/// character references decoded.
fn visible(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    decode(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The `<section>` with `id`, from its opening tag to its end.
fn section_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[start..];
    &rest[..rest.find("</section>").unwrap_or(rest.len())]
}

/// The text of the `<section>` with `id` as a person sees it.
fn text_of(dom: &str, id: &str) -> String {
    let section = section_of(dom, id);
    visible(&section[section.find('>').map_or(0, |i| i + 1)..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium() {
    let up = FakeUpstream::start().await;
    let dead = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(dead, "status_listen = \"127.0.0.1:0\""));
    let http = status_addr(&d);
    let mut ids = Vec::new();
    for (i, to) in ["alice@example.net", "bob@example.net"].iter().enumerate() {
        let r = send_mail(
            d.addr,
            "app@example.com",
            &[to],
            format!("Subject: {i}\r\n\r\nhi\r\n").as_bytes(),
        )
        .await;
        let id = queue_id(&r);
        d.wait_log(&format!("{id}: to=<{to}>"), WAIT);
        ids.push(id);
    }
    let url = format!("http://{http}/");

    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run_chromium(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    assert!(!dom.contains("<script"), "no scripts on the page");
    assert!(
        dom.contains("<title>relayq on relayq.test</title>"),
        "{dom}"
    );

    let summary = text_of(&dom, "queue-summary");
    assert!(
        summary.starts_with("Queue 2 messages waiting for delivery, 0 on hold"),
        "{summary}"
    );
    let size = dom
        .split("id=\"queue-size\">")
        .nth(1)
        .and_then(|s| s.split('<').next());
    assert_eq!(size, Some("2"), "the big number");

    let relays = text_of(&dom, "relays");
    let relay = format!("127.0.0.1:{}", dead.port());
    assert!(relays.contains(&format!("{relay} down")), "{relays}");
    assert!(relays.contains("Connection refused"), "{relays}");

    let queued = text_of(&dom, "queued");
    for (id, to) in ids.iter().zip(["alice@example.net", "bob@example.net"]) {
        assert!(
            queued.contains(id.as_str()) && queued.contains(to),
            "{queued}"
        );
    }
    // Each deferred message's reason.
    assert_eq!(
        queued
            .matches(&format!("connect to {dead} failed: Connection refused"))
            .count(),
        2,
        "{queued}"
    );

    let failures = text_of(&dom, "failures");
    assert!(failures.contains("deferred (4.4.1)"), "{failures}");
    assert_eq!(
        text_of(&dom, "deliveries"),
        "Last deliveries No deliveries since relayq started."
    );
    let chart = text_of(&dom, "chart");
    assert!(
        chart.contains("Queue size over the last hour: 2 now"),
        "{chart}"
    );
    assert!(dom.contains("<polyline"), "the chart has a line");

    let shot_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || run_chromium(&url, &[&format!("--screenshot={}", shot.display())])
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    // A blank page compresses to a few KB; text and tables do not.
    assert!(
        png.len() > 20_000,
        "screenshot looks empty: {} bytes",
        png.len()
    );
    println!("status page screenshot: {}", shot.display());
}

/// The text of each table row of the section `id`, as a person sees it.
fn rows_of(dom: &str, id: &str) -> Vec<String> {
    section_of(dom, id)
        .split("<tr")
        .skip(2)
        .map(|row| visible(&row[row.find('>').map_or(0, |i| i + 1)..]))
        .collect()
}

/// Every state a relay can be in (up, down, paused, over a limit), as the
/// "Relays and limits" table shows it in a real browser: words and times,
/// never markup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_state_reads_right_in_headless_chromium() {
    let up = FakeUpstream::start().await;
    let capped = FakeUpstream::start().await;
    let throttling = FakeUpstream::start_with(
        Script::default().greeting(421, "4.7.0 Too many connections, slow down"),
    )
    .await;
    let gone = FakeUpstream::start().await;
    let dead = gone.addr();
    gone.stop().await;
    let relay = |name: &str, addr: std::net::SocketAddr, extra: &str| {
        format!(
            "[relay.{name}]\nhost = \"{}\"\nport = {}\ntls = \"none\"\nconnect_timeout = \"2s\"\nbreaker_pause = \"1h\"\nbreaker_pause_max = \"1h\"\n{extra}\n",
            addr.ip(),
            addr.port()
        )
    };
    let config = format!(
        "hostname = \"relayq.test\"\nstatus_listen = \"127.0.0.1:0\"\n{}{}{}{}\
         [[route]]\nsender_domain = \"up.example\"\nrelay = \"fine\"\n\
         [[route]]\nsender_domain = \"down.example\"\nrelay = \"gone\"\n\
         [[route]]\nsender_domain = \"paused.example\"\nrelay = \"throttled\"\n\
         [[route]]\nrelay = \"capped\"\n",
        relay("fine", up.addr(), ""),
        relay("gone", dead, ""),
        relay("throttled", throttling.addr(), ""),
        relay("capped", capped.addr(), "messages_per_day = 1"),
    );
    let d = Daemon::start(&config);
    for from in [
        "app@up.example",
        "app@down.example",
        "app@paused.example",
        "app@capped.example",
        "app@capped.example",
    ] {
        let r = send_mail(
            d.addr,
            from,
            &["bob@example.net"],
            b"Subject: s\r\n\r\nx\r\n",
        )
        .await;
        assert!(r.starts_with("250 "), "{r}");
    }
    up.wait_for_messages(1, WAIT).await;
    capped.wait_for_messages(1, WAIT).await;
    d.wait_log("relay gone (", WAIT);
    d.wait_log("relay throttled (", WAIT);
    d.wait_log("quota: 1/day reached", WAIT);

    let url = format!("http://{}/", status_addr(&d));
    let dom = tokio::task::spawn_blocking(move || run_chromium(&url, &["--dump-dom"]))
        .await
        .unwrap();
    let table = text_of(&dom, "routing");
    assert!(
        !table.contains('<') && !table.contains("&lt;") && !table.contains("&amp;"),
        "markup shown as text: {table}"
    );
    let rows = rows_of(&dom, "routing");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}: {rows:#?}"))
            .clone()
    };
    let fine = row("fine");
    assert!(
        fine.contains(" up ") && !fine.contains("limit reached"),
        "{fine}"
    );
    let gone = row("gone");
    assert!(
        gone.contains(&format!("{dead} down since ")) && gone.contains(" ago "),
        "{gone}"
    );
    let throttled = row("throttled");
    assert!(
        throttled.contains(" paused by the circuit breaker until 20"),
        "{throttled}"
    );
    let capped_row = row("capped");
    assert!(
        capped_row.contains(" up; day limit reached until 20")
            && capped_row.contains("1/1 per day"),
        "{capped_row}"
    );
}
