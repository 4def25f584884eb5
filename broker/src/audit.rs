//! The audit trail: one structured `tracing` event per decision, and the metric it moves.
//!
//! Every event carries `event` (accept, reject, acl_denied, revoked_kick, reload, reload_failed,
//! crl_stale) so a log pipeline can filter on it; rejects carry `reason`, one of the stable words
//! of [`RejectReason`], which the README's troubleshooting table explains.

use std::net::SocketAddr;
use std::sync::Arc;

use fleet_identity::Identity;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Why a connection was refused. The words are a contract: logs, metrics and docs use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The client sent no certificate.
    NoClientCert,
    /// The certificate does not chain to a configured device CA.
    UnknownIssuer,
    /// The certificate's notAfter has passed.
    Expired,
    /// The certificate's notBefore is in the future.
    NotYetValid,
    /// The certificate is on the CRL.
    Revoked,
    /// The certificate is not for client authentication (e.g. a server certificate).
    WrongPurpose,
    /// A CA certificate was presented as the client's own.
    CaCertAsLeaf,
    /// The certificate does not carry exactly one valid identity.
    BadIdentity,
    /// The CONNECT client id is not the certificate's device id.
    ClientIdMismatch,
    /// The will topic is outside what the identity may publish to.
    WillDenied,
    /// The TLS handshake did not finish within `limits.handshake_timeout_ms`.
    HandshakeTimeout,
    /// No CONNECT arrived within `limits.connect_timeout_ms` after the handshake.
    ConnectTimeout,
    /// The TLS handshake failed for a reason other than the certificate (no common cipher,
    /// garbage instead of a ClientHello, connection closed).
    TlsError,
    /// The client broke the MQTT protocol (malformed, oversized, unexpected or second CONNECT).
    ProtocolError,
    /// The client speaks an MQTT version this broker does not (MQTT 5 for now).
    UnsupportedProtocolVersion,
    /// `limits.max_connections` sessions are already open.
    TooManyConnections,
}

impl RejectReason {
    /// Every reason, for documentation and metrics.
    pub const ALL: [RejectReason; 16] = [
        RejectReason::NoClientCert,
        RejectReason::UnknownIssuer,
        RejectReason::Expired,
        RejectReason::NotYetValid,
        RejectReason::Revoked,
        RejectReason::WrongPurpose,
        RejectReason::CaCertAsLeaf,
        RejectReason::BadIdentity,
        RejectReason::ClientIdMismatch,
        RejectReason::WillDenied,
        RejectReason::HandshakeTimeout,
        RejectReason::ConnectTimeout,
        RejectReason::TlsError,
        RejectReason::ProtocolError,
        RejectReason::UnsupportedProtocolVersion,
        RejectReason::TooManyConnections,
    ];

    /// The stable word.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::NoClientCert => "no_client_cert",
            RejectReason::UnknownIssuer => "unknown_issuer",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::Revoked => "revoked",
            RejectReason::WrongPurpose => "wrong_purpose",
            RejectReason::CaCertAsLeaf => "ca_cert_as_leaf",
            RejectReason::BadIdentity => "bad_identity",
            RejectReason::ClientIdMismatch => "client_id_mismatch",
            RejectReason::WillDenied => "will_denied",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::ConnectTimeout => "connect_timeout",
            RejectReason::TlsError => "tls_error",
            RejectReason::ProtocolError => "protocol_error",
            RejectReason::UnsupportedProtocolVersion => "unsupported_protocol_version",
            RejectReason::TooManyConnections => "too_many_connections",
        }
    }

    /// The index of this reason in [`RejectReason::ALL`] (for metric arrays).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What the broker knows about a presented client certificate.
#[derive(Clone, Debug, Default)]
pub struct PresentedCert {
    /// The identity id, if one could be read.
    pub id: Option<String>,
    /// Serial, lower-case hex.
    pub serial: String,
    /// SHA-256 fingerprint, lower-case hex.
    pub sha256: String,
}

/// Writes audit events and counts them.
#[derive(Clone)]
pub struct Audit {
    metrics: Arc<Metrics>,
}

impl Audit {
    /// An audit trail that also feeds `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    /// The metrics this trail feeds.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A session was accepted.
    pub fn accept(&self, peer: SocketAddr, identity: &Identity, cert: &PresentedCert, tls_version: &str) {
        self.metrics.handshake_accepted();
        info!(
            event = "accept",
            device_id = %identity.id,
            role = %identity.role,
            serial = %cert.serial,
            sha256 = %cert.sha256,
            %peer,
            tls_version,
            "accepted {} {}",
            identity.role,
            identity.id
        );
    }

    /// A connection was refused.
    pub fn reject(&self, peer: SocketAddr, reason: RejectReason, detail: &str, cert: Option<&PresentedCert>) {
        self.metrics.handshake_rejected(reason);
        let id = cert.and_then(|c| c.id.as_deref()).unwrap_or("-");
        let serial = cert.map_or("-", |c| c.serial.as_str());
        warn!(event = "reject", reason = reason.as_str(), %peer, device_id = id, serial, detail, "rejected {peer}: {}", reason.as_str());
    }

    /// A PUBLISH, SUBSCRIBE filter or will was denied by the ACL.
    pub fn acl_denied(&self, identity: &Identity, action: &'static str, topic: &str) {
        self.metrics.acl_denied();
        warn!(event = "acl_denied", device_id = %identity.id, role = %identity.role, action, topic, "{} {} may not {action} {topic:?}", identity.role, identity.id);
    }

    /// A live session was closed because its certificate was revoked.
    pub fn revoked_kick(&self, identity: &Identity, serial: &str) {
        warn!(event = "revoked_kick", device_id = %identity.id, role = %identity.role, serial, "closed the session of {} {}: certificate revoked", identity.role, identity.id);
    }

    /// New TLS material is in force.
    pub fn reload(&self, what: &str) {
        info!(event = "reload", changed = what, "reloaded {what}");
    }

    /// New TLS material was refused; the old configuration stays.
    pub fn reload_failed(&self, error: &str) {
        tracing::error!(
            event = "reload_failed",
            error,
            "kept the previous TLS configuration: {error}"
        );
    }

    /// The CRL is past its nextUpdate. It is still enforced.
    pub fn crl_stale(&self, path: &str, next_update: &str) {
        warn!(event = "crl_stale", crl = path, next_update, "CRL {path} is past its nextUpdate ({next_update}); still enforcing it: run `provision crl` and deliver the new file");
    }
}
