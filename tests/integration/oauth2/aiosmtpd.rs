//! An upstream nobody here wrote: aiosmtpd with STARTTLS required and an
//! XOAUTH2 authenticator that accepts only the tokens the fake endpoint
//! issued (through a file it keeps current).

use super::*;
use crate::support::aiosmtpd::Aiosmtpd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiosmtpd_takes_the_token_relayq_got_and_refuses_an_expired_one() {
    let s = Setup::new().await;
    let cert = s.ca.server_cert(CertKind::Good);
    let tokens = s.path().join("valid-tokens");
    s.endpoint.write_tokens_to(&tokens);
    let outdir = s.path().join("aiosmtpd");
    std::fs::create_dir_all(&outdir).unwrap();
    let server = Aiosmtpd::start(
        &cert.cert_file,
        &cert.key_file,
        MAILBOX,
        "no-password-login",
        &outdir,
        Some(&tokens),
    )
    .await;
    let (lines, _) = s.google_delegated();
    let config = s.config("", &lines).replace(
        &format!("port = {}", s.up.port()),
        &format!("port = {}", server.port),
    );
    let d = s.start(&config);

    let id = send(&d, 0).await;
    let line = status_line(&d, &id, "sent", 1).await;
    assert!(line.contains("queued by aiosmtpd"), "{line}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outdir.join("1.json")).unwrap()).unwrap();
    assert_eq!(meta["tls"], true, "{meta}");
    assert_eq!(meta["authenticated"], true, "{meta}");
    assert_eq!(meta["login"], MAILBOX, "{meta}");
    assert_eq!(meta["mechanism"], "XOAUTH2", "{meta}");
    let got = std::fs::read(outdir.join("1.eml")).unwrap();
    assert!(got.ends_with(&message(0)), "the message arrived whole");

    // Revoked behind relayq's back a minute later: aiosmtpd refuses the
    // token (334 with Google's JSON, then 535), relayq gets a new one and
    // logs in again on the same connection.
    s.endpoint.expire_all();
    d.advance_clock(60);
    let id = send(&d, 1).await;
    status_line(&d, &id, "sent", 1).await;
    assert!(outdir.join("2.eml").exists());
    assert_eq!(s.endpoint.issued(), 2);
    drop(server);
}
