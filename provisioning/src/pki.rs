//! The PKI directory: two CAs, the CRL and the registry, created once and opened for every
//! other command, and the steps that must change them in a fixed order (the registry first, then
//! the files: see [`crate::registry`]).

use std::fs;
use std::path::{Path, PathBuf};

use fleet_identity::pem::load_certs;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, GenerateContext, IoContext, Result};
use crate::fault;
use crate::key_type::{private_key_pem, KeyType};
use crate::output::{create_private_dir, replace_atomically, write_new, Overwrite, KEY_MODE, PUBLIC_MODE};
use crate::profile::{self, CaKind};
use crate::registry::{Issued, Registry, RevokeTarget};
use crate::revocation::{validate_next_update_days, write_crl, Reason, DEFAULT_NEXT_UPDATE_DAYS};

/// Device CA certificate: the broker's client trust anchor.
pub const DEVICE_CA_CERT: &str = "device-ca.crt";
/// Device CA private key.
pub const DEVICE_CA_KEY: &str = "device-ca.key";
/// Broker CA certificate: the devices' only trust anchor.
pub const BROKER_CA_CERT: &str = "broker-ca.crt";
/// Broker CA private key.
pub const BROKER_CA_KEY: &str = "broker-ca.key";
/// The device CA's CRL.
pub const CRL: &str = "crl.pem";
/// The inventory database.
pub const REGISTRY: &str = "registry.db";

/// Every file `init` creates, in the order `open` checks them.
const PKI_FILES: [&str; 6] = [
    DEVICE_CA_CERT,
    DEVICE_CA_KEY,
    BROKER_CA_CERT,
    BROKER_CA_KEY,
    CRL,
    REGISTRY,
];

/// Options for `provision init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Organisation name written into every certificate.
    pub fleet: String,
    /// Key type of both CAs.
    pub key_type: KeyType,
    /// CA validity.
    pub ca_validity_days: u32,
}

/// A CA ready to sign.
pub struct CertificateAuthority {
    /// The CA certificate as PEM (what bundles copy).
    pub cert_pem: String,
    /// The CA certificate as DER.
    pub cert_der: CertificateDer<'static>,
    /// The signer.
    pub issuer: Issuer<'static, KeyPair>,
}

/// An opened PKI directory.
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
    /// The fleet name recorded at init.
    pub fleet: String,
    /// Signs devices, services and the CRL.
    pub device_ca: CertificateAuthority,
    /// Signs broker certificates.
    pub broker_ca: CertificateAuthority,
    /// The inventory.
    pub registry: Registry,
}

impl Pki {
    /// Creates a new PKI in `dir` (created if missing). Refuses a directory that holds any PKI
    /// file; on failure, removes what it wrote.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<()> {
        validate_fleet(&options.fleet)?;
        if options.ca_validity_days == 0 {
            return Err(Error::BadArgument {
                flag: "--ca-validity-days",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(existing) = PKI_FILES.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
            return Err(Error::PkiExists {
                dir: dir.to_owned(),
                existing,
            });
        }
        create_private_dir(dir)?;
        let created = Self::write_new_pki(dir, options);
        if created.is_err() {
            for file in PKI_FILES {
                let _ = fs::remove_file(dir.join(file));
            }
        }
        created
    }

    fn write_new_pki(dir: &Path, options: &InitOptions) -> Result<()> {
        let device_ca = new_ca(dir, CaKind::Device, DEVICE_CA_CERT, DEVICE_CA_KEY, options)?;
        new_ca(dir, CaKind::Broker, BROKER_CA_CERT, BROKER_CA_KEY, options)?;
        Registry::create(&dir.join(REGISTRY), &options.fleet)?;
        write_crl(&dir.join(CRL), &device_ca, 1, &[], DEFAULT_NEXT_UPDATE_DAYS)
    }

    /// Opens the PKI in `dir`, checking every file is there and each CA key matches its
    /// certificate.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotAPki {
                dir: dir.to_owned(),
                missing: "the directory itself",
            });
        }
        if let Some(missing) = PKI_FILES.iter().find(|f| !dir.join(f).exists()) {
            return Err(Error::NotAPki {
                dir: dir.to_owned(),
                missing,
            });
        }
        let registry = Registry::open(&dir.join(REGISTRY))?;
        Ok(Self {
            fleet: registry.fleet()?,
            device_ca: load_ca(&dir.join(DEVICE_CA_CERT), &dir.join(DEVICE_CA_KEY))?,
            broker_ca: load_ca(&dir.join(BROKER_CA_CERT), &dir.join(BROKER_CA_KEY))?,
            registry,
            dir: dir.to_owned(),
        })
    }

    /// Path of the CRL file.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL)
    }

    /// Records newly issued certificates (see [`Registry::record`]), then writes their files
    /// with `write`. If writing fails, the error says the certificates are recorded and what to
    /// do about them.
    pub fn record_then_write(
        &mut self,
        issued: &[Issued],
        rotate: bool,
        write: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        fault::point("issue-minted");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.registry.record(issued, rotate, now)?;
        fault::point("issue-recorded");
        write(self).map_err(|source| Error::RecordedNotWritten {
            pki: self.dir.clone(),
            serials: issued.iter().map(|cert| cert.serial.clone()).collect(),
            source: Box::new(source),
        })
    }

    /// Revokes what `target` selects and publishes the CRL that lists it, as `provision revoke`
    /// does. Returns the serials revoked.
    ///
    /// The revocation is committed before the CRL is written; if writing fails, the error says
    /// the revocation stands and that `provision crl` publishes it.
    pub fn revoke_and_publish(
        &mut self,
        target: &RevokeTarget,
        reason: Reason,
        next_update_days: u32,
    ) -> Result<Vec<String>> {
        validate_next_update_days(next_update_days)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let serials = self.registry.revoke(target, reason.as_str(), now)?;
        if serials.is_empty() {
            return Ok(serials);
        }
        fault::point("revoke-after-commit");
        self.write_committed_crl(next_update_days)
            .map_err(|source| Error::CrlNotPublished {
                pki: self.dir.clone(),
                serials: serials.clone(),
                source: Box::new(source),
            })?;
        Ok(serials)
    }

    /// Re-signs the CRL with the registry's revoked set under a fresh number and a fresh
    /// nextUpdate, as `provision crl` does (from cron, and after a revocation whose CRL was not
    /// written).
    pub fn publish_crl(&mut self, next_update_days: u32) -> Result<()> {
        validate_next_update_days(next_update_days)?;
        self.registry.advance_crl_number()?;
        self.write_committed_crl(next_update_days)
    }

    /// Copies the CRL, as it is now, into each of `dirs` as `crl.pem`, each atomically
    /// (a temporary file beside it, then a rename): one gateway's broker after another picks up
    /// the same revocations, never a half-written file. Returns the files written.
    pub fn deliver_crl(&self, dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let path = self.crl_path();
        let crl = fs::read(&path).at(&path)?;
        dirs.iter()
            .map(|dir| {
                let target = dir.join(CRL);
                replace_atomically(&target, &crl, PUBLIC_MODE)?;
                Ok(target)
            })
            .collect()
    }

    fn write_committed_crl(&mut self, next_update_days: u32) -> Result<()> {
        let path = self.crl_path();
        let ca = &self.device_ca;
        self.registry
            .publish_committed_crl(|number, revoked| write_crl(&path, ca, number, revoked, next_update_days))
    }
}

fn validate_fleet(fleet: &str) -> Result<()> {
    if fleet.trim().is_empty() || fleet.len() > 64 || fleet.chars().any(char::is_control) {
        return Err(Error::BadArgument {
            flag: "--fleet",
            reason: format!("{fleet:?} must be 1 to 64 printable characters"),
        });
    }
    Ok(())
}

fn new_ca(
    dir: &Path,
    kind: CaKind,
    cert_file: &str,
    key_file: &str,
    options: &InitOptions,
) -> Result<CertificateAuthority> {
    let key = options.key_type.generate()?;
    let params = profile::ca(kind, &options.fleet, options.ca_validity_days);
    let cert = params.self_signed(&key).generating(kind.title())?;
    write_new(
        &dir.join(key_file),
        private_key_pem(&key).as_bytes(),
        KEY_MODE,
        Overwrite::Refuse,
    )?;
    write_new(
        &dir.join(cert_file),
        cert.pem().as_bytes(),
        PUBLIC_MODE,
        Overwrite::Refuse,
    )?;
    Ok(CertificateAuthority {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    })
}

fn load_ca(cert_path: &Path, key_path: &Path) -> Result<CertificateAuthority> {
    let cert_der = load_certs(cert_path)?.remove(0);
    let cert_pem = fs::read_to_string(cert_path).at(cert_path)?;
    let key_pem = fs::read_to_string(key_path).at(key_path)?;
    let bad_key = |reason: String| Error::CaKey {
        path: key_path.to_owned(),
        reason,
    };
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| bad_key(format!("not a usable private key ({e}); restore it from your backup")))?;
    let (_, parsed) = X509Certificate::from_der(&cert_der).map_err(|e| Error::CaKey {
        path: cert_path.to_owned(),
        reason: format!("not a valid certificate: {e}"),
    })?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad_key(format!(
            "does not match the certificate in {}",
            cert_path.display()
        )));
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| Error::CaKey {
        path: cert_path.to_owned(),
        reason: format!("cannot be used as an issuer: {e}"),
    })?;
    Ok(CertificateAuthority {
        cert_pem,
        cert_der,
        issuer,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::ListFilter;

    /// A new PKI in `dir` for the unit tests of this crate.
    pub(crate) fn test_pki(dir: &Path) -> Pki {
        let options = InitOptions {
            fleet: "acme".into(),
            key_type: KeyType::EcdsaP256,
            ca_validity_days: 1,
        };
        Pki::init(dir, &options).unwrap();
        Pki::open(dir).unwrap()
    }

    /// Device `dev-1`'s certificate of serial `1a2b`, valid until `not_after`, not yet recorded.
    pub(crate) fn test_device(not_after: i64) -> Issued {
        Issued {
            id: "dev-1".into(),
            role: "device",
            serial: "1a2b".into(),
            fingerprint: "00".into(),
            not_before: 0,
            not_after,
        }
    }

    #[test]
    fn a_write_that_fails_after_recording_says_the_certificate_is_recorded_and_how_to_revoke_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = test_pki(dir.path());
        let issued = test_device(i64::MAX);
        let err = pki
            .record_then_write(&[issued], false, |_| {
                Err(Error::OutputExists(dir.path().join("out/dev-1")))
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("out/dev-1: already exists")
                && err.contains("records 1 certificate (serial 1a2b) as active")
                && err.contains("it did not reach the output folder in full")
                && err.contains("provision revoke --pki"),
            "{err}"
        );
        let rows = pki.registry.list(&ListFilter::default(), 0).unwrap();
        assert_eq!((rows.len(), rows[0].status.as_str()), (1, "active"));
    }
}
