//! One client connection, from the TCP accept to the close: the TLS handshake, CONNECT, the
//! packet pump, and the close (a waiting publication completed, the will, the audit line).
//!
//! Everything here runs in the connection's own task, so a slow or hostile peer delays nobody
//! else, and every failure ends only this connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::codec::{Outbound, ReasonCode, Version, Will};
use crate::connect::{establish, Established};
use crate::connection::Connection;
use crate::context::SessionContext;
use crate::handshake::handshake;
use crate::pump::pump;
use crate::reason::{KickReason, RejectReason, SessionEnd, Violation};
use crate::router::{Message, Publication, Router, WillHold};
use crate::tls::PresentedCert;

/// How long the close waits for TLS close_notify to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a connection taken over waits for its successor's CONNACK before it closes.
const TAKEOVER_GRACE: Duration = Duration::from_secs(1);
/// How long a connection taken over stays silent after its successor's CONNACK. Longer than the
/// half-second read timeout of Eclipse Paho's interoperability client, whose reader thread of
/// the old socket otherwise wakes on our close and reads the new connection's bytes.
const TAKEOVER_LINGER: Duration = Duration::from_millis(700);

/// Serves one accepted TCP connection to its end.
///
/// A task's future is allocated once, at the size of its largest state, and kept until the
/// session ends. The phases that run once (handshake, CONNECT, close) are boxed so that an idle
/// session holds only what its pump needs.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<SessionContext>) {
    let Some((mut conn, authenticated)) = Box::pin(handshake(tcp, peer, &ctx)).await else {
        return;
    };
    let Some(established) = Box::pin(establish(authenticated, &mut conn, peer, &ctx)).await else {
        return;
    };
    let (end, waiting) = pump(&established, &mut conn, &ctx).await;
    Box::pin(finish(established, conn, end, waiting, peer, &ctx)).await;
}

/// Closes TLS, detaches the session from the router, completes what it left waiting, publishes
/// the will if the end calls for it and logs why the session ended.
async fn finish(
    session: Established,
    conn: Connection,
    end: SessionEnd,
    waiting: Option<Publication>,
    peer: SocketAddr,
    ctx: &SessionContext,
) {
    let Established {
        identity,
        revocation,
        client_id,
        kick,
        attached,
        registration,
        will,
        ..
    } = session;
    let mut conn = conn;
    // A will with a delay waits with the session, which a reconnect may resume first: decided
    // now, while this connection still owns the session, before anything can wait.
    let will = will.filter(|_| end.fires_will()).map(|will| {
        let hold = match will.delay {
            0 => WillHold::PublishNow,
            delay => attached.hold_will(delay),
        };
        (will, hold)
    });
    // An MQTT 5 client is told why, with the audit word as the reason string.
    if let (Version::V5, Some(code)) = (conn.version(), disconnect_code(&end)) {
        let _ = conn.queue(&Outbound::Disconnect {
            code,
            reason: end.as_str(),
        });
    }
    // The client learns first, unless another connection took its client id over (see below).
    let successor = kick.successor().cloned();
    if successor.is_none() {
        conn.close(CLOSE_GRACE).await;
    }
    // Offline from now on: a persistent session queues for the next connection, a clean one
    // ends, and publishers waiting for it go on.
    drop(attached);
    // Some subscribers may have the message already; the rest get it too (bounded by the slow
    // subscriber timeout), so a client that resends it after a reconnect causes at most a
    // duplicate, and a QoS 2 resend (already recorded as received) none. A broker shutting down
    // does not wait: what is left is counted.
    if let Some(waiting) = waiting {
        if end == SessionEnd::Kicked(KickReason::Shutdown) {
            waiting.abandon();
        } else {
            waiting.finish().await;
        }
    }
    match will {
        Some((will, WillHold::PublishNow)) => ctx.router.publish(will_message(&will)).finish().await,
        Some((will, WillHold::Held(delay, pending))) => {
            let router: Router = ctx.router.clone();
            tokio::spawn(async move {
                if pending.wait(Duration::from_secs(u64::from(delay))).await {
                    // Made now: its Message Expiry Interval starts when it is published.
                    router.publish(will_message(&will)).finish().await;
                }
            });
        }
        _ => {}
    }
    if let Some(successor) = successor {
        // A connection taken over says nothing until its successor has its CONNACK, and then
        // for a moment more: a client reconnecting under the same client id usually still reads
        // its old socket from another thread, which our close would wake onto the new one.
        let _ = tokio::time::timeout(TAKEOVER_GRACE, successor.connacked()).await;
        tokio::time::sleep(TAKEOVER_LINGER).await;
        conn.close(CLOSE_GRACE).await;
    }
    drop(registration);
    ctx.audit.metrics().session_closed(identity.role);
    match &end {
        SessionEnd::Kicked(KickReason::Revoked) => ctx.audit.revoked_kick(&identity, &revocation.serial),
        SessionEnd::Protocol(_, detail) => {
            let cert = PresentedCert {
                id: Some(identity.id.to_string()),
                revocation: Some(revocation),
                sha256: String::new(),
            };
            ctx.audit.reject(peer, RejectReason::ProtocolError, detail, Some(&cert))
        }
        end => ctx.audit.disconnect(peer, &identity, &client_id, end),
    }
    // Last: the session is over for everyone else; only the socket is still owed its close.
    conn.linger(CLOSE_GRACE).await;
}

/// The will as the message it becomes.
fn will_message(will: &Will) -> Arc<Message> {
    let topic = String::from_utf8_lossy(&will.topic);
    Message::carrying(
        &topic,
        &will.payload,
        will.qos,
        will.retain,
        &will.properties.forwarded,
        will.properties.message_expiry,
    )
}

/// The MQTT 5 DISCONNECT reason code for a session the broker ends; none where the client
/// ended it or the connection is gone.
fn disconnect_code(end: &SessionEnd) -> Option<ReasonCode> {
    Some(match end {
        SessionEnd::ClientDisconnect
        | SessionEnd::ClientDisconnectWithWill
        | SessionEnd::PeerClosed
        | SessionEnd::Io(_) => return None,
        SessionEnd::KeepaliveTimeout => ReasonCode::KeepAliveTimeout,
        SessionEnd::AclDisconnect => ReasonCode::NotAuthorized,
        SessionEnd::Protocol(violation, _) => match violation {
            Violation::Malformed => ReasonCode::MalformedPacket,
            Violation::Protocol => ReasonCode::ProtocolError,
            Violation::PacketTooLarge => ReasonCode::PacketTooLarge,
            Violation::ReceiveMaximumExceeded => ReasonCode::ReceiveMaximumExceeded,
            Violation::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
        },
        SessionEnd::Kicked(KickReason::Revoked) => ReasonCode::AdministrativeAction,
        SessionEnd::Kicked(KickReason::TakenOver) => ReasonCode::SessionTakenOver,
        SessionEnd::Kicked(KickReason::SlowSubscriber) => ReasonCode::QuotaExceeded,
        SessionEnd::Kicked(KickReason::Shutdown) => ReasonCode::ServerShuttingDown,
    })
}
