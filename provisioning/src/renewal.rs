//! The issuing side of certificate renewal: judging a device's request, signing it under the
//! registry's rules, and retiring the certificate it replaced once the device has moved on.
//! [`crate::serve`] carries requests to [`Issuer`] over MQTT; the protocol itself is
//! [`fleet_identity::renewal`].
//!
//! Who asks is not in the request: it is the device id in the topic, which the broker's device
//! ACL (`devices/{id}/#`) lets only device `<id>` publish to. Everything else is checked here, in
//! this order, and the first failure is the refusal: the payload is a request; the device is not
//! asking too often; the CSR's signature verifies; its CN and SAN name the topic's device; its
//! key type is allowed; the registry knows the device and has a certificate of it that is not
//! revoked; that certificate is in its renewal window (unless the issuer runs with `--force`).
//!
//! The window is judged on the device's *oldest* certificate that is not revoked: that is the
//! one the device uses. A newer one exists only when a signed certificate never reached the
//! device (its reply was lost), and judging that one would refuse the device until the lost
//! certificate itself came due, possibly after the real one expired.
//!
//! A batch of requests is signed, then recorded in one registry transaction (one fsync for all,
//! which is what lets one issuer serve a fleet that comes due at once), then answered. Every
//! decision is one audit line (`event = "renewal"`).

use std::collections::HashMap;

use fleet_identity::renewal::{
    ErrorCode, RenewConfirm, RenewError, RenewReply, RenewRequest, MAX_REQUEST_BYTES, MAX_REQUEST_ID_LEN,
};
use fleet_identity::{DeviceId, Role, Serial};
use serde::Serialize;
use tracing::{info, warn};

use crate::csr::{parse_csr, CsrProblem, VerifiedCsr};
use crate::issue::Minted;
use crate::key_type::KeyType;
use crate::pki::Pki;
use crate::registry::{Record, RevokeTarget};
use crate::revocation::{Reason, DEFAULT_NEXT_UPDATE_DAYS};
use crate::validity::Validity;

/// The default renewal window: the last third of a certificate's validity. The agent asks at
/// two thirds by default, so the window opens exactly when a healthy device first asks.
pub const DEFAULT_RENEW_AFTER: f64 = 2.0 / 3.0;

/// When the renewal window of a certificate valid from `not_before` to `not_after` opens, with
/// the window starting after `renew_after` (a fraction) of its validity.
pub fn window_opens(not_before: i64, not_after: i64, renew_after: f64) -> i64 {
    not_before + ((not_after - not_before) as f64 * renew_after) as i64
}

/// Where a device certificate's renewal stands, as `provision list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RenewalState {
    /// Not yet in its renewal window, and not itself a renewal.
    Current,
    /// Issued by a renewal, not yet in its own window.
    Renewed,
    /// A successor was issued; the device has not yet said it connected with it.
    Pending,
    /// In its renewal window.
    Due,
    /// Expired without a successor in use: the device is locked out unless the broker's
    /// `renewal_grace_days` still admits it.
    Overdue,
    /// The issuer last refused this device for a reason that needs an operator.
    Failed,
}

impl RenewalState {
    /// The state of `record`, for a device certificate that is not revoked; `renewed`: it is
    /// some certificate's successor; `refusal`: the code of a final refusal since it was issued.
    pub fn of(record: &Record, renewed: bool, refusal: Option<&str>, now: i64) -> Option<Self> {
        if record.role != Role::Device.as_str() || record.status == "revoked" {
            return None;
        }
        Some(if record.status == "expired" {
            RenewalState::Overdue
        } else if refusal.is_some() {
            RenewalState::Failed
        } else if record.successor.is_some() {
            RenewalState::Pending
        } else if window_opens(record.not_before, record.not_after, DEFAULT_RENEW_AFTER) <= now {
            RenewalState::Due
        } else if renewed {
            RenewalState::Renewed
        } else {
            RenewalState::Current
        })
    }

    /// The state's word.
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalState::Current => "current",
            RenewalState::Renewed => "renewed",
            RenewalState::Pending => "pending",
            RenewalState::Due => "due",
            RenewalState::Overdue => "overdue",
            RenewalState::Failed => "failed",
        }
    }
}

/// What the issuer accepts.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The window opens after this fraction of the current certificate's validity.
    pub renew_after: f64,
    /// Sign outside the window too (an operator-triggered re-key of the fleet).
    pub force: bool,
    /// Key types signed.
    pub allowed_key_types: Vec<KeyType>,
    /// Seconds between two requests of one device that are judged; sooner: `rate_limited`.
    pub min_interval_s: i64,
    /// Validity of the certificates issued.
    pub validity: Validity,
    /// Folders the CRL is also written into after a revocation (`--publish-to`: one per gateway).
    pub publish_crl_to: Vec<std::path::PathBuf>,
}

/// A request as it arrived: the device the topic names, and the payload.
pub struct Incoming {
    /// The device id from the topic.
    pub id: DeviceId,
    /// The MQTT payload.
    pub payload: Vec<u8>,
}

/// What to send back, and to whom.
pub struct Answer {
    /// The device to answer (on its reply topic).
    pub id: DeviceId,
    /// The reply.
    pub reply: RenewReply,
}

/// The issuer's counters: in its log, and as Prometheus metrics when it serves them.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Requests received.
    pub requests: u64,
    /// Certificates issued.
    pub issued: u64,
    /// Requests refused, by code.
    pub refused: HashMap<ErrorCode, u64>,
    /// Certificates revoked as superseded.
    pub superseded: u64,
}

impl Counters {
    /// The counters in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut text = format!(
            "# TYPE renewal_requests_total counter\nrenewal_requests_total {}\n\
             # TYPE renewal_issued_total counter\nrenewal_issued_total {}\n\
             # TYPE renewal_superseded_revoked_total counter\nrenewal_superseded_revoked_total {}\n\
             # TYPE renewal_refused_total counter\n",
            self.requests, self.issued, self.superseded
        );
        for code in ErrorCode::ALL {
            let count = self.refused.get(&code).copied().unwrap_or(0);
            text.push_str(&format!(
                "renewal_refused_total{{code=\"{}\"}} {count}\n",
                code.as_str()
            ));
        }
        text
    }

    /// The counters as one log line's fields.
    pub fn log(&self) {
        let refused: u64 = self.refused.values().sum();
        let by_code = ErrorCode::ALL
            .iter()
            .filter_map(|code| self.refused.get(code).map(|n| format!("{}={n}", code.as_str())))
            .collect::<Vec<_>>()
            .join(",");
        info!(
            event = "renewal_counters",
            requests = self.requests,
            issued = self.issued,
            refused,
            refused_by_code = by_code,
            superseded = self.superseded,
            "renewals: {} requests, {} issued, {refused} refused ({by_code}), {} superseded certificates revoked",
            self.requests,
            self.issued,
            self.superseded
        );
    }
}

/// The issuing service's state: the PKI it signs with, its policy, and what it has seen.
pub struct Issuer {
    pki: Pki,
    policy: Policy,
    /// When each device's last judged request arrived (Unix seconds).
    last_request: HashMap<DeviceId, i64>,
    counters: Counters,
}

/// A request that passed every check: what to sign.
struct Approved {
    id: DeviceId,
    request_id: String,
    csr: VerifiedCsr,
}

impl Issuer {
    /// An issuer signing with `pki` under `policy`.
    pub fn new(pki: Pki, policy: Policy) -> Self {
        Self {
            pki,
            policy,
            last_request: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Judges a batch of requests, signs and records every one approved (one registry
    /// transaction), and returns one answer per request, in order.
    pub fn handle(&mut self, batch: Vec<Incoming>, now: i64) -> Vec<Answer> {
        self.counters.requests += batch.len() as u64;
        let mut answers = Vec::with_capacity(batch.len());
        let mut approved = Vec::new();
        for incoming in batch {
            match self.judge(&incoming, now) {
                Ok(request) => approved.push(request),
                Err((request_id, error)) => answers.push(self.refuse(incoming.id, request_id, error, now)),
            }
        }
        let signed: Vec<(Approved, crate::Result<Minted>)> = approved
            .into_iter()
            .map(|request| {
                let minted = self.sign(&request);
                (request, minted)
            })
            .collect();
        let issued: Vec<_> = signed
            .iter()
            .filter_map(|(_, minted)| minted.as_ref().ok().map(|m| m.issued.clone()))
            .collect();
        let recorded = if issued.is_empty() {
            Ok(())
        } else {
            self.pki.record_then_write(&issued, true, |_| Ok(()))
        };
        for (request, minted) in signed {
            let outcome = match (&recorded, minted) {
                (Ok(()), Ok(minted)) => Ok(minted),
                (Err(e), _) => Err(e.to_string()),
                (_, Err(e)) => Err(e.to_string()),
            };
            answers.push(match outcome {
                Ok(minted) => self.issue(request, minted),
                Err(why) => {
                    let error = RenewError {
                        code: ErrorCode::Unavailable,
                        message: format!("the issuer could not sign or record the certificate: {why}"),
                        retry_after_s: Some(self.policy.min_interval_s.max(1) as u64),
                    };
                    self.refuse(request.id, request.request_id, error, now)
                }
            });
        }
        answers
    }

    fn sign(&self, request: &Approved) -> crate::Result<Minted> {
        let identity = fleet_identity::Identity {
            role: Role::Device,
            id: request.id.clone(),
        };
        let params = crate::profile::client(&identity, &self.pki.fleet, self.policy.validity)?;
        crate::issue::sign_for_csr(&self.pki.device_ca, identity, params, request.csr.public_key.clone())
    }

    fn issue(&mut self, request: Approved, minted: Minted) -> Answer {
        self.counters.issued += 1;
        info!(
            event = "renewal",
            decision = "issued",
            device_id = %request.id,
            request_id = %request.request_id,
            serial = %minted.issued.serial,
            not_after = minted.issued.not_after,
            "issued a certificate to device {} (serial {})",
            request.id,
            minted.issued.serial
        );
        Answer {
            id: request.id,
            reply: RenewReply {
                request_id: request.request_id,
                certificate: Some(format!("{}{}", minted.cert_pem, self.pki.device_ca.cert_pem)),
                error: None,
            },
        }
    }

    fn refuse(&mut self, id: DeviceId, request_id: String, error: RenewError, now: i64) -> Answer {
        *self.counters.refused.entry(error.code).or_default() += 1;
        warn!(
            event = "renewal",
            decision = "refused",
            code = error.code.as_str(),
            device_id = %id,
            request_id = %request_id,
            retry_after_s = error.retry_after_s,
            "refused device {id} a certificate ({}): {}",
            error.code.as_str(),
            error.message
        );
        if error.code.is_final() {
            if let Err(e) = self
                .pki
                .registry
                .note_renewal_refusal(id.as_str(), error.code.as_str(), now)
            {
                warn!(event = "registry_failed", device_id = %id, error = %e, "cannot record the refusal: {e}");
            }
        }
        Answer {
            id,
            reply: RenewReply {
                request_id,
                certificate: None,
                error: Some(error),
            },
        }
    }

    /// Every check of a request; the request id (possibly empty, for an unreadable payload) and
    /// the refusal of the first that fails.
    fn judge(&mut self, incoming: &Incoming, now: i64) -> Result<Approved, (String, RenewError)> {
        let refusal = |code, message: String| RenewError {
            code,
            message,
            retry_after_s: None,
        };
        let request = read_request(&incoming.payload)
            .map_err(|message| (String::new(), refusal(ErrorCode::BadRequest, message)))?;
        let request_id = request.request_id.clone();
        let fail = |error: RenewError| (request_id.clone(), error);
        if let Some(last) = self.last_request.get(&incoming.id) {
            let wait = last + self.policy.min_interval_s - now;
            if wait > 0 {
                return Err(fail(RenewError {
                    code: ErrorCode::RateLimited,
                    message: format!(
                        "one request per {} s per device: ask again in {wait} s",
                        self.policy.min_interval_s
                    ),
                    retry_after_s: Some(wait as u64),
                }));
            }
        }
        self.last_request.insert(incoming.id.clone(), now);
        let csr = parse_csr(request.csr.as_bytes()).map_err(|problem| {
            fail(match problem {
                CsrProblem::BadSignature => refusal(ErrorCode::BadSignature, problem.to_string()),
                CsrProblem::NoCommonName | CsrProblem::InvalidId { .. } => {
                    refusal(ErrorCode::IdMismatch, problem.to_string())
                }
                _ => refusal(ErrorCode::BadRequest, problem.to_string()),
            })
        })?;
        let own_uri = Role::Device.san_uri(&incoming.id);
        if csr.id != incoming.id || csr.san_uris.iter().any(|uri| *uri != own_uri) {
            return Err(fail(refusal(
                ErrorCode::IdMismatch,
                format!(
                    "the CSR asks for {:?} (SAN {:?}) but was sent by device {:?}",
                    csr.id.as_str(),
                    csr.san_uris,
                    incoming.id.as_str()
                ),
            )));
        }
        let key_type = KeyType::of_algorithm(csr.public_key.algorithm());
        if !key_type.is_some_and(|key_type| self.policy.allowed_key_types.contains(&key_type)) {
            return Err(fail(refusal(
                ErrorCode::KeyTypeNotAllowed,
                format!(
                    "the CSR's key ({}) is not one this issuer signs ({})",
                    key_type.map_or("an unknown algorithm".to_owned(), |k| k.name().to_owned()),
                    self.policy
                        .allowed_key_types
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )));
        }
        self.check_registry(&incoming.id, now).map_err(fail)?;
        Ok(Approved {
            id: incoming.id.clone(),
            request_id: request.request_id,
            csr,
        })
    }

    /// The registry's part: the device is known, not wholly revoked, and due.
    fn check_registry(&self, id: &DeviceId, now: i64) -> Result<(), RenewError> {
        let unavailable = |e: crate::Error| RenewError {
            code: ErrorCode::Unavailable,
            message: format!("the registry cannot be read: {e}"),
            retry_after_s: Some(self.policy.min_interval_s.max(1) as u64),
        };
        let certificates = self
            .pki
            .registry
            .unrevoked_device_certificates(id.as_str())
            .map_err(unavailable)?;
        let Some((serial, not_before, not_after)) = certificates.first() else {
            let known = self.pki.registry.knows_device(id.as_str()).map_err(unavailable)?;
            return Err(if known {
                RenewError {
                    code: ErrorCode::Revoked,
                    message: format!("every certificate of device {id:?} is revoked"),
                    retry_after_s: None,
                }
            } else {
                RenewError {
                    code: ErrorCode::UnknownDevice,
                    message: format!("the registry holds no certificate of device {id:?}"),
                    retry_after_s: None,
                }
            });
        };
        let opens = window_opens(*not_before, *not_after, self.policy.renew_after);
        if !self.policy.force && now < opens {
            return Err(RenewError {
                code: ErrorCode::NotDue,
                message: format!("certificate {serial} is not due for renewal until {opens} (Unix time)"),
                retry_after_s: Some((opens - now) as u64),
            });
        }
        Ok(())
    }

    /// Takes a device's confirmation that it connected with the certificate of the serial it
    /// names: every certificate of the device issued before that one is revoked (superseded)
    /// and the CRL republished. Returns the serials revoked.
    ///
    /// The topic ACL cannot tell which of the device's certificates published the
    /// confirmation; it does not need to. Only a holder of one of the device's keys can publish
    /// it; the agent publishes it only on a connection made with the new certificate; and the
    /// serial must be a certificate issued to this very device and still active. A thief of an
    /// old key could revoke the device's other certificates early, which he could as well do by
    /// renewing himself: a stolen key is answered by `provision revoke`, which this never undoes.
    pub fn confirm(&mut self, id: &DeviceId, payload: &[u8]) -> crate::Result<Vec<String>> {
        let serial = serde_json::from_slice::<RenewConfirm>(payload)
            .ok()
            .and_then(|confirm| Serial::parse(&confirm.serial))
            .ok_or_else(|| crate::Error::BadArgument {
                flag: "confirm payload",
                reason: format!("device {id}: not a confirmation with a hexadecimal serial"),
            })?;
        let target = RevokeTarget::PredecessorsOf {
            id: id.to_string(),
            serial: serial.to_string(),
        };
        let revoked = self
            .pki
            .revoke_and_publish(&target, Reason::Superseded, DEFAULT_NEXT_UPDATE_DAYS)?;
        if !revoked.is_empty() {
            self.pki.deliver_crl(&self.policy.publish_crl_to)?;
            self.counters.superseded += revoked.len() as u64;
            info!(
                event = "renewal",
                decision = "superseded",
                device_id = %id,
                serial = serial.as_str(),
                revoked = revoked.join(","),
                "device {id} connected with {}: revoked {} (superseded) and republished the CRL",
                serial.as_str(),
                revoked.join(", ")
            );
        }
        Ok(revoked)
    }
}

/// Reads a request payload, or says why it is not one.
fn read_request(payload: &[u8]) -> Result<RenewRequest, String> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "the request is {} bytes, more than {MAX_REQUEST_BYTES}",
            payload.len()
        ));
    }
    let request: RenewRequest = serde_json::from_slice(payload)
        .map_err(|e| format!("not a renewal request (JSON with request_id and csr): {e}"))?;
    let id = &request.request_id;
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "request_id must be 1 to {MAX_REQUEST_ID_LEN} printable ASCII characters"
        ));
    }
    Ok(request)
}

#[cfg(test)]
mod tests;
