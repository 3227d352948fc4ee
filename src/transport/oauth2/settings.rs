//! The `oauth2_*` keys of a relay: which grant they describe, the
//! provider's defaults (token endpoint, scope), and the checks that need
//! several keys at once, with messages that say which key to add or drop.
//!
//! The grant follows from the keys: a service account key file means the
//! JWT bearer grant (Google), a refresh token file the refresh-token grant
//! (Microsoft or Google, delegated), and otherwise a client secret means
//! client credentials (Microsoft, app-only; Google has no such grant).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::RelayConfig;

/// Whose token endpoint and conventions to use.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Microsoft 365 / Exchange Online (Entra ID).
    Microsoft,
    /// Google Workspace / Gmail.
    Google,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Microsoft => "Microsoft",
            Provider::Google => "Google",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// Microsoft app-only: client id and secret (RFC 6749 4.4).
    ClientCredentials,
    /// Delegated: a refresh token from a one-time sign-in (RFC 6749 6).
    RefreshToken,
    /// Google service account: a signed JWT (RFC 7523).
    ServiceAccount,
}

impl GrantKind {
    pub fn name(self) -> &'static str {
        match self {
            GrantKind::ClientCredentials => "client credentials",
            GrantKind::RefreshToken => "refresh token",
            GrantKind::ServiceAccount => "service account",
        }
    }
}

/// Where the client secret is read from, at each request (so it can be
/// rotated without a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    File(PathBuf),
    Env(String),
}

/// One relay's OAuth2 setup, defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub provider: Provider,
    pub grant: GrantKind,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    pub refresh_token_file: Option<PathBuf>,
    pub service_account_file: Option<PathBuf>,
    /// The mailbox (the relay's `username`): XOAUTH2's `user=` and the
    /// service account's `sub`.
    pub mailbox: String,
    scope: Option<String>,
    token_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// The whole token request (connect, TLS, answer) must finish in this.
    pub timeout: Duration,
}

pub const MICROSOFT_LOGIN: &str = "https://login.microsoftonline.com";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

impl Settings {
    /// `None` unless the relay sets `oauth2_provider` (a valid config, see
    /// [`check_config`]).
    pub fn of(relay: &RelayConfig) -> Option<Settings> {
        let provider = relay.oauth2_provider?;
        let grant = if relay.oauth2_service_account_file.is_some() {
            GrantKind::ServiceAccount
        } else if relay.oauth2_refresh_token_file.is_some() {
            GrantKind::RefreshToken
        } else {
            GrantKind::ClientCredentials
        };
        let client_secret = match (
            &relay.oauth2_client_secret_file,
            &relay.oauth2_client_secret_env,
        ) {
            (Some(f), _) => Some(SecretRef::File(f.clone())),
            (None, Some(v)) => Some(SecretRef::Env(v.clone())),
            (None, None) => None,
        };
        Some(Settings {
            provider,
            grant,
            tenant: relay.oauth2_tenant.clone(),
            client_id: relay.oauth2_client_id.clone(),
            client_secret,
            refresh_token_file: relay.oauth2_refresh_token_file.clone(),
            service_account_file: relay.oauth2_service_account_file.clone(),
            mailbox: relay.username.clone().unwrap_or_default(),
            scope: relay.oauth2_scope.clone(),
            token_url: relay.oauth2_token_url.clone(),
            ca_file: relay.oauth2_ca_file.clone(),
            timeout: relay.connect_timeout.0,
        })
    }

    /// The configured endpoint, else the provider's. (A service account's
    /// key file may name its own; see `grant`.)
    pub fn token_url(&self) -> String {
        if let Some(url) = &self.token_url {
            return url.clone();
        }
        match self.provider {
            Provider::Microsoft => format!(
                "{MICROSOFT_LOGIN}/{}/oauth2/v2.0/token",
                self.tenant.as_deref().unwrap_or("organizations")
            ),
            Provider::Google => GOOGLE_TOKEN_URL.to_string(),
        }
    }

    pub fn token_url_configured(&self) -> bool {
        self.token_url.is_some()
    }

    /// The configured scope, else what the provider wants for SMTP.
    pub fn scope(&self) -> &str {
        if let Some(s) = &self.scope {
            return s;
        }
        match (self.provider, self.grant) {
            (Provider::Microsoft, GrantKind::ClientCredentials) => {
                "https://outlook.office365.com/.default"
            }
            (Provider::Microsoft, _) => "https://outlook.office.com/SMTP.Send offline_access",
            (Provider::Google, _) => "https://mail.google.com/",
        }
    }

    /// Whether a scope is sent with a refresh-token request: Microsoft
    /// wants one, Google keeps the one granted at sign-in.
    pub fn scope_for_refresh(&self) -> Option<&str> {
        match (self.provider, &self.scope) {
            (Provider::Microsoft, _) => Some(self.scope()),
            (Provider::Google, Some(s)) => Some(s),
            (Provider::Google, None) => None,
        }
    }
}

/// The checks of a relay's `oauth2_*` keys: `Err((key, message))`, `key`
/// relative to the relay's table.
pub fn check_config(relay: &RelayConfig) -> Result<(), (&'static str, String)> {
    let any_key = relay.oauth2_tenant.is_some()
        || relay.oauth2_client_id.is_some()
        || relay.oauth2_client_secret_file.is_some()
        || relay.oauth2_client_secret_env.is_some()
        || relay.oauth2_refresh_token_file.is_some()
        || relay.oauth2_service_account_file.is_some()
        || relay.oauth2_scope.is_some()
        || relay.oauth2_token_url.is_some()
        || relay.oauth2_ca_file.is_some();
    let Some(provider) = relay.oauth2_provider else {
        if any_key {
            return Err((
                "oauth2_provider",
                "oauth2_* keys are set but no oauth2_provider: add oauth2_provider = \"microsoft\" or \"google\"".into(),
            ));
        }
        return Ok(());
    };
    if relay.username.is_none() {
        return Err((
            "username",
            "OAuth2 logs in as a mailbox: set username to its address (e.g. \"app@example.com\")"
                .into(),
        ));
    }
    if relay
        .auth_mechanism
        .is_some_and(|m| m != crate::config::AuthMechanismConfig::Xoauth2)
    {
        return Err((
            "auth_mechanism",
            "OAuth2 tokens are sent with XOAUTH2: remove auth_mechanism or set it to \"xoauth2\""
                .into(),
        ));
    }
    if relay.oauth2_client_secret_file.is_some() && relay.oauth2_client_secret_env.is_some() {
        return Err((
            "oauth2_client_secret_file",
            "set only one of oauth2_client_secret_file and oauth2_client_secret_env".into(),
        ));
    }
    if let Some(v) = &relay.oauth2_client_secret_env
        && !crate::config::is_env_name(v)
    {
        return Err((
            "oauth2_client_secret_env",
            crate::config::NOT_AN_ENV_NAME.into(),
        ));
    }
    // A relative path is the secret itself pasted into the key more often
    // than a path (relayq runs from /): said without showing it.
    for (key, path) in [
        (
            "oauth2_client_secret_file",
            &relay.oauth2_client_secret_file,
        ),
        (
            "oauth2_refresh_token_file",
            &relay.oauth2_refresh_token_file,
        ),
        (
            "oauth2_service_account_file",
            &relay.oauth2_service_account_file,
        ),
    ] {
        if path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err((
                key,
                "must be the absolute path of the file holding the secret (e.g. /etc/relayq/oauth2-secret), not the secret itself; the value is not shown here in case it is".into(),
            ));
        }
    }
    if let Some(url) = &relay.oauth2_token_url {
        if url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
            .unwrap_or(url.contains('@'))
        {
            return Err((
                "oauth2_token_url",
                "must not hold a user name or password (user:password@host): the token request is authenticated by the oauth2_* keys; the URL is not shown here as it holds a secret".into(),
            ));
        }
        let ok = url
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok || url.parse::<hyper::Uri>().is_err() {
            return Err((
                "oauth2_token_url",
                format!("{url:?} is not an https:// URL; tokens are only ever fetched over TLS"),
            ));
        }
    }
    if let Some(tenant) = &relay.oauth2_tenant
        && (tenant.is_empty()
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)))
    {
        return Err((
            "oauth2_tenant",
            format!(
                "{tenant:?} is not a tenant: use the Directory (tenant) ID or the domain (contoso.onmicrosoft.com)"
            ),
        ));
    }
    let has_secret =
        relay.oauth2_client_secret_file.is_some() || relay.oauth2_client_secret_env.is_some();
    if relay.oauth2_service_account_file.is_some() {
        if provider != Provider::Google {
            return Err((
                "oauth2_service_account_file",
                "service accounts are Google's: set oauth2_provider = \"google\"".into(),
            ));
        }
        if relay.oauth2_refresh_token_file.is_some()
            || relay.oauth2_client_id.is_some()
            || has_secret
        {
            return Err((
                "oauth2_service_account_file",
                "a service account key file replaces oauth2_client_id, the client secret and oauth2_refresh_token_file: remove those".into(),
            ));
        }
        return Ok(());
    }
    if relay.oauth2_client_id.is_none() {
        return Err((
            "oauth2_client_id",
            match provider {
                Provider::Microsoft => "set the app registration's Application (client) ID",
                Provider::Google => {
                    "set the OAuth client ID, or use oauth2_service_account_file for a service account"
                }
            }
            .into(),
        ));
    }
    let needs_tenant = provider == Provider::Microsoft
        && relay.oauth2_tenant.is_none()
        && relay.oauth2_token_url.is_none();
    if relay.oauth2_refresh_token_file.is_some() {
        if needs_tenant {
            return Err((
                "oauth2_tenant",
                "set the Directory (tenant) ID of the app registration (or \"organizations\" for a multi-tenant app)".into(),
            ));
        }
        if provider == Provider::Google && !has_secret {
            return Err((
                "oauth2_client_secret_file",
                "Google wants the OAuth client's secret with a refresh token: set oauth2_client_secret_file or oauth2_client_secret_env".into(),
            ));
        }
        return Ok(());
    }
    match provider {
        Provider::Google => Err((
            "oauth2_service_account_file",
            "Google has no client-credentials grant for Gmail: use a service account with domain-wide delegation (oauth2_service_account_file) or a delegated refresh token (oauth2_refresh_token_file)".into(),
        )),
        Provider::Microsoft if needs_tenant => Err((
            "oauth2_tenant",
            "set the Directory (tenant) ID of the app registration".into(),
        )),
        Provider::Microsoft if !has_secret => Err((
            "oauth2_client_secret_file",
            "app-only access (client credentials) needs the client secret: set oauth2_client_secret_file or oauth2_client_secret_env (or oauth2_refresh_token_file for delegated access)".into(),
        )),
        Provider::Microsoft => Ok(()),
    }
}
