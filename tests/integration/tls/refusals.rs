//! Sessions relayq must refuse: a certificate that does not verify, a pin
//! that does not match, STARTTLS not offered, no credentials for a relay
//! that wants them. Mail stays queued, the log says why, and the fake
//! upstream saw no AUTH and no MAIL.

use super::*;

/// A certificate relayq must refuse: mail stays queued, the deferral names
/// `reason`, each attempt is one failed handshake, and nothing but EHLO and
/// STARTTLS (nothing at all with implicit TLS) was ever sent.
async fn refused_certificate(mode: UpstreamTls, kind: CertKind, with_ca: bool, reason: &str) {
    let f = Fixture::new();
    let cert = f.ca.server_cert(kind);
    let up = FakeUpstream::start_tls(mode, &cert, auth_script()).await;
    let ca = if with_ca { ca_line(&f) } else { String::new() };
    let lines = format!("{ca}{}", password_file_lines(&f));
    let tls = match mode {
        UpstreamTls::StartTls => "starttls",
        UpstreamTls::Implicit => "implicit",
    };
    let d = f.start(&config(&up, tls, &lines));
    let id = send(&d, 1).await;

    let line = status_line(&d, &id, "deferred", 1).await;
    assert!(
        line.contains(reason),
        "deferral should say {reason:?}: {line}"
    );
    assert!(line.contains("certificate verification failed"), "{line}");
    assert!(line.contains("dsn=4.7.5,"), "TLS failure status: {line}");
    assert!(line.contains(&relay_name(&up)), "{line}");
    up.wait_for_handshakes(1, WAIT).await;

    // A second attempt is refused the same way (and not in clear text).
    d.flush();
    status_line(&d, &id, "deferred", 2).await;
    up.wait_for_handshakes(2, WAIT).await;
    let handshakes = up.handshakes();
    assert_eq!(handshakes.len(), 2, "{handshakes:?}");
    assert!(
        handshakes.iter().all(|h| h.result.is_err()),
        "relayq completed a handshake it should have refused: {handshakes:?}"
    );
    assert_nothing_sent(&up);
    let starttls = up.seen().iter().filter(|s| s.verb() == "STARTTLS").count();
    let expected = if mode == UpstreamTls::StartTls { 2 } else { 0 };
    assert_eq!(
        starttls,
        expected,
        "one STARTTLS per attempt: {:?}",
        up.seen()
    );
    assert_still_queued(&d, &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_host_keeps_mail_queued() {
    refused_certificate(
        UpstreamTls::StartTls,
        CertKind::WrongHost,
        true,
        "not valid for name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_certificate_without_the_ca_keeps_mail_queued() {
    refused_certificate(
        UpstreamTls::StartTls,
        CertKind::SelfSigned,
        false,
        "unknown issuer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_keeps_mail_queued() {
    refused_certificate(UpstreamTls::StartTls, CertKind::Expired, true, "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_with_an_unverifiable_certificate_keeps_mail_queued() {
    refused_certificate(
        UpstreamTls::Implicit,
        CertKind::SelfSigned,
        true,
        "unknown issuer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_not_offered_keeps_mail_queued() {
    let f = Fixture::new();
    // Clear text only, but offering AUTH: a tempting downgrade.
    let up = FakeUpstream::start_with(auth_script()).await;
    let lines = format!("{}{}", ca_line(&f), password_file_lines(&f));
    let d = f.start(&config(&up, "starttls", &lines));
    let id = send(&d, 1).await;
    let line = status_line(&d, &id, "deferred", 1).await;
    assert!(
        line.contains("does not offer STARTTLS; refusing to continue in clear text"),
        "{line}"
    );
    d.flush();
    status_line(&d, &id, "deferred", 2).await;
    assert_nothing_sent(&up);
    assert!(
        up.seen().iter().all(|s| s.verb() != "STARTTLS"),
        "STARTTLS was not offered, so not sent: {:?}",
        up.seen()
    );
    assert_still_queued(&d, &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_keeps_mail_queued() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    // A valid certificate from the same CA, but not the pinned one.
    let pinned = f.ca.server_cert(CertKind::Expired);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let lines = format!(
        "{}{}pin_sha256 = \"{}\"\n",
        ca_line(&f),
        password_file_lines(&f),
        pinned.sha256
    );
    let d = f.start(&config(&up, "starttls", &lines));
    let id = send(&d, 1).await;
    let line = status_line(&d, &id, "deferred", 1).await;
    assert!(line.contains("certificate pin mismatch"), "{line}");
    assert!(
        line.contains(&pinned.sha256) && line.contains(&cert.sha256),
        "names the expected and the presented fingerprint: {line}"
    );
    up.wait_for_handshakes(1, WAIT).await;
    assert_nothing_sent(&up);
    assert!(
        up.seen().iter().all(|s| !s.tls),
        "nothing may be said over the mismatched session: {:?}",
        up.seen()
    );
    assert_still_queued(&d, &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_keep_mail_queued_rather_than_bounce() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    // No username: the upstream answers MAIL with 530, a settings problem.
    let d = f.start(&config(&up, "starttls", &ca_line(&f)));
    let id = send(&d, 1).await;
    let line = status_line(&d, &id, "deferred", 1).await;
    assert!(line.contains("530 5.7.0"), "{line}");
    // A deferral, so a 4xx status even for the upstream's 5xx reply.
    assert!(line.contains("dsn=4.7.0,"), "{line}");
    assert_eq!(d.count_log("status=bounced"), 0, "{}", d.log());
    assert!(up.auths().is_empty());
    assert_secrets_only_over_tls(&up);
    assert_still_queued(&d, &id);
}
