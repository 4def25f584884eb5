//! The PKI directory: two CAs, the CRL and the registry, created once and opened for every
//! other command.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_identity::pem::load_certs;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, GenerateContext, IoContext, Result};
use crate::key_type::KeyType;
use crate::output::{create_private_dir, write_new, Overwrite, KEY_MODE, PUBLIC_MODE};
use crate::profile::{self, CaKind};
use crate::registry::Registry;
use crate::revocation::{publish_crl, DEFAULT_NEXT_UPDATE_DAYS};

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
        publish_crl(&dir.join(CRL), &device_ca, 1, &[], DEFAULT_NEXT_UPDATE_DAYS)
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
        key.serialize_pem().as_bytes(),
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
