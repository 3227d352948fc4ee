//! The three token requests as Microsoft and Google document them, and
//! what their answers mean.
//!
//! - client credentials (RFC 6749 4.4): `client_id`, `client_secret`,
//!   `scope`, `grant_type=client_credentials`;
//! - refresh token (RFC 6749 6): `client_id`, `client_secret` (optional for
//!   a Microsoft public client), `refresh_token`, `scope` (Microsoft),
//!   `grant_type=refresh_token`. A new refresh token in the answer
//!   (Microsoft rotates them) replaces the file atomically;
//! - service account (RFC 7523, Google): `grant_type=urn:ietf:params:oauth:
//!   grant-type:jwt-bearer` and `assertion`, a JWT signed RS256 with the
//!   key file's private key, claims `iss` (the service account), `sub` (the
//!   mailbox), `scope`, `aud` (the token endpoint), `iat`, `exp` (one hour).
//!
//! Secrets are read at each request, so an operator can rotate them (or
//! write a new refresh token after a revocation) without a restart.
//!
//! # Security
//! Every secret-bearing string sent is remembered for the request and
//! scrubbed from the provider's error text before it is shown.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Deserialize;

use super::settings::{GrantKind, SecretRef, Settings};
use super::{Issued, TokenError, advice, endpoint};

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google's maximum for a service account assertion.
const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Used when the answer has no `expires_in` (it is only RECOMMENDED).
const DEFAULT_LIFETIME_SECS: u64 = 3600;
/// The longest a token is kept, whatever the answer claims (providers'
/// last an hour or so): a token claimed to last for ages is asked for
/// again daily rather than kept until the upstream refuses it.
const MAX_LIFETIME_SECS: u64 = 86_400;
/// Longest provider error description shown.
const MAX_DESCRIPTION: usize = 600;

/// What a request needs to remember between requests: the refresh token.
pub(crate) struct Grant {
    /// The file's content when last read or written, and the refresh token
    /// to use (they differ only when saving a rotated one failed).
    refresh: Option<(String, String)>,
    /// Where the last request went (a service account's key file may name
    /// its own endpoint).
    pub(crate) url: Option<String>,
}

/// The fields of a Google service account key file that are used.
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct Success {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct Failure {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl Grant {
    pub(crate) fn new(_settings: &Settings) -> Grant {
        Grant {
            refresh: None,
            url: None,
        }
    }

    /// Asks the endpoint for a token.
    pub(crate) async fn request(
        &mut self,
        s: &Settings,
        label: &str,
    ) -> Result<Issued, TokenError> {
        let mut secrets: Vec<String> = Vec::new();
        let (url, form) =
            match s.grant {
                GrantKind::ClientCredentials => {
                    let secret = read_client_secret(s).await?;
                    let form = encode(&[
                        ("client_id", s.client_id.as_deref().unwrap_or_default()),
                        ("client_secret", secret.as_deref().unwrap_or_default()),
                        ("scope", s.scope()),
                        ("grant_type", "client_credentials"),
                    ]);
                    secrets.extend(secret);
                    (s.token_url(), form)
                }
                GrantKind::RefreshToken => {
                    let secret = read_client_secret(s).await?;
                    let refresh = self.refresh_token(s).await?;
                    let mut fields = vec![
                        ("client_id", s.client_id.as_deref().unwrap_or_default()),
                        ("refresh_token", refresh.as_str()),
                        ("grant_type", "refresh_token"),
                    ];
                    if let Some(secret) = &secret {
                        fields.push(("client_secret", secret));
                    }
                    if let Some(scope) = s.scope_for_refresh() {
                        fields.push(("scope", scope));
                    }
                    let form = encode(&fields);
                    secrets.extend(secret);
                    secrets.push(refresh);
                    (s.token_url(), form)
                }
                GrantKind::ServiceAccount => {
                    let key = read_service_account(s).await?;
                    let url = if s.token_url_configured() {
                        s.token_url()
                    } else {
                        key.token_uri.clone().unwrap_or_else(|| s.token_url())
                    };
                    let assertion = assertion(&key, &s.mailbox, s.scope(), &url, unix_now())
                        .map_err(|what| TokenError::Local {
                            fix: advice::service_account_key(s),
                            what,
                        })?;
                    let form = encode(&[("grant_type", JWT_BEARER), ("assertion", &assertion)]);
                    secrets.push(assertion);
                    secrets.push(key.private_key);
                    (url, form)
                }
            };
        self.url = Some(url.clone());
        let answer = endpoint::post_form(&url, form, s.ca_file.as_deref(), s.timeout)
            .await
            .map_err(|e| {
                let (detail, fix) = match e {
                    endpoint::PostError::Connect(d) => (d, advice::unreachable(&url)),
                    endpoint::PostError::Tls(d) => (d, advice::tls_failed(&url)),
                    endpoint::PostError::Answer(d) => {
                        return TokenError::Unusable {
                            url: url.clone(),
                            detail: scrub(&d, &secrets),
                            fix: advice::not_a_token_answer(),
                        };
                    }
                };
                TokenError::Unreachable {
                    fix,
                    url: url.clone(),
                    detail: scrub(&detail, &secrets),
                }
            })?;
        let issued = parse(&answer, &url, s, &secrets)?;
        if let (Some(new), GrantKind::RefreshToken) = (issued.1, s.grant) {
            self.rotate(s, new, label).await;
        }
        Ok(issued.0)
    }

    /// The refresh token to send: the file's, unless the file still holds
    /// what we last saw there and we have a newer one we could not save.
    async fn refresh_token(&mut self, s: &Settings) -> Result<String, TokenError> {
        let path = s.refresh_token_file.clone().unwrap_or_default();
        let text = read_secret_file("oauth2_refresh_token_file", &path, || {
            advice::refresh_token_file(s)
        })
        .await?;
        let from_file = text.trim().to_string();
        if from_file.is_empty() {
            return Err(TokenError::Local {
                what: format!("oauth2_refresh_token_file {} is empty", path.display()),
                fix: advice::refresh_token_file(s),
            });
        }
        let token = match &self.refresh {
            Some((seen, current)) if *seen == from_file => current.clone(),
            _ => from_file.clone(),
        };
        self.refresh = Some((from_file, token.clone()));
        Ok(token)
    }

    /// The provider handed out a new refresh token: keep it, and replace
    /// the file so a restart uses it too.
    async fn rotate(&mut self, s: &Settings, new: String, label: &str) {
        if self.refresh.as_ref().is_some_and(|(_, cur)| *cur == new) {
            return;
        }
        let Some(path) = s.refresh_token_file.clone() else {
            return;
        };
        let content = new.clone();
        let target = path.clone();
        let saved = tokio::task::spawn_blocking(move || replace_file(&target, &content))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        match saved {
            Ok(()) => {
                tracing::info!(
                    target: "relayq::delivery",
                    "{label}: saved the new refresh token the provider issued to {}",
                    path.display()
                );
                self.refresh = Some((new.clone(), new));
            }
            Err(e) => {
                tracing::error!(
                    target: "relayq::delivery",
                    "{label}: cannot save the new refresh token to {}: {e}; it is used from memory until relayq restarts or reloads its config (then the old one in the file is sent, which the provider may have revoked); fix: let the relayq user write the directory of oauth2_refresh_token_file",
                    path.display()
                );
                if let Some((_, current)) = self.refresh.as_mut() {
                    *current = new;
                }
            }
        }
    }
}

/// Writes `content` to `path` without ever leaving it empty or partial:
/// a temporary file in the same directory (mode 0600), fsync, rename over
/// `path`, fsync the directory.
///
/// The new file keeps the old one's owner, group and group read/write
/// bits (never the others' bits): `relayq check` run as root rotates the
/// token too, and a root-owned file in its place would lock the daemon's
/// user out of it.
pub(crate) fn replace_file(path: &Path, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".relayq-refresh-token")
        .tempfile_in(&dir)?;
    // The link itself, not what it points to: a link is replaced, never
    // written through (the daemon's user could point it anywhere, and
    // `relayq check` may run as root), and its owner is the one kept.
    if let Ok(old) = std::fs::symlink_metadata(path) {
        let group_bits = if old.file_type().is_symlink() {
            0
        } else {
            old.mode() & 0o060
        };
        let mode = 0o600 | group_bits;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        let new = tmp.as_file().metadata()?;
        if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
            match std::os::unix::fs::fchown(tmp.as_file(), Some(old.uid()), Some(old.gid())) {
                Ok(()) => {}
                // Not root: the file can only be ours, and we can read it.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(e) => return Err(e),
            }
        }
    }
    tmp.write_all(content.as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// The content of the file `key` names; an error says why not, with
/// `fix` unless the file is there but the user relayq runs as may not
/// read it.
async fn read_secret_file(
    key: &str,
    path: &Path,
    fix: impl FnOnce() -> String,
) -> Result<String, TokenError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| TokenError::Local {
            what: format!("cannot read {key} {}: {e}", path.display()),
            fix: if e.kind() == std::io::ErrorKind::PermissionDenied {
                advice::unreadable(path)
            } else {
                fix()
            },
        })
}

async fn read_client_secret(s: &Settings) -> Result<Option<String>, TokenError> {
    let fix = || advice::client_secret(s);
    let secret = match &s.client_secret {
        None => return Ok(None),
        Some(SecretRef::File(p)) => read_secret_file("oauth2_client_secret_file", p, fix).await?,
        Some(SecretRef::Env(v)) => std::env::var(v).map_err(|_| TokenError::Local {
            what: format!("oauth2_client_secret_env: environment variable {v} is not set"),
            fix: fix(),
        })?,
    };
    let secret = secret.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(TokenError::Local {
            what: "the OAuth2 client secret is empty".into(),
            fix: fix(),
        });
    }
    Ok(Some(secret))
}

async fn read_service_account(s: &Settings) -> Result<ServiceAccountKey, TokenError> {
    let path = s.service_account_file.clone().unwrap_or_default();
    let unusable = |what: String| TokenError::Local {
        what,
        fix: advice::service_account_key(s),
    };
    let text = read_secret_file("oauth2_service_account_file", &path, || {
        advice::service_account_key(s)
    })
    .await?;
    // serde_json's message names the line and column, never the content.
    serde_json::from_str(&text).map_err(|e| {
        unusable(format!(
            "oauth2_service_account_file {} is not a service account JSON key: {e}",
            path.display()
        ))
    })
}

/// The signed JWT (RFC 7523 section 2.1) asking for `scope` as `subject`.
fn assertion(
    key: &ServiceAccountKey,
    subject: &str,
    scope: &str,
    audience: &str,
    now: u64,
) -> Result<String, String> {
    let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(kid) = &key.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let claims = serde_json::json!({
        "iss": key.client_email,
        "sub": subject,
        "scope": scope,
        "aud": audience,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    let signing_input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivatePkcs8KeyDer::from_pem_slice(key.private_key.as_bytes())
        .map_err(|_| "the key file's private_key is not a PKCS#8 PEM key".to_string())?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| format!("the key file's private_key is not a usable RSA key: {e}"))?;
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the JWT failed".to_string())?;
    Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
}

/// Seconds since the epoch by the system clock, not the daemon's
/// injectable one: the provider checks `iat` and `exp` against real time.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn encode(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// The token (and a rotated refresh token) from a 2xx answer; the
/// provider's error otherwise.
fn parse(
    answer: &endpoint::Answer,
    url: &str,
    s: &Settings,
    secrets: &[String],
) -> Result<(Issued, Option<String>), TokenError> {
    if (200..300).contains(&answer.status) {
        let unusable = |detail: String| TokenError::Unusable {
            url: url.to_string(),
            detail,
            fix: advice::not_a_token_answer(),
        };
        let ok: Success = serde_json::from_slice(&answer.body).map_err(|e| {
            unusable(format!(
                "HTTP {}, but not a token answer: {e}",
                answer.status
            ))
        })?;
        if ok.access_token.is_empty() {
            return Err(unusable("the answer's access_token is empty".into()));
        }
        // It goes into "user=..\x01auth=Bearer ..\x01\x01": a control
        // character or a space would change what the upstream reads.
        if !ok.access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(unusable(
                "the answer's access_token is not a bearer token (it holds spaces, control or non-ASCII characters)".into(),
            ));
        }
        let secs = match &ok.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(t)) => t.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(DEFAULT_LIFETIME_SECS)
        .min(MAX_LIFETIME_SECS);
        let refresh = ok.refresh_token.filter(|r| !r.is_empty());
        return Ok((
            Issued {
                access_token: ok.access_token,
                expires_in: Duration::from_secs(secs),
            },
            refresh,
        ));
    }
    let failure: Option<Failure> = serde_json::from_slice(&answer.body).ok();
    match failure {
        Some(f) if answer.status < 500 => {
            let description = scrub(f.error_description.as_deref().unwrap_or(""), secrets);
            Err(TokenError::Refused {
                fix: advice::token_error(s, &f.error, &description),
                url: url.to_string(),
                code: scrub(&f.error, secrets),
                description,
            })
        }
        Some(f) => Err(TokenError::Unreachable {
            url: url.to_string(),
            detail: format!(
                "HTTP {}: {}: {}",
                answer.status,
                scrub(&f.error, secrets),
                scrub(f.error_description.as_deref().unwrap_or(""), secrets)
            ),
            fix: advice::unreachable(url),
        }),
        None if answer.status < 500 => Err(TokenError::Refused {
            url: url.to_string(),
            code: format!("HTTP {}", answer.status),
            description: scrub(&String::from_utf8_lossy(&answer.body), secrets),
            fix: advice::not_a_token_endpoint(s),
        }),
        None => Err(TokenError::Unreachable {
            url: url.to_string(),
            detail: format!("HTTP {}", answer.status),
            fix: advice::unreachable(url),
        }),
    }
}

/// Provider text made safe to show: anything we sent removed, one line,
/// printable, bounded.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        text = text.replace(secret.as_str(), "<redacted>");
        let encoded = encode(&[("x", secret)]);
        if let Some(e) = encoded.strip_prefix("x=") {
            text = text.replace(e, "<redacted>");
        }
    }
    let one_line: String = text
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(MAX_DESCRIPTION) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_url_encoded() {
        assert_eq!(
            encode(&[
                ("scope", "https://outlook.office365.com/.default"),
                ("a", "b c&d")
            ]),
            "scope=https%3A%2F%2Foutlook.office365.com%2F.default&a=b+c%26d"
        );
    }

    #[test]
    fn provider_text_is_scrubbed_of_what_we_sent() {
        let secrets = vec!["s3cr+t/x".to_string()];
        let shown = scrub(
            "bad secret s3cr+t/x or s3cr%2Bt%2Fx\r\nTrace ID: 1",
            &secrets,
        );
        assert_eq!(shown, "bad secret <redacted> or <redacted> Trace ID: 1");
        assert!(scrub(&"x".repeat(5000), &[]).len() < 700);
    }

    #[test]
    fn replace_file_never_leaves_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refresh-token");
        std::fs::write(&path, "old\n").unwrap();
        replace_file(&path, "new-token").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new-token\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        // Written 0644 by umask: others lose their read bit, the group
        // (through which the daemon's user may read it) keeps its own.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "others may not read it: {mode:o}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace_file(&path, "newer-token").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may read it: {mode:o}");
    }
}
