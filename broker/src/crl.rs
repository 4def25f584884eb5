//! The CRLs in force. Revocation is the one check that must never fail open, so what the broker
//! believes is narrow:
//!
//! - `crl` names one file per client CA (several during a CA rollover), each written by its own
//!   PKI. `provision revoke` of one PKI rewrites only its own file, so it can never drop the
//!   other CA's revocations. A file may hold several CRLs; at most one per CA counts.
//! - A CRL is believed only if the client CA it names signed it: its signature is checked
//!   against that CA's key, with the same algorithms as handshakes, at start and at every
//!   reload. A CRL that parses but is not signed by its CA is refused, and with it the whole
//!   reload: the old CRLs stay in force and nobody is kicked on its word.
//! - With revocation configured, a client CA that no CRL covers is a hole: a revoked
//!   certificate from it would pass. It is reported at every load, and its certificates are
//!   refused (`crl_missing`) unless `crl_exempt_cas` names the CA's SHA-256 fingerprint.
//! - With no `crl` at all, revocation is off, and the broker says so at start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fleet_identity::pem::{load_crls, PemProblem};
use fleet_identity::{sha256_hex, Serial};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// The issuing distribution point extension (RFC 5280, 5.2.5).
const OID_ISSUING_DISTRIBUTION_POINT: &str = "2.5.29.28";

/// A client CA as the CRL checks need it.
#[derive(Clone, Debug)]
pub struct ClientCa {
    /// Its subject, DER (what a CRL's issuer and a certificate's issuer are compared with).
    pub subject_der: Vec<u8>,
    /// Its subject, readable.
    pub subject: String,
    /// SHA-256 of its certificate, lower-case hex (what `crl_exempt_cas` names).
    pub sha256: String,
    /// Its SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
}

impl ClientCa {
    /// Whether both certificates carry the same key (a CA re-issued with its old key is one CA).
    pub fn same_key(&self, other: &ClientCa) -> bool {
        self.spki == other.spki
    }

    /// Reads what the checks need from a CA certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(Self {
            subject_der: cert.subject().as_raw().to_vec(),
            subject: cert.subject().to_string(),
            sha256: sha256_hex(der),
            spki: cert.public_key().raw.to_vec(),
        })
    }
}

/// A certificate as a CRL names it: its issuer's name (DER) and its serial. Serials are unique
/// only per CA: a serial revoked by one CA says nothing of another CA's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RevocationKey {
    /// The issuer's name, DER.
    pub issuer: Vec<u8>,
    /// The serial.
    pub serial: Serial,
}

/// What the CRLs in force say together.
#[derive(Clone, Debug)]
pub struct CrlInfo {
    /// Revoked certificates.
    pub revoked: HashSet<RevocationKey>,
    /// The earliest thisUpdate, Unix seconds (the set is as old as its oldest CRL).
    pub this_update: i64,
    /// The earliest nextUpdate, Unix seconds, if any CRL has one.
    pub next_update: Option<i64>,
    /// The first CRL's number, if present.
    pub number: Option<String>,
    /// Subjects (DER) of the client CAs a CRL covers.
    covered: Vec<Vec<u8>>,
    /// Client CAs no CRL covers and `crl_exempt_cas` does not name: their certificates are
    /// refused.
    pub uncovered: Vec<ClientCa>,
    /// Client CAs no CRL covers that `crl_exempt_cas` names: accepted without a revocation check.
    pub exempt: Vec<ClientCa>,
}

impl CrlInfo {
    /// Whether some CRL is past its nextUpdate at `now`.
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|t| t < now)
    }

    /// Whether a certificate issued by the CA with this subject (DER) must be refused because no
    /// CRL covers that CA. An allow-list: an issuer that is neither covered nor exempt (an
    /// intermediate CA, say, whose CRL the broker cannot hold) is refused too, never accepted
    /// without a revocation check.
    pub fn refuses_issuer(&self, issuer_der: &[u8]) -> bool {
        !self.covered.iter().any(|subject| subject == issuer_der)
            && !self.exempt.iter().any(|ca| ca.subject_der == issuer_der)
    }
}

/// A CRL file the broker will not believe, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct CrlRefused {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub problem: CrlProblem,
}

/// Why a CRL file is refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlProblem {
    /// The file cannot be read, or holds no CRL.
    #[error(transparent)]
    File(#[from] PemProblem),
    /// A CRL in it does not parse.
    #[error("CRL #{index} is not a valid CRL: {reason}")]
    Malformed {
        /// Its position in the file.
        index: usize,
        /// The parser's reason.
        reason: String,
    },
    /// A CRL names an issuer that is none of the client CAs.
    #[error("CRL #{index}: issuer {issuer} is none of the client CAs: refusing a CRL that cannot apply")]
    UnknownIssuer {
        /// Its position in the file.
        index: usize,
        /// The issuer it names.
        issuer: String,
    },
    /// A CRL's signature does not verify with the key of the client CA it names.
    #[error("CRL #{index}: not signed by the client CA it names ({ca}, sha256 {sha256}): {why}; refusing it")]
    NotSigned {
        /// Its position in the file.
        index: usize,
        /// The CA's subject.
        ca: String,
        /// The CA certificate's SHA-256.
        sha256: String,
        /// What failed.
        why: &'static str,
    },
    /// A CRL of a kind the broker cannot apply completely.
    #[error("CRL #{index}: {what}; refusing it (publish one complete CRL per CA, as `provision crl` does)")]
    Unsupported {
        /// Its position in the file.
        index: usize,
        /// What it carries.
        what: &'static str,
    },
    /// A second CRL for a CA that already has one.
    #[error("CRL #{index}: a second CRL for the client CA {ca} (the other is in {}): keep one CRL per CA, each PKI writing its own file", other.display())]
    Duplicate {
        /// Its position in the file.
        index: usize,
        /// The CA's subject.
        ca: String,
        /// The file holding the first.
        other: PathBuf,
    },
}

/// The CRLs of `files` after every check above, for the handshake verifier, and what they say.
pub fn load(
    files: &[PathBuf],
    client_cas: &[ClientCa],
    exempt_fingerprints: &[String],
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, CrlInfo), CrlRefused> {
    let mut info = CrlInfo {
        revoked: HashSet::new(),
        this_update: i64::MAX,
        next_update: None,
        number: None,
        covered: Vec::new(),
        uncovered: Vec::new(),
        exempt: Vec::new(),
    };
    let mut all = Vec::new();
    // Which file covers each CA subject (CAs listed twice in the bundle are one CA).
    let mut covered: Vec<(&[u8], &Path)> = Vec::new();
    for path in files {
        let refused = |problem: CrlProblem| CrlRefused {
            path: path.clone(),
            problem,
        };
        let crls = load_crls(path).map_err(|e| refused(e.problem.into()))?;
        for (index, der) in crls.iter().enumerate() {
            let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| {
                refused(CrlProblem::Malformed {
                    index,
                    reason: e.to_string(),
                })
            })?;
            let ca = &client_cas[check(index, der, &crl, client_cas, provider).map_err(refused)?];
            if let Some((_, other)) = covered
                .iter()
                .find(|(subject, _)| *subject == ca.subject_der.as_slice())
            {
                return Err(refused(CrlProblem::Duplicate {
                    index,
                    ca: ca.subject.clone(),
                    other: other.to_path_buf(),
                }));
            }
            covered.push((&ca.subject_der, path));
            add(&mut info, &crl);
        }
        all.extend(crls);
    }
    info.covered = covered.iter().map(|(subject, _)| subject.to_vec()).collect();
    for ca in client_cas {
        let listed = |list: &[ClientCa]| list.iter().any(|c| c.subject_der == ca.subject_der);
        if info.covered.contains(&ca.subject_der) || listed(&info.exempt) || listed(&info.uncovered) {
            continue;
        }
        if exempt_fingerprints.iter().any(|f| f.eq_ignore_ascii_case(&ca.sha256)) {
            info.exempt.push(ca.clone());
        } else {
            info.uncovered.push(ca.clone());
        }
    }
    Ok((all, info))
}

/// The index of the client CA that issued and signed `crl` (the `index`th of its file, `der`).
fn check(
    index: usize,
    der: &[u8],
    crl: &CertificateRevocationList<'_>,
    client_cas: &[ClientCa],
    provider: &CryptoProvider,
) -> Result<usize, CrlProblem> {
    let issuer = crl.issuer().as_raw();
    let Some(at) = client_cas.iter().position(|ca| ca.subject_der == issuer) else {
        return Err(CrlProblem::UnknownIssuer {
            index,
            issuer: crl.issuer().to_string(),
        });
    };
    // An issuing distribution point makes a CRL partial (some certificates, some reasons): the
    // verifier would treat it as not authoritative and let a revoked certificate through.
    if crl
        .tbs_cert_list
        .extensions()
        .iter()
        .any(|ext| ext.oid.to_id_string() == OID_ISSUING_DISTRIBUTION_POINT)
    {
        return Err(CrlProblem::Unsupported {
            index,
            what: "it has an issuing distribution point (a partial CRL)",
        });
    }
    let ca = &client_cas[at];
    verify_signature(
        der,
        crl.tbs_cert_list.as_ref(),
        &crl.signature_value.data,
        &ca.spki,
        provider,
    )
    .map_err(|why| CrlProblem::NotSigned {
        index,
        ca: ca.subject.clone(),
        sha256: ca.sha256.clone(),
        why,
    })?;
    Ok(at)
}

fn add(info: &mut CrlInfo, crl: &CertificateRevocationList<'_>) {
    let issuer = crl.issuer().as_raw();
    info.revoked
        .extend(crl.iter_revoked_certificates().map(|r| RevocationKey {
            issuer: issuer.to_vec(),
            serial: Serial::from_be_bytes(r.raw_serial()),
        }));
    info.this_update = info.this_update.min(crl.last_update().timestamp());
    if let Some(next) = crl.next_update().map(|t| t.timestamp()) {
        info.next_update = Some(info.next_update.map_or(next, |n| n.min(next)));
    }
    info.number = info
        .number
        .take()
        .or_else(|| crl.crl_number().map(|n| n.to_str_radix(16)));
}

/// Checks the CRL's signature over `tbs` with the CA key `spki`, choosing the algorithm as
/// webpki does for certificates: the one whose signature and public-key algorithm identifiers
/// match the CRL's and the key's.
fn verify_signature(
    crl_der: &[u8],
    tbs: &[u8],
    signature: &[u8],
    spki: &[u8],
    provider: &CryptoProvider,
) -> Result<(), &'static str> {
    // CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue }
    let list = contents(crl_der).ok_or("malformed DER")?;
    let algorithm = list
        .get(tbs.len()..)
        .and_then(contents)
        .ok_or("malformed signature algorithm")?;
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm, subjectPublicKey BIT STRING }
    let spki = contents(spki).ok_or("malformed CA key")?;
    let key_algorithm = contents(spki).ok_or("malformed CA key algorithm")?;
    let (header, length) = tlv(spki).ok_or("malformed CA key")?;
    let key = spki
        .get(header + length..)
        .and_then(contents)
        .and_then(|bits| bits.get(1..))
        .ok_or("malformed CA key")?;
    let mut candidates = provider
        .signature_verification_algorithms
        .all
        .iter()
        .filter(|alg| alg.signature_alg_id().as_ref() == algorithm && alg.public_key_alg_id().as_ref() == key_algorithm)
        .peekable();
    if candidates.peek().is_none() {
        return Err("its signature algorithm is not one the broker accepts for this CA's key");
    }
    if candidates.any(|alg| alg.verify_signature(key, tbs, signature).is_ok()) {
        Ok(())
    } else {
        Err("the signature does not verify with the CA's key")
    }
}

/// The header and content lengths of the DER element at the start of `der`.
fn tlv(der: &[u8]) -> Option<(usize, usize)> {
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 {
        return None;
    }
    let length = der
        .get(2..2 + count)?
        .iter()
        .fold(0usize, |length, byte| (length << 8) | usize::from(*byte));
    Some((2 + count, length))
}

/// The contents of the DER element at the start of `der`.
fn contents(der: &[u8]) -> Option<&[u8]> {
    let (header, length) = tlv(der)?;
    der.get(header..header.checked_add(length)?)
}
