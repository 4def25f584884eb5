//! Minting client certificates (devices and services) and writing their bundles.
//!
//! Certificates and keys are minted in memory and recorded in the registry; only then are the
//! bundles written, all into a staging folder first and then moved into place together.

use std::path::Path;

use fleet_identity::{BrokerUrl, CertificateSummary, DeviceId, Identity, Role};
use rcgen::CertificateParams;

use crate::error::{Error, GenerateContext, Result};
use crate::fault;
use crate::key_type::{private_key_pem, KeyType};
use crate::output::{create_private_dir, ensure_writable, write_new, Overwrite, KEY_MODE, PUBLIC_MODE};
use crate::parallel;
use crate::pki::{CertificateAuthority, Pki, BROKER_CA_CERT};
use crate::registry::Issued;
use crate::staging::Staging;
use crate::validity::Validity;

/// Default validity of a device or service certificate: three years.
pub const DEFAULT_LEAF_VALIDITY_DAYS: u32 = 3 * 365;

/// A freshly signed certificate and, when this tool generated it, its private key.
pub struct Minted {
    /// Whose certificate it is.
    pub identity: Identity,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (absent for certificates signed from a CSR).
    pub key_pem: Option<String>,
    /// What the registry records.
    pub issued: Issued,
}

/// Generates a key and signs a client certificate for `identity` with the device CA.
pub fn mint_client(
    ca: &CertificateAuthority,
    fleet: &str,
    identity: Identity,
    key_type: KeyType,
    validity: Validity,
) -> Result<Minted> {
    let key = key_type.generate()?;
    let params = crate::profile::client(&identity, fleet, validity)?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .generating(format!("the certificate of {identity}"))?;
    let issued = issued_record(identity.id.as_str(), identity.role.as_str(), cert.der())?;
    Ok(Minted {
        identity,
        cert_pem: cert.pem(),
        key_pem: Some(private_key_pem(&key)),
        issued,
    })
}

/// Signs `params` for the public key of a verified CSR.
pub fn sign_for_csr(
    ca: &CertificateAuthority,
    identity: Identity,
    params: CertificateParams,
    public_key: rcgen::PublicKey,
) -> Result<Minted> {
    let request = rcgen::CertificateSigningRequestParams { params, public_key };
    let cert = request
        .signed_by(&ca.issuer)
        .generating(format!("the certificate of {identity}"))?;
    let issued = issued_record(identity.id.as_str(), identity.role.as_str(), cert.der())?;
    Ok(Minted {
        identity,
        cert_pem: cert.pem(),
        key_pem: None,
        issued,
    })
}

/// What the registry records for a certificate, read back from its DER encoding.
pub fn issued_record(id: &str, role: &'static str, der: &[u8]) -> Result<Issued> {
    let summary = CertificateSummary::from_der(der)
        .map_err(|e| Error::NotFound(format!("the certificate just signed does not parse: {e}")))?;
    Ok(Issued {
        id: id.to_owned(),
        role,
        serial: summary.serial.to_string(),
        fingerprint: summary.sha256,
        not_before: summary.not_before,
        not_after: summary.not_after,
    })
}

/// File names of a client bundle, by role.
fn bundle_names(role: Role) -> (&'static str, &'static str) {
    match role {
        Role::Device => ("device.crt", "device.key"),
        Role::Service => ("service.crt", "service.key"),
        Role::Gateway => ("gateway.crt", "gateway.key"),
    }
}

/// Name of the agent configuration in a device bundle.
pub const AGENT_CONFIG: &str = "agent.toml";

/// Writes a bundle into `dir` (created, owner-only): certificate, key, the broker CA, and, given
/// the broker's URL (devices), an `agent.toml` that points at them.
pub fn write_bundle(
    dir: &Path,
    minted: &Minted,
    broker_ca: &CertificateAuthority,
    broker_url: Option<&BrokerUrl>,
) -> Result<()> {
    create_private_dir(dir)?;
    let (cert_name, key_name) = bundle_names(minted.identity.role);
    write_new(
        &dir.join(cert_name),
        minted.cert_pem.as_bytes(),
        PUBLIC_MODE,
        Overwrite::Refuse,
    )?;
    fault::point("bundle-cert-written");
    if let Some(key) = &minted.key_pem {
        write_new(&dir.join(key_name), key.as_bytes(), KEY_MODE, Overwrite::Refuse)?;
    }
    write_new(
        &dir.join(BROKER_CA_CERT),
        broker_ca.cert_pem.as_bytes(),
        PUBLIC_MODE,
        Overwrite::Refuse,
    )?;
    if let Some(broker_url) = broker_url {
        let config = agent_config(&minted.identity, broker_url);
        write_new(
            &dir.join(AGENT_CONFIG),
            config.as_bytes(),
            PUBLIC_MODE,
            Overwrite::Refuse,
        )?;
    }
    Ok(())
}

/// The `agent.toml` for a device: the broker to reach and the bundle's files, by relative path.
pub fn agent_config(identity: &Identity, broker_url: &BrokerUrl) -> String {
    format!(
        "# Device agent configuration for device \"{id}\", written by `provision`.\n\
         # Paths are relative to this file. The client id is read from device.crt.\n\
         broker_url = \"{broker_url}\"\n\
         server_name = \"{host}\"\n\
         ca = \"{BROKER_CA_CERT}\"\n\
         cert = \"device.crt\"\n\
         key = \"device.key\"\n",
        id = identity.id,
        host = broker_url.host,
    )
}

/// Writes the bundle of each of `minted` (on up to `jobs` threads) into `staging`, then moves
/// them all into `OUT/<id>/` together, replacing old ones only if `overwrite` allows.
pub fn write_bundles(
    staging: Staging,
    minted: &[Minted],
    broker_ca: &CertificateAuthority,
    broker_url: Option<&BrokerUrl>,
    overwrite: Overwrite,
    jobs: usize,
) -> Result<()> {
    parallel::try_map(minted, jobs, |minted| {
        write_bundle(
            &staging.path(minted.identity.id.as_str()),
            minted,
            broker_ca,
            broker_url,
        )
    })?;
    let ids: Vec<&str> = minted.iter().map(|minted| minted.identity.id.as_str()).collect();
    staging.swap_in(&ids, overwrite)
}

/// Issues a named client identity that is not a device (a backend service, or a gateway's bridge
/// to its upstream) and writes `OUT/<name>/` (`<role>.crt`, `<role>.key`, broker-ca.crt).
pub fn issue_named(
    pki: &mut Pki,
    role: Role,
    name: &DeviceId,
    out: &Path,
    validity: Validity,
    overwrite: Overwrite,
) -> Result<Minted> {
    ensure_writable(&out.join(name.as_str()), overwrite)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(serial) = pki.registry.active_serial(role.as_str(), name.as_str(), now)? {
        return Err(Error::AlreadyActive {
            role: role.as_str().into(),
            id: name.to_string(),
            serial,
        });
    }
    let identity = Identity { role, id: name.clone() };
    let staging = Staging::new(out)?;
    let minted = mint_client(&pki.device_ca, &pki.fleet, identity, KeyType::EcdsaP256, validity)?;
    let bundle = std::slice::from_ref(&minted);
    pki.record_then_write(std::slice::from_ref(&minted.issued), false, |pki| {
        write_bundles(staging, bundle, &pki.broker_ca, None, overwrite, 1)
    })?;
    Ok(minted)
}
