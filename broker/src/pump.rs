//! The two pumps of an established session: client to router, with every PUBLISH and
//! SUBSCRIBE checked against the ACL, and router to client, with writes coalesced.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use fleet_identity::Identity;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, PingResp, PubAck, PubAckReason, Publish, SubAck, Subscribe, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, Notify};
use tokio::time::timeout;

use crate::acl::{OnDeniedPublish, TopicRules, Verdict};
use crate::codec::{self, packet_name, qos_and_pkid};
use crate::link::{LazyLink, OpenError};
use crate::live::{KickReason, Registration};
use crate::session::{Established, SessionContext, SessionEnd, Tls};

/// Moves packets both ways until something ends the session.
pub(crate) async fn pump(
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
    // Biased: a kick explains whatever else ends the session at the same time (a takeover also
    // makes the router close this session's link).
    tokio::select! {
        biased;
        reason = session.registration.kick.wait() => match reason {
            KickReason::Revoked => SessionEnd::Revoked,
            KickReason::TakenOver => SessionEnd::TakenOver,
        },
        _ = shutdown.wait_for(|down| *down) => SessionEnd::Shutdown,
        end = scope.inbound(reader, rbuf, &mut session.link, session.keepalive) => end,
        end = scope.outbound(writer, link_arrival) => end,
    }
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
