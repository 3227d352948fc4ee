//! Tests of the upstream client against a scripted SMTP server on 127.0.0.1.
//!
//! The server follows a script of "send these bytes" / "expect exactly these
//! bytes" steps and records everything it read, and in which read() calls,
//! so tests can assert byte-exact dialogues and pipelining's grouping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::wire::{DataEncoder, ReplyParser};
use super::*;

const GREETING: &str = "220 relay.test ESMTP ready\r\n";
const EHLO: &str = "EHLO client.test\r\n";
const STEP_LIMIT: Duration = Duration::from_secs(5);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone)]
enum Act {
    Send(String),
    Expect(String),
    /// The client must send nothing for a while: it is waiting for a reply.
    Quiet,
    Pause(Duration),
    /// TLS handshake as the server (STARTTLS or implicit TLS).
    Tls,
    Close,
}

/// Builder for a server's part of the dialogue.
#[derive(Default)]
struct Script(Vec<Act>);

impl Script {
    fn tx(mut self, s: &str) -> Self {
        self.0.push(Act::Send(s.into()));
        self
    }
    fn rx(mut self, s: &str) -> Self {
        self.0.push(Act::Expect(s.into()));
        self
    }
    fn quiet(mut self) -> Self {
        self.0.push(Act::Quiet);
        self
    }
    fn pause(mut self, ms: u64) -> Self {
        self.0.push(Act::Pause(Duration::from_millis(ms)));
        self
    }
    fn tls(mut self) -> Self {
        self.0.push(Act::Tls);
        self
    }
    fn close(mut self) -> Self {
        self.0.push(Act::Close);
        self
    }
    fn append(mut self, more: Script) -> Self {
        self.0.extend(more.0);
        self
    }
    /// Greeting, EHLO and a reply offering `exts`.
    fn hello(self, exts: &[&str]) -> Self {
        self.tx(GREETING).rx(EHLO).tx(&ehlo_reply(exts))
    }
    fn quit(self) -> Self {
        self.rx("QUIT\r\n").tx("221 2.0.0 bye\r\n")
    }
}

fn ehlo_reply(exts: &[&str]) -> String {
    let mut lines = vec!["relay.test greets client.test"];
    lines.extend_from_slice(exts);
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

#[derive(Debug, Default)]
struct Transcript {
    /// Every byte the server read, in order.
    read: Vec<u8>,
    /// The same bytes, as returned by each read() call.
    chunks: Vec<Vec<u8>>,
    /// What the client sent after the script ended, until it closed.
    after_script: Vec<u8>,
    /// Length of `read` when TLS started: what came before was clear text.
    tls_started_at: Option<usize>,
    tls_failed: bool,
}

impl Transcript {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.read).into_owned()
    }
    /// What the client sent before TLS (everything, without TLS).
    fn clear_text(&self) -> String {
        let end = self.tls_started_at.unwrap_or(self.read.len());
        String::from_utf8_lossy(&self.read[..end]).into_owned()
    }
    fn after_script(&self) -> String {
        String::from_utf8_lossy(&self.after_script).into_owned()
    }
    fn has_chunk(&self, s: &str) -> bool {
        self.chunks.iter().any(|c| c == s.as_bytes())
    }
}

struct TestServer {
    addr: SocketAddr,
    task: JoinHandle<Transcript>,
}

impl TestServer {
    async fn start(script: Script) -> Self {
        Self::start_tls(script, None).await
    }

    async fn start_tls(script: Script, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = ServerConn {
                io: Box::new(tcp),
                pending: Vec::new(),
                transcript: Transcript::default(),
            };
            conn.run(script.0, tls).await;
            conn.transcript
        });
        TestServer { addr, task }
    }

    /// The transcript; re-raises the server's panic (a script mismatch).
    async fn finish(self) -> Transcript {
        match self.task.await {
            Ok(t) => t,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

struct ServerConn {
    io: Box<dyn Io>,
    pending: Vec<u8>,
    transcript: Transcript,
}

impl ServerConn {
    async fn run(&mut self, script: Vec<Act>, tls: Option<Arc<rustls::ServerConfig>>) {
        for act in script {
            match act {
                Act::Send(s) => {
                    // A client that hung up early fails the next Expect.
                    if self.io.write_all(s.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Act::Expect(s) => self.expect(&s).await,
                Act::Quiet => self.quiet().await,
                Act::Pause(d) => tokio::time::sleep(d).await,
                Act::Tls => {
                    if !self.accept_tls(tls.clone()).await {
                        self.transcript.tls_failed = true;
                        return;
                    }
                }
                Act::Close => return,
            }
        }
        let start = self.transcript.read.len();
        while self.read_more().await {}
        self.transcript.after_script = self.transcript.read[start..].to_vec();
        self.transcript
            .after_script
            .splice(0..0, self.pending.drain(..));
    }

    async fn expect(&mut self, want: &str) {
        while self.pending.len() < want.len() && self.read_more().await {}
        let n = want.len().min(self.pending.len());
        let got: Vec<u8> = self.pending.drain(..n).collect();
        assert_eq!(
            String::from_utf8_lossy(&got),
            want,
            "server got unexpected bytes"
        );
    }

    async fn quiet(&mut self) {
        assert!(
            self.pending.is_empty(),
            "client sent ahead: {:?}",
            String::from_utf8_lossy(&self.pending)
        );
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(150), self.io.read(&mut buf)).await
        {
            assert_eq!(
                n,
                0,
                "client sent ahead: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }

    async fn read_more(&mut self) -> bool {
        let mut buf = vec![0u8; 128 * 1024];
        match tokio::time::timeout(STEP_LIMIT, self.io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                self.transcript.read.extend_from_slice(&buf[..n]);
                self.transcript.chunks.push(buf[..n].to_vec());
                self.pending.extend_from_slice(&buf[..n]);
                true
            }
            _ => false,
        }
    }

    async fn accept_tls(&mut self, tls: Option<Arc<rustls::ServerConfig>>) -> bool {
        assert!(self.pending.is_empty(), "bytes pending before TLS");
        self.transcript.tls_started_at = Some(self.transcript.read.len());
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls.expect("script uses TLS but server has no certificate"),
        );
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::duplex(1).0));
        match acceptor.accept(plain).await {
            Ok(stream) => {
                self.io = Box::new(stream);
                true
            }
            Err(_) => false,
        }
    }
}

fn client(addr: SocketAddr) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr, "relay.test", "client.test");
    cfg.tls = TlsMode::None;
    cfg.connect_timeout = STEP_LIMIT;
    cfg.command_timeout = STEP_LIMIT;
    cfg.data_timeout = STEP_LIMIT;
    cfg
}

fn envelope<'a>(from: &'a str, rcpts: &'a [&'a str]) -> Envelope<'a> {
    Envelope {
        from,
        rcpts,
        smtputf8: false,
        smtputf8_required: false,
        eight_bit: false,
        dsn: None,
        rcpt_dsn: &[],
    }
}

fn codes(report: &TxnReport) -> Vec<u16> {
    report.rcpts.iter().map(|r| r.code).collect()
}

// ---- test PKI ------------------------------------------------------------

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/smtp-test-tmp");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate as a PEM file, for `TlsOptions::ca_file`.
    path: PathBuf,
}

impl TestCa {
    fn new(test: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "relayq test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let path = scratch_dir().join(format!("{test}-{}-ca.pem", std::process::id()));
        std::fs::write(&path, issuer.pem()).unwrap();
        TestCa { issuer, path }
    }

    /// A server certificate for `names` signed by this CA, and its DER.
    fn server(&self, names: &[&str]) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
        self.server_with(names, |_| {})
    }

    fn server_with(
        &self,
        names: &[&str],
        tweak: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (server_config(cert.der().clone(), &key), cert.der().clone())
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn server_config(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> Arc<rustls::ServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(config)
}

fn tls_client(addr: SocketAddr, mode: TlsMode, ca: &TestCa) -> ClientConfig {
    let mut cfg = client(addr);
    cfg.tls = mode;
    cfg.tls_options.ca_file = Some(ca.path.clone());
    cfg
}

fn starttls_script(exts: &[&str]) -> Script {
    Script::default()
        .hello(&["STARTTLS", "PIPELINING"])
        .rx("STARTTLS\r\n")
        .tx("220 2.0.0 ready to start TLS\r\n")
        .tls()
        .rx(EHLO)
        .tx(&ehlo_reply(exts))
}

// ---- pure pieces ---------------------------------------------------------

fn encode(body: &[u8], limit: usize) -> Vec<u8> {
    let mut encoder = DataEncoder::new(body);
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    loop {
        chunk.clear();
        let more = encoder.fill(&mut chunk, limit);
        out.extend_from_slice(&chunk);
        if !more {
            return out;
        }
    }
}

#[test]
fn data_is_dot_stuffed_and_terminated() {
    let cases: [(&[u8], &[u8]); 12] = [
        (b"a\r\n.\r\n..x\r\n", b"a\r\n..\r\n...x\r\n.\r\n"),
        (b".starts\r\nend", b"..starts\r\nend\r\n.\r\n"),
        (b"", b".\r\n"),
        // Bare LF and bare CR go out as CRLF, and the dot after them is
        // stuffed: no upstream can read an end of data into the body.
        (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
        (b"ends in cr\r", b"ends in cr\r\n.\r\n"),
        (b"a.b\r\n .c\r\n", b"a.b\r\n .c\r\n.\r\n"),
        (b"\r\n.", b"\r\n..\r\n.\r\n"),
        (
            b"x\r.\rMAIL FROM:<e@x>\r",
            b"x\r\n..\r\nMAIL FROM:<e@x>\r\n.\r\n",
        ),
        (b"x\r\n.\r", b"x\r\n..\r\n.\r\n"),
        (b"x\r.\r\n", b"x\r\n..\r\n.\r\n"),
        (b"x\n.\r", b"x\r\n..\r\n.\r\n"),
        (b"x\r.\n", b"x\r\n..\r\n.\r\n"),
    ];
    for (body, want) in cases {
        assert_eq!(
            String::from_utf8_lossy(&encode(body, 1 << 16)),
            String::from_utf8_lossy(want),
            "body {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn data_chunks_join_to_the_same_bytes() {
    let body = b"Subject: x\r\n\r\n.one\r\n..two\r\nplain line\r\n.\r\nlast";
    let whole = encode(body, 1 << 16);
    for limit in 1..12 {
        assert_eq!(encode(body, limit), whole, "limit {limit}");
    }
}

#[test]
fn replies_parse_with_enhanced_codes() {
    let mut parser = ReplyParser::default();
    assert_eq!(parser.push(b"550-5.1.1 The email account"), Ok(None));
    assert_eq!(parser.push(b"550-5.1.1 does not exist."), Ok(None));
    let reply = parser.push(b"550 5.1.1 See help").unwrap().unwrap();
    assert_eq!(reply.code, 550);
    assert_eq!(reply.enhanced, Some((5, 1, 1)));
    assert_eq!(
        reply.text,
        "5.1.1 The email account\n5.1.1 does not exist.\n5.1.1 See help"
    );
    assert_eq!(reply.status(), "5.1.1");
    assert_eq!(
        reply.one_line(),
        "550 5.1.1 The email account 5.1.1 does not exist. 5.1.1 See help"
    );
    assert!(reply.is_permanent() && !reply.is_transient() && !reply.is_positive());

    let bare = ReplyParser::default().push(b"250").unwrap().unwrap();
    assert_eq!(
        (bare.code, bare.text.as_str(), bare.one_line()),
        (250, "", "250".to_string())
    );
    assert_eq!(Reply::new(451, "try later").status(), "4.0.0");
    // The class must match the basic code to count as an enhanced code.
    assert_eq!(Reply::new(250, "5.1.1 odd").enhanced, None);
    assert_eq!(Reply::new(250, "2.1.0.9 odd").enhanced, None);
    assert_eq!(Reply::new(250, "2.1.+5 odd").enhanced, None);
}

#[test]
fn malformed_replies_are_refused() {
    for line in [
        &b"hello"[..],
        b"25",
        b"250x",
        b"600 no",
        b"199 no",
        b"2a0 x",
    ] {
        assert!(ReplyParser::default().push(line).is_err(), "{line:?}");
    }
    let mut parser = ReplyParser::default();
    assert_eq!(parser.push(b"250-a"), Ok(None));
    assert!(parser.push(b"251 b").is_err(), "code changed mid-reply");
}

#[test]
fn capabilities_parse() {
    let reply = Reply::new(
        250,
        "relay.test hi\nPIPELINING\nsize 1000\n8BITMIME\nSMTPUTF8\nSTARTTLS\nENHANCEDSTATUSCODES\nAUTH plain LOGIN\nAUTH=LOGIN CRAM-MD5",
    );
    let caps = Capabilities::from_ehlo(&reply);
    assert!(caps.pipelining && caps.eight_bit_mime && caps.smtputf8 && caps.starttls);
    assert!(caps.enhanced_status_codes);
    assert_eq!(caps.size, Some(1000));
    assert_eq!(caps.auth, ["PLAIN", "LOGIN", "CRAM-MD5"]);
    assert_eq!(caps.raw.len(), 8);
    let bare_size = Capabilities::from_ehlo(&Reply::new(250, "x\nSIZE"));
    assert_eq!(bare_size.size, Some(0));
}

#[test]
fn secrets_never_print() {
    let creds = Credentials {
        username: "alice".into(),
        secret: Secret::Password("hunter2".into()),
        mechanism: None,
    };
    let shown = format!("{creds:?}");
    assert!(
        shown.contains("<redacted>") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert_eq!(
        format!("{:?}", Secret::OAuth2Token("tok".into())),
        "<redacted>"
    );
}

// ---- transactions ----------------------------------------------------------

#[tokio::test]
async fn transaction_without_pipelining_is_byte_exact() {
    let body = b"Subject: dots\r\n\r\n.\r\n..x\r\nno final newline";
    let script = Script::default()
        .hello(&["SIZE 10240000", "8BITMIME"])
        .rx(&format!(
            "MAIL FROM:<a@x.test> BODY=8BITMIME SIZE={}\r\n",
            body.len()
        ))
        .quiet()
        .tx("250 2.1.0 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .quiet()
        .tx("250 2.1.5 ok\r\n")
        .rx("DATA\r\n")
        .quiet()
        .tx("354 go ahead\r\n")
        .rx("Subject: dots\r\n\r\n..\r\n...x\r\nno final newline\r\n.\r\n")
        .tx("250 2.0.0 queued as ABC\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    assert_eq!(conn.peer(), server.addr);
    assert_eq!(conn.tls_version(), None);
    let mut env = envelope("a@x.test", &["b@y.test"]);
    env.eight_bit = true;
    let report = conn.send(&env, body).await;
    conn.quit().await;
    let t = server.finish().await;
    let report = report.unwrap();
    assert_eq!(codes(&report), [250]);
    let data = report.data.unwrap();
    assert_eq!(
        (data.code, data.text.as_str()),
        (250, "2.0.0 queued as ABC")
    );
    assert_eq!(t.after_script(), "");
}

#[tokio::test]
async fn pipelining_sends_the_envelope_in_one_write() {
    let group = "MAIL FROM:<> SIZE=7\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n";
    let script = Script::default()
        .hello(&["PIPELINING", "SIZE"])
        .rx(group)
        // All four replies in one packet: none may be lost.
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("hello\r\n.\r\n")
        .tx("250 queued\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn
        .send(&envelope("", &["b@y.test", "c@y.test"]), b"hello\r\n")
        .await;
    conn.quit().await;
    let t = server.finish().await;
    let report = report.unwrap();
    assert_eq!(codes(&report), [250, 250]);
    assert_eq!(report.data.map(|r| r.code), Some(250));
    assert!(
        t.has_chunk(group),
        "envelope split over writes: {:?}",
        t.chunks
    );
}

#[tokio::test]
async fn per_recipient_replies_are_kept_in_order() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<ok@y.test>\r\nRCPT TO:<busy@y.test>\r\nRCPT TO:<gone@y.test>\r\nDATA\r\n")
        .tx("250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 mailbox busy\r\n")
        .pause(50)
        .tx("550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1 Please check it.\r\n354 go\r\n")
        .rx("body\r\n.\r\n")
        .tx("250 2.0.0 queued\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let rcpts = ["ok@y.test", "busy@y.test", "gone@y.test"];
    let report = conn.send(&envelope("a@x.test", &rcpts), b"body\r\n").await;
    conn.quit().await;
    server.finish().await;
    let report = report.unwrap();
    assert_eq!(codes(&report), [250, 450, 550]);
    assert_eq!(report.rcpts[1].status(), "4.2.1");
    assert_eq!(
        report.rcpts[2].one_line(),
        "550 5.1.1 The email account that you tried to reach does not exist. 5.1.1 Please check it."
    );
    assert_eq!(report.data.map(|r| r.code), Some(250));
}

#[tokio::test]
async fn mail_rejected_451_keeps_the_session_in_step() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
        // No body may follow: the next thing the client says must be RSET,
        // pipelined with the next transaction's envelope in one write.
        .rx("RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("250 2.0.0 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("x\r\n.\r\n")
        .tx("250 2.0.0 queued\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await
        .unwrap_err();
    assert!(conn.is_usable());
    let reset = conn.reset().await;
    let second = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await;
    conn.quit().await;
    server.finish().await;
    reset.unwrap();
    assert_eq!(second.unwrap().data.map(|r| r.code), Some(250));
    match &err {
        SmtpError::Rejected {
            stage: Stage::Mail,
            reply,
        } => assert_eq!(reply.code, 451),
        other => panic!("unexpected {other:?}"),
    }
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), "mail");
}

#[tokio::test]
async fn mail_rejected_550_is_permanent_and_stops_the_envelope() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .quiet()
        .tx("550 5.7.1 sender not allowed\r\n")
        .rx("RSET\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await
        .unwrap_err();
    conn.reset().await.unwrap();
    conn.quit().await;
    server.finish().await;
    assert!(err.is_permanent(), "{err}");
    assert_eq!(
        err.to_string(),
        "mail rejected: 550 5.7.1 sender not allowed"
    );
}

#[test]
fn mail_rejected_530_is_not_permanent() {
    let err = SmtpError::Rejected {
        stage: Stage::Mail,
        reply: Reply::new(530, "5.7.0 Authentication required"),
    };
    assert!(!err.is_permanent());
    let greeting = SmtpError::Rejected {
        stage: Stage::Greeting,
        reply: Reply::new(554, "no service"),
    };
    assert!(!greeting.is_permanent());
}

#[tokio::test]
async fn no_accepted_recipient_sends_no_body_when_pipelining() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n550 5.1.1 no\r\n450 4.2.0 later\r\n554 5.5.1 no valid recipients\r\n")
        // The owed RSET would go with a next MAIL; QUIT needs none.
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn
        .send(&envelope("a@x.test", &["b@y.test", "c@y.test"]), b"x\r\n")
        .await;
    conn.reset().await.unwrap();
    conn.quit().await;
    server.finish().await;
    let report = report.unwrap();
    assert_eq!(codes(&report), [550, 450]);
    assert_eq!(report.data, None);
}

#[tokio::test]
async fn no_accepted_recipient_sends_no_data_without_pipelining() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .tx("550 5.1.1 no\r\n")
        .rx("RSET\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await;
    conn.reset().await.unwrap();
    conn.quit().await;
    server.finish().await;
    assert_eq!(report.unwrap().data, None);
}

#[tokio::test]
async fn go_ahead_without_recipients_abandons_the_connection() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n550 no\r\n354 go anyway\r\n");
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await;
    assert!(!conn.is_usable());
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(report.unwrap().data, None);
    assert_eq!(
        t.after_script(),
        "",
        "nothing, not even QUIT, may go into the open DATA"
    );
}

#[tokio::test]
async fn data_refusal_is_reported_for_the_accepted_recipients() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .tx("250 ok\r\n")
        .rx("DATA\r\n")
        .tx("554 5.7.1 no mail from you today\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await;
    assert!(conn.is_usable());
    conn.quit().await;
    server.finish().await;
    assert_eq!(report.unwrap().data.map(|r| r.code), Some(554));
}

#[tokio::test]
async fn reply_421_makes_the_connection_unusable() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .tx("421 4.7.0 too many errors, closing\r\n");
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await
        .unwrap_err();
    assert!(!conn.is_usable());
    assert!(matches!(conn.reset().await, Err(SmtpError::Unusable)));
    assert!(matches!(
        conn.send(&envelope("a@x.test", &["b@y.test"]), b"x").await,
        Err(SmtpError::Unusable)
    ));
    conn.quit().await;
    let t = server.finish().await;
    assert!(
        matches!(&err, SmtpError::Rejected { stage: Stage::Rcpt, reply } if reply.code == 421),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert_eq!(t.after_script(), "");
}

#[tokio::test]
async fn reply_421_after_the_body_is_an_error() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("x\r\n.\r\n")
        .tx("421 4.3.2 shutting down\r\n");
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await
        .unwrap_err();
    assert!(!conn.is_usable());
    drop(conn);
    server.finish().await;
    assert_eq!(err.stage(), "body");
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn dropped_line_after_rcpt_is_a_temporary_error() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .tx("250 ok\r\n")
        .rx("DATA\r\n")
        .close();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
        .await
        .unwrap_err();
    server.finish().await;
    assert!(
        matches!(err, SmtpError::Closed { stage: Stage::Data }),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert!(!conn.is_usable());
}

#[tokio::test]
async fn replies_split_across_packets_are_reassembled() {
    let script = Script::default()
        .tx("220-relay.test first line\r\n22")
        .pause(30)
        .tx("0-second\r\n220 third\r\n")
        .rx(EHLO)
        .tx("250-relay.test\r\n250-PIPEL")
        .pause(30)
        .tx("INING\r\n250 SIZE 100\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let conn = Connection::open(&client(server.addr)).await.unwrap();
    let caps = conn.capabilities().clone();
    conn.quit().await;
    server.finish().await;
    assert!(caps.pipelining);
    assert_eq!(caps.size, Some(100));
}

#[tokio::test]
async fn two_transactions_share_one_connection() {
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("one\r\n.\r\n")
        .tx("250 first\r\n")
        .rx("RSET\r\n")
        .tx("250 ok\r\n")
        .rx("MAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("two\r\n.\r\n")
        .tx("250 second\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let first = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"one\r\n")
        .await
        .unwrap();
    conn.reset().await.unwrap();
    let second = conn
        .send(&envelope("c@x.test", &["d@y.test"]), b"two\r\n")
        .await
        .unwrap();
    conn.quit().await;
    server.finish().await;
    assert_eq!(first.data.unwrap().text, "first");
    assert_eq!(second.data.unwrap().text, "second");
}

#[tokio::test]
async fn unsafe_addresses_are_never_written() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<ok@y.test>\r\n")
        .tx("250 ok\r\n")
        .rx("DATA\r\n")
        .tx("354 go\r\n")
        .rx("x\r\n.\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let rcpts = ["ok@y.test", "evil@y.test>\r\nRCPT TO:<other@z.test"];
    let report = conn
        .send(&envelope("a@x.test", &rcpts), b"x\r\n")
        .await
        .unwrap();
    let bad_sender = conn
        .send(&envelope("a\r\nRSET", &["ok@y.test"]), b"x")
        .await
        .unwrap_err();
    conn.quit().await;
    server.finish().await;
    assert_eq!(codes(&report), [250, 501]);
    assert_eq!(report.rcpts[1].status(), "5.1.3");
    assert!(bad_sender.is_permanent());
}

#[tokio::test]
async fn smtputf8_is_required_when_the_message_needs_it() {
    let script = Script::default()
        .hello(&["SMTPUTF8", "8BITMIME"])
        .rx("MAIL FROM:<a@x.test> SMTPUTF8 BODY=8BITMIME\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<josé@y.test>\r\n")
        .tx("250 ok\r\n")
        .rx("DATA\r\n")
        .tx("354 go\r\n")
        .rx("x\r\n.\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let mut env = envelope("a@x.test", &["josé@y.test"]);
    env.eight_bit = true;
    conn.send(&env, b"x\r\n").await.unwrap();
    conn.quit().await;
    server.finish().await;

    let script = Script::default().hello(&["8BITMIME"]).quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["josé@y.test"]), b"x")
        .await
        .unwrap_err();
    assert!(conn.is_usable());
    conn.quit().await;
    server.finish().await;
    assert!(matches!(err, SmtpError::SmtpUtf8NotOffered { .. }));
    assert!(err.is_permanent());
    assert!(err.to_string().contains("SMTPUTF8"));
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let script = Script::default()
        .tx(GREETING)
        .rx(EHLO)
        .tx("502 5.5.2 what?\r\n")
        .rx("HELO client.test\r\n")
        .tx("250 relay.test\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let conn = Connection::open(&client(server.addr)).await.unwrap();
    assert_eq!(conn.capabilities(), &Capabilities::default());
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn greeting_554_is_a_temporary_rejection() {
    let server = TestServer::start(Script::default().tx("554 5.3.2 no service here\r\n")).await;
    let err = Connection::open(&client(server.addr)).await.err().unwrap();
    server.finish().await;
    assert!(
        matches!(&err, SmtpError::Rejected { stage: Stage::Greeting, reply } if reply.code == 554)
    );
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn hostile_replies_are_bounded_and_checked() {
    let line = format!("220-{}\r\n", "x".repeat(1000));
    let server = TestServer::start(Script::default().tx(&line.repeat(70))).await;
    let err = Connection::open(&client(server.addr)).await.err().unwrap();
    server.finish().await;
    assert!(err.to_string().contains("longer than 65536"), "{err}");

    let server = TestServer::start(Script::default().tx("hello there\r\n")).await;
    let err = Connection::open(&client(server.addr)).await.err().unwrap();
    server.finish().await;
    assert!(
        matches!(
            err,
            SmtpError::Protocol {
                stage: Stage::Greeting,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn silence_times_out_at_the_named_stage() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .pause(1000);
    let server = TestServer::start(script).await;
    let mut cfg = client(server.addr);
    cfg.command_timeout = Duration::from_millis(200);
    let mut conn = Connection::open(&cfg).await.unwrap();
    let err = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"x")
        .await
        .unwrap_err();
    drop(conn);
    server.finish().await;
    assert!(
        matches!(
            err,
            SmtpError::Timeout {
                stage: Stage::Mail,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = Connection::open(&client(addr)).await.err().unwrap();
    assert!(matches!(err, SmtpError::Connect { .. }), "{err:?}");
    assert_eq!(err.stage(), "connect");
}

// ---- TLS -------------------------------------------------------------------

#[tokio::test]
async fn starttls_upgrades_and_asks_ehlo_again() {
    let ca = TestCa::new("starttls-ok");
    let (tls, _) = ca.server(&["relay.test"]);
    let script = starttls_script(&["PIPELINING"])
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("secret body\r\n.\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start_tls(script, Some(tls)).await;
    let mut conn = Connection::open(&tls_client(server.addr, TlsMode::StartTls, &ca))
        .await
        .unwrap();
    assert_eq!(conn.tls_version().as_deref(), Some("TLSv1.3"));
    assert!(
        !conn.capabilities().starttls,
        "capabilities must come from the EHLO after TLS"
    );
    let report = conn
        .send(&envelope("a@x.test", &["b@y.test"]), b"secret body\r\n")
        .await;
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(report.unwrap().data.map(|r| r.code), Some(250));
    assert_eq!(t.clear_text(), format!("{EHLO}STARTTLS\r\n"));
    assert!(t.text().contains("secret body"));
}

#[tokio::test]
async fn starttls_not_offered_never_falls_back() {
    let ca = TestCa::new("starttls-missing");
    let server = TestServer::start(Script::default().hello(&["PIPELINING"])).await;
    let err = Connection::open(&tls_client(server.addr, TlsMode::StartTls, &ca))
        .await
        .err()
        .unwrap();
    let t = server.finish().await;
    assert!(
        matches!(err, SmtpError::StartTlsNotOffered { .. }),
        "{err:?}"
    );
    assert!(
        !t.text().contains("MAIL") && !t.text().contains("STARTTLS"),
        "{}",
        t.text()
    );
}

#[tokio::test]
async fn starttls_injection_is_refused() {
    let ca = TestCa::new("starttls-inject");
    let script = Script::default()
        .hello(&["STARTTLS"])
        .rx("STARTTLS\r\n")
        .tx("220 go ahead\r\n250 injected\r\n");
    let server = TestServer::start(script).await;
    let err = Connection::open(&tls_client(server.addr, TlsMode::StartTls, &ca))
        .await
        .err()
        .unwrap();
    server.finish().await;
    assert!(
        matches!(
            err,
            SmtpError::Protocol {
                stage: Stage::StartTls,
                ..
            }
        ),
        "{err:?}"
    );
}

/// Runs STARTTLS against `tls` and returns the client's error.
async fn starttls_failure(
    ca: &TestCa,
    tls: Arc<rustls::ServerConfig>,
    server_name: &str,
) -> SmtpError {
    let script = Script::default()
        .hello(&["STARTTLS"])
        .rx("STARTTLS\r\n")
        .tx("220 go ahead\r\n")
        .tls();
    let server = TestServer::start_tls(script, Some(tls)).await;
    let mut cfg = tls_client(server.addr, TlsMode::StartTls, ca);
    cfg.tls_options.server_name = server_name.into();
    let err = Connection::open(&cfg).await.err().unwrap();
    let t = server.finish().await;
    assert!(t.tls_failed);
    err
}

#[tokio::test]
async fn certificate_for_another_name_is_refused() {
    let ca = TestCa::new("wrong-name");
    let (tls, _) = ca.server(&["relay.test"]);
    let err = starttls_failure(&ca, tls, "smtp.wrong.test").await;
    let shown = err.to_string();
    assert!(
        matches!(err, SmtpError::Tls(TlsFailure::Verify { .. })),
        "{err:?}"
    );
    assert!(
        shown.starts_with("certificate verification failed for smtp.wrong.test: "),
        "{shown}"
    );
    assert!(
        shown.contains("not valid for name \"smtp.wrong.test\""),
        "{shown}"
    );
}

#[tokio::test]
async fn certificate_from_an_untrusted_issuer_is_refused() {
    let ca = TestCa::new("untrusted");
    let key = rcgen::KeyPair::generate().unwrap();
    let self_signed = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = server_config(self_signed.der().clone(), &key);
    let err = starttls_failure(&ca, tls, "relay.test").await;
    assert!(err.to_string().contains("unknown issuer"), "{err}");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let ca = TestCa::new("expired");
    let (tls, _) = ca.server_with(&["relay.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    });
    let err = starttls_failure(&ca, tls, "relay.test").await;
    assert!(err.to_string().contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn implicit_tls_and_a_matching_pin() {
    let ca = TestCa::new("implicit");
    let (tls, leaf) = ca.server(&["relay.test"]);
    let pin = Sha256::digest(leaf.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let script = Script::default().tls().hello(&[]).quit();
    let server = TestServer::start_tls(script, Some(tls)).await;
    let mut cfg = tls_client(server.addr, TlsMode::Implicit, &ca);
    cfg.tls_options.pin_sha256 = Some(pin);
    let conn = Connection::open(&cfg).await.unwrap();
    assert!(conn.tls_version().is_some());
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn pin_mismatch_is_refused() {
    let ca = TestCa::new("pin-mismatch");
    let (tls, _) = ca.server(&["relay.test"]);
    let server = TestServer::start_tls(Script::default().tls(), Some(tls)).await;
    let mut cfg = tls_client(server.addr, TlsMode::Implicit, &ca);
    cfg.tls_options.pin_sha256 = Some("ab".repeat(32));
    let err = Connection::open(&cfg).await.err().unwrap();
    server.finish().await;
    assert!(
        matches!(err, SmtpError::Tls(TlsFailure::PinMismatch { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("certificate pin mismatch for relay.test"),
        "{err}"
    );
}

// ---- AUTH ------------------------------------------------------------------

const USER: &str = "alice@example.test";
const PASSWORD: &str = "s3cret-pw";

fn auth_client(addr: SocketAddr, secret: Secret, mechanism: Option<AuthMechanism>) -> ClientConfig {
    let mut cfg = client(addr);
    cfg.allow_plaintext_auth = true;
    cfg.auth = Some(Credentials {
        username: USER.into(),
        secret,
        mechanism,
    });
    cfg
}

fn password() -> Secret {
    Secret::Password(PASSWORD.into())
}

/// Logs in against a server offering `exts` and then following `script`.
async fn login_ok(
    exts: &[&str],
    script: Script,
    secret: Secret,
    mechanism: Option<AuthMechanism>,
) -> AuthMechanism {
    let server = TestServer::start(Script::default().hello(exts).append(script)).await;
    let result = Connection::open(&auth_client(server.addr, secret, mechanism)).await;
    let used = match result {
        Ok(conn) => {
            let used = conn.auth_mechanism();
            conn.quit().await;
            used
        }
        Err(e) => {
            server.finish().await;
            panic!("login failed: {e}");
        }
    };
    server.finish().await;
    used.expect("a mechanism after a successful login")
}

async fn login_err(exts: &[&str], script: Script, secret: Secret) -> SmtpError {
    let server = TestServer::start(Script::default().hello(exts).append(script)).await;
    let result = Connection::open(&auth_client(server.addr, secret, None)).await;
    server.finish().await;
    result.err().expect("login should have failed")
}

#[tokio::test]
async fn auth_plain_is_byte_exact() {
    let script = Script::default()
        .rx("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc=\r\n")
        .tx("235 2.7.0 accepted\r\n")
        .quit();
    let mechanism = login_ok(&["AUTH LOGIN PLAIN CRAM-MD5"], script, password(), None).await;
    assert_eq!(mechanism, AuthMechanism::Plain);
}

#[tokio::test]
async fn auth_login_is_byte_exact() {
    let script = Script::default()
        .rx("AUTH LOGIN\r\n")
        .tx("334 VXNlcm5hbWU6\r\n")
        .rx("YWxpY2VAZXhhbXBsZS50ZXN0\r\n")
        .tx("334 UGFzc3dvcmQ6\r\n")
        .rx("czNjcmV0LXB3\r\n")
        .tx("235 2.7.0 accepted\r\n")
        .quit();
    let mechanism = login_ok(&["AUTH LOGIN CRAM-MD5"], script, password(), None).await;
    assert_eq!(mechanism, AuthMechanism::Login);
}

#[tokio::test]
async fn auth_cram_md5_is_byte_exact() {
    let script = Script::default()
        .rx("AUTH CRAM-MD5\r\n")
        .tx("334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
        .rx("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n")
        .tx("235 2.7.0 accepted\r\n")
        .quit();
    let server = TestServer::start(
        Script::default()
            .hello(&["AUTH PLAIN CRAM-MD5"])
            .append(script),
    )
    .await;
    let mut cfg = client(server.addr);
    cfg.allow_plaintext_auth = true;
    cfg.auth = Some(Credentials {
        username: "tim".into(),
        secret: Secret::Password("tanstaaftanstaaf".into()),
        mechanism: Some(AuthMechanism::CramMd5),
    });
    let conn = Connection::open(&cfg).await;
    let conn = conn.unwrap();
    assert_eq!(conn.auth_mechanism(), Some(AuthMechanism::CramMd5));
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn auth_xoauth2_is_byte_exact() {
    let script = Script::default()
        .rx("AUTH XOAUTH2 dXNlcj1hbGljZUBleGFtcGxlLnRlc3QBYXV0aD1CZWFyZXIgeWEyOS50b2szbgEB\r\n")
        .tx("235 2.7.0 accepted\r\n")
        .quit();
    let token = Secret::OAuth2Token("ya29.tok3n".into());
    let mechanism = login_ok(&["AUTH PLAIN XOAUTH2"], script, token, None).await;
    assert_eq!(mechanism, AuthMechanism::XOAuth2);
}

#[tokio::test]
async fn auth_xoauth2_error_challenge_gets_an_empty_answer() {
    let script = Script::default()
        .rx("AUTH XOAUTH2 dXNlcj1hbGljZUBleGFtcGxlLnRlc3QBYXV0aD1CZWFyZXIgeWEyOS50b2szbgEB\r\n")
        .tx("334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0=\r\n")
        .rx("\r\n")
        .tx("535 5.7.8 Username and Password not accepted\r\n");
    let token = Secret::OAuth2Token("ya29.tok3n".into());
    let err = login_err(&["AUTH XOAUTH2"], script, token).await;
    assert!(
        matches!(&err, SmtpError::AuthRejected { reply } if reply.code == 535),
        "{err:?}"
    );
}

#[tokio::test]
async fn auth_rejected_quotes_the_server_but_never_the_password() {
    let script = Script::default()
        .rx("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc=\r\n")
        .tx("535 5.7.8 Authentication credentials invalid\r\n");
    let err = login_err(&["AUTH PLAIN"], script, password()).await;
    assert_eq!(
        err.to_string(),
        "authentication rejected: 535 5.7.8 Authentication credentials invalid"
    );
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), "auth");

    // A server that echoes what it got must not get it into our logs.
    let script = Script::default()
        .rx("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc=\r\n")
        .tx("535 5.7.8 bad AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc= (s3cret-pw)\r\n");
    let err = login_err(&["AUTH PLAIN"], script, password()).await;
    for shown in [format!("{err}"), format!("{err:?}")] {
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(!shown.contains("AGFsaWNl"), "{shown}");
    }
}

#[tokio::test]
async fn auth_over_starttls() {
    let ca = TestCa::new("auth-starttls");
    let (tls, _) = ca.server(&["relay.test"]);
    let script = starttls_script(&["AUTH PLAIN"])
        .rx("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc=\r\n")
        .tx("235 ok\r\n")
        .quit();
    let server = TestServer::start_tls(script, Some(tls)).await;
    let mut cfg = tls_client(server.addr, TlsMode::StartTls, &ca);
    cfg.auth = Some(Credentials {
        username: USER.into(),
        secret: password(),
        mechanism: None,
    });
    let conn = Connection::open(&cfg).await.unwrap();
    assert_eq!(conn.auth_mechanism(), Some(AuthMechanism::Plain));
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(t.clear_text(), format!("{EHLO}STARTTLS\r\n"));
}

#[tokio::test]
async fn each_step_the_server_lets_a_session_past_is_told() {
    // TCP, greeting, EHLO, STARTTLS, TLS, EHLO, AUTH: a refusal of one
    // more connection is counted by how far the others got
    // (`transport::openings`), so each step is told once, and none the
    // server refused.
    let steps = std::sync::atomic::AtomicU32::new(0);
    let step = || {
        steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let told = || steps.swap(0, std::sync::atomic::Ordering::SeqCst);
    let ca = TestCa::new("steps");
    let (tls, _) = ca.server(&["relay.test"]);
    for (reply, ok, want) in [
        ("235 ok", true, 7),
        ("454 4.7.0 Temporary failure", false, 6),
    ] {
        let script = starttls_script(&["AUTH PLAIN"])
            .rx("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzM2NyZXQtcHc=\r\n")
            .tx(&format!("{reply}\r\n"));
        let script = match ok {
            true => script.quit(),
            false => script,
        };
        let server = TestServer::start_tls(script, Some(tls.clone())).await;
        let mut cfg = tls_client(server.addr, TlsMode::StartTls, &ca);
        cfg.auth = Some(Credentials {
            username: USER.into(),
            secret: password(),
            mechanism: None,
        });
        match Connection::open_noting(&cfg, &step).await {
            Ok(conn) => conn.quit().await,
            Err(e) => assert!(!ok, "{e}"),
        }
        server.finish().await;
        assert_eq!(told(), want, "AUTH answered {reply}");
    }
    // Refused at the greeting: past TCP only.
    let script = Script::default().tx("421 4.7.0 Too many concurrent SMTP connections\r\n");
    let server = TestServer::start(script).await;
    let err = Connection::open_noting(&client(server.addr), &step).await;
    server.finish().await;
    assert!(err.is_err());
    assert_eq!(told(), 1);
    // Refused at the TCP connect: none.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(Connection::open_noting(&client(addr), &step).await.is_err());
    assert_eq!(told(), 0);
}

#[tokio::test]
async fn credentials_without_tls_are_refused_before_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = auth_client(listener.local_addr().unwrap(), password(), None);
    cfg.allow_plaintext_auth = false;
    let err = Connection::open(&cfg).await.err().unwrap();
    assert!(matches!(err, SmtpError::CredentialsWithoutTls), "{err:?}");
    let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
    assert!(accepted.is_err(), "the client connected anyway");
}

#[tokio::test]
async fn credentials_need_an_auth_offer() {
    let err = login_err(&["PIPELINING"], Script::default(), password()).await;
    assert!(matches!(err, SmtpError::AuthNotOffered), "{err:?}");
}

#[tokio::test]
async fn many_recipients_are_pipelined_in_bounded_batches() {
    let names: Vec<String> = (0..150).map(|i| format!("r{i}@y.test")).collect();
    let rcpts: Vec<&str> = names.iter().map(String::as_str).collect();
    let rcpt_lines =
        |r: &[&str]| -> String { r.iter().map(|a| format!("RCPT TO:<{a}>\r\n")).collect() };
    let first = format!("MAIL FROM:<a@x.test>\r\n{}", rcpt_lines(&rcpts[..99]));
    let second = format!("{}DATA\r\n", rcpt_lines(&rcpts[99..]));
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx(&first)
        .quiet()
        .tx(&"250 ok\r\n".repeat(100))
        .rx(&second)
        .tx(&format!("{}354 go\r\n", "250 ok\r\n".repeat(51)))
        .rx("x\r\n.\r\n")
        .tx("250 ok\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let report = conn.send(&envelope("a@x.test", &rcpts), b"x\r\n").await;
    conn.quit().await;
    server.finish().await;
    let report = report.unwrap();
    assert_eq!(report.rcpts.len(), 150);
    assert_eq!(report.data.map(|r| r.code), Some(250));
}

mod chunking;
mod pipeline;

#[test]
fn errors_carry_the_status_postfix_would_log() {
    let refused = SmtpError::Connect {
        addr: "127.0.0.1:25".parse().unwrap(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    };
    assert_eq!(refused.dsn(), "4.4.1");
    assert_eq!(SmtpError::Closed { stage: Stage::Data }.dsn(), "4.4.2");
    let auth = SmtpError::AuthRejected {
        reply: Reply::new(535, "5.7.8 bad credentials"),
    };
    assert_eq!(auth.dsn(), "4.7.8", "kept queued, so class 4");
    let mail = SmtpError::Rejected {
        stage: Stage::Mail,
        reply: Reply::new(553, "5.1.8 sender domain unknown"),
    };
    assert!(mail.is_permanent());
    assert_eq!(mail.dsn(), "5.1.8");
    let throttled = SmtpError::Rejected {
        stage: Stage::Greeting,
        reply: Reply::new(421, "too busy"),
    };
    assert_eq!(throttled.dsn(), "4.0.0");
    assert_eq!(
        SmtpError::SmtpUtf8NotOffered { host: "h".into() }.dsn(),
        "5.6.7"
    );
}
