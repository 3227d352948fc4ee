//! What a slip of the operator, a hostile or broken peer, or the machine
//! itself must not do to relayq's OAuth2: lock the daemon out of its own
//! refresh token, put a secret in a log line, or stop the mail.

use std::os::unix::fs::MetadataExt;

use super::*;
use crate::sendmail::can_switch_user;

/// The Microsoft delegated setup with a rotating endpoint, the refresh
/// token in `state/refresh-token`; returns the `oauth2` lines and the file.
fn delegated_rotating(s: &Setup) -> (String, PathBuf) {
    s.endpoint.register_client(CLIENT_ID, "");
    s.endpoint.set_rotate(true);
    let state = s.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let file = state.join("refresh-token");
    std::fs::write(&file, format!("{}\n", s.endpoint.new_refresh_token())).unwrap();
    let lines = format!(
        "oauth2_provider = \"microsoft\"\noauth2_tenant = \"{TENANT}\"\noauth2_client_id = \"{CLIENT_ID}\"\noauth2_refresh_token_file = {}\noauth2_token_url = \"{}\"\n",
        toml_path(&file),
        s.endpoint.microsoft_url(TENANT)
    );
    (lines, file)
}

/// `relayq check` run as root (the admin forgot `sudo -u relayq`) gets a
/// rotated refresh token and replaces the file: the new file must keep the
/// owner, group and group bits of the old, or the daemon's user can no
/// longer read it and the mail stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_file_keeps_its_owner_and_group() {
    if !can_switch_user() {
        return;
    }
    let s = Setup::new().await;
    let (lines, file) = delegated_rotating(&s);
    let d = s.start(&s.config("", &lines));
    // (owner, group, mode) as the daemon's user might have it set up.
    for (uid, gid, mode) in [(65534, 65534, 0o600), (0, 65534, 0o640), (65534, 0, 0o600)] {
        std::os::unix::fs::chown(file.parent().unwrap(), Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let before = std::fs::read_to_string(&file).unwrap();
        let (ok, text) = check(&d);
        assert!(ok, "{text}");
        let after = std::fs::read_to_string(&file).unwrap();
        assert_ne!(before, after, "the endpoint rotated the token");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (uid, gid, mode),
            "owner, group and mode of the replaced file"
        );
    }
    // A link in its place (the daemon's user may plant one, pointing at a
    // file of root's): replaced by a file of the link's owner, not written
    // through, the file it pointed to untouched.
    let roots = s.path().join("roots-file");
    std::fs::copy(&file, &roots).unwrap();
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = std::fs::read_to_string(&roots).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&roots, &file).unwrap();
    std::os::unix::fs::lchown(&file, Some(65534), Some(65534)).unwrap();
    let (ok, text) = check(&d);
    assert!(ok, "{text}");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.is_file(), "the link was replaced by a file");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (65534, 65534, 0o600)
    );
    assert_eq!(std::fs::read_to_string(&roots).unwrap(), before);

    // The daemon (which read the file as it was) still gets its tokens.
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    assert_all_logins_ok(&s.up);
}

/// No `secret`, nor any base64 text that decodes to something holding
/// one, in `text` (an AUTH challenge is base64).
fn assert_no_secret_even_decoded(what: &str, text: &str, secrets: &[String]) {
    use base64::Engine;
    assert_no_secret(what, text, secrets);
    for word in text.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(word.trim()) else {
            continue;
        };
        let decoded = String::from_utf8_lossy(&bytes);
        for s in secrets {
            assert!(
                !decoded.contains(s.as_str()),
                "{what} shows the secret {s:?} in base64 {word}:\n{text}"
            );
        }
    }
}

/// An upstream that repeats the credentials it refused (in XOAUTH2's JSON
/// challenge, in the final reply) must not get them into the log at any
/// level, `relayq check`, or the deferral: the token, as the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_an_upstream_repeats_are_not_logged() {
    let s = Setup::new().await;
    let nothing_valid = crate::support::upstream::TokenCheck::default();
    // Google's way (a JSON challenge) and Microsoft's (a plain 535).
    for script in [
        Script::default()
            .require_xoauth2(MAILBOX, nothing_valid.clone())
            .echo_auth(),
        Script::default()
            .require_xoauth2(MAILBOX, nothing_valid)
            .auth_failure(535, "5.7.3 Authentication unsuccessful")
            .echo_auth(),
    ] {
        s.up.set_script(script);
        let dir = tempfile::tempdir().unwrap();
        let config = s.config("", &s.microsoft_app_only());
        let d = Daemon::start_in_with_env(dir.path(), &config, &[("RELAYQ_LOG", "trace")]);
        let id = send(&d, 0).await;
        let deferred = status_line(&d, &id, "deferred", 1).await;
        assert!(
            deferred.contains("<redacted>"),
            "the upstream repeated it: {deferred}"
        );
        let (ok, text) = check(&d);
        assert!(!ok, "{text}");
        let secrets = s.endpoint.secrets();
        assert_no_secret_even_decoded("relayq check", &text, &secrets);
        assert_no_secret_even_decoded("the TRACE log", &d.log(), &secrets);
    }

    // A password, the same.
    let password = "pw-relayq-Zq81-repeated".to_string();
    s.up.set_script(
        Script::default()
            .require_auth(MAILBOX, "the-right-one")
            .echo_auth(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "hostname = \"relayq.test\"\n[relay]\nhost = \"127.0.0.1\"\nport = {}\nca_file = {}\nusername = \"{MAILBOX}\"\npassword = \"{password}\"\n",
        s.up.port(),
        toml_path(&s.ca.ca_file)
    );
    let d = Daemon::start_in_with_env(dir.path(), &config, &[("RELAYQ_LOG", "trace")]);
    let id = send(&d, 1).await;
    status_line(&d, &id, "deferred", 1).await;
    let (ok, text) = check(&d);
    assert!(!ok, "{text}");
    let secrets = [password];
    assert_no_secret_even_decoded("relayq check", &text, &secrets);
    assert_no_secret_even_decoded("the TRACE log", &d.log(), &secrets);
}

/// libfaketime, which moves the wall clock of the process it is preloaded
/// into (and, with FAKETIME_DONT_FAKE_MONOTONIC, leaves its monotonic
/// clock alone).
fn libfaketime() -> &'static str {
    const PATHS: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    PATHS
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime is not installed: apt-get install faketime (.ci/run does)")
}

/// The machine's clock steps back a day (an NTP correction, `date -s`)
/// after relayq got a token: the token's life and the "issued moments
/// ago" rule are measured on a clock that does not jump, so an hour later
/// the expired token is renewed and the mail goes, instead of the token
/// being taken as fresh for a day and a day and every refusal of it as
/// one "moments after it was issued".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_stepping_back_does_not_keep_an_expired_token() {
    let faketime = libfaketime();
    let s = Setup::new().await;
    let offset = s.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let offset_env = offset.display().to_string();
    let d = Daemon::start_in_with_env(
        s.path(),
        &s.config("", &s.microsoft_app_only()),
        &[
            ("LD_PRELOAD", faketime),
            ("FAKETIME_TIMESTAMP_FILE", &offset_env),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    assert_eq!(s.endpoint.issued(), 1);

    std::fs::write(&offset, "-1d\n").unwrap();
    // An hour passes; the provider expires its token.
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let id = send(&d, 1).await;
    s.up.wait_for_messages(2, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_eq!(s.endpoint.issued(), 2, "{:?}", s.endpoint.seen());
}

/// A secret written where it does not belong (a misspelt or made-up key,
/// a variable name or a path) must not be echoed: `check-config` names
/// the key and the fix, and shows no value that could be the secret.
#[test]
fn a_secret_in_the_wrong_key_is_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Zx8Q~relayq.misplaced-s3cret_V41ue";
    let base =
        "[relay]\nhost = \"smtp.office365.com\"\nport = 587\nusername = \"app@contoso.example\"\n";
    let ms = "oauth2_provider = \"microsoft\"\noauth2_tenant = \"t\"\noauth2_client_id = \"x\"\n";
    let cases = [
        // The key the README's table suggests, without _file or _env.
        (
            format!("{ms}oauth2_client_secret = \"{secret}\"\n"),
            "oauth2_client_secret",
        ),
        (format!("pasword = \"{secret}\"\n"), "pasword"),
        (format!("password = \"{secret}\n"), "line 5"),
        (format!("password = 1{}\n", "7".repeat(12)), "password"),
        (
            format!("{ms}oauth2_client_secret_env = \"{secret}\"\n"),
            "relay.oauth2_client_secret_env",
        ),
        (
            format!("password_env = \"{secret}\"\n"),
            "relay.password_env",
        ),
        (
            format!("{ms}oauth2_client_secret_file = \"{secret}\"\n"),
            "relay.oauth2_client_secret_file",
        ),
        (
            format!("{ms}oauth2_refresh_token_file = \"{secret}\"\n"),
            "relay.oauth2_refresh_token_file",
        ),
        (
            "oauth2_provider = \"google\"\noauth2_service_account_file = \"sa.json\"\n".to_string(),
            "relay.oauth2_service_account_file",
        ),
        (
            format!(
                "{ms}oauth2_client_secret_env = \"S\"\noauth2_token_url = \"https://x:{secret}@login.example/t\"\n"
            ),
            "relay.oauth2_token_url",
        ),
    ];
    for (lines, key) in cases {
        let (ok, text) = check_config(dir.path(), &format!("{base}{lines}"));
        assert!(!ok, "{lines} was accepted");
        assert!(text.contains(key), "{lines}: the key is not named: {text}");
        assert!(
            !text.contains(secret),
            "{lines}: the secret is shown: {text}"
        );
        assert!(
            !text.contains("7777777"),
            "{lines}: the number is shown: {text}"
        );
    }
    // What is not a secret is still shown: a wrong port says what it got.
    let (ok, text) = check_config(
        dir.path(),
        &format!("{base}{ms}oauth2_client_secret_env = \"S\"\nport = \"abc\"\n"),
    );
    assert!(!ok && text.contains("abc"), "{text}");
}

/// The FAIL line of `relayq check`'s token step.
fn token_step(d: &Daemon) -> String {
    let (ok, text) = check(d);
    assert!(!ok, "{text}");
    text.lines()
        .find(|l| l.starts_with("FAIL oauth2 token"))
        .unwrap_or_else(|| panic!("no failed token step:\n{text}"))
        .to_string()
}

/// A broken or hostile token endpoint: whatever it answers, no token that
/// could smuggle anything into the XOAUTH2 string reaches the upstream,
/// the mail stays queued, and the fix fits the fault: an answer that is
/// not a token answer is not a firewall problem, a certificate that is
/// not trusted points at `oauth2_ca_file`, and a port other than 443 is
/// not called 443.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_broken_token_endpoint_answers_gets_a_fix_that_fits() {
    let s = Setup::new().await;
    let d = s.start(&s.config("", &s.microsoft_app_only()));
    let not_a_token = "the answer is not a token answer: if oauth2_token_url is set, correct it";
    let cases = [
        // A token that would add fields to "user=..\x01auth=Bearer ..\x01\x01".
        (
            r#"{"access_token":"x\u0001user=boss@contoso.example\u0001","expires_in":3600}"#,
            "not a bearer token",
        ),
        (
            r#"{"access_token":"ok\r\nQUIT","token_type":"Bearer"}"#,
            "not a bearer token",
        ),
        (
            r#"{"access_token":"a b","expires_in":3600}"#,
            "not a bearer token",
        ),
        (
            "<html><body>Sign in to continue</body></html>",
            "not a token answer",
        ),
        (r#"{"token_type":"Bearer"}"#, "not a token answer"),
    ];
    for (n, (body, said)) in cases.into_iter().enumerate() {
        s.endpoint.set_fault(Fault::Answer(200, body));
        let line = token_step(&d);
        assert!(line.contains(said), "{body}: {line}");
        assert!(line.contains(not_a_token), "{body}: {line}");
        assert!(!line.contains("firewall"), "{body}: {line}");
        let id = send(&d, n).await;
        status_line(&d, &id, "deferred", 1).await;
        assert!(s.up.auths().is_empty(), "{:#?}", s.up.auths());
        d.flush();
    }

    // Another certificate than the CA in oauth2_ca_file vouches for (a
    // proxy intercepting HTTPS), and a port that is not 443.
    let other = TestCa::new(&s.path().join("other-pki")).server_cert(CertKind::Good);
    let intercepted = TokenEndpoint::start(&other).await;
    let dir = tempfile::tempdir().unwrap();
    let config = s.config("", &s.microsoft_app_only()).replace(
        &s.endpoint.microsoft_url(TENANT),
        &intercepted.microsoft_url(TENANT),
    );
    let d = Daemon::start_in(dir.path(), &config);
    let line = token_step(&d);
    assert!(
        line.contains("certificate") && line.contains("put its CA certificate in oauth2_ca_file"),
        "{line}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = s.config("", &s.microsoft_app_only()).replace(
        &s.endpoint.microsoft_url(TENANT),
        "https://127.0.0.1:1/t/oauth2/v2.0/token",
    );
    let d = Daemon::start_in(dir.path(), &config);
    let line = token_step(&d);
    assert!(
        line.contains("must reach 127.0.0.1:1 over HTTPS") && !line.contains("443"),
        "{line}"
    );
}

/// A Google service account's key file names its own token endpoint
/// (`token_uri`), and that is where the request goes: `relayq check` and
/// the log must name that one, not Google's default, or an operator opens
/// the firewall for the wrong host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_named_is_the_one_asked() {
    let s = Setup::new().await;
    let (key_file, _) = super::google::service_account_file(&s);
    let lines = format!(
        "oauth2_provider = \"google\"\noauth2_service_account_file = {}\n",
        toml_path(&key_file)
    );
    let d = s.start(&s.config("", &lines));
    let (ok, text) = check(&d);
    assert!(ok, "{text}");
    let from = format!("grant from {})", s.endpoint.google_url());
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok   oauth2 token") && l.contains(&from)),
        "{text}"
    );
    send(&d, 0).await;
    s.up.wait_for_messages(1, WAIT).await;
    let line = &wait_lines(&d, &["new OAuth2 token from"], 1).await[0];
    assert!(line.contains(&s.endpoint.google_url()), "{line}");

    // Down: the fix names it too.
    s.endpoint.set_fault(Fault::Unavailable);
    s.endpoint.expire_all();
    d.advance_clock(3600);
    let line = token_step(&d);
    let host = s
        .endpoint
        .google_url()
        .replace("https://", "")
        .replace("/token", "");
    assert!(
        line.contains(&format!("must reach {host} over HTTPS")),
        "{line}"
    );
    assert!(!line.contains("googleapis"), "{line}");
}

/// A secret file the daemon's user cannot read (created by root, left
/// mode 600) says so and how to fix it, not "sign in again" or "download
/// a new key": each of the three files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_secret_file_says_whose_it_must_be() {
    if !can_switch_user() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new().await;
    let refresh = s.secret_file("refresh-token", &s.endpoint.new_refresh_token());
    let (key_file, _) = super::google::service_account_file(&s);
    let cases = [
        (s.microsoft_app_only(), "oauth2_client_secret_file"),
        (
            format!(
                "oauth2_provider = \"microsoft\"\noauth2_tenant = \"{TENANT}\"\noauth2_client_id = \"{CLIENT_ID}\"\noauth2_refresh_token_file = {}\noauth2_token_url = \"{}\"\n",
                toml_path(&refresh),
                s.endpoint.microsoft_url(TENANT)
            ),
            "oauth2_refresh_token_file",
        ),
        (
            format!(
                "oauth2_provider = \"google\"\noauth2_service_account_file = {}\n",
                toml_path(&key_file)
            ),
            "oauth2_service_account_file",
        ),
    ];
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (n, (lines, key)) in cases.into_iter().enumerate() {
        let config = s.path().join(format!("relayq-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "spool_dir = \"{}/spool-{n}\"\n{}",
                s.path().display(),
                s.config("", &lines)
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = crate::sendmail::as_nobody(crate::support::daemon::BIN)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("FAIL oauth2 token"))
            .unwrap_or_else(|| panic!("{key}: no failed token step:\n{text}"));
        assert!(
            line.contains(&format!("cannot read {key}"))
                && line.contains("Permission denied")
                && line.contains("-> fix: the user relayq runs as cannot read it")
                && line.contains("chown"),
            "{line}"
        );
    }
}

/// `expires_in` from a broken endpoint: far too large (once wrapping to
/// under a second, so every connection asked again) is kept for a day at
/// most; a number in a string is read; nonsense means the usual hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_token_lifetime_is_bounded() {
    let s = Setup::new().await;
    let d = s.start(&s.config("", &s.microsoft_app_only()));
    for (body, said) in [
        (
            r#"{"access_token":"t1","expires_in":18446744073709552}"#,
            "expires in 1440m00s",
        ),
        (
            r#"{"access_token":"t2","expires_in":1e300}"#,
            "expires in 60m00s",
        ),
        (
            r#"{"access_token":"t3","expires_in":"599"}"#,
            "expires in 9m59s",
        ),
        (
            r#"{"access_token":"t4","expires_in":-5}"#,
            "expires in 60m00s",
        ),
    ] {
        s.endpoint.set_fault(Fault::Answer(200, body));
        // The upstream refuses these tokens: only the token step counts.
        let (_, text) = check(&d);
        let line = text
            .lines()
            .find(|l| l.contains("oauth2 token"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.starts_with("ok") && line.contains(said),
            "{body}: {line}"
        );
    }
}
