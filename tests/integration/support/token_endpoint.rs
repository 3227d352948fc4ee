//! A fake OAuth2 token endpoint over HTTPS (certificate from the test CA),
//! speaking the three grants relayq uses as Microsoft and Google document
//! them:
//!
//! - client credentials (Microsoft, `/<tenant>/oauth2/v2.0/token`): the
//!   client id and secret must be registered, the scope must be
//!   `https://outlook.office365.com/.default`;
//! - refresh token (Microsoft and Google, `/token`): the refresh token must
//!   be one it knows; with [`TokenEndpoint::set_rotate`] each use hands out
//!   a new one and forgets the old (as Microsoft may);
//! - JWT bearer (Google service account, RFC 7523): the assertion is
//!   verified by PyJWT (`oauth2_peer.py verify`), not by code of ours, and
//!   its `sub` must be a mailbox the service account is delegated for.
//!
//! Errors are answered the providers' way (`invalid_client` with an
//! AADSTS code for Microsoft, Google's sentences), and faults can be set
//! ([`Fault`]): forced `invalid_client`/`invalid_grant`, 503, slow answers,
//! any answer at all.
//! Every request is counted. Issued access tokens go into a [`TokenCheck`]
//! the fake upstream (and, through a file, aiosmtpd) accepts;
//! [`TokenEndpoint::expire_all`] expires them. Listens on 127.0.0.1 only.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use super::pki::ServerCert;
use super::upstream::TokenCheck;

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const MS_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// A way for the endpoint to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every request gets `invalid_client`.
    InvalidClient,
    /// Every request gets `invalid_grant`.
    InvalidGrant,
    /// Every request gets 500 (the endpoint is down).
    Unavailable,
    /// Answers (normally) only after this long.
    Slow(Duration),
    /// Every request gets this status and body, as they are (a broken or
    /// hostile endpoint).
    Answer(u16, &'static str),
}

/// One request as the endpoint saw it (no secrets kept here).
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub grant_type: String,
    pub client_id: Option<String>,
    pub scope: Option<String>,
    /// 200 when a token was issued.
    pub status: u16,
}

/// A service account the endpoint knows.
#[derive(Clone, Debug)]
struct ServiceAccount {
    email: String,
    public_key: PathBuf,
    /// Mailboxes it may act as (domain-wide delegation).
    delegated: Vec<String>,
}

struct State {
    fault: Fault,
    lifetime: u64,
    clients: HashMap<String, String>,
    refresh_tokens: HashSet<String>,
    rotate: bool,
    service_account: Option<ServiceAccount>,
    seen: Vec<Seen>,
    /// Verified service account assertions: PyJWT's header and claims.
    assertions: Vec<serde_json::Value>,
    /// Every secret it handed out or was given: for leak checks.
    secrets: Vec<String>,
    tokens: TokenCheck,
    tokens_file: Option<PathBuf>,
    seq: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct TokenEndpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenEndpoint {
    /// Starts on 127.0.0.1 with `cert` (signed by the test CA).
    pub async fn start(cert: &ServerCert) -> TokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the token endpoint");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fault: Fault::None,
                lifetime: 3600,
                clients: HashMap::new(),
                refresh_tokens: HashSet::new(),
                rotate: false,
                service_account: None,
                seen: Vec::new(),
                assertions: Vec::new(),
                secrets: Vec::new(),
                tokens: TokenCheck::default(),
                tokens_file: None,
                seq: 0,
            }),
            changed: Notify::new(),
        });
        let acceptor = TlsAcceptor::from(cert.config.clone());
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone(), addr));
        TokenEndpoint { addr, shared, task }
    }

    /// Microsoft's endpoint for `tenant`.
    pub fn microsoft_url(&self, tenant: &str) -> String {
        format!("https://{}/{tenant}/oauth2/v2.0/token", self.addr)
    }

    /// Google's endpoint.
    pub fn google_url(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    pub fn register_client(&self, id: &str, secret: &str) {
        let mut st = self.shared.lock();
        st.clients.insert(id.into(), secret.into());
        if !secret.is_empty() {
            st.secrets.push(secret.into());
        }
    }

    /// A refresh token from a (pretend) sign-in; returns it.
    pub fn new_refresh_token(&self) -> String {
        let mut st = self.shared.lock();
        let token = secret("rt", &mut st.seq);
        st.refresh_tokens.insert(token.clone());
        st.secrets.push(token.clone());
        token
    }

    /// Every refresh token is revoked (the user changed the password).
    pub fn revoke_refresh_tokens(&self) {
        self.shared.lock().refresh_tokens.clear();
    }

    /// Hand out a new refresh token with each refresh, forgetting the old.
    pub fn set_rotate(&self, rotate: bool) {
        self.shared.lock().rotate = rotate;
    }

    pub fn set_service_account(&self, email: &str, public_key: &Path, delegated: &[&str]) {
        self.shared.lock().service_account = Some(ServiceAccount {
            email: email.into(),
            public_key: public_key.into(),
            delegated: delegated.iter().map(|s| s.to_string()).collect(),
        });
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
    }

    /// `expires_in` of the tokens issued from now on.
    pub fn set_lifetime(&self, secs: u64) {
        self.shared.lock().lifetime = secs;
    }

    /// Also keep the valid tokens, one a line, in `file` (for aiosmtpd).
    pub fn write_tokens_to(&self, file: &Path) {
        let mut st = self.shared.lock();
        st.tokens_file = Some(file.into());
        write_tokens(&st);
    }

    /// The tokens an upstream should accept.
    pub fn tokens(&self) -> TokenCheck {
        self.shared.lock().tokens.clone()
    }

    /// Every access token issued so far expires now.
    pub fn expire_all(&self) {
        let st = self.shared.lock();
        st.tokens.expire_all();
        write_tokens(&st);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Requests answered with a token.
    pub fn issued(&self) -> usize {
        self.seen().iter().filter(|s| s.status == 200).count()
    }

    pub fn assertions(&self) -> Vec<serde_json::Value> {
        self.shared.lock().assertions.clone()
    }

    /// Every secret the endpoint knows of: client secrets, refresh tokens
    /// and access tokens it issued.
    pub fn secrets(&self) -> Vec<String> {
        self.shared.lock().secrets.clone()
    }

    /// Waits until `n` requests were answered (any way).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.lock().seen.len() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "token endpoint: expected {n} request(s) within {timeout:?}; seen {:?}",
                    self.seen()
                );
            }
        }
    }
}

fn secret(prefix: &str, seq: &mut u64) -> String {
    *seq += 1;
    format!(
        "{prefix}-{}-{:016x}{:016x}",
        *seq,
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

fn write_tokens(st: &State) {
    if let Some(file) = &st.tokens_file {
        let mut text = st.tokens.tokens().join("\n");
        text.push('\n');
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write tokens file");
        std::fs::rename(&tmp, file).expect("rename tokens file");
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    addr: SocketAddr,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, addr).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn oauth_error(status: u16, code: &str, description: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({ "error": code, "error_description": description }),
    )
}

async fn handle(
    shared: &Shared,
    req: Request<hyper::body::Incoming>,
    addr: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let is_form = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let post = req.method() == hyper::Method::POST;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| form.get(k).cloned();
    let fault = shared.lock().fault;
    if let Fault::Slow(d) = fault {
        tokio::time::sleep(d).await;
    }
    let microsoft = path.ends_with("/oauth2/v2.0/token");
    let response = if !post || !is_form {
        oauth_error(400, "invalid_request", "POST a form")
    } else {
        answer(shared, &path, &form, microsoft, fault, addr).await
    };
    let status = response.status().as_u16();
    shared.lock().seen.push(Seen {
        path,
        grant_type: get("grant_type").unwrap_or_default(),
        client_id: get("client_id"),
        scope: get("scope"),
        status,
    });
    shared.changed.notify_waiters();
    response
}

async fn answer(
    shared: &Shared,
    path: &str,
    form: &HashMap<String, String>,
    microsoft: bool,
    fault: Fault,
    addr: SocketAddr,
) -> Response<Full<Bytes>> {
    let get = |k: &str| form.get(k).map(String::as_str);
    match fault {
        Fault::Unavailable => {
            return oauth_error(
                500,
                "temporarily_unavailable",
                "AADSTS90033: A transient error has occurred. Please try again.",
            );
        }
        Fault::InvalidClient => return invalid_client(microsoft),
        Fault::InvalidGrant => return invalid_grant(microsoft),
        Fault::Answer(status, body) => {
            return Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("response");
        }
        Fault::None | Fault::Slow(_) => {}
    }
    let grant = get("grant_type").unwrap_or_default();
    let client_ok = |st: &State| match (get("client_id"), get("client_secret")) {
        (Some(id), Some(secret)) => st.clients.get(id).is_some_and(|s| s == secret),
        // A Microsoft public client sends no secret.
        (Some(id), None) => microsoft && st.clients.get(id).is_some_and(String::is_empty),
        _ => false,
    };
    let mut rotated = None;
    match grant {
        "client_credentials" => {
            if !microsoft {
                return oauth_error(400, "unsupported_grant_type", "Invalid grant_type");
            }
            if !client_ok(&shared.lock()) {
                return invalid_client(true);
            }
            if get("scope") != Some(MS_SCOPE) {
                return oauth_error(
                    400,
                    "invalid_scope",
                    "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
                );
            }
        }
        "refresh_token" => {
            let mut st = shared.lock();
            if !client_ok(&st) {
                return invalid_client(microsoft);
            }
            let Some(rt) = get("refresh_token").filter(|t| st.refresh_tokens.contains(*t)) else {
                return invalid_grant(microsoft);
            };
            if microsoft && get("scope").is_none() {
                return oauth_error(
                    400,
                    "invalid_request",
                    "AADSTS900144: The request body must contain the following parameter: 'scope'.",
                );
            }
            if st.rotate {
                st.refresh_tokens.remove(rt);
                let new = secret("rt", &mut st.seq);
                st.refresh_tokens.insert(new.clone());
                st.secrets.push(new.clone());
                rotated = Some(new);
            }
        }
        JWT_BEARER => {
            let Some(sa) = shared.lock().service_account.clone() else {
                return oauth_error(400, "invalid_grant", "Invalid JWT Signature.");
            };
            let audience = format!("https://{addr}{path}");
            let verified =
                match verify_jwt(get("assertion").unwrap_or_default(), &sa, &audience).await {
                    Ok(v) => v,
                    Err(why) => {
                        eprintln!("token endpoint: assertion refused: {why}");
                        return oauth_error(400, "invalid_grant", "Invalid JWT Signature.");
                    }
                };
            let claims = &verified["claims"];
            if claims["iss"] != sa.email.as_str() {
                return oauth_error(400, "invalid_grant", "Invalid JWT Signature.");
            }
            let sub = claims["sub"].as_str().unwrap_or_default();
            if !sa.delegated.iter().any(|d| d == sub) || claims["scope"] != GMAIL_SCOPE {
                return oauth_error(
                    401,
                    "unauthorized_client",
                    "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
                );
            }
            shared.lock().assertions.push(verified);
        }
        _ => return oauth_error(400, "unsupported_grant_type", "Invalid grant_type"),
    }
    let mut st = shared.lock();
    let token = secret("at", &mut st.seq);
    st.tokens.accept(&token);
    st.secrets.push(token.clone());
    write_tokens(&st);
    let mut body = serde_json::json!({
        "token_type": "Bearer",
        "expires_in": st.lifetime,
        "access_token": token,
    });
    if microsoft {
        body["ext_expires_in"] = st.lifetime.into();
    } else {
        body["scope"] = GMAIL_SCOPE.into();
    }
    if let Some(rt) = rotated {
        body["refresh_token"] = rt.into();
    }
    json(200, body)
}

fn invalid_client(microsoft: bool) -> Response<Full<Bytes>> {
    if microsoft {
        oauth_error(
            401,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '00000000-0000-0000-0000-000000000000'.\r\nTrace ID: 0f1e\r\nCorrelation ID: 2d3c\r\nTimestamp: 2026-11-02 10:00:00Z",
        )
    } else {
        oauth_error(401, "invalid_client", "Unauthorized")
    }
}

fn invalid_grant(microsoft: bool) -> Response<Full<Bytes>> {
    if microsoft {
        oauth_error(
            400,
            "invalid_grant",
            "AADSTS70008: The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.\r\nTrace ID: 0f1e\r\nCorrelation ID: 2d3c\r\nTimestamp: 2026-11-02 10:00:00Z",
        )
    } else {
        oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
    }
}

/// PyJWT's verdict on a service account assertion.
async fn verify_jwt(
    assertion: &str,
    sa: &ServiceAccount,
    audience: &str,
) -> Result<serde_json::Value, String> {
    let mut child = tokio::process::Command::new("python3")
        .arg(peer_script())
        .arg("verify")
        .arg(&sa.public_key)
        .arg(audience)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("stdin")?;
    stdin
        .write_all(assertion.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(text);
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

pub fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/support/oauth2_peer.py")
}

/// Makes a service account key pair with Python's `cryptography` in `dir`:
/// returns (private key PEM, public key file).
pub fn service_account_keys(dir: &Path) -> (String, PathBuf) {
    let how = "install PyJWT with `python3 -m pip install 'pyjwt[crypto]'`; .ci/run does this";
    let out = std::process::Command::new("python3")
        .arg(peer_script())
        .arg("keygen")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("python3 is not available ({e}): {how}"));
    assert!(
        out.status.success(),
        "oauth2_peer.py keygen failed ({how}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(dir.join("sa-key.pem")).expect("sa-key.pem");
    (key, dir.join("sa-pub.pem"))
}
