//! SMTP AUTH (RFC 4954): choosing a mechanism and running its exchange.
//!
//! Mechanisms: PLAIN (with an initial response), LOGIN (two 334 prompts),
//! CRAM-MD5 (RFC 2195) and XOAUTH2 (Google/Microsoft bearer tokens). When the
//! caller doesn't force one: XOAUTH2 for a token, else PLAIN > LOGIN > CRAM-MD5
//! among those offered. PLAIN is preferred because over TLS it is as safe as
//! the others and costs one round trip; CRAM-MD5 is last because it needs the
//! server to keep the password in clear.
//!
//! # Security
//! The secret is written only base64-encoded inside AUTH exchanges, logged as
//! `<redacted>`, and scrubbed (with every encoded form we sent) from any
//! upstream text that ends up in an error or a log line, in case a server
//! echoes it; a 334 challenge that repeats it (in base64) is not logged.
//! The caller ensures the stream is TLS before calling in here.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use md5::Md5;

use super::{AuthMechanism, Credentials, Reply, Secret, SmtpError, Stage, Wire};
use crate::transport::oauth2::AccessToken;

/// Preference when the caller does not force a mechanism.
const PASSWORD_MECHANISMS: [AuthMechanism; 3] = [
    AuthMechanism::Plain,
    AuthMechanism::Login,
    AuthMechanism::CramMd5,
];

/// Logs in; returns the mechanism used. With relayq's own OAuth2 tokens
/// (`token` is the one got for this login), a refusal that may mean the
/// token expired or was revoked early (535) gets one more try with a new
/// token from the source, on the same connection (RFC 4954 allows AUTH
/// again after a failure).
pub(super) async fn login(
    wire: &mut Wire,
    creds: &Credentials,
    token: Option<AccessToken>,
    offered: &[String],
    limit: Duration,
) -> Result<AuthMechanism, SmtpError> {
    let (Secret::OAuth2(source), Some(token)) = (&creds.secret, token) else {
        return authenticate(wire, creds, offered, limit).await;
    };
    let with = |t: &AccessToken| Credentials {
        secret: Secret::OAuth2Token(t.expose().to_string()),
        ..creds.clone()
    };
    match authenticate(wire, &with(&token), offered, limit).await {
        Err(SmtpError::AuthRejected { reply }) if may_be_the_token(&reply) => {
            match source.after_rejection(&token).await {
                Ok(Some(fresh)) => {
                    tracing::debug!(
                        "AUTH refused ({}); once more with a new token",
                        reply.one_line()
                    );
                    authenticate(wire, &with(&fresh), offered, limit).await
                }
                Ok(None) => Err(SmtpError::AuthRejected { reply }),
                Err(e) => Err(SmtpError::OAuth2(e)),
            }
        }
        other => other,
    }
}

/// 535 is what Google and Microsoft answer for an expired or revoked
/// token, but Microsoft's 5.7.139 (SMTP AUTH disabled) is not about it.
fn may_be_the_token(reply: &Reply) -> bool {
    reply.code == 535 && reply.enhanced != Some((5, 7, 139))
}

/// Logs in with the secret as given; returns the mechanism used.
async fn authenticate(
    wire: &mut Wire,
    creds: &Credentials,
    offered: &[String],
    limit: Duration,
) -> Result<AuthMechanism, SmtpError> {
    let mechanism = choose(creds, offered)?;
    let mut exchange = Exchange {
        wire,
        limit,
        sent: vec![creds.secret.expose().to_string()],
    };
    let result = match mechanism {
        AuthMechanism::Plain => exchange.plain(creds).await,
        AuthMechanism::Login => exchange.login(creds).await,
        AuthMechanism::CramMd5 => exchange.cram_md5(creds).await,
        AuthMechanism::XOAuth2 => exchange.xoauth2(creds).await,
    };
    match result {
        Ok(()) => {
            tracing::debug!(mechanism = mechanism.name(), "authenticated");
            Ok(mechanism)
        }
        Err(e) => Err(scrub_error(e, &exchange.sent)),
    }
}

pub(super) fn choose(creds: &Credentials, offered: &[String]) -> Result<AuthMechanism, SmtpError> {
    if offered.is_empty() {
        return Err(SmtpError::AuthNotOffered);
    }
    let is_offered = |m: AuthMechanism| offered.iter().any(|o| o == m.name());
    let is_token = matches!(creds.secret, Secret::OAuth2Token(_) | Secret::OAuth2(_));
    let chosen = match creds.mechanism {
        Some(forced) => {
            if is_token != (forced == AuthMechanism::XOAuth2) {
                return Err(SmtpError::AuthMechanismMismatch {
                    mechanism: forced.name(),
                    secret_kind: if is_token {
                        "an OAuth2 token"
                    } else {
                        "a password"
                    },
                });
            }
            Some(forced).filter(|&m| is_offered(m))
        }
        None if is_token => Some(AuthMechanism::XOAuth2).filter(|&m| is_offered(m)),
        None => PASSWORD_MECHANISMS.into_iter().find(|&m| is_offered(m)),
    };
    chosen.ok_or_else(|| SmtpError::NoCommonAuthMechanism {
        offered: offered.to_vec(),
    })
}

/// One AUTH conversation. `sent` remembers every secret-bearing string, so
/// errors can be scrubbed of them.
struct Exchange<'w> {
    wire: &'w mut Wire,
    limit: Duration,
    sent: Vec<String>,
}

impl Exchange<'_> {
    async fn plain(&mut self, creds: &Credentials) -> Result<(), SmtpError> {
        let blob =
            self.encode(format!("\0{}\0{}", creds.username, creds.secret.expose()).as_bytes());
        let reply = self
            .send(&format!("AUTH PLAIN {blob}\r\n"), "AUTH PLAIN <redacted>")
            .await?;
        expect_success(reply)
    }

    async fn login(&mut self, creds: &Credentials) -> Result<(), SmtpError> {
        let reply = self.send("AUTH LOGIN\r\n", "AUTH LOGIN").await?;
        expect_challenge(reply)?;
        let user = BASE64.encode(creds.username.as_bytes());
        let reply = self
            .send(&format!("{user}\r\n"), &format!("{user} (username)"))
            .await?;
        expect_challenge(reply)?;
        let password = self.encode(creds.secret.expose().as_bytes());
        let reply = self.send(&format!("{password}\r\n"), "<redacted>").await?;
        expect_success(reply)
    }

    async fn cram_md5(&mut self, creds: &Credentials) -> Result<(), SmtpError> {
        let reply = self.send("AUTH CRAM-MD5\r\n", "AUTH CRAM-MD5").await?;
        let challenge = expect_challenge(reply)?;
        let digest = cram_md5_digest(creds.secret.expose().as_bytes(), &challenge);
        let response = self.encode(format!("{} {digest}", creds.username).as_bytes());
        let reply = self.send(&format!("{response}\r\n"), "<redacted>").await?;
        expect_success(reply)
    }

    /// On failure the server sends a 334 with a base64 JSON error; the client
    /// must answer with an empty line to get the final reply.
    async fn xoauth2(&mut self, creds: &Credentials) -> Result<(), SmtpError> {
        let raw = format!(
            "user={}\x01auth=Bearer {}\x01\x01",
            creds.username,
            creds.secret.expose()
        );
        let blob = self.encode(raw.as_bytes());
        let reply = self
            .send(
                &format!("AUTH XOAUTH2 {blob}\r\n"),
                "AUTH XOAUTH2 <redacted>",
            )
            .await?;
        if reply.code != 334 {
            return expect_success(reply);
        }
        tracing::debug!(
            "XOAUTH2 error: {}",
            scrub_text(decode_challenge_text(&reply), &self.sent)
        );
        let reply = self
            .send("\r\n", "(empty line after XOAUTH2 error)")
            .await?;
        expect_success(reply)
    }

    fn encode(&mut self, secret_bearing: &[u8]) -> String {
        let encoded = BASE64.encode(secret_bearing);
        self.sent.push(encoded.clone());
        encoded
    }

    async fn send(&mut self, line: &str, shown: &str) -> Result<Reply, SmtpError> {
        self.wire
            .write(line.as_bytes(), shown, Stage::Auth, self.limit)
            .await?;
        let reply = self
            .wire
            .read_reply_unlogged(Stage::Auth, self.limit)
            .await?;
        tracing::trace!("< {}", self.shown(&reply));
        if reply.code == 421 {
            return Err(SmtpError::Rejected {
                stage: Stage::Auth,
                reply,
            });
        }
        Ok(reply)
    }
}

impl Exchange<'_> {
    /// A reply as the log may show it: without what we sent, and a 334
    /// challenge that repeats it (in base64, where no text search finds
    /// it) not at all.
    fn shown(&self, reply: &Reply) -> String {
        if reply.code == 334 {
            let decoded = decode_challenge_text(reply);
            if scrub_text(decoded.clone(), &self.sent) != decoded {
                return "334 <a challenge repeating our credentials>".into();
            }
        }
        scrub_text(reply.one_line(), &self.sent)
    }
}

/// A 334 challenge, decoded. Anything else ends the exchange.
fn expect_challenge(reply: Reply) -> Result<Vec<u8>, SmtpError> {
    if reply.code != 334 {
        return Err(unexpected(reply));
    }
    let text = reply.text.split('\n').next().unwrap_or_default().trim();
    BASE64.decode(text).map_err(|_| SmtpError::Protocol {
        stage: Stage::Auth,
        detail: format!("AUTH challenge is not base64: {}", reply.one_line()),
    })
}

fn expect_success(reply: Reply) -> Result<(), SmtpError> {
    if reply.is_positive() {
        Ok(())
    } else {
        Err(unexpected(reply))
    }
}

fn unexpected(reply: Reply) -> SmtpError {
    if reply.is_transient() || reply.is_permanent() {
        SmtpError::AuthRejected { reply }
    } else {
        SmtpError::Protocol {
            stage: Stage::Auth,
            detail: format!("unexpected reply during AUTH: {}", reply.one_line()),
        }
    }
}

fn decode_challenge_text(reply: &Reply) -> String {
    BASE64
        .decode(reply.text.trim())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|_| reply.text.clone())
}

fn cram_md5_digest(secret: &[u8], challenge: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let Ok(mut mac) = Hmac::<Md5>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(challenge);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes anything we sent from upstream text quoted in an error.
/// `text` with every secret-bearing string we sent replaced.
fn scrub_text(mut text: String, sent: &[String]) -> String {
    for secret in sent.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret.as_str(), "<redacted>");
    }
    text
}

fn scrub_error(err: SmtpError, sent: &[String]) -> SmtpError {
    let scrub_text = |text: String| scrub_text(text, sent);
    let scrub_reply = |reply: Reply| Reply::new(reply.code, scrub_text(reply.text));
    match err {
        SmtpError::AuthRejected { reply } => SmtpError::AuthRejected {
            reply: scrub_reply(reply),
        },
        SmtpError::Rejected { stage, reply } => SmtpError::Rejected {
            stage,
            reply: scrub_reply(reply),
        },
        SmtpError::Protocol { stage, detail } => SmtpError::Protocol {
            stage,
            detail: scrub_text(detail),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(secret: Secret, mechanism: Option<AuthMechanism>) -> Credentials {
        Credentials {
            username: "u".into(),
            secret,
            mechanism,
        }
    }

    fn offered(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cram_md5_matches_rfc_2195() {
        let digest = cram_md5_digest(
            b"tanstaaftanstaaf",
            b"<1896.697170952@postoffice.reston.mci.net>",
        );
        assert_eq!(digest, "b913a602c7eda7a495b4e6e7334d3890");
    }

    #[test]
    fn password_prefers_plain_then_login_then_cram() {
        let pw = creds(Secret::Password("p".into()), None);
        let pick = |o: &[&str]| choose(&pw, &offered(o)).ok();
        assert_eq!(
            pick(&["CRAM-MD5", "LOGIN", "PLAIN"]),
            Some(AuthMechanism::Plain)
        );
        assert_eq!(pick(&["CRAM-MD5", "LOGIN"]), Some(AuthMechanism::Login));
        assert_eq!(pick(&["CRAM-MD5"]), Some(AuthMechanism::CramMd5));
        assert!(matches!(
            choose(&pw, &offered(&["XOAUTH2"])),
            Err(SmtpError::NoCommonAuthMechanism { .. })
        ));
        assert!(matches!(choose(&pw, &[]), Err(SmtpError::AuthNotOffered)));
    }

    #[test]
    fn token_uses_xoauth2_and_forced_mechanisms_are_checked() {
        let token = creds(Secret::OAuth2Token("t".into()), None);
        assert_eq!(
            choose(&token, &offered(&["PLAIN", "XOAUTH2"])).ok(),
            Some(AuthMechanism::XOAuth2)
        );
        assert!(choose(&token, &offered(&["PLAIN"])).is_err());
        let forced = creds(Secret::Password("p".into()), Some(AuthMechanism::Login));
        assert_eq!(
            choose(&forced, &offered(&["PLAIN", "LOGIN"])).ok(),
            Some(AuthMechanism::Login)
        );
        assert!(choose(&forced, &offered(&["PLAIN"])).is_err());
        let mismatched = creds(Secret::Password("p".into()), Some(AuthMechanism::XOAuth2));
        assert!(matches!(
            choose(&mismatched, &offered(&["XOAUTH2"])),
            Err(SmtpError::AuthMechanismMismatch { .. })
        ));
    }

    #[test]
    fn scrubbing_removes_echoed_secrets() {
        let err = SmtpError::AuthRejected {
            reply: Reply::new(535, "5.7.8 bad password hunter2 (aHVudGVyMg==)"),
        };
        let sent = vec!["hunter2".to_string(), "aHVudGVyMg==".to_string()];
        let shown = format!("{}", scrub_error(err, &sent));
        assert_eq!(
            shown,
            "authentication rejected: 535 5.7.8 bad password <redacted> (<redacted>)"
        );
    }
}
