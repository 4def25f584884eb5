//! One client connection, from the TCP accept to the close: the TLS handshake with a deadline,
//! CONNECT with a deadline, binding the client id to the certificate, then pumping packets
//! between the client and the router with every PUBLISH and SUBSCRIBE checked against the ACL.
//!
//! Everything here runs in the connection's own task, so a slow or hostile peer delays nobody
//! else, and every failure ends only this connection.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use fleet_identity::{Identity, Role};
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    Connect, ConnectReturnCode, LastWill, Packet, PingResp, PubAck, PubAckReason, Publish, SubAck, Subscribe,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::acl::{AclConfig, OnDeniedPublish, TopicRules, Verdict};
use crate::audit::{Audit, PresentedCert, RejectReason};
use crate::codec::{self, FrameError};
use crate::config::Limits;
use crate::link::{LazyLink, OpenError};
use crate::live::{KickReason, LiveSessions, Registration};
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

type Tls = TlsStream<TcpStream>;

/// A peer that completed the handshake with an accepted certificate.
struct Authenticated {
    tls: Tls,
    identity: Identity,
    cert: PresentedCert,
    tls_version: String,
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
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
struct Established {
    identity: Identity,
    cert: PresentedCert,
    rules: TopicRules,
    registration: Registration,
    link: LazyLink,
    will: Option<LastWill>,
    /// 1.5 times the client's keepalive, if it asked for one.
    keepalive: Option<Duration>,
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

/// Moves packets both ways until something ends the session.
async fn pump(
    session: &mut Established,
    reader: &mut ReadHalf<Tls>,
    writer: &mut WriteHalf<Tls>,
    link_arrival: oneshot::Receiver<LinkRx>,
    rbuf: &mut BytesMut,
    ctx: &SessionContext,
) -> SessionEnd {
    let scope = Scope {
        identity: &session.identity,
        rules: &session.rules,
        ctx,
        registration: &session.registration,
        replies: ReplyQueue::default(),
        pending_subacks: Mutex::new(HashMap::new()),
    };
    let mut shutdown = ctx.shutdown.clone();
    tokio::select! {
        end = scope.inbound(reader, rbuf, &mut session.link, session.keepalive) => end,
        end = scope.outbound(writer, link_arrival) => end,
        reason = session.registration.kick.wait() => match reason {
            KickReason::Revoked => SessionEnd::Revoked,
            KickReason::TakenOver => SessionEnd::TakenOver,
        },
        _ = shutdown.wait_for(|down| *down) => SessionEnd::Shutdown,
    }
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

/// QoS and packet id of a client's PUBLISH (private fields in rumqttd, read from its encoding).
fn qos_and_pkid(publish: &Publish) -> (u8, u16) {
    let raw = publish.serialize();
    ((raw[0] >> 1) & 0b11, u16::from_be_bytes([raw[1], raw[2]]))
}

/// Read buffer growth step while the client is sending.
const READ_CHUNK: usize = 4096;
/// Read buffer while waiting on a quiet client: enough for a PINGREQ or a small PUBLISH.
const IDLE_READ: usize = 64;

/// Answers the front gives itself, from the inbound pump to the outbound one. Both pumps run in
/// the session's task; an empty queue holds no memory, unlike a channel.
#[derive(Default)]
struct ReplyQueue {
    queue: Mutex<VecDeque<Reply>>,
    added: Notify,
}

impl ReplyQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Reply>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, reply: Reply) {
        self.lock().push_back(reply);
        self.added.notify_one();
    }

    /// Waits until a reply was pushed since the last wait.
    async fn ready(&self) {
        self.added.notified().await;
    }

    fn take(&self) -> VecDeque<Reply> {
        std::mem::take(&mut *self.lock())
    }
}

/// What a session's two pumps share.
struct Scope<'a> {
    identity: &'a Identity,
    rules: &'a TopicRules,
    ctx: &'a SessionContext,
    registration: &'a Registration,
    replies: ReplyQueue,
    /// SUBSCRIBEs forwarded with some filters removed: packet id -> which filters were allowed,
    /// so the router's SUBACK can be widened back to one code per requested filter.
    pending_subacks: Mutex<HashMap<u16, Vec<bool>>>,
}

/// What to do with one packet from the client.
// A transient value per packet: boxing the forwarded packet would allocate on the hot path.
#[allow(clippy::large_enum_variant)]
enum Action {
    /// Pass it to the router.
    Forward(Packet),
    /// Answer it ourselves.
    Reply(Reply),
    /// Nothing.
    Drop,
    /// End the session.
    End(SessionEnd),
}

/// An answer the front gives itself.
enum Reply {
    /// PUBACK for a denied QoS 1 PUBLISH.
    PubAck(u16),
    /// SUBACK when every filter was denied.
    SubAck(SubAck),
    /// PINGRESP.
    PingResp,
}

impl From<Reply> for Packet {
    fn from(reply: Reply) -> Packet {
        match reply {
            Reply::PubAck(pkid) => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            Reply::SubAck(suback) => Packet::SubAck(suback, None),
            Reply::PingResp => Packet::PingResp(PingResp),
        }
    }
}

impl Scope<'_> {
    async fn inbound(
        &self,
        reader: &mut ReadHalf<Tls>,
        rbuf: &mut BytesMut,
        link: &mut LazyLink,
        keepalive: Option<Duration>,
    ) -> SessionEnd {
        let max = self.ctx.limits.max_packet_bytes;
        loop {
            let mut forwarded = 0u64;
            let mut publishes = 0u64;
            loop {
                let packet = match codec::decode(rbuf, max) {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break,
                    Err(e) => return SessionEnd::Protocol(e.to_string()),
                };
                match self.on_client_packet(packet) {
                    Action::Forward(packet) => {
                        publishes += u64::from(matches!(packet, Packet::Publish(..)));
                        forwarded += 1;
                        let tx = match link.tx() {
                            Some(tx) => tx,
                            None => match Box::pin(self.open_link(link)).await {
                                Ok(tx) => tx,
                                Err(end) => return end,
                            },
                        };
                        tx.buffer().push_back(packet);
                    }
                    Action::Reply(reply) => self.replies.push(reply),
                    Action::Drop => {}
                    Action::End(end) => return end,
                }
            }
            if forwarded > 0 {
                self.ctx.audit.metrics().messages_in(publishes);
                if let Err(e) = link.tx().map_or(Ok(()), notify_router) {
                    return SessionEnd::Io(format!("router link closed: {e}"));
                }
            }
            let read = read_more(reader, rbuf);
            let read = match keepalive {
                Some(limit) => match timeout(limit, read).await {
                    Ok(read) => read,
                    Err(_) => return SessionEnd::KeepaliveTimeout,
                },
                None => read.await,
            };
            match read {
                Ok(0) => return SessionEnd::PeerClosed,
                Ok(_) => {}
                Err(e) => return SessionEnd::Io(e.to_string()),
            }
        }
    }

    /// Opens the link for the first packet bound for the router; the router's CONNACK is not
    /// for the client, which had the front's.
    async fn open_link<'l>(&self, link: &'l mut LazyLink) -> Result<&'l mut LinkTx, SessionEnd> {
        match link.open(&self.ctx.router, self.registration).await {
            Ok(_connack) => link
                .tx()
                .ok_or_else(|| SessionEnd::Io("the router link did not open".into())),
            Err(OpenError::TakenOver) => Err(SessionEnd::TakenOver),
            Err(e) => Err(SessionEnd::Io(e.to_string())),
        }
    }

    fn on_client_packet(&self, packet: Packet) -> Action {
        match packet {
            Packet::Publish(publish, _) => self.on_publish(publish),
            Packet::Subscribe(subscribe, _) => self.on_subscribe(subscribe),
            Packet::PingReq(_) => Action::Reply(Reply::PingResp),
            Packet::Disconnect(..) => Action::End(SessionEnd::ClientDisconnect),
            packet @ (Packet::PubAck(..)
            | Packet::PubRec(..)
            | Packet::PubRel(..)
            | Packet::PubComp(..)
            | Packet::Unsubscribe(..)) => Action::Forward(packet),
            Packet::Connect(..) => Action::End(SessionEnd::Protocol("a second CONNECT on the same connection".into())),
            other => Action::End(SessionEnd::Protocol(format!(
                "a client may not send {}",
                packet_name(&other)
            ))),
        }
    }

    fn on_publish(&self, publish: Publish) -> Action {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Action::End(SessionEnd::Protocol("PUBLISH topic is not UTF-8".into()));
        };
        match self.rules.may_publish(topic) {
            Verdict::Allowed => Action::Forward(Packet::Publish(publish, None)),
            Verdict::Invalid(e) => Action::End(SessionEnd::Protocol(format!("PUBLISH to {topic:?}: {e}"))),
            Verdict::Denied => {
                self.ctx.audit.acl_denied(self.identity, "publish", topic);
                let (qos, pkid) = qos_and_pkid(&publish);
                match (self.ctx.acl.on_denied_publish, qos) {
                    (OnDeniedPublish::Disconnect, _) | (_, 2) => Action::End(SessionEnd::AclDisconnect),
                    (OnDeniedPublish::Drop, 1) => Action::Reply(Reply::PubAck(pkid)),
                    (OnDeniedPublish::Drop, _) => Action::Drop,
                }
            }
        }
    }

    fn on_subscribe(&self, mut subscribe: Subscribe) -> Action {
        let allowed: Vec<bool> = subscribe
            .filters
            .iter()
            .map(|filter| match self.rules.may_subscribe(&filter.path) {
                Verdict::Allowed => true,
                Verdict::Denied | Verdict::Invalid(_) => {
                    self.ctx.audit.acl_denied(self.identity, "subscribe", &filter.path);
                    false
                }
            })
            .collect();
        if allowed.iter().all(|a| *a) {
            return Action::Forward(Packet::Subscribe(subscribe, None));
        }
        if !allowed.iter().any(|a| *a) {
            let return_codes = vec![SubscribeReasonCode::Failure; allowed.len()];
            return Action::Reply(Reply::SubAck(SubAck {
                pkid: subscribe.pkid,
                return_codes,
            }));
        }
        let mut keep = allowed.iter();
        subscribe.filters.retain(|_| *keep.next().unwrap_or(&false));
        self.pending_subacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(subscribe.pkid, allowed);
        Action::Forward(Packet::Subscribe(subscribe, None))
    }

    /// Restores a denied filter's 0x80 in the router's SUBACK, at its requested position.
    fn widen_suback(&self, mut suback: SubAck) -> SubAck {
        let Some(allowed) = self
            .pending_subacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&suback.pkid)
        else {
            return suback;
        };
        let mut granted = suback.return_codes.into_iter();
        suback.return_codes = allowed
            .iter()
            .map(|ok| {
                if *ok {
                    granted.next().unwrap_or(SubscribeReasonCode::Failure)
                } else {
                    SubscribeReasonCode::Failure
                }
            })
            .collect();
        suback
    }

    async fn outbound(&self, writer: &mut WriteHalf<Tls>, mut link_arrival: oneshot::Receiver<LinkRx>) -> SessionEnd {
        let mut wbuf = BytesMut::new();
        let mut link_rx: Option<LinkRx> = None;
        loop {
            let mut wake_router = false;
            tokio::select! {
                biased;
                () = self.replies.ready() => {}
                Ok(rx) = &mut link_arrival, if link_rx.is_none() => link_rx = Some(rx),
                notification = next_notification(&mut link_rx) => match notification {
                    Ok(Some(n)) => wake_router |= self.encode_notification(n, &mut wbuf),
                    Ok(None) => {}
                    Err(e) => return SessionEnd::Io(format!("router link closed: {e}")),
                },
            }
            // Take whatever else is ready without waiting, so one write carries many packets.
            for reply in self.replies.take() {
                self.encode(reply.into(), &mut wbuf);
            }
            while let Some(Ok(Some(n))) = link_rx.as_mut().and_then(|rx| poll_now(rx.next())) {
                wake_router |= self.encode_notification(n, &mut wbuf);
                if wbuf.len() > 64 * 1024 {
                    break;
                }
            }
            if !wbuf.is_empty() {
                if let Err(e) = async {
                    writer.write_all(&wbuf).await?;
                    writer.flush().await
                }
                .await
                {
                    return SessionEnd::Io(e.to_string());
                }
                wbuf.clear();
            }
            if let (true, Some(rx)) = (wake_router, &link_rx) {
                // The router's channel is bounded and LinkTx sends block on it too; a blocking
                // send keeps the pump's state small.
                if rx.ready().is_err() {
                    return SessionEnd::Io("router link closed".into());
                }
            }
        }
    }

    /// Encodes a router notification; true if the router asked to be woken when we are ready.
    fn encode_notification(&self, notification: rumqttd::Notification, wbuf: &mut BytesMut) -> bool {
        match Option::<Packet>::from(notification) {
            Some(Packet::SubAck(suback, _)) => self.encode(Packet::SubAck(self.widen_suback(suback), None), wbuf),
            Some(packet) => {
                if matches!(packet, Packet::Publish(..)) {
                    self.ctx.audit.metrics().messages_out(1);
                }
                self.encode(packet, wbuf);
            }
            None => return true,
        }
        false
    }

    fn encode(&self, packet: Packet, wbuf: &mut BytesMut) {
        if let Err(e) = codec::encode(packet, wbuf) {
            tracing::error!(device_id = %self.identity.id, error = %e, "could not encode a packet for the client; dropped");
        }
    }
}

/// Tells the router the link's buffer holds new packets. rumqttd notifies by sending a packet,
/// so the last one is taken back and sent again: one router event for a whole batch.
/// `LinkTx::send` is async in signature only (its send on the router channel is blocking), so
/// it completes on its first poll and its state never joins the pump's.
fn notify_router(tx: &mut LinkTx) -> Result<(), String> {
    let last = tx.buffer().pop_back();
    match last.map(|packet| poll_now(tx.send(packet))) {
        None | Some(Some(Ok(_))) => Ok(()),
        Some(Some(Err(e))) => Err(e.to_string()),
        // Not in rumqttd 0.20. The packet is lost with the future, so the session ends and the
        // client re-sends what was not acknowledged.
        Some(None) => Err("the router link did not take the packet at once".into()),
    }
}

/// Reads more bytes from the client. While the client is quiet the buffer is given back and a
/// small one waits for the next packet, so an idle session holds no read buffer.
async fn read_more(reader: &mut ReadHalf<Tls>, rbuf: &mut BytesMut) -> std::io::Result<usize> {
    if rbuf.capacity() - rbuf.len() < 1024 {
        rbuf.reserve(READ_CHUNK);
    }
    if let Some(read) = poll_now(reader.read_buf(rbuf)) {
        return read;
    }
    if rbuf.is_empty() {
        *rbuf = BytesMut::with_capacity(IDLE_READ);
    }
    reader.read_buf(rbuf).await
}

/// The next notification on the link, or never while there is no link.
async fn next_notification(link_rx: &mut Option<LinkRx>) -> Result<Option<rumqttd::Notification>, LinkError> {
    match link_rx {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Polls a future once; its result if it was ready.
fn poll_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
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

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}
