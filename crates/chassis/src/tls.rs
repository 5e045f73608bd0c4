//! TLS on a listener and for a caller: rustls (on ring, as the rest of the tree), certificate
//! files reloaded when they change, and optional client certificates (mTLS) whose name becomes
//! the caller's identity.
//!
//! The files are watched by polling their modification time and size once a second (a
//! listener's by a task, a caller's on its next handshake), as the gateway's configuration is:
//! it also sees a Kubernetes Secret's symlink swap or cert-manager's rename. New files serve new
//! connections at once; open connections keep what they were made with. A bad new file (half
//! written, a key that does not match) is logged and counted, and the previous one stays.

use crate::shutdown::Shutdown;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// `[….tls]` of a listener. Without `cert` the listener speaks plain TCP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM (the server's certificate first).
    pub cert: Option<PathBuf>,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The CA certificates (PEM) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Client certificates: `none` (not asked for), `optional` (verified when sent; a client
    /// may instead send an API key) or `required` (a connection without one fails its handshake).
    pub client_auth: ClientAuth,
    /// The names (see [`PeerIdentity`]) a client certificate may carry; another one fails its
    /// handshake. Empty: any certificate of `client_ca`.
    pub allowed_names: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    None,
    Optional,
    Required,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }

    pub fn validate(&self, section: &str) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (Some(_), None) | (None, Some(_)) => return Err(format!("{section}.cert and {section}.key go together")),
            (None, None) if self.client_ca.is_some() || self.client_auth != ClientAuth::None => {
                return Err(format!("{section}.client_ca and client_auth need {section}.cert and key (TLS)"));
            }
            _ => {}
        }
        if self.client_auth != ClientAuth::None && self.client_ca.is_none() {
            return Err(format!("{section}.client_auth = {:?} needs {section}.client_ca", self.client_auth));
        }
        if !self.allowed_names.is_empty() && self.client_auth == ClientAuth::None {
            return Err(format!("{section}.allowed_names needs {section}.client_auth = \"optional\" or \"required\""));
        }
        if self.allowed_names.iter().any(String::is_empty) {
            return Err(format!("{section}.allowed_names holds an empty name"));
        }
        Ok(())
    }

    fn files(&self) -> Vec<&Path> {
        [&self.cert, &self.key, &self.client_ca].into_iter().flatten().map(PathBuf::as_path).collect()
    }
}

/// `[….client_tls]` of a role that calls others over TLS: the CA their certificates must chain
/// to, and a certificate of its own to present (mTLS). Without `ca` the role dials in plaintext
/// (gRPC) or, for `https://` URLs, trusts the system's roots.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// The CA certificates (PEM) servers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM) to present.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsConfig {
    /// Whether calls speak TLS (a CA is set).
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(format!("{section}.cert and {section}.key go together"));
        }
        Ok(())
    }

    fn files(&self) -> Vec<&Path> {
        [&self.ca, &self.cert, &self.key].into_iter().flatten().map(PathBuf::as_path).collect()
    }

    /// [`ClientTlsConfig::validate`], for a gRPC caller: it speaks TLS only with a CA, so a
    /// certificate without one (which would go unused, the calls in plaintext) is refused.
    pub fn validate_for_grpc(&self, section: &str) -> Result<(), String> {
        self.validate(section)?;
        if self.cert.is_some() && self.ca.is_none() {
            return Err(format!("{section}.cert needs {section}.ca: gRPC speaks TLS only with a CA"));
        }
        Ok(())
    }

    /// The rustls client configuration: `ca` as the only roots (the system's when none is
    /// set) and the client certificate when one is set. No ALPN: the connector sets it.
    ///
    /// The files are re-read when they change, as a listener's are: on a handshake, at most
    /// once a second, so a rotated certificate or CA serves the next connection with no
    /// restart (sessions are not resumed, which would skip both). A bad new file is logged and
    /// counted and the one in force stays. The system's roots are read once.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let files = Arc::new(CallerFiles::load(self)?);
        let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match &self.ca {
            Some(_) => builder.dangerous().with_custom_certificate_verifier(Arc::clone(&files) as Arc<dyn ServerCertVerifier>),
            None => {
                let mut roots = RootCertStore::empty();
                for c in rustls_native_certs::load_native_certs().certs {
                    // A system store holds the odd certificate rustls cannot use; skip it.
                    let _ = roots.add(c);
                }
                builder.with_root_certificates(roots)
            }
        };
        let mut config = match &self.cert {
            Some(_) => builder.with_client_cert_resolver(files),
            None => builder.with_no_client_auth(),
        };
        if self.ca.is_some() || self.cert.is_some() {
            // A resumed session skips both the server's certificate and ours, so after a
            // rotation it would go on with the old CA or the old name. Connections are pooled
            // and long-lived; a full handshake on the odd new one costs little.
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(config)
    }
}

/// What a caller trusts (`ca`) and presents (`cert`, `key`), re-read when the files change.
/// It is both the configuration's server-certificate verifier (when `ca` is set) and its
/// client-certificate resolver (when `cert` is): rustls asks it on every handshake.
#[derive(Debug)]
struct CallerFiles {
    config: ClientTlsConfig,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    current: Mutex<CallerState>,
}

#[derive(Debug)]
struct CallerState {
    checked: Instant,
    stamps: Stamps,
    /// Some when `ca` is set.
    roots: Option<Arc<WebPkiServerVerifier>>,
    /// Some when `cert` is set.
    key: Option<Arc<CertifiedKey>>,
}

type CallerParts = (Option<Arc<WebPkiServerVerifier>>, Option<Arc<CertifiedKey>>);

impl CallerFiles {
    fn load(config: &ClientTlsConfig) -> Result<CallerFiles, TlsError> {
        let stamps = file_stamps(&config.files());
        let (roots, key) = Self::read(config)?;
        Ok(CallerFiles {
            config: config.clone(),
            algorithms: provider().signature_verification_algorithms,
            current: Mutex::new(CallerState { checked: Instant::now(), stamps, roots, key }),
        })
    }

    fn read(config: &ClientTlsConfig) -> Result<CallerParts, TlsError> {
        let roots = match &config.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates("CA", ca)? {
                    roots.add(c)?;
                }
                let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::Ca { path: ca.clone(), message: e.to_string() })?;
                Some(verifier)
            }
            None => None,
        };
        let key = match (&config.cert, &config.key) {
            (Some(cert), Some(key_path)) => {
                let chain = certificates("client certificate", cert)?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Pem {
                    what: "private key",
                    path: key_path.clone(),
                    source,
                })?;
                let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Certificate {
                    path: cert.clone(),
                    key: key_path.clone(),
                    source,
                })?;
                Some(Arc::new(certified))
            }
            _ => None,
        };
        Ok((roots, key))
    }

    /// The roots and certificate in force, after re-reading the files if a second has passed
    /// since the last look and they changed. The lock is not held over the files: one caller
    /// claims the look, the others go on with what is in force.
    fn current(&self) -> CallerParts {
        let lock = || self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = {
            let mut state = lock();
            if state.checked.elapsed() < RELOAD_CHECK {
                return (state.roots.clone(), state.key.clone());
            }
            state.checked = Instant::now();
            state.stamps.clone()
        };
        let now = file_stamps(&self.config.files());
        if now != seen {
            let read = Self::read(&self.config);
            let mut state = lock();
            state.stamps = now;
            match read {
                Ok((roots, key)) => {
                    (state.roots, state.key) = (roots, key);
                    tracing::info!(ca = ?self.config.ca, cert = ?self.config.cert, "caller TLS files reloaded");
                    metrics::counter!(crate::instruments::TLS_RELOADS, "side" => "caller", "outcome" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "caller TLS reload failed; keeping the files in force");
                    metrics::counter!(crate::instruments::TLS_RELOADS, "side" => "caller", "outcome" => "failed").increment(1);
                }
            }
        }
        let state = lock();
        (state.roots.clone(), state.key.clone())
    }

    fn roots(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.current().0.ok_or_else(|| rustls::Error::General("no CA configured".into()))
    }
}

impl ServerCertVerifier for CallerFiles {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.roots()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ResolvesClientCert for CallerFiles {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current().1
    }

    fn has_certs(&self) -> bool {
        self.config.cert.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Pem { what: &'static str, path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate {path} with key {key}: {source}")]
    Certificate { path: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("development CA: {0}")]
    DevCa(String),
}

/// The caller's name from its verified client certificate: its first DNS or URI subject
/// alternative name (a SPIFFE ID, say), or else its subject's common name. Requests carry it as
/// an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);

/// Marks every request that arrived over TLS, so a proxy can tell its upstream the scheme the
/// client used (`X-Forwarded-Proto: https`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverTls;

/// A listener's TLS: the server configuration in force, replaced when the files change.
pub struct Tls {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the files; `None` when `config` has no certificate (plain TCP).
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<Tls>>, TlsError> {
        if !config.enabled() {
            return Ok(None);
        }
        let server = server_config(config)?;
        Ok(Some(Arc::new(Tls { config: config.clone(), current: RwLock::new(Arc::new(server)) })))
    }

    /// The acceptor for the next connection, with the certificate in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let current = self.current.read().map(|c| Arc::clone(&c)).unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()));
        tokio_rustls::TlsAcceptor::from(current)
    }

    /// Reloads the certificate when its files change, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        let mut stamps = file_stamps(&self.config.files());
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            let now = file_stamps(&self.config.files());
            if now == stamps {
                continue;
            }
            stamps = now;
            match server_config(&self.config) {
                Ok(server) => {
                    if let Ok(mut current) = self.current.write() {
                        *current = Arc::new(server);
                    }
                    tracing::info!(cert = ?self.config.cert, "TLS certificate reloaded");
                    metrics::counter!(crate::instruments::TLS_RELOADS, "side" => "listener", "outcome" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the current one");
                    metrics::counter!(crate::instruments::TLS_RELOADS, "side" => "listener", "outcome" => "failed").increment(1);
                }
            }
        }
    }
}

/// How often a changed certificate file is looked for.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

type Stamps = Vec<Option<(SystemTime, u64)>>;

/// The modification time and size of each file: a change to either is a new file.
fn file_stamps(files: &[&Path]) -> Stamps {
    files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { what, path: path.to_path_buf(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn server_config(config: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Err(TlsError::Rustls(rustls::Error::General("no certificate configured".into())));
    };
    let chain = certificates("certificate", cert)?;
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem { what: "private key", path: key.clone(), source })?;
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match (&config.client_ca, config.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("client CA", ca)? {
                roots.add(c)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if config.client_auth == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa { path: ca.clone(), message: e.to_string() })?;
            if config.allowed_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(NamesAllowed { inner: verifier, names: config.allowed_names.clone() }))
            }
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|source| TlsError::Certificate {
        path: cert.clone(),
        key: key_path.clone(),
        source,
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// A client certificate verified by the CA, and then refused unless it carries one of `names`
/// (rustls checks the chain; this only narrows who may call).
#[derive(Debug)]
struct NamesAllowed {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

impl ClientCertVerifier for NamesAllowed {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match identity(end_entity) {
            Some(PeerIdentity(name)) if self.names.iter().any(|n| **n == *name) => Ok(verified),
            Some(PeerIdentity(name)) => Err(rustls::Error::General(format!("client certificate {name:?} is not among the allowed names"))),
            None => Err(rustls::Error::General("client certificate carries no name".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity in a verified client certificate (see [`PeerIdentity`]).
pub fn identity(certificate: &CertificateDer<'_>) -> Option<PeerIdentity> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => return Some(PeerIdentity(Arc::from(*n))),
                _ => {}
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(PeerIdentity(Arc::from(cn)))
}

/// A development certificate authority: certificates for `pixmesh up --tls` and for tests, so
/// every hop can be tried with TLS and mTLS without an outside CA. Never for production: its
/// key lives in a file beside the certificates.
pub struct DevCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// From an hour ago (clocks differ a little) for a year.
fn validity(params: &mut rcgen::CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(365 * 24 * 3600);
}

impl DevCa {
    /// A new CA named `name`, valid for a year.
    pub fn new(name: &str) -> Result<DevCa, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        validity(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(DevCa { issuer: rcgen::Issuer::new(params, key), cert_pem })
    }

    /// The CA saved earlier: its certificate and key, PEM (what [`DevCa::cert_pem`] and
    /// [`DevCa::key_pem`] gave).
    /// A key that is not the certificate's is refused: what it signed would chain to nothing.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<DevCa, TlsError> {
        let bad = |e: &dyn std::fmt::Display| TlsError::DevCa(e.to_string());
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(&e))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(&e))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(&e))?;
        if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
            return Err(TlsError::DevCa("the key is not the certificate's".into()));
        }
        let issuer = rcgen::Issuer::from_ca_cert_der(&der, key).map_err(|e| bad(&e))?;
        Ok(DevCa { issuer, cert_pem: cert_pem.to_string() })
    }

    /// The CA's certificate, PEM: what servers and clients trust.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// How long the CA's certificate stays valid from now (zero when it has expired or cannot
    /// be read).
    pub fn remaining(&self) -> Duration {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok();
        let parsed = der.as_ref().and_then(|der| x509_parser::parse_x509_certificate(der).ok());
        parsed.and_then(|(_, cert)| cert.validity().time_to_expiration()).and_then(|d| Duration::try_from(d).ok()).unwrap_or_default()
    }

    /// The CA's private key, PEM (to keep beside its certificate, readable by its owner only).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `names` (DNS names, IP addresses, or `spiffe://…` URIs; the first is
    /// also the common name), for serving (`server`) and/or for client authentication.
    pub fn issue(&self, names: &[&str], server: bool, client: bool) -> Result<Issued, rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            let san = if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                rcgen::SanType::IpAddress(ip)
            } else if name.contains("://") {
                rcgen::SanType::URI((*name).try_into()?)
            } else {
                rcgen::SanType::DnsName((*name).try_into()?)
            };
            params.subject_alt_names.push(san);
        }
        if let Some(first) = names.first() {
            params.distinguished_name.push(rcgen::DnType::CommonName, *first);
        }
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            [(server, rcgen::ExtendedKeyUsagePurpose::ServerAuth), (client, rcgen::ExtendedKeyUsagePurpose::ClientAuth)]
                .into_iter()
                .filter_map(|(wanted, usage)| wanted.then_some(usage))
                .collect();
        validity(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_reason() {
        let cert = Some(PathBuf::from("c.pem"));
        let key = Some(PathBuf::from("k.pem"));
        let only_cert = TlsConfig { cert: cert.clone(), ..TlsConfig::default() };
        assert!(only_cert.validate("gateway.tls").unwrap_err().contains("go together"));
        let mtls_without_ca = TlsConfig { cert: cert.clone(), key: key.clone(), client_auth: ClientAuth::Required, ..TlsConfig::default() };
        assert!(mtls_without_ca.validate("gateway.tls").unwrap_err().contains("needs gateway.tls.client_ca"));
        let ca_without_tls = TlsConfig { client_ca: Some("ca.pem".into()), ..TlsConfig::default() };
        assert!(ca_without_tls.validate("gateway.tls").is_err());
        assert!(TlsConfig::default().validate("gateway.tls").is_ok());
        assert!(Tls::load(&TlsConfig::default()).unwrap().is_none(), "no certificate: plain TCP");
        let names_without_client_auth =
            TlsConfig { cert: cert.clone(), key: key.clone(), allowed_names: vec!["a".into()], ..TlsConfig::default() };
        assert!(names_without_client_auth.validate("worker.tls").unwrap_err().contains("worker.tls.allowed_names needs"));
        let mtls = TlsConfig { cert, key, client_ca: Some("ca.pem".into()), client_auth: ClientAuth::Required, ..TlsConfig::default() };
        let empty_name = TlsConfig { allowed_names: vec![String::new()], ..mtls.clone() };
        assert!(empty_name.validate("worker.tls").unwrap_err().contains("empty name"));
        assert!(TlsConfig { allowed_names: vec!["distributor.pixmesh".into()], ..mtls }.validate("worker.tls").is_ok());
    }

    #[test]
    fn the_identity_is_the_first_dns_or_uri_name_else_the_common_name() {
        let ca = DevCa::new("test CA").unwrap();
        let der = |issued: &Issued| CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let dns = ca.issue(&["billing.internal", "127.0.0.1"], false, true).unwrap();
        assert_eq!(identity(&der(&dns)).unwrap().0.as_ref(), "billing.internal");
        let spiffe = ca.issue(&["spiffe://pixmesh.dev/ns/a/sa/web"], false, true).unwrap();
        assert_eq!(identity(&der(&spiffe)).unwrap().0.as_ref(), "spiffe://pixmesh.dev/ns/a/sa/web");
        let ip_only = ca.issue(&["10.0.0.7"], true, false).unwrap();
        assert_eq!(identity(&der(&ip_only)).unwrap().0.as_ref(), "10.0.0.7", "no DNS or URI name: the common name");
        assert!(identity(&CertificateDer::from(vec![1u8, 2, 3])).is_none(), "not a certificate: no identity");
        for pem in [ca.cert_pem(), dns.cert_pem] {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            assert!(cert.validity().is_valid(), "valid now: {:?}", cert.validity());
            assert!(cert.validity().time_to_expiration().unwrap() > time::Duration::days(300));
        }
    }

    #[test]
    fn a_server_config_is_built_from_issued_files_with_and_without_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let server = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
        let (cert, key, ca_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("ca.crt"));
        std::fs::write(&cert, &server.cert_pem).unwrap();
        std::fs::write(&key, &server.key_pem).unwrap();
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let plain = TlsConfig { cert: Some(cert.clone()), key: Some(key.clone()), ..TlsConfig::default() };
        assert!(Tls::load(&plain).unwrap().is_some());
        let mtls = TlsConfig { client_ca: Some(ca_file), client_auth: ClientAuth::Required, ..plain.clone() };
        assert!(Tls::load(&mtls).unwrap().is_some());
        // A key that is not the certificate's is refused, naming the problem.
        std::fs::write(&key, ca.issue(&["other"], true, false).unwrap().key_pem).unwrap();
        assert!(Tls::load(&plain).is_err());
    }

    #[test]
    fn unreadable_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let config = TlsConfig { cert: Some(empty.clone()), key: Some(empty.clone()), ..TlsConfig::default() };
        let err = Tls::load(&config).err().unwrap().to_string();
        assert!(err.contains("holds no certificate") && err.contains("empty.pem"), "{err}");
        let missing = TlsConfig { cert: Some(dir.path().join("nope.pem")), key: Some(empty), ..TlsConfig::default() };
        let err = Tls::load(&missing).err().unwrap().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }

    /// Whether a handshake over an in-memory pipe succeeds on both sides (in TLS 1.3 the
    /// client is done before the server has judged its certificate).
    async fn handshake(server: &Tls, client: &rustls::ClientConfig) -> bool {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client.clone()));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (client_side, server_side) = tokio::join!(connector.connect(name, a), server.acceptor().accept(b));
        let (Ok(mut client_side), Ok(mut server_side)) = (client_side, server_side) else {
            return false;
        };
        // A byte from the server: the client reads the session tickets sent before it, so a
        // later handshake could resume this session if resumption were on.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        server_side.write_all(b"x").await.unwrap();
        server_side.flush().await.unwrap();
        client_side.read_exact(&mut [0u8; 1]).await.is_ok()
    }

    #[tokio::test]
    async fn a_callers_rotated_ca_and_certificate_serve_the_next_handshake_unresumed_and_a_bad_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        let (ca, other_ca) = (DevCa::new("test CA").unwrap(), DevCa::new("another CA").unwrap());
        let server = ca.issue(&["localhost"], true, false).unwrap();
        write("server.pem", &server.cert_pem);
        write("server-key.pem", &server.key_pem);
        write("server-ca.pem", &ca.cert_pem());
        let listener = TlsConfig {
            cert: Some(path("server.pem")),
            key: Some(path("server-key.pem")),
            client_ca: Some(path("server-ca.pem")),
            client_auth: ClientAuth::Required,
            allowed_names: vec!["new.caller".into()],
        };
        let listener = Tls::load(&listener).unwrap().unwrap();
        let set_caller = |name: &str| {
            let issued = ca.issue(&[name], false, true).unwrap();
            write("caller.pem", &issued.cert_pem);
            write("caller-key.pem", &issued.key_pem);
        };
        // It trusts another CA and presents a name the listener does not let in.
        write("ca.pem", &other_ca.cert_pem());
        set_caller("old.caller");
        let caller = ClientTlsConfig { ca: Some(path("ca.pem")), cert: Some(path("caller.pem")), key: Some(path("caller-key.pem")) };
        let config = caller.client_config().unwrap();
        assert!(!handshake(&listener, &config).await, "the server's CA is not trusted yet");
        let after_a_look = || tokio::time::sleep(RELOAD_CHECK + Duration::from_millis(100));

        write("ca.pem", &ca.cert_pem());
        after_a_look().await;
        assert!(!handshake(&listener, &config).await, "the CA is right now, the name not yet");

        set_caller("new.caller");
        after_a_look().await;
        assert!(handshake(&listener, &config).await, "the same configuration presents the new certificate");

        // A half-written certificate, then a CA file that holds none: the ones in force stay.
        let issued = std::fs::read_to_string(path("caller.pem")).unwrap();
        write("caller.pem", &issued[..issued.len() / 2]);
        after_a_look().await;
        assert!(handshake(&listener, &config).await, "a half-written certificate is not taken");
        write("caller.pem", &issued);
        write("ca.pem", "");
        after_a_look().await;
        assert!(handshake(&listener, &config).await, "an empty CA file is not taken");
        // Back to a name the listener refuses (the files are taken together, so the CA is mended
        // too): the sessions made with the allowed one are not resumed, which would skip the
        // check.
        write("ca.pem", &ca.cert_pem());
        set_caller("old.caller");
        after_a_look().await;
        assert!(!handshake(&listener, &config).await, "a session of the old files is not resumed");
        // Without a client certificate the listener refuses; a CA without a certificate is fine.
        let anonymous = ClientTlsConfig { ca: Some(path("server-ca.pem")), ..ClientTlsConfig::default() };
        assert!(!handshake(&listener, &anonymous.client_config().unwrap()).await);
    }

    #[test]
    fn a_saved_ca_issues_again_and_knows_how_long_it_lasts() {
        let ca = DevCa::new("saved CA").unwrap();
        let days = ca.remaining().as_secs() / 86_400;
        assert!((364..=365).contains(&days), "{days} days");
        let again = DevCa::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.remaining().as_secs() / 86_400, days);
        // What the loaded CA issues verifies against the first one's certificate.
        let issued = again.issue(&["upload.pixmesh"], true, true).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        verifier.verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now()).unwrap();
        assert_eq!(identity(&cert), Some(PeerIdentity(Arc::from("upload.pixmesh"))));
        // A key that is not the CA's, or a certificate that is not one, is refused.
        assert!(DevCa::load(&ca.cert_pem(), "not a key").is_err());
        assert!(DevCa::load("not a certificate", &ca.key_pem()).is_err());
        let other = DevCa::new("another CA").unwrap();
        let mismatch = DevCa::load(&ca.cert_pem(), &other.key_pem()).err().unwrap().to_string();
        assert!(mismatch.contains("not the certificate's"), "{mismatch}");
        assert_eq!(DevCa::load(&ca.cert_pem(), &ca.key_pem()).map(|c| c.remaining() > Duration::ZERO).ok(), Some(true));
    }
}
