//! A test PKI made at test time with rcgen: one CA, and server certificates
//! signed by it (or deliberately wrong: for another host name, self-signed,
//! expired). Everything is written as PEM files into a directory the test
//! owns, so relayq's `ca_file` and Python's `ssl` can read them, and each
//! server certificate also comes as a ready rustls `ServerConfig` for the
//! fake upstream.
//!
//! Keys are fresh per test run; nothing here is a checked-in secret.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The names a good server certificate is valid for. relayq's tests point
/// `[relay] host` at the IP literal (no DNS in tests) and sometimes set
/// `tls_server_name = "relay.test"`, as for a provider behind a name.
pub const SERVER_NAMES: [&str; 3] = ["relay.test", "127.0.0.1", "::1"];

/// The only name in a [`CertKind::WrongHost`] certificate.
pub const WRONG_NAME: &str = "wrong-host.test";

/// What is (or is not) wrong with a server certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// Signed by the test CA, valid now, for [`SERVER_NAMES`].
    Good,
    /// Signed by the test CA, valid now, but only for [`WRONG_NAME`].
    WrongHost,
    /// For [`SERVER_NAMES`], valid now, but signed by its own key.
    SelfSigned,
    /// Signed by the test CA for [`SERVER_NAMES`], but expired in 2021.
    Expired,
}

impl CertKind {
    fn file_stem(self) -> &'static str {
        match self {
            CertKind::Good => "server-good",
            CertKind::WrongHost => "server-wrong-host",
            CertKind::SelfSigned => "server-self-signed",
            CertKind::Expired => "server-expired",
        }
    }
}

/// A server certificate with its key, as files and as a rustls config.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub kind: CertKind,
    /// The leaf certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key_file: PathBuf,
    /// Lower-case hex SHA-256 of the leaf's DER: what `pin_sha256` takes.
    pub sha256: String,
    pub config: Arc<rustls::ServerConfig>,
}

/// A certificate authority for one test.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM), for `[relay] ca_file`.
    pub ca_file: PathBuf,
}

impl TestCa {
    /// Makes a CA and writes `ca.pem` into `dir` (created if missing).
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).expect("create the PKI directory");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "relayq integration test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).expect("write ca.pem");
        TestCa {
            issuer,
            dir: dir.to_path_buf(),
            ca_file,
        }
    }

    /// Makes a server certificate of the given kind and writes
    /// `<kind>.pem` and `<kind>-key.pem` next to the CA.
    pub fn server_cert(&self, kind: CertKind) -> ServerCert {
        let names: Vec<String> = match kind {
            CertKind::WrongHost => vec![WRONG_NAME.to_string()],
            _ => SERVER_NAMES.iter().map(|s| s.to_string()).collect(),
        };
        let mut params = rcgen::CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake upstream");
        if kind == CertKind::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = match kind {
            CertKind::SelfSigned => params.self_signed(&key),
            _ => params.signed_by(&key, &self.issuer),
        }
        .expect("sign the server certificate");

        let cert_file = self.dir.join(format!("{}.pem", kind.file_stem()));
        let key_file = self.dir.join(format!("{}-key.pem", kind.file_stem()));
        std::fs::write(&cert_file, cert.pem()).expect("write server certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write server key");

        let der = cert.der().clone();
        let sha256 = Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ServerCert {
            kind,
            cert_file,
            key_file,
            sha256,
            config: server_config(der, &key),
        }
    }
}

fn server_config(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> Arc<rustls::ServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // ring explicitly, as relayq itself does: never the process default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server certificate and key");
    Arc::new(config)
}
