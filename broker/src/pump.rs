//! An established session's packets, both ways, in one poll loop: the client's packets are
//! checked against the ACL and handed to the router; the router's deliveries are written to the
//! client, with writes coalesced.
//!
//! Flow control lives here as much as in the router. A publication that waits for a full
//! subscriber ([`Publication`]) holds back the packets behind it, in order; acknowledgements
//! and PINGREQ still pass, read ahead of what is held up to `HELD_BYTES`: a client's whole
//! window of publishes, so two clients publishing to each other, or a client reading its own
//! retained messages, keep acknowledging. Beyond that budget reading stops, so TCP slows the
//! client down; two clients that pipeline more than that to each other while both their queues
//! are full hold each other up until one of them is found slow. Reading also stops while too much output
//! is waiting to be written, so a client that never reads cannot make the broker buffer
//! replies for it.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use rumqttd::protocol::{
    Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, SubAck,
    Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use tokio::time::Sleep;

use crate::acl::{OnDeniedPublish, Verdict};
use crate::codec::{FrameError, Inbound, InboundPublish, OutgoingPublish};
use crate::connect::Established;
use crate::connection::Connection;
use crate::context::SessionContext;
use crate::metrics::DropReason;
use crate::reason::SessionEnd;
use crate::router::{Message, Outgoing, Publication, QoS, SubscribeRefused};
use crate::store::{DurableWaiter, Ticket};

/// Output waiting to be written beyond which the pump neither reads nor takes deliveries.
const OUTPUT_HIGH: usize = 64 * 1024;
/// Deliveries taken from the router per call.
const DELIVERY_BATCH: usize = 128;
/// Rounds of work per poll before the task yields to others on its worker.
const ROUNDS_PER_POLL: usize = 32;

/// Acknowledgements waiting for the store beyond which the pump stops reading: a client that
/// pipelines more publishes than this waits for the disk like everyone else.
const UNSYNCED_ACKS: usize = 4096;

/// A publication waiting for room, and the acknowledgement the client gets when it completes.
struct Waiting {
    publication: Publication,
    ack: Option<Ack>,
}

/// What an acknowledgement waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// The store to have this on disk.
    Durable(Ticket),
    /// The first routing of the QoS 2 message with this packet id to complete (the client sent
    /// a resend of it), then everything recorded by then to be on disk.
    Routed(u16),
}

/// An acknowledgement the broker owes the client.
#[derive(Clone, Copy)]
enum Ack {
    /// PUBACK: a QoS 1 publish is taken.
    Taken(u16),
    /// PUBREC: a QoS 2 publish is received.
    Received(u16),
    /// PUBCOMP: a QoS 2 exchange is complete.
    Complete(u16),
}

impl Ack {
    fn packet(self) -> Packet {
        match self {
            Ack::Taken(pkid) => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            Ack::Received(pkid) => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            Ack::Complete(pkid) => Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ),
        }
    }
}

struct Pump<'a> {
    ctx: &'a SessionContext,
    session: &'a Established,
    conn: &'a mut Connection,
    waiting: Option<Waiting>,
    /// Acknowledgements waiting, in the order owed (MQTT-4.6.0-2, -3).
    unsynced: VecDeque<(Wait, Ack)>,
    /// PUBRELs for our QoS 2 deliveries waiting for their release to be on disk. Apart from
    /// `unsynced`: nothing orders them against the client's own publishes, and one held behind a
    /// resend waiting for its routing could hold up the very queue that routing waits for.
    releases: VecDeque<(Ticket, u16)>,
    /// This connection's registration for the store's watermark.
    durable: Arc<DurableWaiter>,
    /// Packets read while `waiting` that may not overtake it, in order, handled once it
    /// completes. Bounded by [`HELD_BYTES`]: beyond, reading stops.
    held: VecDeque<Inbound>,
    held_bytes: usize,
    /// The client closed its side; what it sent before is still handled.
    peer_closed: bool,
    last_read: Instant,
    /// When output last went out: a client that reads is alive even while we do not read it.
    last_write: Instant,
    /// The deadline the timer is set to.
    armed: Option<Instant>,
}

/// Bytes held behind a waiting publication, at most (each packet counts its topic, payload and
/// bookkeeping). Enough for a client's whole window of small publishes (rumqttc keeps 100
/// unacknowledged), so the acknowledgements it sends behind them are still read.
const HELD_BYTES: usize = 128 * 1024;

/// Moves packets both ways until something ends the session. Returns why, and a publication
/// still waiting for room (which the caller completes: it may already have reached some
/// subscribers).
pub(crate) async fn pump(
    session: &Established,
    conn: &mut Connection,
    ctx: &SessionContext,
) -> (SessionEnd, Option<Publication>) {
    let timer = tokio::time::sleep(std::time::Duration::from_secs(3600));
    let mut timer = std::pin::pin!(timer);
    let mut pump = Pump {
        ctx,
        session,
        conn,
        waiting: None,
        unsynced: VecDeque::new(),
        releases: VecDeque::new(),
        durable: Arc::default(),
        held: VecDeque::new(),
        held_bytes: 0,
        peer_closed: false,
        last_read: Instant::now(),
        last_write: Instant::now(),
        armed: None,
    };
    let end = poll_fn(|cx| pump.poll(cx, timer.as_mut())).await;
    (end, pump.waiting.map(|w| w.publication))
}

impl Pump<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<SessionEnd> {
        for _ in 0..ROUNDS_PER_POLL {
            if let Poll::Ready(reason) = self.session.kick.poll(cx) {
                return Poll::Ready(SessionEnd::Kicked(reason));
            }
            let mut progress = false;
            if let Some(waiting) = &mut self.waiting {
                if waiting.publication.poll(cx).is_ready() {
                    let (ack, ticket) = (waiting.ack.take(), waiting.publication.ticket());
                    self.waiting = None;
                    if let Some(ack) = ack {
                        self.acknowledge(ticket, ack);
                    }
                    progress = true;
                }
            }
            progress |= self.release_acknowledgements(cx);
            let handled = match self.handle_input() {
                Ok(handled) => handled,
                Err(end) => return Poll::Ready(end),
            };
            progress |= handled;
            if self.peer_closed && !handled && (self.waiting.is_some() || self.conn.pending_output() < OUTPUT_HIGH) {
                return Poll::Ready(self.end_of_input());
            }
            progress |= self.take_deliveries(cx);
            match self.conn.poll_write(cx) {
                Poll::Ready(Ok(wrote)) => {
                    if wrote {
                        self.last_write = Instant::now();
                    }
                    progress |= wrote;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(SessionEnd::Io(e.to_string())),
                Poll::Pending => {}
            }
            if self.may_read() && !self.peer_closed {
                match self.conn.poll_read(cx) {
                    Poll::Ready(Ok(0)) => {
                        // Handle what came before the close first.
                        self.peer_closed = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        self.last_read = Instant::now();
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(SessionEnd::Io(e.to_string())),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return match self.poll_timer(cx, timer.as_mut()) {
                    Some(end) => Poll::Ready(end),
                    None => Poll::Pending,
                };
            }
        }
        // Plenty done: let the worker's other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reading waits while too much is held behind a waiting publication, and while output
    /// piles up.
    fn may_read(&self) -> bool {
        !self.held_full()
            && self.conn.pending_output() < OUTPUT_HIGH
            && self.unsynced.len() < UNSYNCED_ACKS
            && self.releases.len() < UNSYNCED_ACKS
    }

    /// Owes the client `ack` once `ticket` is durable, after every acknowledgement owed before.
    fn acknowledge(&mut self, ticket: Ticket, ack: Ack) {
        let durable = || self.ctx.router.store().is_none_or(|store| store.is_durable(ticket));
        if self.unsynced.is_empty() && durable() {
            self.reply(ack.packet());
        } else {
            self.unsynced.push_back((Wait::Durable(ticket), ack));
        }
    }

    /// Sends the acknowledgements and PUBRELs that no longer wait; true if any went out.
    fn release_acknowledgements(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(store) = self.ctx.router.store() else {
            return false;
        };
        let mut released = false;
        while let Some(&(ticket, pkid)) = self.releases.front() {
            if store.poll_durable(ticket, &self.durable, cx).is_pending() {
                break;
            }
            self.releases.pop_front();
            self.reply(pubrel(pkid));
            released = true;
        }
        while let Some(&(wait, ack)) = self.unsynced.front() {
            let ticket = match wait {
                Wait::Durable(ticket) => ticket,
                Wait::Routed(pkid) => {
                    if self.session.attached.poll_routed(pkid, cx).is_pending() {
                        break;
                    }
                    let head = store.head();
                    self.unsynced[0].0 = Wait::Durable(head);
                    head
                }
            };
            if store.poll_durable(ticket, &self.durable, cx).is_pending() {
                break;
            }
            self.unsynced.pop_front();
            self.reply(ack.packet());
            released = true;
        }
        released
    }

    fn held_full(&self) -> bool {
        self.held_bytes >= HELD_BYTES
    }

    /// Why the session ends once the client has closed and everything before was handled:
    /// a DISCONNECT still held behind a waiting publication counts (no will), and QoS 0
    /// publishes held there are lost (counted; QoS 1/2 ones were never acknowledged, so the
    /// client has them).
    fn end_of_input(&mut self) -> SessionEnd {
        let held_qos0 = self
            .held
            .iter()
            .filter(|p| matches!(p, Inbound::Publish(publish) if publish.qos == QoS::AtMostOnce))
            .count();
        self.ctx
            .audit
            .metrics()
            .dropped(DropReason::SessionEnded, held_qos0 as u64);
        if self.held.iter().any(|p| matches!(p, Inbound::Disconnect)) {
            SessionEnd::ClientDisconnect
        } else {
            SessionEnd::PeerClosed
        }
    }

    /// Sets the timer to the next deadline (keepalive, a waiting subscriber's timeout); the end
    /// if the keepalive has run out.
    fn poll_timer(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Option<SessionEnd> {
        loop {
            let now = Instant::now();
            let keepalive = self.session.keepalive.map(|limit| self.last_read + limit);
            if keepalive.is_some_and(|at| at <= now) {
                // We stopped reading, not the client: its packets wait in the socket. While we
                // wait for a publication that is so; while output piles up, only as long as the
                // client still reads what we write.
                let ours = self.held_full()
                    || self.unsynced.len() >= UNSYNCED_ACKS
                    || self.releases.len() >= UNSYNCED_ACKS
                    || (self.conn.pending_output() >= OUTPUT_HIGH
                        && self
                            .session
                            .keepalive
                            .is_some_and(|limit| now.duration_since(self.last_write) < limit));
                if !ours {
                    return Some(SessionEnd::KeepaliveTimeout);
                }
                self.last_read = now;
                continue;
            }
            let waiting = self.waiting.as_ref().and_then(|w| w.publication.deadline());
            let next = match (keepalive, waiting) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let next = next?;
            if self.armed != Some(next) {
                self.armed = Some(next);
                timer.as_mut().reset(next.into());
            }
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if keepalive != Some(next) {
                // A waiting subscriber's time is up: the publication decides what that means.
                cx.waker().wake_by_ref();
                return None;
            }
        }
    }

    /// Moves deliveries from the router into the write buffer, while there is room for output.
    fn take_deliveries(&mut self, cx: &mut Context<'_>) -> bool {
        if self.conn.pending_output() >= OUTPUT_HIGH {
            return false;
        }
        let (session, conn) = (self.session, &mut *self.conn);
        let (mut published, mut failed, mut durable_wait) = (0u64, None, None);
        let handed = session
            .attached
            .poll_outgoing(cx, DELIVERY_BATCH, &mut durable_wait, &mut |outgoing| {
                let queued = match outgoing {
                    Outgoing::Publish { delivery, pkid, dup } => {
                        published += 1;
                        conn.queue_publish(&OutgoingPublish {
                            topic: &delivery.message.topic,
                            payload: &delivery.message.payload,
                            qos: delivery.qos,
                            pkid,
                            dup,
                            retain: delivery.retain,
                        })
                    }
                    Outgoing::PubRel(pkid) => conn.queue(pubrel(pkid)),
                };
                failed = failed.take().or(queued.err());
            });
        if published > 0 {
            self.ctx.audit.metrics().messages_out(published);
        }
        if let Some(e) = failed {
            self.encoding_failed(&e);
        }
        let now_durable = match (durable_wait, self.ctx.router.store()) {
            (Some(ticket), Some(store)) => store.poll_durable(ticket, &self.durable, cx).is_ready(),
            _ => false,
        };
        handed > 0 || now_durable
    }

    /// Handles the packets already read, as far as allowed: while a publication waits, only
    /// those that may overtake it, the others held in order. True if any was handled or held.
    fn handle_input(&mut self) -> Result<bool, SessionEnd> {
        let mut handled = false;
        let mut published = 0u64;
        let result = loop {
            if self.conn.pending_output() >= OUTPUT_HIGH {
                break Ok(());
            }
            let packet = if self.waiting.is_none() && !self.held.is_empty() {
                let packet = self.held.pop_front().expect("not empty");
                self.held_bytes -= held_size(&packet);
                packet
            } else if self.held_full() {
                break Ok(());
            } else {
                match self.conn.next_packet() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(SessionEnd::Protocol(e.to_string())),
                }
            };
            handled = true;
            if self.waiting.is_some() && !passes_a_waiting_publication(&packet) {
                self.held_bytes += held_size(&packet);
                self.held.push_back(packet);
                continue;
            }
            published += u64::from(matches!(packet, Inbound::Publish(_)));
            if let Err(end) = self.on_packet(packet) {
                break Err(end);
            }
        };
        if published > 0 {
            self.ctx.audit.metrics().messages_in(published);
        }
        result.map(|()| handled)
    }

    fn reply(&mut self, packet: Packet) {
        if let Err(e) = self.conn.queue(packet) {
            self.encoding_failed(&e);
        }
    }

    fn encoding_failed(&self, error: &FrameError) {
        tracing::error!(device_id = %self.session.identity.id, %error, "could not encode a packet for the client; dropped");
    }

    fn on_packet(&mut self, packet: Inbound) -> Result<(), SessionEnd> {
        let attached = &self.session.attached;
        match packet {
            Inbound::Publish(publish) => return self.on_publish(publish),
            Inbound::PubAck(pkid) => {
                attached.puback(pkid);
            }
            Inbound::PubRec(pkid) => {
                if let Some(ticket) = attached.pubrec(pkid) {
                    let durable = self.ctx.router.store().is_none_or(|store| store.is_durable(ticket));
                    if self.releases.is_empty() && durable {
                        self.reply(pubrel(pkid));
                    } else {
                        self.releases.push_back((ticket, pkid));
                    }
                }
            }
            Inbound::PubComp(pkid) => {
                attached.pubcomp(pkid);
            }
            Inbound::PubRel(pkid) => {
                let ticket = attached.release(pkid);
                self.acknowledge(ticket, Ack::Complete(pkid));
            }
            Inbound::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Inbound::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe),
            Inbound::PingReq => self.reply(Packet::PingResp(PingResp)),
            Inbound::Disconnect => return Err(SessionEnd::ClientDisconnect),
            Inbound::Connect(_) => return Err(SessionEnd::Protocol("a second CONNECT on the same connection".into())),
            Inbound::ServerOnly(name) => return Err(SessionEnd::Protocol(format!("a client may not send {name}"))),
        }
        Ok(())
    }

    fn on_publish(&mut self, publish: InboundPublish) -> Result<(), SessionEnd> {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(SessionEnd::Protocol("PUBLISH topic is not UTF-8".into()));
        };
        let ack = acknowledgement(publish.qos, publish.pkid);
        match self.session.rules.may_publish(topic) {
            Verdict::Allowed => {}
            Verdict::Invalid(e) => return Err(SessionEnd::Protocol(format!("PUBLISH to {topic:?}: {e}"))),
            Verdict::Denied => {
                self.ctx.audit.acl_denied(&self.session.identity, "publish", topic);
                if self.ctx.acl.on_denied_publish == OnDeniedPublish::Disconnect {
                    return Err(SessionEnd::AclDisconnect);
                }
                // Dropped, and acknowledged as Mosquitto does, so the client does not resend it.
                if let Some(ack) = ack {
                    self.acknowledge(Ticket::default(), ack);
                }
                return Ok(());
            }
        }
        let mut ticket = Ticket::default();
        if publish.qos == QoS::ExactlyOnce {
            match self.session.attached.receive_exactly_once(publish.pkid, &mut ticket) {
                Ok(true) => {}
                // A resend: acknowledge it again (once its first routing is complete and on disk),
                // deliver it once.
                Ok(false) => {
                    if self.ctx.router.store().is_some() {
                        self.unsynced
                            .push_back((Wait::Routed(publish.pkid), Ack::Received(publish.pkid)));
                    } else {
                        self.acknowledge(ticket, Ack::Received(publish.pkid));
                    }
                    return Ok(());
                }
                Err(e) => return Err(SessionEnd::Protocol(e.to_string())),
            }
        }
        let message = Message::new(topic, &publish.payload, publish.qos, publish.retain);
        let mut publication = self.ctx.router.publish(message);
        if publish.qos == QoS::ExactlyOnce {
            self.session.attached.route_exactly_once(&mut publication, publish.pkid);
        }
        ticket.cover(publication.ticket());
        self.await_or_ack(publication, ticket, ack);
        Ok(())
    }

    /// Acknowledges (once `ticket` and the publication's own records are durable) if the
    /// publication is complete, else once it is.
    fn await_or_ack(&mut self, publication: Publication, ticket: Ticket, ack: Option<Ack>) {
        if publication.is_complete() {
            if let Some(ack) = ack {
                self.acknowledge(ticket, ack);
            }
        } else {
            self.waiting = Some(Waiting { publication, ack });
        }
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) {
        let session = self.session;
        let (identity, attached) = (&session.identity, &session.attached);
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::new();
        for filter in &subscribe.filters {
            let qos = QoS::from_u8(filter.qos as u8).unwrap_or(QoS::AtMostOnce);
            let code = match self.session.rules.may_subscribe(&filter.path) {
                Verdict::Allowed => match attached.subscribe(&filter.path, qos) {
                    Ok(()) => {
                        granted.push((filter.path.as_str(), qos));
                        SubscribeReasonCode::Success(filter.qos)
                    }
                    Err(refused @ SubscribeRefused::TooManySubscriptions) => {
                        self.ctx
                            .audit
                            .subscription_refused(identity, &filter.path, &refused.to_string());
                        SubscribeReasonCode::Failure
                    }
                    Err(_) => SubscribeReasonCode::Failure,
                },
                Verdict::Denied | Verdict::Invalid(_) => {
                    self.ctx.audit.acl_denied(identity, "subscribe", &filter.path);
                    SubscribeReasonCode::Failure
                }
            };
            return_codes.push(code);
        }
        self.reply(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes,
            },
            None,
        ));
        let retained = attached.retained_for(&granted);
        self.await_or_ack(retained, Ticket::default(), None);
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        for filter in &unsubscribe.filters {
            self.session.attached.unsubscribe(filter);
        }
        // Exactly one UNSUBACK, also for filters never subscribed (MQTT-3.10.4-5).
        self.reply(Packet::UnsubAck(
            UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: Vec::new(),
            },
            None,
        ));
    }
}

/// Packets that concern the broker's own deliveries to the client, or nothing at all: they may
/// overtake a publication that waits for room, which is what keeps two clients publishing to
/// each other from waiting on each other forever.
fn passes_a_waiting_publication(packet: &Inbound) -> bool {
    matches!(
        packet,
        Inbound::PubAck(_) | Inbound::PubRec(_) | Inbound::PubComp(_) | Inbound::PubRel(_) | Inbound::PingReq
    )
}

/// What a held packet counts against [`HELD_BYTES`].
fn held_size(packet: &Inbound) -> usize {
    let bookkeeping = std::mem::size_of::<Inbound>();
    match packet {
        Inbound::Publish(publish) => bookkeeping + publish.topic.len() + publish.payload.len(),
        _ => bookkeeping,
    }
}

/// What a client is owed for a PUBLISH of `qos`.
fn acknowledgement(qos: QoS, pkid: u16) -> Option<Ack> {
    match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Ack::Taken(pkid)),
        QoS::ExactlyOnce => Some(Ack::Received(pkid)),
    }
}

fn pubrel(pkid: u16) -> Packet {
    Packet::PubRel(
        PubRel {
            pkid,
            reason: PubRelReason::Success,
        },
        None,
    )
}
