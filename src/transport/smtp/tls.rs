//! TLS for the upstream connection: trust roots, the name to verify, the
//! handshake, certificate pinning, and error text an operator can act on.
//!
//! # Security
//! Verification is always on; there is no switch to turn it off. A private CA
//! file replaces the system roots rather than adding to them, so a relay
//! pinned to a company CA can't be impersonated with a public certificate.
//! A pin is checked in addition to verification, never instead of it.
//! The ring provider is passed explicitly: if another crate enables aws-lc-rs
//! too, rustls' process-default provider would be ambiguous and panic.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::{CertificateError, ProtocolVersion, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{SmtpError, Stage, TlsFailure, TlsOptions};

/// A client ready to handshake with one upstream.
pub(super) struct TlsSetup {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// The name as configured, for error messages.
    name: String,
    pin: Option<[u8; 32]>,
}

impl TlsSetup {
    pub(super) async fn new(opts: &TlsOptions, host: &str) -> Result<Self, SmtpError> {
        let name = if opts.server_name.is_empty() {
            host
        } else {
            &opts.server_name
        };
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| SmtpError::Config(format!("invalid TLS server name {name:?}")))?;
        let config = client_config(opts.ca_file.as_deref())
            .await
            .map_err(SmtpError::Config)?;
        let pin = opts.pin_sha256.as_deref().map(parse_pin).transpose()?;
        Ok(TlsSetup {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            name: name.to_string(),
            pin,
        })
    }

    /// Handshakes, verifies, and checks the pin.
    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
        limit: Duration,
    ) -> Result<TlsStream<TcpStream>, SmtpError> {
        let connecting = self.connector.connect(self.server_name.clone(), tcp);
        let stream = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(SmtpError::Tls(self.describe(e))),
            Err(_) => {
                return Err(SmtpError::Timeout {
                    stage: Stage::Tls,
                    after: limit,
                });
            }
        };
        self.check_pin(&stream)?;
        Ok(stream)
    }

    fn check_pin(&self, stream: &TlsStream<TcpStream>) -> Result<(), SmtpError> {
        let Some(expected) = &self.pin else {
            return Ok(());
        };
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        let actual: Option<[u8; 32]> = leaf.map(|cert| Sha256::digest(cert.as_ref()).into());
        if actual.as_ref() == Some(expected) {
            return Ok(());
        }
        Err(SmtpError::Tls(TlsFailure::PinMismatch {
            server_name: self.name.clone(),
            expected: hex(expected),
            actual: actual.map_or_else(|| "no certificate".into(), |a| hex(&a)),
        }))
    }

    /// tokio-rustls wraps rustls' error in an io::Error; dig it out so the
    /// message says "expired" rather than "invalid data".
    fn describe(&self, err: io::Error) -> TlsFailure {
        let server_name = self.name.clone();
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        match inner {
            Some(rustls::Error::InvalidCertificate(cert_err)) => TlsFailure::Verify {
                reason: describe_certificate_error(cert_err, &server_name),
                server_name,
            },
            Some(other) => TlsFailure::Handshake {
                server_name,
                reason: other.to_string(),
            },
            None if err.kind() == io::ErrorKind::UnexpectedEof => TlsFailure::Handshake {
                server_name,
                reason: "connection closed during the handshake".into(),
            },
            None => TlsFailure::Handshake {
                server_name,
                reason: err.to_string(),
            },
        }
    }
}

fn describe_certificate_error(err: &CertificateError, name: &str) -> String {
    match err {
        CertificateError::UnknownIssuer => {
            "unknown issuer (the certificate is not signed by a trusted CA)".into()
        }
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::NotValidYet => "certificate not valid yet".into(),
        CertificateError::NotValidForName => format!("certificate not valid for name {name:?}"),
        CertificateError::Revoked => "certificate revoked".into(),
        CertificateError::BadSignature => "bad certificate signature".into(),
        CertificateError::BadEncoding => "malformed certificate".into(),
        // The *Context variants already say what was expected and found.
        other => other.to_string(),
    }
}

/// "TLSv1.3" rather than rustls' "TLSv1_3".
pub(super) fn version_name(stream: &TlsStream<TcpStream>) -> Option<String> {
    let version = stream.get_ref().1.protocol_version()?;
    Some(match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    })
}

/// A TLS client configuration with the ring provider and the trust roots
/// of `ca_file` (replacing the system's) or the system's. Also used for
/// the OAuth2 token endpoint, so both trust the same way.
pub(crate) async fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let roots = match ca_file {
        Some(path) => Arc::new(load_ca_file(path).await?),
        None => system_roots(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

async fn load_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let unusable = |e: &dyn std::fmt::Display| format!("CA file {}: {e}", path.display());
    let pem = tokio::fs::read(path).await.map_err(|e| unusable(&e))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| unusable(&e))?;
        store.add(cert).map_err(|e| unusable(&e))?;
    }
    if store.is_empty() {
        return Err(unusable(&"no certificates found"));
    }
    Ok(store)
}

/// The system trust store, read once per process; webpki-roots (Mozilla's
/// list, compiled in) when the system has none, e.g. in a bare container.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for err in &loaded.errors {
                tracing::warn!("system trust store: {err}");
            }
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(loaded.certs);
            if ignored > 0 {
                tracing::warn!("system trust store: ignored {ignored} unparsable certificates");
            }
            if added == 0 {
                tracing::warn!("system trust store is empty; using the compiled-in webpki roots");
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(store)
        })
        .clone()
}

/// Accepts "AB:CD:..." or "abcd..." (64 hex digits).
fn parse_pin(pin: &str) -> Result<[u8; 32], SmtpError> {
    let bad = || SmtpError::Config(format!("pin_sha256 {pin:?} is not 64 hex digits"));
    let digits: Vec<u8> = pin
        .bytes()
        .filter(|b| !matches!(b, b':' | b' '))
        .map(|b| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = pair[0] << 4 | pair[1];
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons_in_any_case() {
        let plain = "00ff".repeat(16);
        let colons = plain
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let expected: [u8; 32] = std::array::from_fn(|i| if i % 2 == 0 { 0 } else { 0xff });
        assert_eq!(parse_pin(&plain).ok(), Some(expected));
        assert_eq!(parse_pin(&colons).ok(), Some(expected));
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }
}
