//! Loading certificates, private keys and CRLs from files, with errors that name the file.
//!
//! Every file may be PEM; CRL files may also be raw DER (what some CA tools write).

use std::fs;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self as pki_pem, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A file that could not be loaded, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: PemProblem,
}

/// What is wrong with a PEM file.
#[derive(Debug, thiserror::Error)]
pub enum PemProblem {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    /// The file is not valid PEM.
    #[error("not valid PEM: {0}")]
    Malformed(String),
    /// The file holds no object of the expected kind.
    #[error("contains no {0}")]
    Missing(&'static str),
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    fs::read(path).map_err(|e| error(path, PemProblem::Read(e)))
}

fn error(path: &Path, problem: PemProblem) -> PemError {
    PemError {
        path: path.to_owned(),
        problem,
    }
}

fn malformed(path: &Path, e: pki_pem::Error) -> PemError {
    error(path, PemProblem::Malformed(e.to_string()))
}

/// Loads every certificate in a PEM file, in file order (leaf first for a chain). At least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    parse_certs(&read(path)?).map_err(|problem| error(path, problem))
}

/// Parses every certificate in PEM bytes; at least one must be present.
pub fn parse_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemProblem> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemProblem::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemProblem::Missing("CERTIFICATE block"));
    }
    Ok(certs)
}

/// Loads the private key (PKCS#8, SEC1 or PKCS#1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pki_pem::Error::NoItemsFound => error(path, PemProblem::Missing("PRIVATE KEY block")),
        e => malformed(path, e),
    })
}

/// Loads every CRL in a file: PEM `X509 CRL` blocks, or a single raw DER CRL. At least one.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let bytes = read(path)?;
    if !bytes.starts_with(b"-----") && bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(path, e))?;
    if crls.is_empty() {
        return Err(error(path, PemProblem::Missing("X509 CRL block")));
    }
    Ok(crls)
}

/// The DER prefix of an Ed25519 PKCS#8 v2 key (RFC 5958) as ring and aws-lc-rs write it:
/// version 1, the algorithm, the 32-byte seed; the public key follows.
const ED25519_PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The DER prefix of the same key as PKCS#8 v1 (RFC 5208), which ends after the seed.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A PKCS#8 private key in the form every common TLS stack reads, for writing to a key file.
/// An Ed25519 key in PKCS#8 v2 (with its public key, as ring and aws-lc-rs write it) becomes
/// PKCS#8 v1 without the public key: OpenSSL 3.0 refuses the v2 form ("unsupported"), and with
/// it Python's `ssl`, `mosquitto_pub` and most device stacks built on OpenSSL. Every other key
/// is returned as it is.
pub fn portable_pkcs8(der: &[u8]) -> Vec<u8> {
    match der
        .strip_prefix(&ED25519_PKCS8_V2_PREFIX[..])
        .and_then(|rest| rest.get(..32))
    {
        Some(seed) => [&ED25519_PKCS8_V1_PREFIX[..], seed].concat(),
        None => der.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleet-identity-pem-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn ed25519_keys_become_pkcs8_v1_without_the_public_key_and_others_stay() {
        let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let v2 = ed25519.serialized_der();
        assert_eq!(&v2[..16], &ED25519_PKCS8_V2_PREFIX[..], "what the key library writes");
        let v1 = portable_pkcs8(v2);
        assert_eq!(v1.len(), 48, "version 0, the algorithm and the seed, nothing more");
        assert_eq!(&v1[..16], &ED25519_PKCS8_V1_PREFIX[..]);
        assert_eq!(&v1[16..], &v2[16..48], "the same seed");
        let ecdsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(portable_pkcs8(ecdsa.serialized_der()), ecdsa.serialized_der());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let missing = Path::new("/nonexistent/device.crt");
        let msg = load_certs(missing).unwrap_err().to_string();
        assert!(msg.starts_with("/nonexistent/device.crt: cannot read"), "{msg}");

        let empty = temp_file("empty.crt", b"hello\n");
        let msg = load_certs(&empty).unwrap_err().to_string();
        assert!(
            msg.contains("empty.crt") && msg.contains("no CERTIFICATE block"),
            "{msg}"
        );

        let msg = load_key(&empty).unwrap_err().to_string();
        assert!(msg.contains("no PRIVATE KEY block"), "{msg}");

        let msg = load_crls(&empty).unwrap_err().to_string();
        assert!(msg.contains("no X509 CRL block"), "{msg}");
    }

    #[test]
    fn loads_a_generated_certificate_and_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = temp_file("ok.crt", cert.pem().as_bytes());
        let key_path = temp_file("ok.key", key.serialize_pem().as_bytes());
        assert_eq!(load_certs(&cert_path).unwrap()[0].as_ref(), cert.der().as_ref());
        assert!(load_key(&key_path).is_ok());
    }
}
