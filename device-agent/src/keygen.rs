//! Keys made on the device, and the CSR that carries the public half to `provision sign-csr`.
//!
//! A small DER writer over ring instead of rcgen keeps the agent's dependency tree and binary
//! small: a PKCS#10 request is a handful of fixed structures.

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
};

/// Key types a device can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA P-256 (the default).
    #[default]
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA P-384.
    #[value(name = "ecdsa-p384")]
    EcdsaP384,
    /// Ed25519.
    #[value(name = "ed25519")]
    Ed25519,
}

/// Why a key or CSR could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate the key or CSR: {0}")]
pub struct KeygenError(String);

impl KeygenError {
    /// An error with this reason.
    pub fn new(reason: String) -> Self {
        Self(reason)
    }
}

/// A private key (PKCS#8 PEM) and its CSR (PEM).
pub struct KeyAndCsr {
    /// `-----BEGIN PRIVATE KEY-----`.
    pub key_pem: String,
    /// `-----BEGIN CERTIFICATE REQUEST-----`.
    pub csr_pem: String,
    /// The public key's SubjectPublicKeyInfo, DER: what the certificate must carry.
    pub public_key_info: Vec<u8>,
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn sequence(parts: &[Vec<u8>]) -> Vec<u8> {
    der(0x30, &parts.concat())
}

fn oid(bytes: &[u8]) -> Vec<u8> {
    der(0x06, bytes)
}

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    der(0x03, &[&[0u8][..], bytes].concat())
}

/// `der` as a PEM block labelled `label`, 64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Generates a key of `key_type` and a CSR whose subject is `CN=<common_name>`.
pub fn generate(key_type: KeyType, common_name: &str) -> Result<KeyAndCsr, KeygenError> {
    let rng = SystemRandom::new();
    let fail = |e: &dyn std::fmt::Display| KeygenError(e.to_string());
    let subject = sequence(&[der(
        0x31,
        &sequence(&[oid(OID_COMMON_NAME), der(0x0c, common_name.as_bytes())]),
    )]);
    type Signer = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, KeygenError>>;
    let (pkcs8, spki, signature_alg, signer): (Vec<u8>, Vec<u8>, Vec<u8>, Signer) = match key_type {
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let (alg, curve, sig_oid) = match key_type {
                KeyType::EcdsaP256 => (&ECDSA_P256_SHA256_ASN1_SIGNING, OID_P256, OID_ECDSA_SHA256),
                _ => (&ECDSA_P384_SHA384_ASN1_SIGNING, OID_P384, OID_ECDSA_SHA384),
            };
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| fail(&e))?;
            let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| fail(&e))?;
            let spki_alg = sequence(&[oid(OID_EC_PUBLIC_KEY), oid(curve)]);
            let public = pair.public_key().as_ref().to_vec();
            let signer = move |data: &[u8]| {
                pair.sign(&SystemRandom::new(), data)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|e| KeygenError(e.to_string()))
            };
            (
                pkcs8.as_ref().to_vec(),
                sequence(&[spki_alg, bit_string(&public)]),
                sequence(&[oid(sig_oid)]),
                Box::new(signer),
            )
        }
        KeyType::Ed25519 => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| fail(&e))?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| fail(&e))?;
            let public = pair.public_key().as_ref().to_vec();
            let signer = move |data: &[u8]| Ok(pair.sign(data).as_ref().to_vec());
            (
                pkcs8.as_ref().to_vec(),
                sequence(&[sequence(&[oid(OID_ED25519)]), bit_string(&public)]),
                sequence(&[oid(OID_ED25519)]),
                Box::new(signer),
            )
        }
    };
    // CertificationRequestInfo: version 0, subject, SubjectPublicKeyInfo, empty attributes [0].
    let info = sequence(&[der(0x02, &[0]), subject, spki.clone(), der(0xa0, &[])]);
    let signature = signer(&info)?;
    let csr = sequence(&[info, signature_alg, bit_string(&signature)]);
    Ok(KeyAndCsr {
        // In the form every TLS stack reads (Ed25519: PKCS#8 v1), not ring's PKCS#8 v2.
        key_pem: pem("PRIVATE KEY", &fleet_identity::pem::portable_pkcs8(&pkcs8)),
        csr_pem: pem("CERTIFICATE REQUEST", &csr),
        public_key_info: spki,
    })
}
