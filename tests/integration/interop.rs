//! Interoperability with peers nobody here wrote: Python's smtplib and
//! swaks as clients, Python's aiosmtpd as the upstream. What arrives is
//! compared byte for byte with what the client put on the wire.
//!
//! The peers are installed by `.ci/run`. A test whose peer is missing
//! fails and says how to install it: it never passes without its peer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::client::{Client, dot_stuff, queue_id};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::peers::require;
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

fn require_python() {
    require(
        "python3",
        "python3",
        &["--version"],
        "apt-get install -y python3",
    );
}

fn require_aiosmtpd() {
    require_python();
    require(
        "Python's aiosmtpd",
        "python3",
        &["-c", "import aiosmtpd"],
        "python3 -m pip install aiosmtpd",
    );
}

fn require_swaks() {
    require("swaks", "swaks", &["--version"], "apt-get install -y swaks");
}

/// A free port on 127.0.0.1 for a peer that cannot be told to pick one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One message as aiosmtpd received it.
#[derive(Debug)]
struct AioMessage {
    mail_from: String,
    rcpt_tos: Vec<String>,
    mail_options: Vec<String>,
    helo: String,
    data: Vec<u8>,
}

impl AioMessage {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// `python3 -m aiosmtpd` with the dump handler from tests/peers; killed
/// when dropped.
struct Aiosmtpd {
    child: Child,
    addr: SocketAddr,
    out: tempfile::TempDir,
}

impl Aiosmtpd {
    async fn start() -> Aiosmtpd {
        require_aiosmtpd();
        let out = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "--smtputf8", "-l"])
            .arg(addr.to_string())
            .args(["-c", "aiosmtpd_dump.DumpHandler"])
            .arg(out.path())
            .env("PYTHONPATH", PEERS)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 -m aiosmtpd");
        // Ready when it greets.
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(s) = TcpStream::connect(addr).await {
                let mut r = BufReader::new(s);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_ok() && line.starts_with("220 ") {
                    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("aiosmtpd exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Aiosmtpd { child, addr, out }
    }

    /// Everything received so far, in order.
    fn messages(&self) -> Vec<AioMessage> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.out.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|json| {
                let meta: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
                let strings = |k: &str| -> Vec<String> {
                    meta[k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect()
                };
                AioMessage {
                    mail_from: meta["mail_from"].as_str().unwrap().to_string(),
                    rcpt_tos: strings("rcpt_tos"),
                    mail_options: strings("mail_options"),
                    helo: meta["helo"].as_str().unwrap_or_default().to_string(),
                    data: std::fs::read(json.with_extension("eml")).unwrap(),
                }
            })
            .collect()
    }

    async fn wait_for(&mut self, n: usize) -> Vec<AioMessage> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("aiosmtpd exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd got {} of {n} messages: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Splits a relayed message into the header lines relayq puts in front
/// (Received, and Message-ID/Date when missing) and the client's message.
fn split_added(data: &[u8]) -> (String, &[u8]) {
    let mut pos = 0;
    let mut in_added = false;
    while pos < data.len() {
        let end = data[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(data.len(), |p| pos + p + 2);
        let line = &data[pos..end];
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        let added = line.starts_with(b"Received: ")
            || line.starts_with(b"Message-ID: <")
            || line.starts_with(b"Date: ");
        if added || (continuation && in_added) {
            in_added = true;
            pos = end;
        } else {
            break;
        }
    }
    (
        String::from_utf8_lossy(&data[..pos]).into_owned(),
        &data[pos..],
    )
}

/// A header's value in a message (first occurrence, unfolded).
fn header(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let prefix = format!("{name}: ");
    text.split("\r\n\r\n")
        .next()?
        .split("\r\n")
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiosmtpd_upstream_receives_byte_for_byte() {
    let mut aio = Aiosmtpd::start().await;
    let d = Daemon::start(&relay_config(aio.addr, ""));
    let cases: Vec<(&str, Vec<&str>, &str, Vec<u8>)> = vec![
        (
            "app@example.com",
            vec!["bob@example.net"],
            "",
            b"From: app@example.com\r\nSubject: ascii\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nplain text\r\n"
                .to_vec(),
        ),
        (
            "app@example.com",
            vec!["carol@example.net", "dave@example.org"],
            " BODY=8BITMIME",
            "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e, caf\u{e9}, \u{65e5}\u{672c}\r\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "app@example.com",
            vec!["bob@example.net"],
            "",
            b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\nend.\r\n. space\r\n"
                .to_vec(),
        ),
        (
            "j\u{f6}rg@b\u{fc}cher.example",
            vec!["\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{6d4b}\u{8bd5}"],
            " SMTPUTF8",
            "Subject: utf8 envelope\r\n\r\nhallo\r\n".as_bytes().to_vec(),
        ),
    ];
    for (from, rcpts, params, data) in &cases {
        let (mut c, _) = Client::connect(d.addr).await;
        c.cmd("EHLO app.test").await;
        let r = c.cmd(&format!("MAIL FROM:<{from}>{params}")).await;
        assert!(r.starts_with("250"), "{r}");
        for rcpt in rcpts {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert!(r.starts_with("250"), "{r}");
        }
        assert!(c.cmd("DATA").await.starts_with("354"));
        let wire = dot_stuff(data);
        c.send(&wire).await;
        c.send(b".\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
        d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    }
    let got = aio.wait_for(cases.len()).await;
    for ((from, rcpts, params, data), m) in cases.iter().zip(&got) {
        assert_eq!(m.mail_from, *from);
        assert_eq!(m.rcpt_tos, *rcpts);
        assert_eq!(m.helo, "relayq.test");
        let (added, rest) = split_added(&m.data);
        assert_eq!(
            rest,
            &data[..],
            "changed in transit; aiosmtpd got:\n{}",
            m.text()
        );
        assert!(
            added.starts_with("Received: from app.test ([127.0.0.1])"),
            "{added}"
        );
        if params.contains("SMTPUTF8") {
            assert!(m.mail_options.iter().any(|o| o == "SMTPUTF8"), "{m:?}");
        }
        if params.contains("8BITMIME") {
            assert!(m.mail_options.iter().any(|o| o == "BODY=8BITMIME"), "{m:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_through_relayq_to_aiosmtpd() {
    require_python();
    let mut aio = Aiosmtpd::start().await;
    let d = Daemon::start(&relay_config(aio.addr, ""));
    let report = d.dir.join("smtplib.json");
    let out = Command::new("python3")
        .arg(Path::new(PEERS).join("smtplib_client.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(d.addr.port().to_string())
        .arg(&report)
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "smtplib client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let got = aio.wait_for(cases.len()).await;
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let sent = base64::engine::general_purpose::STANDARD
            .decode(case["sent"].as_str().unwrap())
            .unwrap();
        let m = got
            .iter()
            .find(|m| header(&m.data, "X-Case").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("case {name} did not arrive: {got:#?}"));
        assert_eq!(m.mail_from, case["mail_from"].as_str().unwrap(), "{name}");
        let rcpts: Vec<&str> = case["rcpts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(m.rcpt_tos, rcpts, "{name}");
        let (added, rest) = split_added(&m.data);
        assert_eq!(
            String::from_utf8_lossy(rest),
            String::from_utf8_lossy(&sent),
            "{name}: what smtplib sent is what aiosmtpd got"
        );
        assert_eq!(rest, &sent[..], "{name}: byte for byte");
        assert!(
            added.starts_with("Received: from smtplib.test ([127.0.0.1])"),
            "{added}"
        );
        // smtplib sets neither Date nor Message-ID: relayq adds both.
        if name != "plain" {
            assert!(
                added.contains("\r\nMessage-ID: <") && added.contains("\r\nDate: "),
                "{added}"
            );
        }
    }
    let utf8 = got
        .iter()
        .find(|m| header(&m.data, "X-Case").as_deref() == Some("smtputf8"))
        .unwrap();
    assert!(
        utf8.mail_options.iter().any(|o| o == "SMTPUTF8"),
        "{utf8:?}"
    );
    let body8 = got
        .iter()
        .find(|m| header(&m.data, "X-Case").as_deref() == Some("utf8-body"))
        .unwrap();
    assert!(
        body8
            .text()
            .contains("\r\n.this line starts with a dot\r\n")
    );
    assert!(
        body8.mail_options.iter().any(|o| o == "BODY=8BITMIME"),
        "{body8:?}"
    );
    // Bcc is not in the content, but the Bcc recipient got it.
    assert!(header(&body8.data, "Bcc").is_none());
    assert!(body8.rcpt_tos.contains(&"hidden@example.org".to_string()));
}

/// Runs swaks against relayq; returns its transcript, panicking (with it)
/// unless swaks succeeded.
async fn swaks(args: &[&str]) -> String {
    require_swaks();
    let out = Command::new("swaks")
        .args(args)
        .output()
        .await
        .expect("run swaks");
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "swaks failed:\n{transcript}");
    transcript
}

/// The message swaks is given with `--data @file`: dot lines and 8-bit
/// text, in LF form (swaks turns line ends into CRLF and dot-stuffs).
const SWAKS_DATA: &str = "From: app@example.com\nTo: dev@example.net\nSubject: from swaks\nMessage-ID: <swaks-1@example.com>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nline one\n.dot line\n..two dots\nGr\u{fc}\u{df}e\nlast\n";

/// What swaks puts on the wire for [`SWAKS_DATA`], dot-stuffing undone:
/// CRLF line ends, and swaks always sends CRLF before the final
/// ".\r\n", so a file ending in a newline gains an empty last line
/// (checked against a bare socket: "last\r\n\r\n.\r\n").
fn swaks_wire() -> String {
    format!("{}\r\n", SWAKS_DATA.replace('\n', "\r\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_into_the_capture_maildir() {
    require_swaks();
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let d = Daemon::start_in(
        dir.path(),
        &format!(
            "hostname = \"relayq.test\"\ntransport = \"capture\"\n[capture]\nmaildir = \"{}\"\n",
            maildir.display()
        ),
    );
    let data = dir.path().join("message.txt");
    std::fs::write(&data, SWAKS_DATA).unwrap();
    let server = d.addr.to_string();
    let transcript = swaks(&[
        "--server",
        &server,
        "--helo",
        "swaks.test",
        "--from",
        "app@example.com",
        "--to",
        "dev@example.net",
        "--data",
        &format!("@{}", data.display()),
    ])
    .await;
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    let id = transcript
        .lines()
        .find(|l| l.contains("queued as"))
        .map(queue_id)
        .unwrap();
    d.wait_log(&format!("{id}: removed"), WAIT);

    let files: Vec<PathBuf> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let got = std::fs::read(&files[0]).unwrap();
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.starts_with("Return-Path: <app@example.com>\r\nDelivered-To: dev@example.net\r\n"),
        "{text}"
    );
    let after_envelope = text.splitn(3, "\r\n").nth(2).unwrap().as_bytes();
    let (added, rest) = split_added(after_envelope);
    assert!(
        added.starts_with("Received: from swaks.test ([127.0.0.1])"),
        "{added}"
    );
    assert_eq!(
        String::from_utf8_lossy(rest),
        swaks_wire(),
        "what swaks sent is what landed in the Maildir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_pipelined_through_the_relay() {
    require_swaks();
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let data = d.dir.join("message.txt");
    std::fs::write(&data, SWAKS_DATA).unwrap();
    let server = d.addr.to_string();
    let transcript = swaks(&[
        "--server",
        &server,
        "--helo",
        "swaks.test",
        "--pipeline",
        "--from",
        "app@example.com",
        "--to",
        "a@example.net,b@example.net,c@example.org",
        "--data",
        &format!("@{}", data.display()),
    ])
    .await;
    // swaks really pipelined: the whole envelope went out in one batch,
    // and relayq answered every command of it, in order.
    let batch = " -> MAIL FROM:<app@example.com>\n -> RCPT TO:<a@example.net>\n -> RCPT TO:<b@example.net>\n -> RCPT TO:<c@example.org>\n -> DATA\n<-  250 2.1.0 Ok\n<-  250 2.1.5 Ok\n<-  250 2.1.5 Ok\n<-  250 2.1.5 Ok\n<-  354 ";
    assert!(transcript.contains(batch), "{transcript}");
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].mail_from, "app@example.com");
    assert_eq!(
        got[0].rcpts,
        vec!["a@example.net", "b@example.net", "c@example.org"]
    );
    let (added, rest) = split_added(&got[0].data);
    assert!(
        added.starts_with("Received: from swaks.test ([127.0.0.1])"),
        "{added}"
    );
    assert_eq!(String::from_utf8_lossy(rest), swaks_wire());
    // 8-bit content goes upstream with BODY=8BITMIME.
    assert!(
        got[0].mail_params.contains("BODY=8BITMIME"),
        "{}",
        got[0].mail_params
    );
}
