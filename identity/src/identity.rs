//! The identity a certificate carries, and a summary of the certificate for logs and inventories.

use std::fmt;

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{DeviceId, DeviceIdError};

/// What kind of peer a certificate identifies. The SAN URI scheme says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// An edge device: confined to its own topics.
    Device,
    /// A backend service that consumes telemetry from, or sends commands to, many devices.
    Service,
    /// A gateway broker's bridge to an upstream broker (`urn:gateway:<name>`): upstreams map it
    /// to a user of their own; a gateway broker refuses it as a client.
    Gateway,
}

impl Role {
    /// The SAN URI prefix that marks this role, e.g. `urn:device:`.
    pub const fn uri_prefix(self) -> &'static str {
        match self {
            Role::Device => "urn:device:",
            Role::Service => "urn:service:",
            Role::Gateway => "urn:gateway:",
        }
    }

    /// The SAN URI for `id` in this role, e.g. `urn:device:sensor-1`.
    pub fn san_uri(self, id: &DeviceId) -> String {
        format!("{}{}", self.uri_prefix(), id)
    }

    /// The lower-case word used in logs, configs and the registry.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Service => "service",
            Role::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a peer: its role and its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Device, service or gateway.
    pub role: Role,
    /// The validated id (a device id or a service name).
    pub id: DeviceId,
}

/// Why a certificate does not carry exactly one valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    NotACertificate(String),
    /// Neither a `urn:device:`/`urn:service:`/`urn:gateway:` SAN URI nor a subject CN was found.
    #[error("certificate has no identity: no urn:device:/urn:service:/urn:gateway: SAN URI and no subject CN")]
    Missing,
    /// More than one identity SAN URI was found, so the identity is ambiguous.
    #[error("certificate carries {0} identity SAN URIs: exactly one is allowed")]
    Ambiguous(usize),
    /// The id in the SAN URI or CN breaks the id rules.
    #[error("certificate identity {value:?} is not a valid id: {source}")]
    InvalidId {
        /// The rejected value.
        value: String,
        /// The rule it broke.
        source: DeviceIdError,
    },
    /// The subject CN names a different id than the SAN URI.
    #[error("subject CN {cn:?} does not match the SAN URI id {san:?}")]
    CnMismatch {
        /// The subject common name.
        cn: String,
        /// The id from the SAN URI.
        san: String,
    },
}

impl Identity {
    /// Reads the identity from a DER certificate.
    ///
    /// The SAN URIs come first: exactly one `urn:device:<id>`, `urn:service:<name>` or `urn:gateway:<name>` must be
    /// present, and if the subject has a CN it must equal that id. A certificate with no identity
    /// URI at all falls back to its subject CN as a device id (certificates minted by other tools).
    /// Anything else is rejected: a peer never gets an identity the issuer did not clearly give.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let cert = parse(der)?;
        Self::from_certificate(&cert)
    }

    fn from_certificate(cert: &X509Certificate<'_>) -> Result<Self, IdentityError> {
        let cn = common_name(cert);
        let from_san: Vec<(Role, &str)> = san_uris(cert)
            .into_iter()
            .filter_map(|uri| {
                [Role::Device, Role::Service, Role::Gateway]
                    .into_iter()
                    .find_map(|role| uri.strip_prefix(role.uri_prefix()).map(|id| (role, id)))
            })
            .collect();
        let (role, value) = match from_san.as_slice() {
            [] => (Role::Device, cn.clone().ok_or(IdentityError::Missing)?),
            [(role, id)] => {
                if let Some(cn) = &cn {
                    if cn != id {
                        return Err(IdentityError::CnMismatch {
                            cn: cn.clone(),
                            san: (*id).to_owned(),
                        });
                    }
                }
                (*role, (*id).to_owned())
            }
            many => return Err(IdentityError::Ambiguous(many.len())),
        };
        let id = DeviceId::parse(&value).map_err(|source| IdentityError::InvalidId { value, source })?;
        Ok(Identity { role, id })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.id)
    }
}

/// The facts about a certificate that logs and inventories record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Serial number.
    pub serial: crate::Serial,
    /// The issuer's name, DER: with the serial, what a CRL names a certificate by.
    pub issuer: Vec<u8>,
    /// SHA-256 of the DER encoding, lower-case hex.
    pub sha256: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Whether basicConstraints says CA:true.
    pub is_ca: bool,
}

impl CertificateSummary {
    /// Summarises a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        Ok(Self::of(&parse(der)?, der))
    }

    /// Summarises a DER certificate and reads its identity, parsing it once (the broker does
    /// this for every handshake).
    pub fn with_identity(der: &[u8]) -> Result<(Self, Result<Identity, IdentityError>), IdentityError> {
        let cert = parse(der)?;
        Ok((Self::of(&cert, der), Identity::from_certificate(&cert)))
    }

    fn of(cert: &X509Certificate<'_>, der: &[u8]) -> Self {
        Self {
            serial: crate::Serial::from_be_bytes(cert.raw_serial()),
            issuer: cert.issuer().as_raw().to_vec(),
            sha256: sha256_hex(der),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            common_name: common_name(cert),
            is_ca: cert.is_ca(),
        }
    }
}

/// SHA-256 of `bytes` as lower-case hex: certificate fingerprints.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(IdentityError::NotACertificate(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(IdentityError::NotACertificate(e.to_string())),
    }
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

fn san_uris<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn device_identity_comes_from_the_san_uri() {
        let id = Identity::from_der(&cert(Some("dev-1"), &["urn:device:dev-1"])).unwrap();
        assert_eq!((id.role, id.id.as_str()), (Role::Device, "dev-1"));
    }

    #[test]
    fn service_identity_comes_from_the_san_uri() {
        let id = Identity::from_der(&cert(Some("ingest"), &["urn:service:ingest"])).unwrap();
        assert_eq!((id.role, id.id.as_str()), (Role::Service, "ingest"));
    }

    #[test]
    fn gateway_identity_comes_from_the_san_uri() {
        let id = Identity::from_der(&cert(Some("site-a"), &["urn:gateway:site-a"])).unwrap();
        assert_eq!((id.role, id.id.as_str()), (Role::Gateway, "site-a"));
    }

    #[test]
    fn cn_alone_is_read_as_a_device_id() {
        let id = Identity::from_der(&cert(Some("legacy-7"), &[])).unwrap();
        assert_eq!((id.role, id.id.as_str()), (Role::Device, "legacy-7"));
    }

    #[test]
    fn certificates_without_exactly_one_valid_identity_are_rejected() {
        assert_eq!(Identity::from_der(&cert(None, &[])), Err(IdentityError::Missing));
        assert_eq!(
            Identity::from_der(&cert(None, &["urn:device:a", "urn:service:a"])),
            Err(IdentityError::Ambiguous(2))
        );
        assert!(matches!(
            Identity::from_der(&cert(Some("a"), &["urn:device:b"])),
            Err(IdentityError::CnMismatch { .. })
        ));
        assert!(matches!(
            Identity::from_der(&cert(None, &["urn:device:a/b"])),
            Err(IdentityError::InvalidId { .. })
        ));
        assert!(matches!(
            Identity::from_der(b"garbage"),
            Err(IdentityError::NotACertificate(_))
        ));
    }

    #[test]
    fn summary_reports_serial_and_fingerprint() {
        let der = cert(Some("dev-1"), &[]);
        let summary = CertificateSummary::from_der(&der).unwrap();
        assert_eq!(summary.sha256, sha256_hex(&der));
        assert_eq!(summary.common_name.as_deref(), Some("dev-1"));
        assert!(summary.not_after > summary.not_before);
    }
}
