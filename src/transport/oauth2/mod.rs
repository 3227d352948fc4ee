//! OAuth2 access tokens for XOAUTH2, got by relayq itself: Microsoft 365
//! (client credentials, or a delegated refresh token) and Google Workspace
//! (a delegated refresh token, or a service account with domain-wide
//! delegation signing an RFC 7523 JWT).
//!
//! One [`TokenSource`] per relay, shared by all of its connections. It keeps
//! the token in memory and gets a new one when a connection asks within
//! [`margin`] of expiry, so a login never uses a token about to run out. One
//! request at a time (single flight): connections that ask while a request
//! is under way wait for its answer instead of sending their own. A failed
//! request is not repeated before a backoff has passed (connections asking
//! meanwhile get the same error at once), and it is logged once, with the
//! provider's error and what to change. Times come from the daemon's
//! [`Clock`], so tests walk through token lifetimes in milliseconds; its
//! monotonic reading, so a step of the wall clock neither keeps an expired
//! token nor stretches a backoff.
//!
//! Submodules: `settings` (the `oauth2_*` keys and their checks), `grant`
//! (the three token requests and the provider's answer), `endpoint` (the
//! HTTPS POST), `advice` (what an operator should change for a provider's
//! error, also for an upstream's reply to AUTH).
//!
//! # Security
//! The client secret, the refresh token, the service account's private key
//! and the access token are never logged, printed or put in an error: they
//! are held in types whose `Debug` says `<redacted>`, and the provider's
//! error text is scrubbed of anything we sent before it is shown. The token
//! endpoint is reached over TLS only (ring provider, certificate verified
//! against the system roots or `oauth2_ca_file`). A new refresh token
//! replaces the file atomically (temporary file, fsync, rename, fsync the
//! directory), so a crash never leaves it empty or half written; the new
//! file keeps the old one's owner and group (`relayq check` may run as
//! root), and a symlink in its place is replaced, never written through.
//! A token answer with anything but visible ASCII in its token is refused:
//! the token goes into the XOAUTH2 string, whose fields \x01 separates.

pub mod advice;
mod endpoint;
mod grant;
mod settings;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::Clock;
use crate::config::RelayConfig;

pub use settings::{GrantKind, Provider, Settings, check_config};

/// A token younger than this that the upstream refuses is not refreshed
/// again: the provider just issued it, so asking again would only repeat
/// the refusal (and a fleet of connections would hammer the endpoint).
const MIN_FORCED_REFRESH_MS: u64 = 30_000;
/// The first wait after a failed token request; it doubles up to
/// [`BACKOFF_MAX_MS`].
const BACKOFF_MIN_MS: u64 = 5_000;
const BACKOFF_MAX_MS: u64 = 60_000;

/// How long before expiry a token is replaced: a fifth of its lifetime,
/// at most five minutes (a one-hour token is renewed at 55 minutes).
pub fn margin(lifetime_ms: u64) -> u64 {
    (lifetime_ms / 5).min(300_000)
}

/// An access token. Never printed.
#[derive(Clone)]
pub struct AccessToken {
    secret: Arc<str>,
    /// When it was issued and when it expires ([`Clock::monotonic_ms`]).
    pub obtained_ms: u64,
    pub expires_ms: u64,
}

impl AccessToken {
    pub fn expose(&self) -> &str {
        &self.secret
    }

    fn same(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.secret, &other.secret) || self.secret == other.secret
    }

    /// Still worth using at `now`: not within the renewal margin.
    fn fresh(&self, now: u64) -> bool {
        let lifetime = self.expires_ms.saturating_sub(self.obtained_ms);
        now.saturating_add(margin(lifetime)) < self.expires_ms
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why no token could be had. The text names the endpoint and the
/// provider's error, never a secret; [`TokenError::fix`] says what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// A file or variable the request needs is missing or unusable.
    #[error("{what}")]
    Local { what: String, fix: String },
    /// The endpoint could not be reached or failed (5xx, timeout, TLS).
    #[error("token endpoint {url} unreachable: {detail}")]
    Unreachable {
        url: String,
        detail: String,
        fix: String,
    },
    /// It answered, but with no usable token (not a token endpoint, or
    /// something in the way).
    #[error("token endpoint {url} gave no usable answer: {detail}")]
    Unusable {
        url: String,
        detail: String,
        fix: String,
    },
    /// The provider answered with an OAuth2 error.
    #[error("token endpoint {url} refused: {code}: {description}")]
    Refused {
        url: String,
        code: String,
        description: String,
        fix: String,
    },
}

impl TokenError {
    pub fn fix(&self) -> &str {
        match self {
            TokenError::Local { fix, .. }
            | TokenError::Unreachable { fix, .. }
            | TokenError::Unusable { fix, .. }
            | TokenError::Refused { fix, .. } => fix,
        }
    }
}

/// What [`TokenSource::status`] shows: no secret in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    /// When the token in memory expires ([`Clock::monotonic_ms`]), if there
    /// is one.
    pub expires_ms: Option<u64>,
    /// The last request's error, while it stands.
    pub error: Option<String>,
    /// Token requests sent since start.
    pub requests: u64,
}

#[derive(Default)]
struct State {
    token: Option<AccessToken>,
    /// The last failed request and when the next may be sent.
    failure: Option<(TokenError, u64)>,
    /// Failed requests in a row (the backoff doubles with each).
    failures: u32,
    requests: u64,
    /// Where the last request went, once one was sent.
    url: Option<String>,
}

/// The token of one relay, shared by its connections.
pub struct TokenSource {
    /// "relay NAME (host:port)" for log lines.
    label: String,
    settings: Settings,
    clock: Clock,
    state: Mutex<State>,
    /// Held while a request is under way: the single flight.
    flight: tokio::sync::Mutex<grant::Grant>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("relay", &self.label)
            .field("grant", &self.settings.grant)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// The token source of `relay`, if it is set up for relayq's own OAuth2
    /// (`oauth2_provider`); `label` names the relay in log lines.
    pub fn for_relay(relay: &RelayConfig, label: String, clock: Clock) -> Option<Arc<TokenSource>> {
        let settings = Settings::of(relay)?;
        Some(Arc::new(TokenSource {
            label,
            flight: tokio::sync::Mutex::new(grant::Grant::new(&settings)),
            settings,
            clock,
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The endpoint tokens come from: where the last request went, else
    /// where the settings say (a service account's key file may name
    /// another, known once it is read).
    pub fn token_url(&self) -> String {
        self.state()
            .url
            .clone()
            .unwrap_or_else(|| self.settings.token_url())
    }

    /// A token good for a login now: the one in memory, or a new one.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        if let Some(t) = self.cached_fresh() {
            return Ok(t);
        }
        let mut grant = self.flight.lock().await;
        // Another connection may have got one while we waited.
        if let Some(t) = self.cached_fresh() {
            return Ok(t);
        }
        self.request(&mut grant).await
    }

    /// The upstream refused `rejected`: a token to try once more, if there
    /// is one worth trying. Another connection's newer token is reused; a
    /// token issued moments ago is not replaced (the refusal is about
    /// something else), otherwise a new one is requested.
    pub async fn after_rejection(
        &self,
        rejected: &AccessToken,
    ) -> Result<Option<AccessToken>, TokenError> {
        let mut grant = self.flight.lock().await;
        let now = self.clock.monotonic_ms();
        {
            let mut st = self.state();
            if let Some(current) = &st.token
                && !current.same(rejected)
                && current.fresh(now)
            {
                return Ok(Some(current.clone()));
            }
            if now < rejected.obtained_ms.saturating_add(MIN_FORCED_REFRESH_MS) {
                return Ok(None);
            }
            st.token = None;
            st.failure = None;
        }
        tracing::info!(
            target: "relayq::delivery",
            "{}: the upstream refused the OAuth2 token issued {}s ago; asking {} for a new one",
            self.label,
            now.saturating_sub(rejected.obtained_ms) / 1000,
            self.token_url()
        );
        self.request(&mut grant).await.map(Some)
    }

    /// Forgets the backoff after a failed request, so the next login asks
    /// the endpoint at once (an operator flushed the queue).
    pub fn retry_now(&self) {
        let mut st = self.state();
        if let Some((_, at)) = st.failure.as_mut() {
            *at = 0;
        }
    }

    pub fn status(&self) -> TokenStatus {
        let st = self.state();
        TokenStatus {
            expires_ms: st.token.as_ref().map(|t| t.expires_ms),
            error: st.failure.as_ref().map(|(e, _)| e.to_string()),
            requests: st.requests,
        }
    }

    fn cached_fresh(&self) -> Option<AccessToken> {
        let now = self.clock.monotonic_ms();
        self.state().token.clone().filter(|t| t.fresh(now))
    }

    /// Sends one request (the caller holds the flight), unless the backoff
    /// of a failed one is still running. A token still valid, though
    /// within its margin, is used while the endpoint fails.
    async fn request(&self, grant: &mut grant::Grant) -> Result<AccessToken, TokenError> {
        let now = self.clock.monotonic_ms();
        let still_valid = {
            let st = self.state();
            let valid = st.token.clone().filter(|t| now < t.expires_ms);
            if let Some((err, retry_at)) = &st.failure
                && now < *retry_at
            {
                return valid.ok_or_else(|| err.clone());
            }
            valid
        };
        self.state().requests += 1;
        let result = grant.request(&self.settings, &self.label).await;
        let now = self.clock.monotonic_ms();
        let url = grant
            .url
            .clone()
            .unwrap_or_else(|| self.settings.token_url());
        let mut st = self.state();
        st.url = Some(url.clone());
        match result {
            Ok(issued) => {
                let token = AccessToken {
                    secret: issued.access_token.into(),
                    obtained_ms: now,
                    expires_ms: now.saturating_add(
                        u64::try_from(issued.expires_in.as_millis()).unwrap_or(u64::MAX),
                    ),
                };
                tracing::debug!(
                    target: "relayq::delivery",
                    "{}: new OAuth2 token from {url}, valid for {}s",
                    self.label,
                    issued.expires_in.as_secs()
                );
                st.token = Some(token.clone());
                st.failure = None;
                st.failures = 0;
                Ok(token)
            }
            Err(e) => {
                st.failures += 1;
                let factor = 1u64 << (st.failures - 1).min(10);
                let wait = BACKOFF_MIN_MS.saturating_mul(factor).min(BACKOFF_MAX_MS);
                st.failure = Some((e.clone(), now.saturating_add(wait)));
                drop(st);
                let keep = if still_valid.is_some() {
                    "; the current token is used until it expires"
                } else {
                    "; mail stays queued"
                };
                tracing::error!(
                    target: "relayq::delivery",
                    "{}: no OAuth2 token: {e}{keep}; fix: {}",
                    self.label,
                    e.fix()
                );
                still_valid.ok_or(e)
            }
        }
    }
}

/// A token issued by the endpoint, before it is stamped with our clock.
pub(crate) struct Issued {
    access_token: String,
    expires_in: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose endpoint refuses connections (nothing listens on
    /// port 1 of loopback).
    fn unreachable_source(clock: Clock) -> Arc<TokenSource> {
        let relay: RelayConfig = toml::from_str(
            "host = \"127.0.0.1\"\nusername = \"app@contoso.example\"\noauth2_provider = \"microsoft\"\noauth2_tenant = \"t\"\noauth2_client_id = \"c\"\noauth2_client_secret_env = \"PATH\"\noauth2_token_url = \"https://127.0.0.1:1/t/oauth2/v2.0/token\"\n",
        )
        .unwrap();
        TokenSource::for_relay(&relay, "relay test".into(), clock).unwrap()
    }

    #[tokio::test]
    async fn a_failed_request_is_repeated_only_after_a_doubling_backoff() {
        let clock = Clock::new();
        let source = unreachable_source(clock.clone());
        let err = source.token().await.unwrap_err();
        assert!(matches!(err, TokenError::Unreachable { .. }), "{err}");
        assert!(
            err.fix().contains("must reach 127.0.0.1:1"),
            "{}",
            err.fix()
        );
        // Every connection asking during the backoff gets the error at once.
        for _ in 0..5 {
            assert!(source.token().await.is_err());
        }
        assert_eq!(source.status().requests, 1);
        clock.advance(Duration::from_millis(BACKOFF_MIN_MS));
        assert!(source.token().await.is_err());
        assert_eq!(source.status().requests, 2);
        // Now twice as long.
        clock.advance(Duration::from_millis(BACKOFF_MIN_MS));
        assert!(source.token().await.is_err());
        assert_eq!(source.status().requests, 2);
        clock.advance(Duration::from_millis(BACKOFF_MIN_MS));
        assert!(source.token().await.is_err());
        assert_eq!(source.status().requests, 3);
        // A queue flush asks at once.
        source.retry_now();
        assert!(source.token().await.is_err());
        assert_eq!(source.status().requests, 4);
        assert!(
            source
                .status()
                .error
                .is_some_and(|e| e.contains("unreachable"))
        );
    }

    #[test]
    fn margin_is_a_fifth_at_most_five_minutes() {
        assert_eq!(margin(3_600_000), 300_000);
        assert_eq!(margin(600_000), 120_000);
        let t = AccessToken {
            secret: "t".into(),
            obtained_ms: 0,
            expires_ms: 3_600_000,
        };
        assert!(t.fresh(3_299_999));
        assert!(!t.fresh(3_300_000));
        assert_eq!(format!("{t:?}"), "<redacted>");
    }
}
