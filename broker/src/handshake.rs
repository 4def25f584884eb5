//! The TLS handshake of one connection, with a deadline, and the audit of its outcome: the
//! certificate's identity when it is accepted, the stable reason when it is not.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use fleet_identity::Identity;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::connection::{Connection, HandshakeError};
use crate::context::SessionContext;
use crate::reason::RejectReason;
use crate::tls::{reason_for, HandshakeNotes, PresentedCert, HANDSHAKE_NOTES};

/// Who a peer proved to be in its handshake.
pub(crate) struct Authenticated {
    pub(crate) identity: Identity,
    pub(crate) cert: PresentedCert,
    pub(crate) tls_version: String,
    /// When the certificate expired, if it was admitted under `renewal_grace_days`.
    pub(crate) expired_grace: Option<i64>,
}

/// Runs the handshake; refusals are logged here.
pub(crate) async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<(Connection, Authenticated)> {
    let config = ctx.tls.current().config.clone();
    let deadline = Duration::from_millis(ctx.limits.handshake_timeout_ms);
    let max_packet_bytes = ctx.limits.max_packet_bytes;
    let (outcome, notes) = HANDSHAKE_NOTES
        .scope(RefCell::new(HandshakeNotes::default()), async move {
            let outcome = timeout(deadline, Connection::accept(tcp, config, max_packet_bytes)).await;
            (outcome, HANDSHAKE_NOTES.with(|notes| notes.take()))
        })
        .await;
    let presented = notes.presented.as_ref();
    match outcome {
        Err(_) => {
            let detail = format!("no complete handshake within {} ms", ctx.limits.handshake_timeout_ms);
            ctx.audit
                .reject(peer, RejectReason::HandshakeTimeout, &detail, presented);
            None
        }
        Ok(Err(error)) => {
            let (reason, detail) = classify_handshake_error(&error, &notes);
            ctx.audit.reject(peer, reason, &detail, presented);
            None
        }
        Ok(Ok(tls)) => {
            let HandshakeNotes {
                presented: Some(cert),
                identity: Some(identity),
                expired_grace,
                ..
            } = notes
            else {
                ctx.audit.reject(
                    peer,
                    RejectReason::TlsError,
                    "handshake finished without a verified client identity",
                    presented,
                );
                return None;
            };
            let tls_version = tls.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            Some((
                tls,
                Authenticated {
                    identity,
                    cert,
                    tls_version,
                    expired_grace,
                },
            ))
        }
    }
}

/// The reason and detail for a failed handshake: the verifier's notes first, then the error.
fn classify_handshake_error(error: &HandshakeError, notes: &HandshakeNotes) -> (RejectReason, String) {
    if let Some((reason, detail)) = &notes.refused {
        return (*reason, detail.clone());
    }
    match error {
        HandshakeError::Tls(rustls::Error::AlertReceived(alert)) => (
            RejectReason::TlsError,
            format!("the client aborted the handshake with alert {alert:?} (it may not trust the broker certificate)"),
        ),
        HandshakeError::Tls(tls) => (reason_for(tls), tls.to_string()),
        other => (RejectReason::TlsError, other.to_string()),
    }
}
