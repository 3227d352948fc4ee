//! OAuth2 built in, end to end: the real relayq binary gets its XOAUTH2
//! tokens from a fake token endpoint over HTTPS (test CA) that speaks the
//! Microsoft and Google grants, and relays through a fake upstream that
//! requires STARTTLS and XOAUTH2 and accepts only tokens that endpoint
//! issued and has not expired. Time moves with the daemon's injected
//! clock (`relayq clock-advance`), so token lifetimes pass in
//! milliseconds.
//!
//! This file has the shared helpers and the Microsoft flows;
//! `oauth2/google.rs` the Google ones (the service account JWT checked by
//! PyJWT), `oauth2/failures.rs` what must keep mail queued (revoked refresh
//! token, endpoint down or slow, refusals of AUTH, with or without a
//! token), `oauth2/aiosmtpd.rs` an upstream nobody here wrote.

mod aiosmtpd;
mod failures;
mod google;
mod hardening;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::daemon::Daemon;
use crate::support::pki::{CertKind, TestCa};
use crate::support::token_endpoint::{Fault, MS_SCOPE, TokenEndpoint};
use crate::support::upstream::{FakeUpstream, Script, UpstreamTls};
use crate::tls::{message, send, status_line, toml_path, wait_lines};

const WAIT: Duration = Duration::from_secs(30);
/// The mailbox relayq sends as (XOAUTH2 `user=`, the service account's
/// `sub`).
const MAILBOX: &str = "app@contoso.example";
const TENANT: &str = "contoso-tenant";
const CLIENT_ID: &str = "5b1c0f8e-relayq-test-client";
/// Distinctive, so a grep for it can't match anything else.
const CLIENT_SECRET: &str = "Qx9~relayq-client-s3cret-Vt51";

/// A test's directory, CA, token endpoint and upstream.
struct Setup {
    dir: tempfile::TempDir,
    ca: TestCa,
    endpoint: TokenEndpoint,
    up: FakeUpstream,
}

impl Setup {
    /// An endpoint and an upstream requiring STARTTLS + XOAUTH2 as
    /// [`MAILBOX`] with the endpoint's tokens.
    async fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(&dir.path().join("pki"));
        let cert = ca.server_cert(CertKind::Good);
        let endpoint = TokenEndpoint::start(&cert).await;
        let script = Script::default().require_xoauth2(MAILBOX, endpoint.tokens());
        let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, script).await;
        Setup {
            dir,
            ca,
            endpoint,
            up,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a secret file (mode 0600); returns its path.
    fn secret_file(&self, name: &str, secret: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, format!("{secret}\n")).expect("write secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// A config relaying to the upstream with `oauth2` lines; every
    /// message on its own connection (so each needs a login), four at
    /// once, and a short breaker pause. `top` goes before `[relay]`.
    fn config(&self, top: &str, oauth2: &str) -> String {
        format!(
            "hostname = \"relayq.test\"\n{top}\n[relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = {ca}\noauth2_ca_file = {ca}\nusername = \"{MAILBOX}\"\nconcurrency = 4\nmax_messages_per_connection = 1\nconnect_timeout = \"5s\"\ncommand_timeout = \"10s\"\nidle_timeout = \"30s\"\nbreaker_pause = \"1s\"\n{oauth2}",
            self.up.port(),
            ca = toml_path(&self.ca.ca_file),
        )
    }

    /// Microsoft app-only access (client credentials) at the endpoint.
    fn microsoft_app_only(&self) -> String {
        self.endpoint.register_client(CLIENT_ID, CLIENT_SECRET);
        let secret = self.secret_file("client-secret", CLIENT_SECRET);
        format!(
            "oauth2_provider = \"microsoft\"\noauth2_tenant = \"{TENANT}\"\noauth2_client_id = \"{CLIENT_ID}\"\noauth2_client_secret_file = {}\noauth2_token_url = \"{}\"\n",
            toml_path(&secret),
            self.endpoint.microsoft_url(TENANT)
        )
    }

    /// Google delegated access (a refresh token) at the endpoint; returns
    /// the `oauth2` lines and the refresh token file.
    fn google_delegated(&self) -> (String, PathBuf) {
        use google::{GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET};
        self.endpoint
            .register_client(GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET);
        let file = self.secret_file("refresh-token", &self.endpoint.new_refresh_token());
        let secret = self.secret_file("client-secret", GOOGLE_CLIENT_SECRET);
        let lines = format!(
            "oauth2_provider = \"google\"\noauth2_client_id = \"{GOOGLE_CLIENT_ID}\"\noauth2_client_secret_file = {}\noauth2_refresh_token_file = {}\noauth2_token_url = \"{}\"\n",
            toml_path(&secret),
            toml_path(&file),
            self.endpoint.google_url()
        );
        (lines, file)
    }

    fn start(&self, config: &str) -> Daemon {
        Daemon::start_in_with_env(self.path(), config, &[("RELAYQ_LOG", "trace")])
    }
}

/// Every AUTH so far was XOAUTH2 as the mailbox over TLS, and succeeded.
fn assert_all_logins_ok(up: &FakeUpstream) {
    let auths = up.auths();
    assert!(!auths.is_empty());
    for a in &auths {
        assert!(
            a.ok && a.tls && a.mechanism == "XOAUTH2" && a.username == MAILBOX,
            "{auths:#?}"
        );
    }
}

/// `relayq check`'s output and whether it passed.
fn check(d: &Daemon) -> (bool, String) {
    let out = d.cli(&["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// None of `secrets` (and the client secret) appears in `text`.
fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets.iter().map(String::as_str).chain([CLIENT_SECRET]) {
        assert!(!text.contains(s), "{what} shows the secret {s:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_app_only_token_is_shared_and_refreshed_once_per_expiry() {
    let s = Setup::new().await;
    let d = s.start(&s.config("", &s.microsoft_app_only()));

    // Eight messages, each on its own connection, four at a time: one
    // token for all of them.
    for n in 0..8 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(8, WAIT).await;
    assert_eq!(s.endpoint.issued(), 1, "{:?}", s.endpoint.seen());
    let first = &s.endpoint.seen()[0];
    assert_eq!(first.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(first.grant_type, "client_credentials");
    assert_eq!(first.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(first.scope.as_deref(), Some(MS_SCOPE));
    assert!(s.up.connections() >= 8);
    assert_all_logins_ok(&s.up);

    // The hour passes: the provider expires the token, relayq's clock
    // says so too. Mail keeps flowing with exactly one more request.
    s.endpoint.expire_all();
    d.advance_clock(3600);
    for n in 8..16 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(16, WAIT).await;
    assert_eq!(s.endpoint.issued(), 2, "{:?}", s.endpoint.seen());
    assert_all_logins_ok(&s.up);

    // 55 minutes and 30 seconds into the new token's hour (inside the five
    // minute margin, still valid): renewed ahead of expiry, once.
    d.advance_clock(3330);
    for n in 16..20 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(20, WAIT).await;
    assert_eq!(s.endpoint.issued(), 3, "{:?}", s.endpoint.seen());
    assert_all_logins_ok(&s.up);
    assert_eq!(s.endpoint.seen().len(), 3, "no failed requests either");

    // relayq check: the token step before the AUTH step, no secret shown.
    let (ok, text) = check(&d);
    assert!(ok, "{text}");
    let token_line = text
        .lines()
        .position(|l| l.starts_with("ok   oauth2 token for relay 127.0.0.1: expires in 60m00s"))
        .unwrap_or_else(|| panic!("no token step:\n{text}"));
    let auth_line = text
        .lines()
        .position(|l| l.starts_with(&format!("ok   auth: logged in as {MAILBOX} with XOAUTH2")))
        .unwrap_or_else(|| panic!("no auth step:\n{text}"));
    assert!(token_line < auth_line, "{text}");
    assert_no_secret("relayq check", &text, &s.endpoint.secrets());
    assert_no_secret("the TRACE log", &d.log(), &s.endpoint.secrets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_upstream_refuses_is_refreshed_once_and_auth_retried() {
    let s = Setup::new().await;
    let d = s.start(&s.config("", &s.microsoft_app_only()));
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    assert_eq!(s.endpoint.issued(), 1);

    // Revoked at the provider a minute later; relayq still thinks it good.
    s.endpoint.expire_all();
    d.advance_clock(60);
    let id = send(&d, 1).await;
    s.up.wait_for_messages(2, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_eq!(s.endpoint.issued(), 2, "{:?}", s.endpoint.seen());
    // Refused, then accepted on the same connection with the new token.
    let auths = s.up.auths();
    let last: Vec<_> = auths.iter().rev().take(2).rev().collect();
    assert!(!last[0].ok && last[1].ok, "{auths:#?}");
    assert_eq!(last[0].conn, last[1].conn, "{auths:#?}");

    // A token refused moments after it was issued is not renewed again
    // (the refusal is about something else): one more refusal, no
    // request, the mail deferred.
    s.endpoint.expire_all();
    let id = send(&d, 2).await;
    status_line(&d, &id, "deferred", 1).await;
    assert_eq!(s.endpoint.seen().len(), 2, "{:?}", s.endpoint.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_delegated_refresh_token_rotates_into_the_file() {
    let s = Setup::new().await;
    s.endpoint.register_client(CLIENT_ID, "");
    s.endpoint.set_rotate(true);
    let first = s.endpoint.new_refresh_token();
    let file = s.secret_file("refresh-token", &first);
    let lines = format!(
        "oauth2_provider = \"microsoft\"\noauth2_tenant = \"{TENANT}\"\noauth2_client_id = \"{CLIENT_ID}\"\noauth2_refresh_token_file = {}\noauth2_token_url = \"{}\"\n",
        toml_path(&file),
        s.endpoint.microsoft_url(TENANT)
    );
    let mut d = s.start(&s.config("", &lines));
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    let seen = s.endpoint.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].grant_type, "refresh_token");
    assert_eq!(
        seen[0].scope.as_deref(),
        Some("https://outlook.office.com/SMTP.Send offline_access")
    );

    // The provider rotated the refresh token: the file holds the new one,
    // whole, still private, with no temporary file left beside it.
    wait_lines(&d, &["saved the new refresh token"], 1).await;
    let second = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_ne!(second, first);
    assert!(s.endpoint.secrets().contains(&second));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let strays: Vec<_> = std::fs::read_dir(s.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("relayq-refresh"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");

    // An hour later only the new refresh token works (the old one was
    // forgotten by the endpoint): mail still flows.
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 1).await;
    s.up.wait_for_messages(2, WAIT).await;
    // Done with it before the restart below (else it goes again): its
    // sent line is logged before its queue file is removed, so a kill -9
    // between them sends it again after the restart, and every count of
    // messages at the upstream below is one ahead (seen twice under load:
    // 4 tokens counted where the renewal made 5). Removed, it is done.
    status_line(&d, &id, "sent", 1).await;
    d.wait_log(&format!("{id}: removed"), WAIT);
    assert_eq!(s.endpoint.issued(), 2);
    let third = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_ne!(third, second);

    // After a restart the file is all relayq knows: it works.
    s.endpoint.expire_all();
    d.restart();
    let id = send(&d, 2).await;
    s.up.wait_for_messages(3, WAIT).await;
    assert_eq!(s.endpoint.issued(), 3, "{:?}", s.endpoint.seen());
    assert_all_logins_ok(&s.up);
    // Each message is sent before the clock jumps and before tokens are
    // counted: the count at the upstream alone does not say which message
    // arrived.
    status_line(&d, &id, "sent", 1).await;

    // Short-lived tokens (five minutes) are renewed a minute early.
    s.endpoint.set_lifetime(300);
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 3).await;
    s.up.wait_for_messages(4, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_eq!(s.endpoint.issued(), 4);
    d.advance_clock(250);
    let id = send(&d, 4).await;
    s.up.wait_for_messages(5, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_eq!(s.endpoint.issued(), 5, "renewed 50s before expiry");

    // Revoked (AADSTS70008): deferred, with Microsoft's code and the fix.
    s.endpoint.set_fault(Fault::InvalidGrant);
    s.endpoint.expire_all();
    d.advance_clock(300);
    let id = send(&d, 5).await;
    status_line(&d, &id, "deferred", 1).await;
    let line = &wait_lines(&d, &["ERROR", "invalid_grant: AADSTS70008"], 1).await[0];
    assert!(
        line.contains("fix: the refresh token is expired or revoked: sign in again as"),
        "{line}"
    );
    assert_no_secret("the TRACE log", &d.log(), &s.endpoint.secrets());
}

#[test]
fn oauth2_config_mistakes_name_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[relay]\nhost = \"smtp.office365.com\"\nport = 587\nusername = \"app@contoso.example\"\n";
    let cases = [
        (
            "oauth2_provider = \"microsoft\"\noauth2_client_id = \"x\"\noauth2_client_secret_file = \"/s\"\n",
            "relay.oauth2_tenant",
        ),
        (
            "oauth2_provider = \"microsoft\"\noauth2_tenant = \"t\"\noauth2_client_id = \"x\"\n",
            "relay.oauth2_client_secret_file",
        ),
        (
            "oauth2_provider = \"google\"\noauth2_client_id = \"x\"\noauth2_client_secret_file = \"/s\"\n",
            "client-credentials",
        ),
        (
            "oauth2_provider = \"microsoft\"\noauth2_service_account_file = \"/k.json\"\n",
            "relay.oauth2_service_account_file",
        ),
        (
            "oauth2_tenant = \"t\"\noauth2_client_id = \"x\"\n",
            "relay.oauth2_provider",
        ),
        (
            "oauth2_provider = \"google\"\noauth2_service_account_file = \"/k.json\"\noauth2_token_url = \"http://127.0.0.1/token\"\n",
            "relay.oauth2_token_url",
        ),
        (
            "oauth2_provider = \"google\"\noauth2_service_account_file = \"/k.json\"\npassword = \"x\"\n",
            "only one of",
        ),
        ("oauth2_provider = \"yahoo\"\n", "oauth2_provider"),
    ];
    for (lines, expected) in cases {
        let (ok, text) = check_config(dir.path(), &format!("{base}{lines}"));
        assert!(!ok, "{lines} was accepted");
        assert!(text.contains(expected), "{lines}: {text}");
    }
    // And the three good forms pass.
    for lines in [
        "oauth2_provider = \"microsoft\"\noauth2_tenant = \"t\"\noauth2_client_id = \"x\"\noauth2_client_secret_env = \"S\"\n",
        "oauth2_provider = \"microsoft\"\noauth2_tenant = \"t\"\noauth2_client_id = \"x\"\noauth2_refresh_token_file = \"/r\"\n",
        "oauth2_provider = \"google\"\noauth2_client_id = \"x\"\noauth2_client_secret_file = \"/s\"\noauth2_refresh_token_file = \"/r\"\n",
        "oauth2_provider = \"google\"\noauth2_service_account_file = \"/k.json\"\n",
    ] {
        let (ok, text) = check_config(dir.path(), &format!("{base}{lines}"));
        assert!(ok, "{lines}: {text}");
    }
}

/// `relayq check-config` on `text`: whether it passed, and what it said.
fn check_config(dir: &Path, text: &str) -> (bool, String) {
    let path = dir.join("relayq.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(crate::support::daemon::BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_relay_gets_its_token_and_check_names_it() {
    let s = Setup::new().await;
    let config = s
        .config("", &s.microsoft_app_only())
        .replace("[relay]\n", "[relay.m365]\n");
    let d = s.start(&config);
    for n in 0..3 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(3, WAIT).await;
    assert_eq!(s.endpoint.issued(), 1);
    assert_all_logins_ok(&s.up);
    let (ok, text) = check(&d);
    assert!(ok, "{text}");
    assert!(
        text.contains("ok   oauth2 token for relay m365: expires in 60m00s (Microsoft client credentials grant from https://127.0.0.1:"),
        "{text}"
    );

    // A failure names the relay by its name, in the log and in check.
    s.endpoint.set_fault(Fault::InvalidClient);
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 3).await;
    status_line(&d, &id, "deferred", 1).await;
    let line = &wait_lines(&d, &["ERROR", "no OAuth2 token"], 1).await[0];
    assert!(
        line.contains(&format!(
            "relay m365 (127.0.0.1:{}): no OAuth2 token",
            s.up.port()
        )),
        "{line}"
    );
    let (ok, text) = check(&d);
    assert!(
        !ok && text.contains("FAIL oauth2 token for relay m365: ")
            && text.contains("-> fix: the client secret is wrong or expired"),
        "{text}"
    );
}
