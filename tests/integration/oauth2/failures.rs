//! Failures are the relay's problem, never the message's: a revoked
//! refresh token, a token endpoint that is down, refuses the client or is
//! slow, and an upstream that refuses the login (with a password or a
//! token) keep mail queued (deferred, never bounced), pause the relay, log
//! one line naming the relay, the provider's error and the fix, show in
//! `relayq check`, and the mail goes once the cause is gone. No secret
//! appears anywhere on the way.

use super::google::GOOGLE_CLIENT_SECRET;
use super::*;
use crate::support::http::{get, status_addr};

/// Nothing but the sent mail reached the upstream: no bounce went out.
fn assert_no_bounce(d: &Daemon, up: &FakeUpstream) {
    assert_eq!(d.count_log("status=bounced"), 0, "{}", d.log());
    assert!(
        up.messages().iter().all(|m| !m.mail_from.is_empty()),
        "a bounce was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_refresh_token_keeps_mail_queued_until_a_new_one_is_written() {
    let s = Setup::new().await;
    let (lines, file) = s.google_delegated();
    let d = s.start(&s.config("status_listen = \"127.0.0.1:0\"", &lines));
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;

    // The user changed the password: Google revokes everything.
    s.endpoint.revoke_refresh_tokens();
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 1).await;
    let deferred = status_line(&d, &id, "deferred", 1).await;
    assert!(
        deferred.contains("dsn=4.7.0") && deferred.contains("invalid_grant"),
        "{deferred}"
    );
    let lines = wait_lines(&d, &["ERROR", "no OAuth2 token"], 1).await;
    assert_eq!(lines.len(), 1, "one line per failed request: {lines:#?}");
    let line = &lines[0];
    assert!(
        line.contains("ERROR")
            && line.contains(&format!("relay 127.0.0.1:{}", s.up.port()))
            && line.contains("invalid_grant: Token has been expired or revoked.")
            && line.contains("fix: the refresh token was revoked or expired")
            && line.contains("write the new refresh token into oauth2_refresh_token_file"),
        "{line}"
    );
    wait_lines(&d, &["paused by the circuit breaker", "invalid_grant"], 1).await;
    assert_eq!(d.queued(), 1);

    // relayq check names the fix; no secret in it.
    let (ok, text) = check(&d);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL oauth2 token for relay 127.0.0.1: token endpoint https://127.0.0.1:")
            && text.contains("refused: invalid_grant: Token has been expired or revoked.")
            && text.contains("-> fix: the refresh token was revoked or expired"),
        "{text}"
    );
    let mut secrets = s.endpoint.secrets();
    secrets.push(GOOGLE_CLIENT_SECRET.into());
    assert_no_secret("relayq check", &text, &secrets);

    // Neither the status page, the metrics nor the queue listing shows
    // a secret.
    let http = status_addr(&d);
    for path in ["/status", "/metrics", "/"] {
        let body = get(http, path).await.body;
        assert_no_secret(path, &body, &secrets);
    }
    let list = d.cli(&["queue", "list", "--json"]);
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(listing.contains(&id), "{listing}");
    assert_no_secret("queue list --json", &listing, &secrets);

    // The operator signs in again and writes the new refresh token; the
    // queued mail goes at the next attempt.
    let new = s.endpoint.new_refresh_token();
    std::fs::write(&file, format!("{new}\n")).unwrap();
    d.flush();
    s.up.wait_for_messages(2, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_no_bounce(&d, &s.up);
    secrets.push(new);
    assert_no_secret("the TRACE log", &d.log(), &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_down_or_refusing_the_client_defers_and_drains_once_fixed() {
    let s = Setup::new().await;
    s.endpoint.set_fault(Fault::Unavailable);
    let d = s.start(&s.config("", &s.microsoft_app_only()));
    let id = send(&d, 0).await;
    status_line(&d, &id, "deferred", 1).await;
    let line = &wait_lines(&d, &["no OAuth2 token", "unreachable"], 1).await[0];
    assert!(
        line.contains("HTTP 500: temporarily_unavailable")
            && line.contains("fix: this machine must reach 127.0.0.1:"),
        "{line}"
    );
    let (ok, text) = check(&d);
    assert!(
        !ok && text.contains("-> fix: this machine must reach"),
        "{text}"
    );

    // Back up: the next attempt gets a token and the mail goes.
    s.endpoint.set_fault(Fault::None);
    d.flush();
    s.up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;

    // Now the secret is wrong (someone rotated it in Entra ID).
    std::fs::write(s.path().join("client-secret"), "an-old-secret\n").unwrap();
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 1).await;
    let deferred = status_line(&d, &id, "deferred", 1).await;
    assert!(deferred.contains("invalid_client"), "{deferred}");
    let line = &wait_lines(&d, &["no OAuth2 token", "invalid_client"], 1).await[0];
    assert!(
        line.contains("AADSTS7000215: Invalid client secret provided")
            && line.contains("fix: the client secret is wrong or expired"),
        "{line}"
    );
    assert!(!line.contains("an-old-secret"), "{line}");
    wait_lines(&d, &["paused by the circuit breaker", "invalid_client"], 1).await;
    let (ok, text) = check(&d);
    assert!(
        !ok && text.contains("FAIL oauth2 token for relay 127.0.0.1:")
            && text.contains("-> fix: the client secret is wrong or expired"),
        "{text}"
    );
    assert!(!text.contains("an-old-secret"));

    // The secret file is read at each request: fixing it is enough.
    std::fs::write(s.path().join("client-secret"), format!("{CLIENT_SECRET}\n")).unwrap();
    d.flush();
    s.up.wait_for_messages(2, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_no_bounce(&d, &s.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_one_request_from_eight_connections() {
    let s = Setup::new().await;
    s.endpoint
        .set_fault(Fault::Slow(Duration::from_millis(1500)));
    let config = s
        .config("", &s.microsoft_app_only())
        .replace("concurrency = 4", "concurrency = 8");
    let d = s.start(&config);
    for n in 0..8 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(8, WAIT).await;
    assert_eq!(s.endpoint.seen().len(), 1, "{:?}", s.endpoint.seen());

    // Slower than connect_timeout (5s): the request is given up, the mail
    // deferred, and it goes once the endpoint answers in time.
    s.endpoint.expire_all();
    d.advance_clock(3600);
    s.endpoint.set_fault(Fault::Slow(Duration::from_secs(8)));
    let id = send(&d, 8).await;
    let deferred = status_line(&d, &id, "deferred", 1).await;
    assert!(deferred.contains("no answer within 5"), "{deferred}");
    s.endpoint.set_fault(Fault::None);
    d.flush();
    s.up.wait_for_messages(9, WAIT).await;
    assert_no_bounce(&d, &s.up);
}

/// Item 3 of the issue: a permanent refusal of a password login is the
/// relay's problem: the mail is deferred, never bounced, the relay paused
/// at once, and the log says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_auth_refusals_defer_pause_and_never_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let cert = ca.server_cert(CertKind::Good);
    let cases = [
        (
            535,
            "5.7.3 Authentication unsuccessful [BN9PR03CA0123.namprd03.prod.outlook.com]",
            "let relayq get OAuth2 tokens",
        ),
        (
            550,
            "5.7.30 Basic authentication is not supported for Client Submission.",
            "Microsoft 365 no longer accepts passwords",
        ),
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            "Set-CASMailbox",
        ),
        (
            535,
            "5.7.8 Username and Password not accepted.",
            "check [relay] username and password",
        ),
    ];
    for (n, (code, text, fix)) in cases.into_iter().enumerate() {
        let script = Script::default()
            .require_auth(MAILBOX, "the-right-one")
            .auth_failure(code, text);
        let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, script).await;
        let sub = dir.path().join(format!("case{n}"));
        std::fs::create_dir_all(&sub).unwrap();
        let config = format!(
            "hostname = \"relayq.test\"\n[relay]\nhost = \"127.0.0.1\"\nport = {}\nca_file = {}\nusername = \"{MAILBOX}\"\npassword = \"a-password\"\nbreaker_pause = \"1m\"\n",
            up.port(),
            toml_path(&ca.ca_file)
        );
        let d = Daemon::start_in(&sub, &config);
        let id = send(&d, n).await;
        let deferred = status_line(&d, &id, "deferred", 1).await;
        assert!(deferred.contains(&format!("{code} {text}")), "{deferred}");
        let line = &wait_lines(&d, &["authentication rejected", "fix:"], 1).await[0];
        assert!(line.contains("ERROR") && line.contains(fix), "{line}");
        // Paused at the first refusal, not after breaker_failures.
        wait_lines(&d, &["paused by the circuit breaker", text], 1).await;
        assert_eq!(d.queued(), 1);
        assert_no_bounce(&d, &up);
        assert!(up.messages().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_refusing_an_app_token_names_the_missing_permission() {
    let s = Setup::new().await;
    s.up.set_script(
        Script::default()
            .require_xoauth2(MAILBOX, crate::support::upstream::TokenCheck::default())
            .auth_failure(535, "5.7.3 Authentication unsuccessful"),
    );
    let d = s.start(&s.config("", &s.microsoft_app_only()));
    let id = send(&d, 0).await;
    status_line(&d, &id, "deferred", 1).await;
    let line = &wait_lines(&d, &["authentication rejected", "fix:"], 1).await[0];
    assert!(
        line.contains("535 5.7.3 Authentication unsuccessful")
            && line.contains("SMTP.SendAsApp")
            && line.contains("New-ServicePrincipal"),
        "{line}"
    );
    assert_eq!(
        s.endpoint.issued(),
        1,
        "a new token is not asked for at once"
    );
    wait_lines(&d, &["paused by the circuit breaker"], 1).await;
    assert_no_bounce(&d, &s.up);
}
