//! CONNECT: read it within its deadline, bind the client id to the certificate, attach the
//! connection to its router session and answer CONNACK. Every refusal is written and logged here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::{Identity, Role};
use rumqttd::protocol::{Connect, ConnectReturnCode, LastWill};
use tokio::time::timeout;

use crate::acl::{TopicRules, Verdict};
use crate::codec::{self, FrameError, Inbound};
use crate::connection::{Connection, ReadError};
use crate::context::SessionContext;
use crate::crl::RevocationKey;
use crate::handshake::Authenticated;
use crate::kick::Kick;
use crate::live::Registration;
use crate::reason::RejectReason;
use crate::router::{Attached, SessionKey};
use crate::tls::PresentedCert;

/// A session past its CONNACK: what the pump and the close need.
pub(crate) struct Established {
    pub(crate) identity: Identity,
    /// The certificate's issuer and serial (what revocation and the audit need of it from now on).
    pub(crate) revocation: RevocationKey,
    /// The client id as the client knows it (assigned if it sent none).
    pub(crate) client_id: String,
    pub(crate) rules: TopicRules,
    /// Tells this connection to close (revocation, takeover, slow subscriber, shutdown).
    pub(crate) kick: Arc<Kick>,
    /// The router session.
    pub(crate) attached: Attached,
    pub(crate) registration: Registration,
    /// Boxed: most sessions have none, and every session's task is allocated at full size.
    pub(crate) will: Option<Box<LastWill>>,
    /// 1.5 times the client's keepalive, if it asked for one.
    pub(crate) keepalive: Option<Duration>,
}

/// Reads and checks the CONNECT, attaches the session and answers CONNACK.
pub(crate) async fn establish(
    session: Authenticated,
    conn: &mut Connection,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<Established> {
    let Authenticated {
        identity,
        cert,
        tls_version,
        expired_grace,
    } = session;
    let (connect, will) = read_connect(conn, &cert, peer, ctx).await?;
    let rules = match expired_grace {
        Some(expired_at) => {
            ctx.audit.expired_grace(peer, &identity, &cert, expired_at);
            TopicRules::renewal_only(&identity)
        }
        None => ctx.acl.for_identity(&identity),
    };
    if let Err((code, reason, detail)) = check_connect(&identity, &connect, will.as_ref(), &rules) {
        if let (RejectReason::WillDenied, Some(will)) = (reason, &will) {
            ctx.audit
                .acl_denied(&identity, "will", &String::from_utf8_lossy(&will.topic));
        }
        let _ = conn.write_now(codec::connack(code, false)).await;
        ctx.audit.reject(peer, reason, &detail, Some(&cert));
        return None;
    }
    let Some(revocation) = cert.revocation.clone() else {
        // The verifier accepted a certificate it could read: never without a serial.
        ctx.audit.reject(
            peer,
            RejectReason::BadIdentity,
            "the certificate's serial cannot be read",
            Some(&cert),
        );
        return None;
    };
    let (key, client_id) = session_key(&identity, &connect.client_id);
    let kick = Arc::new(Kick::default());
    let registration = ctx
        .sessions
        .register(identity.clone(), revocation.clone(), kick.clone());
    // A CRL swapped in between this handshake and the registration above would miss us.
    if ctx.tls.is_revoked(&revocation) {
        ctx.audit
            .reject(peer, RejectReason::Revoked, "revoked while connecting", Some(&cert));
        return None;
    }
    let attached = ctx
        .router
        .attach(key, connect.clean_session, kick.clone(), ctx.limits.max_inflight);
    // The decision is recorded before the client can see it.
    ctx.audit.accept(peer, &identity, &cert, &tls_version);
    ctx.audit.metrics().session_opened(identity.role);
    let connack = codec::connack(ConnectReturnCode::Success, attached.session_present());
    let written = conn.write_now(connack).await;
    kick.mark_connacked();
    if written.is_err() {
        ctx.audit.metrics().session_closed(identity.role);
        return None;
    }
    let keepalive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    Some(Established {
        identity,
        revocation,
        client_id,
        rules,
        kick,
        attached,
        registration,
        will: will.map(Box::new),
        keepalive,
    })
}

/// Reads the CONNECT, within the deadline. Refusals are written and logged here.
async fn read_connect(
    conn: &mut Connection,
    cert: &PresentedCert,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<(Connect, Option<LastWill>)> {
    let deadline = Duration::from_millis(ctx.limits.connect_timeout_ms);
    let first = timeout(deadline, conn.read_packet()).await;
    let reject = |reason, detail: &str| ctx.audit.reject(peer, reason, detail, Some(cert));
    match first {
        Err(_) => reject(
            RejectReason::ConnectTimeout,
            &format!(
                "no CONNECT within {} ms of the handshake",
                ctx.limits.connect_timeout_ms
            ),
        ),
        Ok(Ok(Inbound::Connect(connect))) => return Some(*connect),
        Ok(Ok(other)) => reject(
            RejectReason::ProtocolError,
            &format!("first packet was {}, not CONNECT", other.name()),
        ),
        Ok(Err(ReadError::Frame(FrameError::UnsupportedProtocolLevel(level)))) => {
            let _ = conn
                .write_now(codec::connack(ConnectReturnCode::RefusedProtocolVersion, false))
                .await;
            reject(
                RejectReason::UnsupportedProtocolVersion,
                &format!("MQTT protocol level {level}: only MQTT 3.1.1 is supported"),
            );
        }
        Ok(Err(e)) => reject(RejectReason::ProtocolError, &e.to_string()),
    }
    None
}

/// Numbers the client ids given to services that connect without one.
static ASSIGNED: AtomicU64 = AtomicU64::new(1);

/// The router session key of a peer, and the client id as the client knows it.
///
/// Roles live in separate namespaces, so no service can take over a device's session by naming
/// its client id, and several instances of a service may connect under different client ids. A
/// device's session is its certificate's id whatever it sent (`check_connect` refused anything
/// else but empty). A service without a client id gets a fresh one (clean sessions only).
///
/// Shared subscription groups are scoped: each device alone, all services together. So a device
/// never takes messages from a backend's group, nor shares a group with another device.
fn session_key(identity: &Identity, requested: &str) -> (SessionKey, String) {
    let id = identity.id.as_str();
    let (client, scope, client_id) = match identity.role {
        Role::Device => (format!("device:{id}"), format!("device:{id}"), id.to_owned()),
        Role::Service => {
            let client_id = if requested.is_empty() {
                format!("{id}-auto-{}", ASSIGNED.fetch_add(1, Ordering::Relaxed))
            } else {
                requested.to_owned()
            };
            (format!("service:{id}:{client_id}"), "services".to_owned(), client_id)
        }
    };
    let key = SessionKey {
        client: client.into(),
        share_scope: scope.into(),
    };
    (key, client_id)
}

/// Binds the CONNECT to the certificate: the refusal to send and log, if any.
fn check_connect(
    identity: &Identity,
    connect: &Connect,
    will: Option<&LastWill>,
    rules: &TopicRules,
) -> Result<(), (ConnectReturnCode, RejectReason, String)> {
    let requested = connect.client_id.as_str();
    match identity.role {
        Role::Device if !requested.is_empty() && requested != identity.id.as_str() => {
            let detail = format!(
                "client id {requested:?} does not match certificate identity {:?}",
                identity.id.as_str()
            );
            return Err((ConnectReturnCode::NotAuthorized, RejectReason::ClientIdMismatch, detail));
        }
        Role::Service if requested.is_empty() && !connect.clean_session => {
            return Err((
                ConnectReturnCode::ClientIdentifierNotValid,
                RejectReason::ClientIdRequired,
                "a persistent session (clean_session = false) needs a client id".into(),
            ));
        }
        Role::Service if requested.chars().any(|c| "+$#/".contains(c) || c.is_control()) => {
            let detail = format!("client id {requested:?} contains '+', '$', '#', '/' or a control character");
            return Err((
                ConnectReturnCode::ClientIdentifierNotValid,
                RejectReason::ProtocolError,
                detail,
            ));
        }
        _ => {}
    }
    if let Some(will) = will {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        if rules.may_publish(topic) != Verdict::Allowed {
            return Err((
                ConnectReturnCode::NotAuthorized,
                RejectReason::WillDenied,
                format!("will topic {topic:?} is outside what {identity} may publish to"),
            ));
        }
    }
    Ok(())
}
