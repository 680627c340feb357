//! A throwaway public-key infrastructure: one CA and the certificates it
//! signs, for `corral dev` (TLS on by default, with no files to provide)
//! and for tests (a second CA, an expired certificate).
//!
//! A real cluster brings its own CA (cert-manager, Vault, an operator's
//! openssl): nothing here is needed there.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::{TlsError, TlsFiles};

fn generate_error(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub enum Validity {
    /// From an hour ago until this many days from now.
    Days(i64),
    /// Valid for a day that ended yesterday (for tests of refusals).
    Expired,
}

impl Validity {
    fn apply(self, params: &mut CertificateParams) {
        let now = OffsetDateTime::now_utc();
        let (from, until) = match self {
            Validity::Days(days) => (now - Duration::hours(1), now + Duration::days(days)),
            Validity::Expired => (now - Duration::days(2), now - Duration::days(1)),
        };
        params.not_before = from;
        params.not_after = until;
    }
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Write the certificate to `cert` and the key to `key` (mode 0600).
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        write_file(cert, &self.cert_pem, 0o644)?;
        write_file(key, &self.key_pem, 0o600)
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Write beside and rename, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// A certificate authority that lives in memory.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    /// A new CA named `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Pki, TlsError> {
        let key = KeyPair::generate().map_err(generate_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Validity::Days(3650).apply(&mut params);
        let cert = params.self_signed(&key).map_err(generate_error)?;
        Ok(Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, in PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate for `common_name`, good as a server's (for each of
    /// `names`: DNS names or IP addresses) and as a client's.
    pub fn issue(
        &self,
        common_name: &str,
        names: &[&str],
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(generate_error)?;
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(generate_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Write the CA certificate to `path`.
    pub fn write_ca(&self, path: &Path) -> Result<(), TlsError> {
        write_file(path, &self.ca_pem, 0o644)
    }
}

/// The names a certificate for processes on this machine's loopback carries.
pub const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Make (or keep, if it is there) a throwaway CA and one certificate for
/// every process on this machine's loopback under `dir`: `ca.pem`,
/// `corral.pem`, `corral-key.pem`. The CA's key is never written: nothing
/// else can be signed by it once this returns.
pub fn loopback_identity(dir: &Path) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles {
        cert: dir.join("corral.pem"),
        key: dir.join("corral-key.pem"),
        ca: dir.join("ca.pem"),
    };
    if [&files.cert, &files.key, &files.ca]
        .iter()
        .all(|p| p.exists())
    {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: PathBuf::from(dir),
        source,
    })?;
    let pki = Pki::new("corral dev CA")?;
    pki.issue("corral", LOOPBACK_NAMES, Validity::Days(365))?
        .write(&files.cert, &files.key)?;
    pki.write_ca(&files.ca)?;
    Ok(files)
}
