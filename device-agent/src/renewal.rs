//! The agent's half of certificate renewal ([`fleet_identity::renewal`] is the protocol):
//! when to ask, what to ask with, and whether the answer can be trusted.
//!
//! The key is generated here, on the device, and only its CSR is sent. A certificate in a reply
//! is used only if it holds the new public key and this device's own id, and was signed by the
//! CA that signed the current certificate (the reply carries that CA's certificate; its key must
//! verify both). [`crate::session`] drives the exchange on its MQTT connection and
//! [`crate::identity_files`] the swap on disk.

use std::time::Duration;

use fleet_identity::renewal::{ErrorCode, RenewError, RenewReply, RenewRequest};
use fleet_identity::{Identity, Role};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::backoff::{random_below, Backoff};
use crate::config::RenewalConfig;
use crate::keygen::{self, KeyAndCsr, KeygenError};

/// A request sent and not yet answered.
pub struct InFlight {
    /// Echoed by the reply.
    pub request_id: String,
    /// The new key and its CSR.
    pub key: KeyAndCsr,
}

/// What a reply means for the request in flight.
#[derive(Debug)]
pub enum Answer {
    /// A certificate that passed every check: the new leaf, PEM.
    Certificate(String),
    /// The issuer refused.
    Refused(RenewError),
    /// A reply to another request (an earlier one that timed out): ignored.
    NotOurs,
}

/// Why a reply cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReplyProblem {
    /// Not JSON of the protocol, or neither certificate nor error.
    #[error("not a renewal reply: {0}")]
    Malformed(String),
    /// The certificate fails a check.
    #[error("the issued certificate is refused: {0}")]
    Untrusted(String),
}

/// When this device renews, and how it is doing.
pub struct Schedule {
    config: RenewalConfig,
    /// Unix seconds at which to ask next.
    next_at: u64,
    /// Between failed attempts.
    backoff: Backoff,
}

impl Schedule {
    /// The schedule for the certificate valid from `not_before` to `not_after` (Unix seconds):
    /// the first attempt after `renew_after` of its validity plus this device's jitter.
    pub fn new(config: &RenewalConfig, not_before: i64, not_after: i64) -> Self {
        let mut schedule = Self {
            config: config.clone(),
            next_at: 0,
            backoff: Backoff::new(config.retry_min_s * 1000, config.retry_max_s * 1000),
        };
        schedule.restart(not_before, not_after);
        schedule
    }

    /// A new certificate is in use: its first attempt, and the backoff from the start.
    pub fn restart(&mut self, not_before: i64, not_after: i64) {
        let lifetime = (not_after - not_before).max(0) as f64;
        let jitter = random_below((lifetime * self.config.jitter) as u64 + 1);
        self.next_at = (not_before + (lifetime * self.config.renew_after) as i64).max(0) as u64 + jitter;
        self.backoff.reset();
    }

    /// Ask now (`device-agent renew`).
    pub fn now(&mut self) {
        self.next_at = 0;
    }

    /// Unix seconds of the next attempt.
    pub fn next_at(&self) -> u64 {
        self.next_at
    }

    /// How long to wait for a reply.
    pub fn reply_timeout(&self) -> Duration {
        Duration::from_secs(self.config.reply_timeout_s)
    }

    /// An attempt failed without an answer (timeout, unusable reply, local error): ask again
    /// after the next backoff delay from `now`.
    pub fn failed(&mut self, now: u64) -> Duration {
        let delay = self.backoff.next_delay();
        self.next_at = now + delay.as_secs();
        delay
    }

    /// The issuer refused: ask again no sooner than it said, nor than the backoff; after a
    /// refusal only an operator can fix, at the longest delay.
    pub fn refused(&mut self, now: u64, error: &RenewError) -> Duration {
        let delay = if error.code.is_final() {
            self.backoff.longest()
        } else {
            let told = Duration::from_secs(error.retry_after_s.unwrap_or(0));
            match error.code {
                // Not a failure: the window opens then; jitter keeps a fleet apart.
                ErrorCode::NotDue => told + Duration::from_millis(random_below(1000)),
                _ => told.max(self.backoff.next_delay()),
            }
        };
        self.next_at = now + delay.as_secs();
        delay
    }
}

/// A fresh key and the request that carries its CSR.
pub fn new_request(key_type: keygen::KeyType, identity: &Identity) -> Result<(InFlight, Vec<u8>), KeygenError> {
    let key = keygen::generate(key_type, identity.id.as_str())?;
    let request_id = format!("{:016x}", random_below(u64::MAX));
    let payload = serde_json::to_vec(&RenewRequest {
        request_id: request_id.clone(),
        csr: key.csr_pem.clone(),
    })
    .map_err(|e| KeygenError::new(e.to_string()))?;
    Ok((InFlight { request_id, key }, payload))
}

/// Reads a reply to `request`, checking a certificate against the new key, this device's
/// identity and the CA of its `current` certificate.
pub fn read_reply(
    payload: &[u8],
    request: &InFlight,
    identity: &Identity,
    current: &CertificateDer<'_>,
) -> Result<Answer, ReplyProblem> {
    let reply: RenewReply = serde_json::from_slice(payload).map_err(|e| ReplyProblem::Malformed(e.to_string()))?;
    if reply.request_id != request.request_id {
        return Ok(Answer::NotOurs);
    }
    match (reply.certificate, reply.error) {
        (Some(chain), None) => check_certificate(&chain, request, identity, current).map(Answer::Certificate),
        (None, Some(error)) => Ok(Answer::Refused(error)),
        _ => Err(ReplyProblem::Malformed(
            "a reply must carry exactly one of certificate and error".into(),
        )),
    }
}

fn check_certificate(
    chain: &str,
    request: &InFlight,
    identity: &Identity,
    current: &CertificateDer<'_>,
) -> Result<String, ReplyProblem> {
    let untrusted = |why: String| ReplyProblem::Untrusted(why);
    let certs = fleet_identity::pem::parse_certs(chain.as_bytes()).map_err(|e| untrusted(e.to_string()))?;
    let [leaf, ca, ..] = certs.as_slice() else {
        return Err(untrusted(
            "the reply must carry the certificate and its CA's certificate".into(),
        ));
    };
    let (new, issuer, old) = (
        parse(leaf, "certificate")?,
        parse(ca, "CA certificate")?,
        parse(current, "current certificate")?,
    );
    if new.public_key().raw != request.key.public_key_info.as_slice() {
        return Err(untrusted("it does not hold the key this device generated".into()));
    }
    let named = Identity::from_der(leaf).map_err(|e| untrusted(e.to_string()))?;
    if named.role != Role::Device || named.id != identity.id {
        return Err(untrusted(format!("it names {named}, not device {}", identity.id)));
    }
    if issuer.subject().as_raw() != old.issuer().as_raw() || new.issuer().as_raw() != old.issuer().as_raw() {
        return Err(untrusted(format!(
            "it was not issued by {}, the CA of the current certificate",
            old.issuer()
        )));
    }
    for (cert, what) in [(&old, "the current certificate"), (&new, "the new certificate")] {
        cert.verify_signature(Some(issuer.public_key())).map_err(|_| {
            untrusted(format!(
                "the CA certificate in the reply did not sign {what}: not the CA of this device"
            ))
        })?;
    }
    Ok(pem_certificate(leaf))
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, ReplyProblem> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| ReplyProblem::Untrusted(format!("the {what} does not parse: {e}")))
}

fn pem_certificate(der: &[u8]) -> String {
    keygen::pem("CERTIFICATE", der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_identity::DeviceId;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

    fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (Issuer::new(params, key), cert.pem())
    }

    /// A device certificate for `id` and `key`, signed by `issuer`: DER and PEM.
    fn leaf(issuer: &Issuer<'_, KeyPair>, id: &str, key: &impl rcgen::PublicKeyData) -> (Vec<u8>, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, id);
        params.subject_alt_names = vec![SanType::URI(format!("urn:device:{id}").as_str().try_into().unwrap())];
        let cert = params.signed_by(key, issuer).unwrap();
        (cert.der().to_vec(), cert.pem())
    }

    fn reply(request_id: &str, chain: &str) -> Vec<u8> {
        serde_json::to_vec(&RenewReply {
            request_id: request_id.into(),
            certificate: Some(chain.into()),
            error: None,
        })
        .unwrap()
    }

    #[test]
    fn only_a_certificate_for_the_new_key_and_this_device_from_its_own_ca_is_taken() {
        let identity = Identity {
            role: Role::Device,
            id: DeviceId::parse("dev-1").unwrap(),
        };
        let (fleet_ca, fleet_ca_pem) = ca("fleet CA");
        let (current, _) = leaf(&fleet_ca, "dev-1", &KeyPair::generate().unwrap());
        let current = CertificateDer::from(current);
        let (request, _) = new_request(keygen::KeyType::EcdsaP256, &identity).unwrap();
        let new_key = KeyPair::from_pem(&request.key.key_pem).unwrap();
        let read = |payload: Vec<u8>| read_reply(&payload, &request, &identity, &current);

        let (_, good) = leaf(&fleet_ca, "dev-1", &new_key);
        let answer = read(reply(&request.request_id, &format!("{good}{fleet_ca_pem}"))).unwrap();
        assert!(matches!(answer, Answer::Certificate(pem) if pem.starts_with("-----BEGIN CERTIFICATE-----")));
        assert!(matches!(read(reply("another", &good)).unwrap(), Answer::NotOurs));

        let (_, other_key) = leaf(&fleet_ca, "dev-1", &KeyPair::generate().unwrap());
        let (_, other_id) = leaf(&fleet_ca, "dev-2", &new_key);
        let (rogue_ca, rogue_ca_pem) = ca("fleet CA");
        let (_, rogue) = leaf(&rogue_ca, "dev-1", &new_key);
        for (chain, why) in [
            (format!("{other_key}{fleet_ca_pem}"), "does not hold the key"),
            (format!("{other_id}{fleet_ca_pem}"), "not device dev-1"),
            (format!("{rogue}{rogue_ca_pem}"), "did not sign the current certificate"),
            (good.clone(), "its CA's certificate"),
        ] {
            let problem = read(reply(&request.request_id, &chain)).unwrap_err().to_string();
            assert!(problem.contains(why), "{problem}");
        }
    }
}
