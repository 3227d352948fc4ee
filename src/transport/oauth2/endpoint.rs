//! One HTTPS POST of a form to a token endpoint: resolve, connect, TLS
//! (ring only, the relay's trust rules), HTTP/1.1 through hyper, and the
//! answer's status and body. A token request is a single exchange, so
//! there is no connection pool; everything must finish within one limit.
//!
//! # Security
//! The body carries secrets and never appears in an error. The answer is
//! read up to [`MAX_BODY`]; an endpoint that sends more is refused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Token answers are a few kilobytes.
const MAX_BODY: usize = 64 * 1024;

/// The endpoint's answer.
pub(super) struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a POST failed, as a sentence without any secret in it; the kind
/// decides what the operator is told to change.
pub(super) enum PostError {
    /// The endpoint could not be reached, or did not answer in time.
    Connect(String),
    /// The TLS handshake failed (a certificate not trusted, not TLS).
    Tls(String),
    /// It answered, but not with HTTP (or with too much).
    Answer(String),
}

/// POSTs `form` (already encoded) to `url`.
pub(super) async fn post_form(
    url: &str,
    form: String,
    ca_file: Option<&Path>,
    limit: Duration,
) -> Result<Answer, PostError> {
    match tokio::time::timeout(limit, exchange(url, form, ca_file)).await {
        Ok(result) => result,
        Err(_) => Err(PostError::Connect(format!(
            "no answer within {}s",
            limit.as_secs_f32()
        ))),
    }
}

async fn exchange(url: &str, form: String, ca_file: Option<&Path>) -> Result<Answer, PostError> {
    use PostError::{Answer as BadAnswer, Connect, Tls};
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Connect(format!("invalid URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Connect("only https:// token endpoints are used".into()));
    }
    let no_host = || Connect("the URL has no host".into());
    let authority = uri.authority().ok_or_else(no_host)?.as_str().to_string();
    let host = uri
        .host()
        .ok_or_else(no_host)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tls = super::super::smtp::tls::client_config(ca_file)
        .await
        .map_err(Tls)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| Connect(format!("invalid host name {host:?}")))?;

    let tcp = connect(&host, port).await.map_err(Connect)?;
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| Tls(format!("TLS with {host}: {}", tls_reason(&e))))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BadAnswer(format!("HTTP: {e}")))?;
    // Drives the connection; it ends when `sender` is dropped.
    let driver = tokio::spawn(connection);
    let request = hyper::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("relayq/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(form)))
        .map_err(|e| Connect(format!("HTTP request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BadAnswer(format!("HTTP: {e}")))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| BadAnswer(format!("reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    drop(sender);
    driver.abort();
    Ok(Answer { status, body })
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// rustls' own error rather than tokio-rustls' "invalid data".
fn tls_reason(e: &std::io::Error) -> String {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map_or_else(|| e.to_string(), |r| r.to_string())
}
