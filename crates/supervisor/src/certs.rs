//! `pixmesh up --tls`: a development CA kept in the data dir (`tls/ca.pem`, its key beside it,
//! readable by its owner only) and, on every start, a certificate for each role, so every hop
//! between roles runs over mTLS and clients trust one file.
//!
//! A role's certificate names it (`upload.pixmesh`, `worker-1.pixmesh`: the identity servers
//! read from it) and the loopback addresses it is reached at (`localhost`, `127.0.0.1`,
//! `::1`), and serves both as a server and a client certificate.

use anyhow::Context;
use pixmesh_chassis::tls::DevCa;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TLS_DIR: &str = "tls";
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
/// A CA this close to its end is replaced (its certificates would expire within a run).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

pub struct DevPki {
    dir: PathBuf,
    ca: DevCa,
}

/// Where one role's certificate and key were written.
pub struct RoleFiles {
    pub cert: String,
    pub key: String,
}

/// How the CA came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Created,
    Existing,
    /// The old one was about to expire.
    Renewed,
}

impl DevPki {
    /// The CA in `data_dir/tls`, created on first use (or when it is within 30 days of its end).
    pub fn ensure(data_dir: &Path) -> anyhow::Result<(DevPki, Origin)> {
        let dir = data_dir.join(TLS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let mut origin = Origin::Created;
        if let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) {
            let ca = DevCa::load(&cert_pem, &key_pem)
                .with_context(|| format!("{} and {} do not hold a CA (delete them to make a new one)", cert.display(), key.display()))?;
            if ca.remaining() > RENEW_BEFORE {
                return Ok((DevPki { dir, ca }, Origin::Existing));
            }
            origin = Origin::Renewed;
        }
        let ca = DevCa::new("pixmesh development CA").context("cannot make the development CA")?;
        write(&key, &ca.key_pem(), true)?;
        write(&cert, &ca.cert_pem(), false)?;
        Ok((DevPki { dir, ca }, origin))
    }

    /// The CA certificate's path: what clients trust.
    pub fn ca_file(&self) -> String {
        self.dir.join(CA_CERT).display().to_string()
    }

    /// A new certificate for the role child `name`, written as `name.pem` and `name-key.pem`.
    pub fn issue(&self, name: &str) -> anyhow::Result<RoleFiles> {
        let identity = identity(name);
        let issued = self
            .ca
            .issue(&[identity.as_str(), "localhost", "127.0.0.1", "::1"], true, true)
            .with_context(|| format!("cannot issue a certificate for {name}"))?;
        let (cert, key) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")));
        write(&key, &issued.key_pem, true)?;
        write(&cert, &issued.cert_pem, false)?;
        Ok(RoleFiles { cert: cert.display().to_string(), key: key.display().to_string() })
    }
}

/// The name in child `name`'s certificate, what servers allow callers by: `upload.pixmesh`.
pub fn identity(name: &str) -> String {
    format!("{name}.pixmesh")
}

/// Writes `path` whole (a temporary file renamed over it), `private` ones readable by their
/// owner only.
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_made_once_and_kept_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let (first, origin) = DevPki::ensure(dir.path()).unwrap();
        assert_eq!(origin, Origin::Created);
        let ca_pem = std::fs::read_to_string(first.ca_file()).unwrap();
        let (again, origin) = DevPki::ensure(dir.path()).unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(std::fs::read_to_string(again.ca_file()).unwrap(), ca_pem, "a second start keeps the CA clients trust");
        let files = again.issue("upload").unwrap();
        for private in [dir.path().join("tls/ca-key.pem"), PathBuf::from(&files.key)] {
            assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600, "{}", private.display());
        }
        // The certificate the reloaded CA issued chains to the CA written on the first start.
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        roots.add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let cert = rustls_pki_types::CertificateDer::from_pem_file(&files.cert).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["127.0.0.1", "localhost", "upload.pixmesh"] {
            let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&cert, &[], &server_name, &[], rustls_pki_types::UnixTime::now()).unwrap();
        }
        let wrong = rustls_pki_types::ServerName::try_from("status.pixmesh").unwrap();
        assert!(verifier.verify_server_cert(&cert, &[], &wrong, &[], rustls_pki_types::UnixTime::now()).is_err());
    }

    #[test]
    fn a_damaged_ca_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(TLS_DIR)).unwrap();
        std::fs::write(dir.path().join("tls/ca.pem"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("tls/ca-key.pem"), "not a key").unwrap();
        let e = DevPki::ensure(dir.path()).err().unwrap();
        assert!(format!("{e:#}").contains("delete them"), "{e:#}");
    }
}
