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
//!
//! MQTT 5 adds per-connection state here, each part bounded by the broker's limits: the topic
//! aliases both ways (`limits.max_topic_aliases`), the count of the client's unacknowledged
//! QoS 1 publishes (its Receive Maximum is `limits.max_inflight`), and the client's Maximum
//! Packet Size, beyond which a delivery is dropped, counted, and done as if delivered.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::time::Sleep;

use crate::acl::{OnDeniedPublish, Verdict};
use crate::codec::{
    publish_size, Disconnect, FrameError, Inbound, InboundPublish, Outbound, OutgoingPublish, ReasonCode,
    RetainHandling, Subscribe, Unsubscribe, Version,
};
use crate::connect::Established;
use crate::connection::Connection;
use crate::context::SessionContext;
use crate::message::unix_millis;
use crate::metrics::DropReason;
use crate::reason::{SessionEnd, Violation};
use crate::router::{Message, Outgoing, Publication, QoS, SubscribeRefused, SubscriptionOptions};
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
    /// A publish the ACL denied: PUBACK or PUBREC (for QoS 2) with reason code 0x87 for MQTT 5
    /// clients, plain success for 3.1.1 ones (which have no way to hear it, so do not resend).
    /// The code says it all: no reason string, which some MQTT 5 clients (Eclipse Paho's test
    /// client among them) cannot read on a PUBACK.
    Denied(u16, QoS),
}

impl Ack {
    fn packet(self) -> Outbound<'static> {
        match self {
            Ack::Taken(pkid) => Outbound::PubAck {
                pkid,
                code: ReasonCode::Success,
            },
            Ack::Received(pkid) => Outbound::PubRec {
                pkid,
                code: ReasonCode::Success,
            },
            Ack::Complete(pkid) => Outbound::PubComp(pkid),
            Ack::Denied(pkid, QoS::ExactlyOnce) => Outbound::PubRec {
                pkid,
                code: ReasonCode::NotAuthorized,
            },
            Ack::Denied(pkid, _) => Outbound::PubAck {
                pkid,
                code: ReasonCode::NotAuthorized,
            },
        }
    }

    /// Whether sending it ends a QoS 1 exchange the client counts against the Receive Maximum.
    fn ends_qos1(self) -> bool {
        matches!(self, Ack::Taken(_) | Ack::Denied(_, QoS::AtLeastOnce))
    }
}

/// The topic aliases of one MQTT 5 connection, both ways (MQTT 5 section 3.3.2.3.4). Each map
/// holds at most `limits.max_topic_aliases` topics, and nothing until the first alias.
#[derive(Default)]
struct TopicAliases {
    /// The client's aliases: index alias - 1.
    inbound: Vec<Option<Box<str>>>,
    /// The broker's aliases towards the client.
    outbound: HashMap<Box<str>, u16>,
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
    aliases: TopicAliases,
    /// An MQTT 5 client's QoS 1 publishes not yet acknowledged (its QoS 2 ones are counted by
    /// the router, as awaiting PUBREL): both within the Receive Maximum it was given.
    unacknowledged: usize,
    /// Bytes were read that no PUBLISH among them has been handled from yet.
    fresh_input: bool,
    /// The next packet is the first PUBLISH of freshly read bytes: other tasks run first.
    yield_before_publish: bool,
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
        aliases: TopicAliases::default(),
        unacknowledged: 0,
        fresh_input: false,
        yield_before_publish: false,
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
            if self.yield_before_publish {
                // Other connections' packets that arrived at the same moment may wait behind
                // this task (tokio runs the task woken last first): they go first, so that a
                // SUBSCRIBE a client sent on another connection just before this PUBLISH is
                // in place when it is routed. MQTT orders nothing across connections; clients
                // (Eclipse Paho's MQTT 5 suite among them) still expect it.
                self.yield_before_publish = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
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
                        self.fresh_input = true;
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
            self.send_ack(ack);
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
            self.reply(&Outbound::PubRel(pkid));
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
            self.send_ack(ack);
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
        let disconnect = self.held.iter().find_map(|p| match p {
            Inbound::Disconnect(disconnect) => Some(disconnect),
            _ => None,
        });
        match disconnect {
            Some(disconnect) => self.disconnect_end(disconnect),
            None => SessionEnd::PeerClosed,
        }
    }

    /// The end a client's DISCONNECT asks for, after applying the Session Expiry Interval an
    /// MQTT 5 one may carry (capped as at CONNECT).
    fn disconnect_end(&self, disconnect: &Disconnect) -> SessionEnd {
        if let Some(expiry) = disconnect.session_expiry {
            // MQTT-3.14.2-2: a session that was to end with the connection stays so.
            if self.session.client.session_expiry == 0 && expiry > 0 {
                return SessionEnd::Protocol(
                    Violation::Protocol,
                    "DISCONNECT sets a Session Expiry Interval on a session that had none".into(),
                );
            }
            self.session
                .attached
                .set_session_expiry(expiry.min(self.ctx.limits.max_session_expiry_secs));
        }
        if disconnect.reason_code == 0x04 {
            SessionEnd::ClientDisconnectWithWill
        } else {
            SessionEnd::ClientDisconnect
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
    /// A delivery larger than an MQTT 5 client's Maximum Packet Size is not sent: counted,
    /// and completed as if delivered (MQTT-3.1.2-25).
    fn take_deliveries(&mut self, cx: &mut Context<'_>) -> bool {
        if self.conn.pending_output() >= OUTPUT_HIGH {
            return false;
        }
        let version = self.conn.version();
        let (session, conn, aliases) = (self.session, &mut *self.conn, &mut self.aliases);
        let terms = &session.client;
        let now = unix_millis();
        let (mut published, mut failed, mut durable_wait) = (0u64, None, None);
        let mut too_large = Vec::new();
        let handed = session
            .attached
            .poll_outgoing(cx, DELIVERY_BATCH, &mut durable_wait, &mut |outgoing| {
                let queued = match outgoing {
                    Outgoing::Publish { delivery, pkid, dup } => {
                        let message = &delivery.message;
                        let mut publish = OutgoingPublish {
                            topic: &message.topic,
                            payload: &message.payload,
                            qos: delivery.qos,
                            pkid,
                            dup,
                            retain: delivery.retain,
                            topic_alias: None,
                            message_expiry: message.expiry_left(now),
                            subscription_ids: &delivery.subscription_ids,
                            properties: &message.properties,
                        };
                        let alias = aliases.outbound_alias(&message.topic, terms.topic_alias_maximum);
                        if let Some((alias, known)) = alias {
                            publish.topic_alias = Some(alias);
                            if known {
                                publish.topic = "";
                            }
                        }
                        // The size of exactly what would go out, alias included.
                        let limit = terms.maximum_packet_size.map(|max| max as usize);
                        if limit.is_some_and(|limit| publish_size(&publish, version) > limit) {
                            too_large.push((pkid, delivery.qos));
                            return;
                        }
                        if let Some((alias, false)) = alias {
                            aliases.commit(&message.topic, alias);
                        }
                        published += 1;
                        conn.queue_publish(&publish)
                    }
                    Outgoing::PubRel(pkid) => conn.queue(&Outbound::PubRel(pkid)),
                };
                failed = failed.take().or(queued.err());
            });
        if published > 0 {
            self.ctx.audit.metrics().messages_out(published);
        }
        if !too_large.is_empty() {
            for &(pkid, qos) in &too_large {
                if qos != QoS::AtMostOnce {
                    session.attached.abandon(pkid);
                }
            }
            self.ctx
                .audit
                .metrics()
                .dropped(DropReason::TooLargeForClient, too_large.len() as u64);
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
            } else if self.fresh_input && self.conn.next_is_publish() {
                self.fresh_input = false;
                self.yield_before_publish = true;
                break Ok(());
            } else {
                match self.conn.next_packet() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(frame_violation(&e)),
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

    fn reply(&mut self, packet: &Outbound<'_>) {
        if let Err(e) = self.conn.queue(packet) {
            self.encoding_failed(&e);
        }
    }

    /// Sends an acknowledgement of a client's publish.
    fn send_ack(&mut self, ack: Ack) {
        if ack.ends_qos1() {
            self.unacknowledged = self.unacknowledged.saturating_sub(1);
        }
        self.reply(&ack.packet());
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
            // An MQTT 5 client that refuses a QoS 2 delivery ends the exchange there (no PUBREL).
            Inbound::PubRec { pkid, refused: true } => {
                attached.abandon(pkid);
            }
            Inbound::PubRec { pkid, refused: false } => {
                if let Some(ticket) = attached.pubrec(pkid) {
                    let durable = self.ctx.router.store().is_none_or(|store| store.is_durable(ticket));
                    if self.releases.is_empty() && durable {
                        self.reply(&Outbound::PubRel(pkid));
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
            Inbound::PingReq => self.reply(&Outbound::PingResp),
            Inbound::Disconnect(disconnect) => return Err(self.disconnect_end(&disconnect)),
            Inbound::Auth => {
                return Err(SessionEnd::Protocol(
                    Violation::Protocol,
                    "AUTH: enhanced authentication is not offered, the certificate is the authentication".into(),
                ))
            }
            Inbound::Connect(_) => {
                return Err(SessionEnd::Protocol(
                    Violation::Protocol,
                    "a second CONNECT on the same connection".into(),
                ))
            }
            Inbound::ServerOnly(name) => {
                return Err(SessionEnd::Protocol(
                    Violation::Protocol,
                    format!("a client may not send {name}"),
                ))
            }
        }
        Ok(())
    }

    /// The topic a PUBLISH names, through its topic alias if it has one.
    fn topic_of(&mut self, publish: &InboundPublish) -> Result<Box<str>, SessionEnd> {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(SessionEnd::Protocol(
                Violation::Malformed,
                "PUBLISH topic is not UTF-8".into(),
            ));
        };
        let Some(alias) = publish.topic_alias else {
            if topic.is_empty() {
                return Err(SessionEnd::Protocol(
                    Violation::Protocol,
                    "PUBLISH with an empty topic and no topic alias".into(),
                ));
            }
            return Ok(topic.into());
        };
        let max = self.ctx.limits.max_topic_aliases;
        if alias == 0 || alias > max {
            return Err(SessionEnd::Protocol(
                Violation::TopicAliasInvalid,
                format!("topic alias {alias} is outside 1 to {max} (limits.max_topic_aliases)"),
            ));
        }
        let slot = usize::from(alias) - 1;
        let inbound = &mut self.aliases.inbound;
        if topic.is_empty() {
            return inbound.get(slot).cloned().flatten().ok_or_else(|| {
                SessionEnd::Protocol(
                    Violation::Protocol,
                    format!("topic alias {alias} was never set on this connection"),
                )
            });
        }
        if inbound.len() <= slot {
            inbound.resize(slot + 1, None);
        }
        inbound[slot] = Some(topic.into());
        Ok(topic.into())
    }

    fn on_publish(&mut self, publish: InboundPublish) -> Result<(), SessionEnd> {
        let topic = self.topic_of(&publish)?;
        let topic = &*topic;
        let ack = acknowledgement(publish.qos, publish.pkid);
        let v5 = self.conn.version() == Version::V5;
        if v5 && publish.qos == QoS::AtLeastOnce {
            self.unacknowledged += 1;
            if self.unacknowledged > self.ctx.limits.max_inflight {
                return Err(SessionEnd::Protocol(
                    Violation::ReceiveMaximumExceeded,
                    format!(
                        "more than the Receive Maximum of {} QoS 1 publishes unacknowledged",
                        self.ctx.limits.max_inflight
                    ),
                ));
            }
        }
        match self.session.rules.may_publish(topic) {
            Verdict::Allowed => {}
            Verdict::Invalid(e) => {
                return Err(SessionEnd::Protocol(
                    Violation::Protocol,
                    format!("PUBLISH to {topic:?}: {e}"),
                ))
            }
            Verdict::Denied => {
                self.ctx.audit.acl_denied(&self.session.identity, "publish", topic);
                if self.ctx.acl.on_denied_publish == OnDeniedPublish::Disconnect {
                    return Err(SessionEnd::AclDisconnect);
                }
                // Dropped, and acknowledged (MQTT 5: as refused) so the client does not resend it.
                if ack.is_some() {
                    self.acknowledge(Ticket::default(), Ack::Denied(publish.pkid, publish.qos));
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
                Err(e) => return Err(SessionEnd::Protocol(Violation::ReceiveMaximumExceeded, e.to_string())),
            }
        }
        let properties = &publish.properties;
        let message = Message::carrying(
            topic,
            &publish.payload,
            publish.qos,
            publish.retain,
            &properties.forwarded,
            properties.message_expiry,
        );
        let mut publication = self.session.attached.publish(message);
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
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::new();
        for request in &subscribe.filters {
            let filter = request.filter.as_str();
            let options = SubscriptionOptions {
                qos: request.qos,
                no_local: request.no_local,
                retain_as_published: request.retain_as_published,
                identifier: subscribe.identifier,
            };
            let code = match self.session.rules.may_subscribe(filter) {
                Verdict::Allowed => match attached.subscribe(filter, options) {
                    Ok(existed) => {
                        let send_retained = match request.retain_handling {
                            RetainHandling::OnSubscribe => true,
                            RetainHandling::OnNewSubscription => !existed,
                            RetainHandling::Never => false,
                        };
                        if send_retained {
                            granted.push((filter, options));
                        }
                        granted_code(request.qos)
                    }
                    Err(refused @ SubscribeRefused::TooManySubscriptions) => {
                        self.ctx
                            .audit
                            .subscription_refused(identity, filter, &refused.to_string());
                        ReasonCode::QuotaExceeded
                    }
                    Err(SubscribeRefused::Invalid) => ReasonCode::TopicFilterInvalid,
                    Err(SubscribeRefused::SessionEnded) => ReasonCode::UnspecifiedError,
                },
                Verdict::Denied => {
                    self.ctx.audit.acl_denied(identity, "subscribe", filter);
                    ReasonCode::NotAuthorized
                }
                Verdict::Invalid(_) => {
                    self.ctx.audit.acl_denied(identity, "subscribe", filter);
                    ReasonCode::TopicFilterInvalid
                }
            };
            codes.push(code);
        }
        self.reply(&Outbound::SubAck {
            pkid: subscribe.pkid,
            codes: &codes,
        });
        let retained = attached.retained_for(&granted);
        self.await_or_ack(retained, Ticket::default(), None);
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let codes: Vec<ReasonCode> = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                if crate::topic::SubscriptionFilter::parse(filter).is_err() {
                    ReasonCode::TopicFilterInvalid
                } else if self.session.attached.unsubscribe(filter) {
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        // Exactly one UNSUBACK, also for filters never subscribed (MQTT-3.10.4-5).
        self.reply(&Outbound::UnsubAck {
            pkid: unsubscribe.pkid,
            codes: &codes,
        });
    }
}

impl TopicAliases {
    /// The alias to send `topic` under, and whether the client knows it already; a new one
    /// (to [`TopicAliases::commit`] once it is sent) while fewer than `max` are in use. None
    /// once all are taken: the topic goes in full.
    fn outbound_alias(&self, topic: &str, max: u16) -> Option<(u16, bool)> {
        if max == 0 {
            return None;
        }
        if let Some(&alias) = self.outbound.get(topic) {
            return Some((alias, true));
        }
        let next = u16::try_from(self.outbound.len() + 1).ok().filter(|n| *n <= max)?;
        Some((next, false))
    }

    /// A new alias went out with `topic`: the client knows it from now on.
    fn commit(&mut self, topic: &str, alias: u16) {
        self.outbound.insert(topic.into(), alias);
    }
}

/// The session end for bytes that could not be decoded.
fn frame_violation(error: &FrameError) -> SessionEnd {
    let violation = match error {
        FrameError::TooLarge(_) => Violation::PacketTooLarge,
        FrameError::Malformed(_) => Violation::Malformed,
        FrameError::Protocol(_) | FrameError::UnsupportedProtocolLevel(_) => Violation::Protocol,
    };
    SessionEnd::Protocol(violation, error.to_string())
}

/// SUBACK's code for a subscription granted at `qos`.
fn granted_code(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::Success,
        QoS::AtLeastOnce => ReasonCode::GrantedQos1,
        QoS::ExactlyOnce => ReasonCode::GrantedQos2,
    }
}

/// Packets that concern the broker's own deliveries to the client, or nothing at all: they may
/// overtake a publication that waits for room, which is what keeps two clients publishing to
/// each other from waiting on each other forever.
fn passes_a_waiting_publication(packet: &Inbound) -> bool {
    matches!(
        packet,
        Inbound::PubAck(_) | Inbound::PubRec { .. } | Inbound::PubComp(_) | Inbound::PubRel(_) | Inbound::PingReq
    )
}

/// What a held packet counts against [`HELD_BYTES`].
fn held_size(packet: &Inbound) -> usize {
    let bookkeeping = std::mem::size_of::<Inbound>();
    match packet {
        Inbound::Publish(publish) => {
            bookkeeping + publish.topic.len() + publish.payload.len() + publish.properties.forwarded.len()
        }
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
