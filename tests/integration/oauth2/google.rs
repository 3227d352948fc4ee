//! Google Workspace: a service account with domain-wide delegation (its
//! RFC 7523 JWT verified by PyJWT at the fake endpoint), and a delegated
//! refresh token.

use super::*;
use crate::support::token_endpoint::{GMAIL_SCOPE, JWT_BEARER, service_account_keys};

const SA_EMAIL: &str = "relayq-sender@contoso-project.iam.gserviceaccount.com";
const SA_KEY_ID: &str = "4c0ffee0relayq0key0id";
pub(super) const GOOGLE_CLIENT_ID: &str = "1234-relayq.apps.googleusercontent.com";
pub(super) const GOOGLE_CLIENT_SECRET: &str = "GOCSPX-relayq-g00gle-s3cret";

/// Writes a service account JSON key file as Google's console makes it;
/// returns its path and the private key.
pub(super) fn service_account_file(s: &Setup) -> (PathBuf, String) {
    let (private_key, public_key) = service_account_keys(s.path());
    s.endpoint
        .set_service_account(SA_EMAIL, &public_key, &[MAILBOX]);
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "contoso-project",
        "private_key_id": SA_KEY_ID,
        "private_key": private_key,
        "client_email": SA_EMAIL,
        "client_id": "112233445566778899",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": s.endpoint.google_url(),
    });
    let path = s.secret_file("service-account.json", &key.to_string());
    (path, private_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_service_account_jwt_is_verified_by_pyjwt_and_mail_flows() {
    let s = Setup::new().await;
    let (key_file, private_key) = service_account_file(&s);
    // No oauth2_token_url: the key file's token_uri is the endpoint.
    let lines = format!(
        "oauth2_provider = \"google\"\noauth2_service_account_file = {}\n",
        toml_path(&key_file)
    );
    let d = s.start(&s.config("", &lines));
    for n in 0..4 {
        send(&d, n).await;
    }
    s.up.wait_for_messages(4, WAIT).await;
    assert_eq!(s.endpoint.issued(), 1, "{:?}", s.endpoint.seen());
    let seen = &s.endpoint.seen()[0];
    assert_eq!(seen.path, "/token");
    assert_eq!(seen.grant_type, JWT_BEARER);
    assert_all_logins_ok(&s.up);

    // What PyJWT found in the assertion (signature and audience verified).
    let verified = s.endpoint.assertions();
    assert_eq!(verified.len(), 1);
    let (header, claims) = (&verified[0]["header"], &verified[0]["claims"]);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], SA_KEY_ID);
    assert_eq!(claims["iss"], SA_EMAIL);
    assert_eq!(claims["sub"], MAILBOX);
    assert_eq!(claims["scope"], GMAIL_SCOPE);
    assert_eq!(claims["aud"], s.endpoint.google_url().as_str());
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(iat.abs_diff(now) < 120, "iat {iat} is real time ({now})");

    // An hour later: one new assertion, mail flows.
    s.endpoint.expire_all();
    d.advance_clock(3600);
    send(&d, 4).await;
    s.up.wait_for_messages(5, WAIT).await;
    assert_eq!(s.endpoint.assertions().len(), 2);

    // The private key never shows, not even in a TRACE log.
    let key_body: String = private_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let log = d.log();
    for piece in private_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(piece), "private key in the log");
    }
    assert!(!log.contains(&key_body[..40]));
    assert_no_secret("the TRACE log", &log, &s.endpoint.secrets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_without_domain_wide_delegation_defers_and_says_how_to_fix() {
    let s = Setup::new().await;
    let (key_file, _) = service_account_file(&s);
    let public_key = s.path().join("sa-pub.pem");
    // Delegated for another mailbox only.
    s.endpoint
        .set_service_account(SA_EMAIL, &public_key, &["someone@contoso.example"]);
    let lines = format!(
        "oauth2_provider = \"google\"\noauth2_service_account_file = {}\n",
        toml_path(&key_file)
    );
    let d = s.start(&s.config("", &lines));
    let id = send(&d, 0).await;
    let deferred = status_line(&d, &id, "deferred", 1).await;
    assert!(deferred.contains("unauthorized_client"), "{deferred}");
    let line = wait_lines(&d, &["no OAuth2 token", "unauthorized_client"], 1).await;
    assert!(
        line[0].contains("relay 127.0.0.1:")
            && line[0].contains("Client is unauthorized to retrieve access tokens")
            && line[0].contains("fix: domain-wide delegation is missing"),
        "{}",
        line[0]
    );
    wait_lines(
        &d,
        &["paused by the circuit breaker", "unauthorized_client"],
        1,
    )
    .await;
    assert!(s.up.auths().is_empty(), "no login without a token");
    let (ok, text) = check(&d);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL oauth2 token for relay 127.0.0.1: ")
            && text.contains("unauthorized_client")
            && text.contains("-> fix: domain-wide delegation is missing"),
        "{text}"
    );

    // The admin adds the delegation: a flush sends the mail.
    s.endpoint
        .set_service_account(SA_EMAIL, &public_key, &[MAILBOX]);
    d.flush();
    s.up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_eq!(d.count_log("status=bounced"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_delegated_refresh_token_sends_client_secret_and_no_scope() {
    let s = Setup::new().await;
    let (lines, file) = s.google_delegated();
    let rt = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let d = s.start(&s.config("", &lines));
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    let seen = s.endpoint.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].grant_type, "refresh_token");
    assert_eq!(seen[0].scope, None, "Google keeps the scope of the sign-in");
    // Google does not rotate: the file is untouched.
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), rt);
    assert_all_logins_ok(&s.up);
    let mut secrets = s.endpoint.secrets();
    secrets.push(GOOGLE_CLIENT_SECRET.to_string());
    assert_no_secret("the TRACE log", &d.log(), &secrets);
}
