//! The broker's TLS material: loaded from files, checked, and turned into a rustls
//! `ServerConfig` whose client-certificate verifier records what each client presented and why it
//! was refused, so the audit log can name the certificate and a stable reason.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_identity::pem::{load_certs, load_key, PemProblem};
use fleet_identity::{sha256_hex, CertificateSummary, Identity, Role};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::crl::{ClientCa, CrlInfo, CrlProblem, RevocationKey};
use crate::reason::RejectReason;

/// The files the TLS configuration is built from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// Client CA bundle.
    pub client_ca: PathBuf,
    /// The CRL files, one per client CA; none: revocation is off.
    pub crl: Vec<PathBuf>,
    /// SHA-256 fingerprints of client CAs accepted without a CRL.
    pub crl_exempt_cas: Vec<String>,
    /// `renewal_grace_days`, in seconds (0: off). Not a file, but read with them: the verifier
    /// built from them applies it.
    pub renewal_grace_s: u64,
}

impl TlsFiles {
    /// The files `config` names.
    pub fn of(config: &crate::config::BrokerConfig) -> Self {
        Self {
            server_cert: config.server_cert.clone(),
            server_key: config.server_key.clone(),
            client_ca: config.client_ca.clone(),
            crl: config.crl.clone(),
            crl_exempt_cas: config.crl_exempt_cas.clone(),
            renewal_grace_s: u64::from(config.renewal_grace_days) * 86_400,
        }
    }

    /// Every file, for watching.
    pub fn all(&self) -> Vec<(&'static str, &Path)> {
        let mut files = vec![
            ("server_cert", self.server_cert.as_path()),
            ("server_key", self.server_key.as_path()),
            ("client_ca", self.client_ca.as_path()),
        ];
        files.extend(self.crl.iter().map(|crl| ("crl", crl.as_path())));
        files
    }
}

/// Why TLS material was refused.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct TlsLoadError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: TlsProblem,
}

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
pub enum TlsProblem {
    /// It cannot be read, is not PEM, or holds nothing of the kind expected.
    #[error(transparent)]
    File(#[from] PemProblem),
    /// A certificate in it is not valid X.509.
    #[error("not a valid certificate: {0}")]
    Certificate(String),
    /// A CRL in it is not believed.
    #[error(transparent)]
    Crl(#[from] CrlProblem),
    /// rustls refused the material (a key that does not fit its certificate, an unusable CA).
    #[error("{0}")]
    Refused(String),
}

fn fail(path: &Path, problem: impl Into<TlsProblem>) -> TlsLoadError {
    TlsLoadError {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// What the broker knows about a presented client certificate.
#[derive(Clone, Debug, Default)]
pub struct PresentedCert {
    /// The identity id, if one could be read.
    pub id: Option<String>,
    /// Issuer and serial, if the certificate could be read.
    pub revocation: Option<RevocationKey>,
    /// SHA-256 fingerprint, lower-case hex.
    pub sha256: String,
}

/// Facts about the server certificate.
#[derive(Clone, Debug)]
pub struct ServerCertInfo {
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
}

/// A complete, validated TLS configuration and what the rest of the broker needs to know of it.
pub struct TlsMaterial {
    /// The rustls configuration for new handshakes.
    pub config: Arc<ServerConfig>,
    /// The server certificate.
    pub server: ServerCertInfo,
    /// The client CAs.
    pub client_cas: Vec<ClientCa>,
    /// What the CRLs say, if revocation is configured.
    pub crl: Option<CrlInfo>,
}

impl TlsMaterial {
    /// Loads and checks every file; any problem names the file.
    pub fn load(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Self, TlsLoadError> {
        let chain = load_certs(&files.server_cert).map_err(|e| fail(&files.server_cert, e.problem))?;
        let key = load_key(&files.server_key).map_err(|e| fail(&files.server_key, e.problem))?;
        let server = server_cert_info(&chain[0]).map_err(|e| fail(&files.server_cert, TlsProblem::Certificate(e)))?;
        let client_cas = load_certs(&files.client_ca).map_err(|e| fail(&files.client_ca, e.problem))?;
        let cas = client_cas
            .iter()
            .map(ClientCa::from_der)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(&files.client_ca, TlsProblem::Certificate(e)))?;
        // A CRL names its CA by subject: two CAs of one name but different keys cannot both be
        // covered, nor told apart by a certificate's issuer.
        for (at, ca) in cas.iter().enumerate() {
            if let Some(other) = cas[..at]
                .iter()
                .find(|o| o.subject_der == ca.subject_der && !o.same_key(ca))
            {
                return Err(fail(
                    &files.client_ca,
                    TlsProblem::Certificate(format!(
                        "two CAs are named {} but have different keys (sha256 {} and {}): give each CA its own name, as `provision init --fleet` does",
                        ca.subject, other.sha256, ca.sha256
                    )),
                ));
            }
        }
        let (crls, crl) = if files.crl.is_empty() {
            (Vec::new(), None)
        } else {
            let (crls, info) = crate::crl::load(&files.crl, &cas, &files.crl_exempt_cas, provider)
                .map_err(|e| fail(&e.path, e.problem))?;
            (crls, Some(info))
        };
        let standard = fleet_identity::tls::client_verifier(provider.clone(), &client_cas, crls).map_err(|e| {
            fail(
                files.crl.first().unwrap_or(&files.client_ca),
                TlsProblem::Refused(e.to_string()),
            )
        })?;
        let verifier = Arc::new(AuditingVerifier {
            inner: standard,
            crl: crl.clone(),
            renewal_grace_s: files.renewal_grace_s,
        });
        let config = fleet_identity::tls::server_config(provider.clone(), verifier, chain, key).map_err(|e| {
            fail(
                &files.server_key,
                TlsProblem::Refused(format!("does not fit {}: {e}", files.server_cert.display())),
            )
        })?;
        Ok(Self {
            config: Arc::new(with_fleet_tuning(config)),
            server,
            client_cas: cas,
            crl,
        })
    }
}

/// Server settings for a fleet: no TLS 1.3 session tickets. rustls would send two per handshake
/// into a 256-entry in-memory cache, which a fleet of thousands of devices never hits: pure cost
/// on every handshake.
fn with_fleet_tuning(mut config: ServerConfig) -> ServerConfig {
    config.send_tls13_tickets = 0;
    config
}

fn server_cert_info(der: &CertificateDer<'_>) -> Result<ServerCertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(ip) => ip_to_string(ip),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ServerCertInfo {
        not_after: cert.validity().not_after.timestamp(),
        names,
    })
}

fn ip_to_string(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// What the verifier learned during one handshake.
#[derive(Default)]
pub struct HandshakeNotes {
    /// The certificate the client presented, if any.
    pub presented: Option<PresentedCert>,
    /// Why the verifier refused it, if it did.
    pub refused: Option<(RejectReason, String)>,
    /// The identity of an accepted certificate.
    pub identity: Option<Identity>,
    /// When an accepted certificate expired (Unix seconds), if it was admitted under
    /// `renewal_grace_days`: to its renewal topics only.
    pub expired_grace: Option<i64>,
}

tokio::task_local! {
    /// Set around each handshake by the session task; the verifier writes into it. A task-local
    /// (not a field of the shared verifier) because one verifier serves every connection.
    pub static HANDSHAKE_NOTES: RefCell<HandshakeNotes>;
}

/// Wraps the standard verifier: checks the identity on top of the chain, and notes the outcome.
#[derive(Debug)]
struct AuditingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// The CRLs in force: a certificate from a client CA none of them covers is refused.
    crl: Option<CrlInfo>,
    /// `renewal_grace_days` in seconds; 0: off.
    renewal_grace_s: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(String);

impl AuditingVerifier {
    fn judge(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> (Result<ClientCertVerified, rustls::Error>, HandshakeNotes) {
        let (summary, identity) = match CertificateSummary::with_identity(end_entity) {
            Ok((summary, identity)) => (Some(summary), identity),
            Err(e) => (None, Err(e)),
        };
        let presented = PresentedCert {
            id: identity
                .as_ref()
                .ok()
                .map(|i| i.id.to_string())
                .or_else(|| summary.as_ref().and_then(|s| s.common_name.clone())),
            revocation: summary.as_ref().map(|s| RevocationKey {
                issuer: s.issuer.clone(),
                serial: s.serial.clone(),
            }),
            sha256: summary
                .as_ref()
                .map(|s| s.sha256.clone())
                .unwrap_or_else(|| sha256_hex(end_entity)),
        };
        let mut notes = HandshakeNotes {
            presented: Some(presented),
            ..Default::default()
        };
        let is_ca = summary.as_ref().is_some_and(|s| s.is_ca);
        let mut verdict = self.inner.verify_client_cert(end_entity, intermediates, now);
        if let (Err(e), Some(summary), Ok(identity)) = (&verdict, &summary, &identity) {
            if let Some(expired_at) = self.within_grace(e, summary, identity, now) {
                // Everything else is judged as it was the moment before it expired: chain, CA
                // validity, purpose and the CRL in force now.
                let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(expired_at as u64));
                verdict = self.inner.verify_client_cert(end_entity, intermediates, then);
                notes.expired_grace = verdict.is_ok().then_some(expired_at);
            }
        }
        let uncovered = match (&self.crl, &summary) {
            (Some(crl), Some(summary)) => crl.refuses_issuer(&summary.issuer),
            _ => false,
        };
        let refusal = match (&verdict, identity) {
            _ if is_ca => Some((
                RejectReason::CaCertAsLeaf,
                "a CA certificate was presented as a client certificate".to_owned(),
            )),
            (Err(e), _) => Some((reason_for(e), e.to_string())),
            (Ok(_), _) if uncovered => Some((
                RejectReason::CrlMissing,
                "no CRL covers the CA that issued this certificate, so its revocation cannot be checked (add that CA's CRL to `crl`, or name the CA in `crl_exempt_cas`)".to_owned(),
            )),
            (Ok(_), Err(e)) => Some((RejectReason::BadIdentity, e.to_string())),
            (Ok(_), Ok(identity)) if identity.role == Role::Gateway => Some((
                RejectReason::GatewayIdentity,
                format!("{identity} is a gateway's bridge identity, for upstream brokers; it is not a client of this broker"),
            )),
            (Ok(_), Ok(identity)) => {
                notes.identity = Some(identity);
                None
            }
        };
        let result = match (&refusal, verdict) {
            (None, verdict) => verdict,
            (Some(_), Err(e)) => Err(e),
            (Some((_, detail)), Ok(_)) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(Refusal(detail.clone())),
            )))),
        };
        notes.refused = refusal;
        (result, notes)
    }
}

impl AuditingVerifier {
    /// When the certificate expired, if `error` says it expired, it is a device's, and it did
    /// so less than `renewal_grace_days` before `now`.
    fn within_grace(
        &self,
        error: &rustls::Error,
        summary: &CertificateSummary,
        identity: &Identity,
        now: UnixTime,
    ) -> Option<i64> {
        let expired = reason_for(error) == RejectReason::Expired;
        let since = (now.as_secs() as i64).saturating_sub(summary.not_after);
        (self.renewal_grace_s > 0
            && expired
            && identity.role == fleet_identity::Role::Device
            && since >= 0
            && (since as u64) < self.renewal_grace_s)
            .then_some(summary.not_after)
    }
}

impl ClientCertVerifier for AuditingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (result, notes) = self.judge(end_entity, intermediates, now);
        // Outside a session task (never in the broker) the notes are simply not kept.
        let _ = HANDSHAKE_NOTES.try_with(|slot| *slot.borrow_mut() = notes);
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The stable reason for a rustls error met during a handshake.
pub fn reason_for(error: &rustls::Error) -> RejectReason {
    match error {
        rustls::Error::NoCertificatesPresented => RejectReason::NoClientCert,
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => RejectReason::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => RejectReason::NotYetValid,
            CertificateError::Revoked => RejectReason::Revoked,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => RejectReason::UnknownIssuer,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                RejectReason::WrongPurpose
            }
            _ => RejectReason::TlsError,
        },
        _ => RejectReason::TlsError,
    }
}
