//! What an operator should change, for each error a token endpoint or an
//! upstream's reply to AUTH can give: the fix half of every OAuth2 log line
//! and `relayq check` FAIL line. Microsoft puts an `AADSTS<n>` code in its
//! error descriptions; Google's descriptions are fixed sentences. Both are
//! matched here, with a general fix per OAuth2 error code (RFC 6749 5.2)
//! when nothing more specific is known.

use super::settings::{GrantKind, Provider, Settings};

/// Host and port of a token endpoint URL, the port always said.
fn host_port(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) if u.host().is_some() => {
            format!(
                "{}:{}",
                u.host().unwrap_or_default(),
                u.port_u16().unwrap_or(443)
            )
        }
        _ => url.to_string(),
    }
}

/// The endpoint did not answer (or answered 5xx).
pub fn unreachable(url: &str) -> String {
    format!(
        "this machine must reach {} over HTTPS (check the firewall, DNS and any proxy); relayq retries with backoff and sends the queued mail once a token is issued",
        host_port(url)
    )
}

/// The TLS handshake with the endpoint failed.
pub fn tls_failed(url: &str) -> String {
    format!(
        "{} did not prove itself with a certificate this machine trusts: if a proxy intercepts HTTPS, put its CA certificate in oauth2_ca_file; check that oauth2_token_url is an HTTPS endpoint and that this machine's clock is right",
        host_port(url)
    )
}

/// A 2xx answer without a usable token, or no HTTP answer at all.
pub fn not_a_token_answer() -> String {
    "the answer is not a token answer: if oauth2_token_url is set, correct it (or remove it to use the provider's endpoint); otherwise something between this machine and the provider (a proxy, a captive portal) answers in its place".into()
}

/// A secret file the process may not read.
pub fn unreadable(path: &std::path::Path) -> String {
    format!(
        "the user relayq runs as cannot read it: chown relayq {p} && chmod 600 {p} (a file written by root, e.g. by relayq check run as root, is root's); run relayq check as that user too (sudo -u relayq relayq check)",
        p = path.display()
    )
}

pub fn client_secret(s: &Settings) -> String {
    match s.provider {
        Provider::Microsoft => "put the client secret's Value (from the app registration's Certificates & secrets, not its Secret ID) in oauth2_client_secret_file (chmod 600), or set the variable oauth2_client_secret_env names".into(),
        Provider::Google => "put the OAuth client's secret (Google Cloud console, APIs & Services > Credentials) in oauth2_client_secret_file (chmod 600), or set the variable oauth2_client_secret_env names".into(),
    }
}

pub fn refresh_token_file(s: &Settings) -> String {
    format!(
        "sign in once as {} to get a refresh token (README: {}) and write it into oauth2_refresh_token_file, in a directory the relayq user may write (relayq replaces the file when the provider rotates the token)",
        mailbox(s),
        readme_section(s)
    )
}

pub fn service_account_key(_s: &Settings) -> String {
    "download a JSON key for the service account (Google Cloud console, IAM & Admin > Service accounts > Keys > Add key > JSON) and point oauth2_service_account_file at it (chmod 600)".into()
}

/// A 4xx answer that is not an OAuth2 error: the URL is not a token
/// endpoint.
pub fn not_a_token_endpoint(s: &Settings) -> String {
    if s.token_url_configured() {
        "oauth2_token_url is not a token endpoint: remove it to use the provider's, or correct it"
            .into()
    } else {
        match s.provider {
            Provider::Microsoft => "check oauth2_tenant: the Directory (tenant) ID or domain of the app registration".into(),
            Provider::Google => "the token endpoint did not answer as an OAuth2 endpoint; check outgoing HTTPS (a proxy or TLS interception in the way?)".into(),
        }
    }
}

/// The fix for an OAuth2 error answer.
pub fn token_error(s: &Settings, code: &str, description: &str) -> String {
    let aadsts = |n: &str| description.contains(&format!("AADSTS{n}"));
    let said = |t: &str| {
        description
            .to_ascii_lowercase()
            .contains(&t.to_ascii_lowercase())
    };
    match s.provider {
        Provider::Microsoft => {
            if aadsts("7000215") || aadsts("7000222") || aadsts("7000216") {
                return format!(
                    "the client secret is wrong or expired: create a new one in the app registration (Certificates & secrets) and put its Value in {}",
                    secret_key(s)
                );
            }
            if aadsts("700016") {
                return "no app with oauth2_client_id in this tenant: copy the Application (client) ID and the Directory (tenant) ID from the app registration's Overview into oauth2_client_id and oauth2_tenant".into();
            }
            if aadsts("90002") || aadsts("900023") {
                return "oauth2_tenant is not a tenant: use the Directory (tenant) ID from the app registration's Overview, or the domain (contoso.onmicrosoft.com)".into();
            }
            if aadsts("70011") || code == "invalid_scope" {
                return format!(
                    "the scope {:?} is not valid for this grant: remove oauth2_scope to use relayq's default",
                    s.scope()
                );
            }
            if aadsts("65001") || code == "consent_required" {
                return "the app lacks admin consent: in Entra ID, app registration > API permissions, add Office 365 Exchange Online > Application permissions > SMTP.SendAsApp (delegated: SMTP.Send) and grant admin consent".into();
            }
            if aadsts("50126") || aadsts("50034") || aadsts("50057") {
                return format!(
                    "the mailbox {} cannot sign in (disabled, or its password changed): sign in again and write the new refresh token into oauth2_refresh_token_file",
                    mailbox(s)
                );
            }
        }
        Provider::Google => {
            if said("unauthorized to retrieve access tokens")
                || said("not authorized for any of the scopes")
                || code == "unauthorized_client"
            {
                return "domain-wide delegation is missing: in the Google Admin console, Security > Access and data control > API controls > Manage domain-wide delegation, add the service account's client ID with the scope https://mail.google.com/".into();
            }
            if said("invalid email or user id") {
                return format!(
                    "{} is not a mailbox of your Workspace domain: set username to a real user's address (the service account acts as that user)",
                    mailbox(s)
                );
            }
            if said("invalid jwt signature") || said("invalid_signature") {
                return "the service account key was deleted or is not this account's: create a new JSON key and point oauth2_service_account_file at it".into();
            }
            if said("reasonable timeframe") {
                return "this machine's clock is off: enable time synchronisation (timedatectl set-ntp true)".into();
            }
            if said("expired or revoked") {
                return format!(
                    "the refresh token was revoked or expired (an app in \"Testing\" publishing status gets 7-day tokens; a password change revokes them): sign in again as {} (README: {}) and write the new refresh token into oauth2_refresh_token_file",
                    mailbox(s),
                    readme_section(s)
                );
            }
        }
    }
    match code {
        "invalid_client" | "unauthorized_client" => format!(
            "the provider does not accept the client: check oauth2_client_id and the secret in {}",
            secret_key(s)
        ),
        "invalid_grant" => match s.grant {
            GrantKind::RefreshToken => format!(
                "the refresh token is expired or revoked: sign in again as {} (README: {}) and write the new refresh token into oauth2_refresh_token_file; relayq uses it at the next attempt",
                mailbox(s),
                readme_section(s)
            ),
            GrantKind::ServiceAccount => "the service account's JWT was refused: check that the key file is current, username is a mailbox of your domain, and this machine's clock is right".into(),
            GrantKind::ClientCredentials => "the grant was refused: check oauth2_tenant, oauth2_client_id and the client secret".into(),
        },
        "invalid_scope" => format!(
            "the scope {:?} is not allowed: remove oauth2_scope to use relayq's default",
            s.scope()
        ),
        "invalid_request" => "the provider refused the request as malformed: check oauth2_token_url, oauth2_tenant and oauth2_client_id".into(),
        _ => format!(
            "read the provider's description above; the setup steps are in the README ({})",
            readme_section(s)
        ),
    }
}

/// The fix for an upstream's refusal of AUTH, or `None` for a generic one.
/// `oauth2` is the token source's settings, when relayq got the token.
pub fn auth_refused(reply: &str, host: &str, oauth2: Option<&Settings>) -> Option<String> {
    let r = reply.to_ascii_lowercase();
    // Exchange Online names its front end in every reply: "[BN9PR03CA0123.
    // namprd03.prod.outlook.com]".
    let microsoft = host.ends_with("office365.com")
        || host.ends_with("outlook.com")
        || r.contains(".outlook.com]");
    let google = host.ends_with("gmail.com") || host.ends_with("google.com");
    if r.contains("5.7.139") {
        return Some("SMTP AUTH is disabled for the mailbox or tenant: enable it (Exchange admin center > the mailbox > Manage email apps > Authenticated SMTP, or Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false; tenant-wide Set-TransportConfig -SmtpClientAuthenticationDisabled $false), and make sure Security defaults do not block it".into());
    }
    if r.contains("5.7.30") || r.contains("basic authentication is not supported") {
        return Some("Microsoft 365 no longer accepts passwords for SMTP: let relayq get OAuth2 tokens (oauth2_provider = \"microsoft\"; README: Microsoft 365)".into());
    }
    match oauth2 {
        Some(s) if s.provider == Provider::Microsoft || microsoft => {
            if r.contains("5.7.3") || r.contains("535") {
                return Some(match s.grant {
                    GrantKind::ClientCredentials => format!(
                        "Exchange does not let the app send as {}: the app registration needs the application permission SMTP.SendAsApp (Office 365 Exchange Online) with admin consent, and its service principal must be registered in Exchange Online with rights on the mailbox (New-ServicePrincipal, then Add-MailboxPermission -Identity {} -User <service principal id> -AccessRights FullAccess); README: Microsoft 365",
                        s.mailbox, s.mailbox
                    ),
                    _ => format!(
                        "Exchange refused the token for {}: the sign-in must be as that mailbox with the delegated permission SMTP.Send, and SMTP AUTH must be enabled for it; README: Microsoft 365",
                        s.mailbox
                    ),
                });
            }
            None
        }
        Some(s) => Some(match s.grant {
            GrantKind::ServiceAccount => format!(
                "Gmail refused the token for {}: check domain-wide delegation of the service account's client ID with the scope https://mail.google.com/ (Admin console > Security > API controls), and that username is a real mailbox",
                s.mailbox
            ),
            _ => format!(
                "Gmail refused the token for {}: the refresh token must be for that mailbox, granted the scope https://mail.google.com/",
                s.mailbox
            ),
        }),
        None if microsoft && (r.contains("5.7.3") || r.contains("535")) => Some("Microsoft 365 refused the password (Basic authentication is off in most tenants): let relayq get OAuth2 tokens (oauth2_provider = \"microsoft\"; README: Microsoft 365)".into()),
        None if google && r.contains("535") => Some("Google refused the password: use an app password (with 2-step verification on) or OAuth2 (oauth2_provider = \"google\"; README: Google Workspace)".into()),
        None => None,
    }
}

fn mailbox(s: &Settings) -> &str {
    if s.mailbox.is_empty() {
        "the mailbox"
    } else {
        &s.mailbox
    }
}

fn secret_key(s: &Settings) -> &'static str {
    match s.client_secret {
        Some(super::settings::SecretRef::Env(_)) => "oauth2_client_secret_env",
        _ => "oauth2_client_secret_file",
    }
}

fn readme_section(s: &Settings) -> &'static str {
    match s.provider {
        Provider::Microsoft => "Microsoft 365",
        Provider::Google => "Google Workspace",
    }
}
