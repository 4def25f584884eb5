//! Certificate profiles: exactly which fields each kind of certificate carries.

use std::net::IpAddr;

use fleet_identity::Identity;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::serial::random_serial;
use crate::validity::Validity;

/// Which of the two CAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaKind {
    /// Signs device and service certificates and the CRL; the broker trusts it for clients.
    Device,
    /// Signs broker server certificates; devices trust it and nothing else.
    Broker,
}

impl CaKind {
    /// Words for the CA's common name.
    pub fn title(self) -> &'static str {
        match self {
            CaKind::Device => "device CA",
            CaKind::Broker => "broker CA",
        }
    }
}

fn base(fleet: &str, common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, fleet);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - validity.backdate();
    params.not_after = now + validity.duration();
    params.serial_number = Some(random_serial());
    params
}

/// A self-signed CA: CA:true with pathlen 0, keyCertSign + cRLSign.
///
/// Its subject carries a random `OU=ca-<hex>`, so a new CA made for a rollover never has the
/// same name as the one it replaces: a broker trusting both must tell them apart.
pub fn ca(kind: CaKind, fleet: &str, validity_days: u32) -> CertificateParams {
    let mut params = base(
        fleet,
        &format!("{fleet} {}", kind.title()),
        Validity::days(validity_days),
    );
    let generation = hex::encode(&random_serial().to_bytes()[..4]);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, format!("ca-{generation}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn leaf(params: &mut CertificateParams, eku: ExtendedKeyUsagePurpose) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
}

/// A device or service client certificate: CN = id, O = fleet, SAN URI `urn:<role>:<id>`,
/// EKU clientAuth only.
pub fn client(identity: &Identity, fleet: &str, validity: Validity) -> Result<CertificateParams> {
    let mut params = base(fleet, identity.id.as_str(), validity);
    leaf(&mut params, ExtendedKeyUsagePurpose::ClientAuth);
    let uri = identity.role.san_uri(&identity.id);
    let uri = rcgen::string::Ia5String::try_from(uri.as_str()).map_err(|e| Error::BadArgument {
        flag: "--id",
        reason: format!("cannot encode {uri:?} as a SAN URI: {e}"),
    })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    Ok(params)
}

/// A broker server certificate: EKU serverAuth, SANs from the DNS names and IP addresses given.
pub fn broker(fleet: &str, dns: &[String], ips: &[IpAddr], validity_days: u32) -> Result<CertificateParams> {
    let common_name = dns
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .ok_or(Error::BadArgument {
            flag: "--dns/--ip",
            reason: "give at least one name or address the devices will use to reach the broker".into(),
        })?;
    let mut params = base(fleet, &common_name, Validity::days(validity_days));
    leaf(&mut params, ExtendedKeyUsagePurpose::ServerAuth);
    for name in dns {
        let encoded = rcgen::string::Ia5String::try_from(name.as_str()).map_err(|e| Error::BadArgument {
            flag: "--dns",
            reason: format!("{name:?} is not a DNS name: {e}"),
        })?;
        params.subject_alt_names.push(SanType::DnsName(encoded));
    }
    params
        .subject_alt_names
        .extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(params)
}
