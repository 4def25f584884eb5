//! Signing certificate signing requests from devices that keep their own keys: from a file
//! (`provision sign-csr`) or from an MQTT renewal request (`provision serve`).

use std::fs;
use std::path::Path;

use fleet_identity::{DeviceId, DeviceIdError, Identity, Role};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::FromDer;

use crate::error::{Error, IoContext, Result};
use crate::issue::{sign_for_csr, Minted};
use crate::pki::Pki;
use crate::validity::Validity;

/// A CSR whose signature verified, with the device id read from its CN.
pub struct VerifiedCsr {
    /// The device id the CSR asks for.
    pub id: DeviceId,
    /// The public key to certify.
    pub public_key: rcgen::PublicKey,
    /// The SAN URIs the request asks for, if any (only `urn:device:<id>` is ever signed: the
    /// profile is ours, but a request naming another identity is refused by the issuer).
    pub san_uris: Vec<String>,
}

/// Why a CSR is unusable: distinct, because a renewal refusal tells the device which it was.
#[derive(Debug, thiserror::Error)]
pub enum CsrProblem {
    /// Not a PKCS#10 request at all.
    #[error("not a usable certificate signing request: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("the signature does not verify: the request was altered, or not signed by the key it contains")]
    BadSignature,
    /// An extension this CA does not sign.
    #[error("requests an extension this CA does not sign; make the CSR with only a subject CN")]
    UnsupportedExtension,
    /// No subject CN.
    #[error("the subject has no common name (CN): the CN must be the device id")]
    NoCommonName,
    /// The CN breaks the id rules.
    #[error("the CN {value:?} is not a valid device id: {source}")]
    InvalidId {
        /// The CN.
        value: String,
        /// The rule it broke.
        source: DeviceIdError,
    },
}

/// Reads a CSR (PEM or DER), checks its signature and reads a valid device id from its CN.
pub fn read_csr(path: &Path) -> Result<VerifiedCsr> {
    let bytes = fs::read(path).at(path)?;
    parse_csr(&bytes).map_err(|problem| match problem {
        CsrProblem::InvalidId { value, source } => Error::InvalidId {
            value,
            origin: format!("CN of {}", path.display()),
            source,
        },
        problem => Error::Csr {
            path: path.to_owned(),
            reason: problem.to_string(),
        },
    })
}

/// Parses a CSR (PEM or DER), checks its signature and reads a valid device id from its CN.
pub fn parse_csr(bytes: &[u8]) -> Result<VerifiedCsr, CsrProblem> {
    let der = if bytes.starts_with(b"-----") {
        CertificateSigningRequestDer::from_pem_slice(bytes)
            .map_err(|e| CsrProblem::Malformed(format!("not a PEM certificate signing request: {e}")))?
    } else {
        CertificateSigningRequestDer::from(bytes.to_vec())
    };
    let request = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrProblem::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrProblem::UnsupportedExtension,
        other => CsrProblem::Malformed(other.to_string()),
    })?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| CsrProblem::Malformed(e.to_string()))?;
    let cn = parsed
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(CsrProblem::NoCommonName)?;
    let id = DeviceId::parse(cn).map_err(|source| CsrProblem::InvalidId {
        value: cn.to_owned(),
        source,
    })?;
    let san_uris = request
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            rcgen::SanType::URI(uri) => uri.as_str().to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    Ok(VerifiedCsr {
        id,
        public_key: request.public_key,
        san_uris,
    })
}

/// Signs a verified CSR as a device certificate. The profile is ours, not the request's: only
/// the public key and the id are taken from it.
pub fn sign_device_csr(pki: &Pki, csr: VerifiedCsr, validity: Validity) -> Result<Minted> {
    let identity = Identity {
        role: Role::Device,
        id: csr.id,
    };
    let params = crate::profile::client(&identity, &pki.fleet, validity)?;
    sign_for_csr(&pki.device_ca, identity, params, csr.public_key)
}
