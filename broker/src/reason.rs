//! The broker's vocabulary for why a connection was refused or a session ended.
//!
//! The words are a contract: the audit log carries them in `reason`, the metrics label by them
//! and the README's troubleshooting table explains each. This module depends on nothing else in
//! the crate, so every layer (TLS, router, audit, metrics) can name a reason without importing
//! another's machinery.

use std::fmt;

/// Why a connection was refused before its session began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The client sent no certificate.
    NoClientCert,
    /// Revocation is configured, but no CRL covers the CA that issued the certificate (and
    /// `crl_exempt_cas` does not name it): without one, a revoked certificate would pass.
    CrlMissing,
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
    /// The certificate is a gateway's (`urn:gateway:`): it identifies a bridge to an upstream
    /// broker, and a gateway broker has no topics for one.
    GatewayIdentity,
    /// The CONNECT client id is not the certificate's device id, or is not usable.
    ClientIdMismatch,
    /// A service asked for a persistent session without naming it (empty client id with
    /// `clean_session = false`): there would be no way to find the session again.
    ClientIdRequired,
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
    /// The client speaks an MQTT version this broker does not (neither 3.1.1 nor 5).
    UnsupportedProtocolVersion,
    /// An MQTT 5 client asked for enhanced authentication (an Authentication Method): the
    /// certificate is the authentication, and nothing else is offered.
    EnhancedAuthRefused,
    /// `limits.max_connections` sessions are already open.
    TooManyConnections,
}

impl RejectReason {
    /// Every reason, for documentation and metrics.
    pub const ALL: [RejectReason; 20] = [
        RejectReason::NoClientCert,
        RejectReason::UnknownIssuer,
        RejectReason::Expired,
        RejectReason::NotYetValid,
        RejectReason::Revoked,
        RejectReason::CrlMissing,
        RejectReason::WrongPurpose,
        RejectReason::CaCertAsLeaf,
        RejectReason::BadIdentity,
        RejectReason::GatewayIdentity,
        RejectReason::ClientIdMismatch,
        RejectReason::ClientIdRequired,
        RejectReason::WillDenied,
        RejectReason::HandshakeTimeout,
        RejectReason::ConnectTimeout,
        RejectReason::TlsError,
        RejectReason::ProtocolError,
        RejectReason::UnsupportedProtocolVersion,
        RejectReason::EnhancedAuthRefused,
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
            RejectReason::CrlMissing => "crl_missing",
            RejectReason::WrongPurpose => "wrong_purpose",
            RejectReason::CaCertAsLeaf => "ca_cert_as_leaf",
            RejectReason::BadIdentity => "bad_identity",
            RejectReason::GatewayIdentity => "gateway_identity",
            RejectReason::ClientIdMismatch => "client_id_mismatch",
            RejectReason::ClientIdRequired => "client_id_required",
            RejectReason::WillDenied => "will_denied",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::ConnectTimeout => "connect_timeout",
            RejectReason::TlsError => "tls_error",
            RejectReason::ProtocolError => "protocol_error",
            RejectReason::UnsupportedProtocolVersion => "unsupported_protocol_version",
            RejectReason::EnhancedAuthRefused => "enhanced_auth_refused",
            RejectReason::TooManyConnections => "too_many_connections",
        }
    }

    /// The index of this reason in [`RejectReason::ALL`] (for metric arrays).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why something outside a session's own connection told it to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KickReason {
    /// Its certificate was revoked.
    Revoked,
    /// A newer connection authenticated under the same client id (MQTT-3.1.4-2).
    TakenOver,
    /// Its outgoing queue stayed full, with nothing taken from it, past
    /// `limits.slow_subscriber_timeout_ms` while publishers waited for it.
    SlowSubscriber,
    /// The broker is shutting down.
    Shutdown,
}

/// How a client broke the protocol: MQTT 5 clients are told which with a DISCONNECT reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Bytes that do not form the packet they claim to be.
    Malformed,
    /// A well-formed packet the protocol forbids (a repeated property, a second CONNECT, ...).
    Protocol,
    /// A packet larger than `limits.max_packet_bytes`.
    PacketTooLarge,
    /// More unacknowledged QoS 1/2 PUBLISHes than the Receive Maximum the broker gave.
    ReceiveMaximumExceeded,
    /// A topic alias of 0, beyond the Topic Alias Maximum, or never set.
    TopicAliasInvalid,
}

/// Why an established session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The client sent DISCONNECT asking for its will to be published (MQTT 5 reason 0x04).
    ClientDisconnectWithWill,
    /// The client closed the connection without DISCONNECT.
    PeerClosed,
    /// Nothing arrived within 1.5 keepalive periods.
    KeepaliveTimeout,
    /// The client broke the protocol (how, and the details).
    Protocol(Violation, String),
    /// A denied PUBLISH with `acl.on_denied_publish = "disconnect"` (or a denied QoS 2 one).
    AclDisconnect,
    /// Told to close from outside (revocation, takeover, slow subscriber, shutdown).
    Kicked(KickReason),
    /// Reading or writing the socket failed.
    Io(String),
}

impl SessionEnd {
    /// The stable word for the audit log.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionEnd::ClientDisconnect => "client_disconnect",
            SessionEnd::ClientDisconnectWithWill => "client_disconnect_with_will",
            SessionEnd::PeerClosed => "peer_closed",
            SessionEnd::KeepaliveTimeout => "keepalive_timeout",
            SessionEnd::Protocol(..) => "protocol_error",
            SessionEnd::AclDisconnect => "acl_disconnect",
            SessionEnd::Kicked(KickReason::Revoked) => "revoked",
            SessionEnd::Kicked(KickReason::TakenOver) => "taken_over",
            SessionEnd::Kicked(KickReason::SlowSubscriber) => "slow_subscriber",
            SessionEnd::Kicked(KickReason::Shutdown) => "shutdown",
            SessionEnd::Io(_) => "io_error",
        }
    }

    /// Whether the will must be published: every end the client did not ask for, except a
    /// broker shutdown.
    pub fn fires_will(&self) -> bool {
        !matches!(
            self,
            SessionEnd::ClientDisconnect | SessionEnd::Kicked(KickReason::Shutdown)
        )
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            SessionEnd::ClientDisconnectWithWill => f.write_str("client sent DISCONNECT asking for its will"),
            SessionEnd::PeerClosed => f.write_str("client closed the connection without DISCONNECT"),
            SessionEnd::KeepaliveTimeout => f.write_str("keepalive expired"),
            SessionEnd::Protocol(_, detail) => write!(f, "protocol error: {detail}"),
            SessionEnd::AclDisconnect => {
                f.write_str("denied PUBLISH (acl.on_denied_publish = \"disconnect\", or QoS 2)")
            }
            SessionEnd::Kicked(KickReason::Revoked) => f.write_str("certificate revoked"),
            SessionEnd::Kicked(KickReason::TakenOver) => f.write_str("a newer connection took over the client id"),
            SessionEnd::Kicked(KickReason::SlowSubscriber) => f.write_str(
                "slow subscriber: its queue stayed full, nothing taken from it, past limits.slow_subscriber_timeout_ms",
            ),
            SessionEnd::Kicked(KickReason::Shutdown) => f.write_str("broker shutting down"),
            SessionEnd::Io(detail) => write!(f, "connection failed: {detail}"),
        }
    }
}
