//! The certificate revocation list: signed by the device CA, published atomically.

use std::path::Path;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, GenerateContext, Result};
use crate::fault;
use crate::output::{replace_atomically, PUBLIC_MODE};
use crate::pki::CertificateAuthority;
use crate::registry::RevokedEntry;

/// Default distance to the CRL's nextUpdate. Run `provision crl` from cron well within it.
pub const DEFAULT_NEXT_UPDATE_DAYS: u32 = 30;

/// Why a certificate was revoked (the subset operators use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Reason {
    /// The device's key leaked or the device was stolen.
    KeyCompromise,
    /// Replaced by a newer certificate.
    Superseded,
    /// The device was decommissioned.
    CessationOfOperation,
    /// No reason given.
    Unspecified,
}

impl Reason {
    /// The word stored in the registry (the same as the flag value).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KeyCompromise => "key-compromise",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessation-of-operation",
            Reason::Unspecified => "unspecified",
        }
    }

    fn from_word(word: &str) -> Self {
        match word {
            "key-compromise" => Reason::KeyCompromise,
            "superseded" => Reason::Superseded,
            "cessation-of-operation" => Reason::CessationOfOperation,
            _ => Reason::Unspecified,
        }
    }

    fn code(self) -> RevocationReason {
        match self {
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::Unspecified => RevocationReason::Unspecified,
        }
    }
}

/// Refuses a CRL that would be stale the moment it is written. Checked before the registry
/// commits anything, so a bad flag never leaves a revocation waiting for its CRL.
pub fn validate_next_update_days(next_update_days: u32) -> Result<()> {
    if next_update_days == 0 {
        return Err(Error::BadArgument {
            flag: "--next-update-days",
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// Signs a CRL listing `revoked` and returns it as PEM.
pub fn sign_crl(
    ca: &CertificateAuthority,
    crl_number: u64,
    revoked: &[RevokedEntry],
    next_update_days: u32,
) -> Result<String> {
    validate_next_update_days(next_update_days)?;
    let now = OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|entry| {
            let bytes = fleet_identity::Serial::parse(&entry.serial)
                .map(|serial| serial.to_be_bytes())
                .ok_or_else(|| Error::NotFound(format!("registry holds a malformed serial {:?}", entry.serial)))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from_unix_timestamp(entry.revoked_at).unwrap_or(now),
                reason_code: Some(Reason::from_word(&entry.reason).code()),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(i64::from(next_update_days)),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer).generating("the CRL")?;
    crl.pem().generating("the CRL's PEM encoding")
}

/// Signs the CRL and atomically replaces the file at `path` with it.
pub fn write_crl(
    path: &Path,
    ca: &CertificateAuthority,
    crl_number: u64,
    revoked: &[RevokedEntry],
    next_update_days: u32,
) -> Result<()> {
    let pem = sign_crl(ca, crl_number, revoked, next_update_days)?;
    fault::point("crl-before-write");
    replace_atomically(path, pem.as_bytes(), PUBLIC_MODE)?;
    fault::point("crl-after-write");
    Ok(())
}
