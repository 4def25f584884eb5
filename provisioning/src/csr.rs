//! Signing certificate signing requests from devices that keep their own keys.

use std::fs;
use std::path::Path;

use fleet_identity::{DeviceId, Identity, Role};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::FromDer;

use crate::error::{Error, IoContext, Result};
use crate::issue::{sign_for_csr, Minted};
use crate::pki::Pki;

/// A CSR whose signature verified, with the device id read from its CN.
pub struct VerifiedCsr {
    /// The device id the CSR asks for.
    pub id: DeviceId,
    /// The public key to certify.
    pub public_key: rcgen::PublicKey,
}

/// Reads a CSR (PEM or DER), checks its signature and reads a valid device id from its CN.
pub fn read_csr(path: &Path) -> Result<VerifiedCsr> {
    let bytes = fs::read(path).at(path)?;
    let bad = |reason: String| Error::Csr {
        path: path.to_owned(),
        reason,
    };
    let der = if bytes.starts_with(b"-----") {
        CertificateSigningRequestDer::from_pem_slice(&bytes)
            .map_err(|e| bad(format!("not a PEM certificate signing request: {e}")))?
    } else {
        CertificateSigningRequestDer::from(bytes)
    };
    let request = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| {
        bad(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "the signature does not verify: the request was altered, or not signed by the key it contains".into()
            }
            rcgen::Error::UnsupportedExtension => {
                "requests an extension this CA does not sign; make the CSR with only a subject CN".into()
            }
            other => format!("not a usable certificate signing request: {other}"),
        })
    })?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| bad(format!("not a certificate signing request: {e}")))?;
    let cn = parsed
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("the subject has no common name (CN): the CN must be the device id".into()))?;
    let id = DeviceId::parse(cn).map_err(|source| Error::InvalidId {
        value: cn.to_owned(),
        origin: format!("CN of {}", path.display()),
        source,
    })?;
    Ok(VerifiedCsr {
        id,
        public_key: request.public_key,
    })
}

/// Signs a verified CSR as a device certificate. The profile is ours, not the request's: only
/// the public key and the id are taken from it.
pub fn sign_device_csr(pki: &Pki, csr: VerifiedCsr, validity_days: u32) -> Result<Minted> {
    if validity_days == 0 {
        return Err(Error::BadArgument {
            flag: "--validity-days",
            reason: "must be at least 1".into(),
        });
    }
    let identity = Identity {
        role: Role::Device,
        id: csr.id,
    };
    let params = crate::profile::client(&identity, &pki.fleet, validity_days)?;
    sign_for_csr(&pki.device_ca, identity, params, csr.public_key)
}
