//! A raw SMTP client for tests: sends exact bytes, returns exact replies.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Client {
    io: BufReader<TcpStream>,
}

impl Client {
    /// Connects and returns the client with the greeting.
    pub async fn connect(addr: SocketAddr) -> (Client, String) {
        let s = TcpStream::connect(addr).await.expect("connect to relayq");
        let mut c = Client {
            io: BufReader::new(s),
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// Connects from a chosen loopback source address (`127.0.0.2`, ...),
    /// as a client on another host would, and returns the greeting.
    pub async fn connect_from(source: &str, addr: SocketAddr) -> (Client, String) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("source address"))
            .expect("bind the source address");
        let stream = socket.connect(addr).await.expect("connect to relayq");
        Client::from_stream(stream).await
    }

    /// Wraps an already connected stream (e.g. bound to a chosen source
    /// address) and returns the client with the greeting.
    pub async fn from_stream(s: TcpStream) -> (Client, String) {
        let mut c = Client {
            io: BufReader::new(s),
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// The raw connection, for a test that writes and reads on its own
    /// (anything buffered but unread is dropped).
    pub fn into_stream(self) -> TcpStream {
        self.io.into_inner()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("write");
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Reads one (possibly multi-line) reply, joined with "\n".
    pub async fn reply(&mut self) -> String {
        let mut all = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read_line(&mut line))
                .await
                .expect("reply timeout")
                .expect("read reply");
            if n == 0 {
                all.push("<EOF>".to_string());
                break;
            }
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            all.push(line);
            if last {
                break;
            }
        }
        all.join("\n")
    }

    /// True if the server closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// A full transaction; returns the reply to the end of data.
    pub async fn mail(&mut self, from: &str, rcpts: &[&str], data: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with("250"), "MAIL: {r}");
        for rcpt in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert!(r.starts_with("250"), "RCPT {rcpt}: {r}");
        }
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(data).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

/// Connects, says EHLO, sends one message, quits. Returns the final reply.
pub async fn send_mail(addr: SocketAddr, from: &str, rcpts: &[&str], data: &[u8]) -> String {
    let (mut c, greeting) = Client::connect(addr).await;
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let r = c.cmd("EHLO client.test").await;
    assert!(r.starts_with("250"), "EHLO: {r}");
    let reply = c.mail(from, rcpts, data).await;
    c.cmd("QUIT").await;
    reply
}

/// A message as a client puts it on the wire after DATA: every line that
/// starts with a dot gets another one (RFC 5321 4.5.2).
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(data.len() + 8);
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire
}

/// The queue id from "250 2.0.0 Ok: queued as ID".
pub fn queue_id(reply: &str) -> String {
    reply
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}
