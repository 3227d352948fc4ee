//! A minimal HTTP/1.0 client for the status endpoint: one request per
//! connection, the whole response read until the server closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::daemon::Daemon;

pub struct HttpResponse {
    pub status: u16,
    /// Header lines as received ("Name: value"), names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with the given Host header.
pub async fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> HttpResponse {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to status endpoint");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("response timeout")
        .expect("read response");
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `GET path` as a local client would send it.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    get_with_host(addr, path, &addr.to_string()).await
}

/// The status endpoint's address, from the daemon's start-up log line.
pub fn status_addr(d: &Daemon) -> SocketAddr {
    let line = d.wait_log("status endpoint on http://", Duration::from_secs(10));
    line.split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status address in {line:?}"))
}
