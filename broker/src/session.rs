//! One client connection, from the TCP accept to the close: the TLS handshake with a deadline,
//! CONNECT with a deadline, binding the client id to the certificate, then pumping packets
//! between the client and the router with every PUBLISH and SUBSCRIBE checked against the ACL.
//!
//! Everything here runs in the connection's own task, so a slow or hostile peer delays nobody
//! else, and every failure ends only this connection.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fleet_identity::{Identity, Role};
use rumqttd::local::LinkRx;
use rumqttd::protocol::{Connect, ConnectReturnCode, LastWill, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::acl::{AclConfig, TopicRules, Verdict};
use crate::audit::{Audit, PresentedCert, RejectReason};
use crate::codec::{self, packet_name, FrameError};
use crate::config::Limits;
use crate::link::LazyLink;
use crate::live::{LiveSessions, Registration};
use crate::pump::pump;
use crate::reload::TlsState;
use crate::router::RouterHandle;
use crate::tls::{classify_handshake_error, HandshakeNotes, HANDSHAKE_NOTES};

/// What every session shares.
pub struct SessionContext {
    /// The TLS material in force.
    pub tls: Arc<TlsState>,
    /// ACL templates.
    pub acl: Arc<AclConfig>,
    /// Deadlines and sizes.
    pub limits: Limits,
    /// The router.
    pub router: RouterHandle,
    /// Live sessions, for revocation.
    pub sessions: Arc<LiveSessions>,
    /// The audit trail.
    pub audit: Audit,
    /// Turns true when the broker shuts down.
    pub shutdown: watch::Receiver<bool>,
}

pub(crate) type Tls = TlsStream<TcpStream>;

/// A peer that completed the handshake with an accepted certificate.
struct Authenticated {
    tls: Tls,
    identity: Identity,
    cert: PresentedCert,
    tls_version: String,
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The client closed the connection without DISCONNECT.
    PeerClosed,
    /// Nothing arrived within 1.5 keepalive periods.
    KeepaliveTimeout,
    /// The client broke the protocol.
    Protocol(String),
    /// A denied PUBLISH with `acl.on_denied_publish = "disconnect"`.
    AclDisconnect,
    /// The certificate was revoked while connected.
    Revoked,
    /// A newer connection authenticated under the same client id.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// Reading or writing the socket failed, or the router dropped the link.
    Io(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            SessionEnd::PeerClosed => f.write_str("client closed the connection without DISCONNECT"),
            SessionEnd::KeepaliveTimeout => f.write_str("keepalive expired"),
            SessionEnd::Protocol(detail) => write!(f, "protocol error: {detail}"),
            SessionEnd::AclDisconnect => f.write_str("denied PUBLISH (acl.on_denied_publish = \"disconnect\")"),
            SessionEnd::Revoked => f.write_str("certificate revoked"),
            SessionEnd::TakenOver => f.write_str("a newer connection took over the client id"),
            SessionEnd::Shutdown => f.write_str("broker shutting down"),
            SessionEnd::Io(detail) => write!(f, "connection failed: {detail}"),
        }
    }
}

impl SessionEnd {
    /// Whether the will must be published (every end the client did not ask for, except a
    /// broker shutdown).
    fn fires_will(&self) -> bool {
        !matches!(self, SessionEnd::ClientDisconnect | SessionEnd::Shutdown)
    }
}

/// Serves one accepted TCP connection to its end.
///
/// A task's future is allocated once, at the size of its largest state, and kept until the
/// session ends. The phases that run once (handshake, CONNECT, close) are boxed so that an idle
/// session holds only what its pumps need.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<SessionContext>) {
    let Some(authenticated) = Box::pin(handshake(tcp, peer, &ctx)).await else {
        return;
    };
    // Starts empty, grows with traffic and is given back while the client is quiet.
    let mut rbuf = BytesMut::new();
    let Some((tls, mut session, link_arrival)) = Box::pin(establish(authenticated, &mut rbuf, peer, &ctx)).await else {
        return;
    };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let end = pump(&mut session, &mut reader, &mut writer, link_arrival, &mut rbuf, &ctx).await;
    Box::pin(finish(session, reader.unsplit(writer), end, peer, &ctx)).await;
}

async fn handshake(tcp: TcpStream, peer: SocketAddr, ctx: &SessionContext) -> Option<Authenticated> {
    let acceptor = TlsAcceptor::from(ctx.tls.current().config.clone());
    let deadline = Duration::from_millis(ctx.limits.handshake_timeout_ms);
    let (outcome, notes) = HANDSHAKE_NOTES
        .scope(RefCell::new(HandshakeNotes::default()), async move {
            let outcome = timeout(deadline, acceptor.accept(tcp)).await;
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
            let tls_version = tls
                .get_ref()
                .1
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            Some(Authenticated {
                tls,
                identity,
                cert,
                tls_version,
            })
        }
    }
}

/// Reads the CONNECT, within the deadline. Refusals are written and logged here.
async fn read_connect(
    session: &mut Authenticated,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<(Connect, Option<LastWill>)> {
    let deadline = Duration::from_millis(ctx.limits.connect_timeout_ms);
    let first = timeout(
        deadline,
        read_packet(&mut session.tls, rbuf, ctx.limits.max_packet_bytes),
    )
    .await;
    let reject = |reason, detail: &str| ctx.audit.reject(peer, reason, detail, Some(&session.cert));
    match first {
        Err(_) => reject(
            RejectReason::ConnectTimeout,
            &format!(
                "no CONNECT within {} ms of the handshake",
                ctx.limits.connect_timeout_ms
            ),
        ),
        Ok(Ok(Packet::Connect(connect, _, will, _, _))) => return Some((connect, will)),
        Ok(Ok(other)) => reject(
            RejectReason::ProtocolError,
            &format!("first packet was {}, not CONNECT", packet_name(&other)),
        ),
        Ok(Err(ReadError::Frame(FrameError::UnsupportedProtocolLevel(level)))) => {
            let _ = write_now(
                &mut session.tls,
                codec::connack(ConnectReturnCode::RefusedProtocolVersion),
            )
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

/// The router's client id for a peer. Roles live in separate namespaces, so no service can take
/// over a device's session by naming its client id (rumqttd drops the older of two sessions with
/// one id), and several instances of a service may connect under different client ids.
fn router_client_id(identity: &Identity, requested: &str) -> String {
    match identity.role {
        Role::Device => format!("device:{}", identity.id),
        Role::Service if requested.is_empty() => format!("service:{}:{}", identity.id, identity.id),
        Role::Service => format!("service:{}:{requested}", identity.id),
    }
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

/// A session past its CONNACK: what the pumps and the close need.
pub(crate) struct Established {
    pub(crate) identity: Identity,
    cert: PresentedCert,
    pub(crate) rules: TopicRules,
    pub(crate) registration: Registration,
    pub(crate) link: LazyLink,
    will: Option<LastWill>,
    /// 1.5 times the client's keepalive, if it asked for one.
    pub(crate) keepalive: Option<Duration>,
}

/// Reads and checks the CONNECT, registers the session and answers CONNACK. Refusals are
/// written and logged here.
async fn establish(
    mut session: Authenticated,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<(Tls, Established, oneshot::Receiver<LinkRx>)> {
    let (connect, will) = read_connect(&mut session, rbuf, peer, ctx).await?;
    let identity = session.identity;
    let rules = ctx.acl.for_identity(&identity);
    if let Err((code, reason, detail)) = check_connect(&identity, &connect, will.as_ref(), &rules) {
        if let (RejectReason::WillDenied, Some(will)) = (reason, &will) {
            ctx.audit
                .acl_denied(&identity, "will", &String::from_utf8_lossy(&will.topic));
        }
        let _ = write_now(&mut session.tls, codec::connack(code)).await;
        ctx.audit.reject(peer, reason, &detail, Some(&session.cert));
        return None;
    }
    let client_id = router_client_id(&identity, &connect.client_id);
    let registration = ctx
        .sessions
        .register(identity.clone(), session.cert.serial.clone(), client_id.clone());
    // A CRL swapped in between this handshake and the registration above would miss us.
    if ctx.tls.is_revoked(&session.cert.serial) {
        ctx.audit.reject(
            peer,
            RejectReason::Revoked,
            "revoked while connecting",
            Some(&session.cert),
        );
        return None;
    }
    let link_now = ctx.router.needs_link_at_connect(&client_id, connect.clean_session);
    let (mut link, link_arrival) = LazyLink::new(client_id, connect.clean_session);
    let connack = if link_now {
        match link.open(&ctx.router, &registration).await {
            Ok(connack) => Option::<Packet>::from(connack),
            Err(e) => {
                ctx.audit
                    .reject(peer, RejectReason::ProtocolError, &e.to_string(), Some(&session.cert));
                return None;
            }
        }
    } else {
        Some(codec::connack(ConnectReturnCode::Success))
    };
    // The decision is recorded before the client can see it.
    ctx.audit.accept(peer, &identity, &session.cert, &session.tls_version);
    ctx.audit.metrics().session_opened(identity.role);
    if let Some(ack) = connack {
        if write_now(&mut session.tls, ack).await.is_err() {
            ctx.audit.metrics().session_closed(identity.role);
            link.close().await;
            return None;
        }
    }
    let keepalive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let established = Established {
        identity,
        cert: session.cert,
        rules,
        registration,
        link,
        will,
        keepalive,
    };
    Some((session.tls, established, link_arrival))
}

/// Tells the router, publishes the will if the end calls for it, closes TLS and logs why.
async fn finish(mut session: Established, mut tls: Tls, end: SessionEnd, peer: SocketAddr, ctx: &SessionContext) {
    session.link.close().await;
    if let Some(will) = session.will.take().filter(|_| end.fires_will()) {
        if let Err(e) = ctx.router.publish_will(&will).await {
            tracing::error!(device_id = %session.identity.id, error = %e, "could not publish the will");
        }
    }
    let _ = timeout(Duration::from_secs(1), tls.shutdown()).await;
    let Established {
        identity,
        cert,
        registration,
        ..
    } = session;
    drop(registration);
    ctx.audit.metrics().session_closed(identity.role);
    match &end {
        SessionEnd::Revoked => ctx.audit.revoked_kick(&identity, &cert.serial),
        SessionEnd::Protocol(detail) => ctx.audit.reject(peer, RejectReason::ProtocolError, detail, Some(&cert)),
        cause => {
            info!(event = "disconnect", device_id = %identity.id, role = %identity.role, %peer, %cause, "{identity} disconnected: {cause}")
        }
    }
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

async fn read_packet(tls: &mut Tls, rbuf: &mut BytesMut, max: usize) -> Result<Packet, ReadError> {
    loop {
        if let Some(packet) = codec::decode(rbuf, max)? {
            return Ok(packet);
        }
        rbuf.reserve(4096);
        if tls.read_buf(rbuf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

async fn write_now(tls: &mut Tls, packet: Packet) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(64);
    codec::encode(packet, &mut buf).map_err(std::io::Error::other)?;
    tls.write_all(&buf).await?;
    tls.flush().await
}
