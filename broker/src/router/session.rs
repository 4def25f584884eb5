//! One client id's state in the router: its subscriptions, its outgoing queue and inflight
//! window, and the QoS 2 packet ids it received and has not yet seen released.
//!
//! A session outlives its connections when it is persistent (`clean_session = false` in 3.1.1,
//! a Session Expiry Interval above 0 in MQTT 5), for its expiry interval once detached. The
//! connection attached to it (its *owner*, known by a generation number) drains the queue; a
//! connection that was taken over keeps a stale generation, and everything it asks is ignored.
//!
//! Bounds and what happens at them:
//! - online, queue full: a delivery is refused ([`Offered::Full`]) so the publisher waits and
//!   its client is slowed. If the queue stays full and its owner takes nothing from it for the
//!   slow-subscriber timeout (it stopped reading or acknowledging), a waiting QoS 1/2
//!   publication kicks the owner as a slow subscriber (the session is then treated as offline),
//!   and QoS 0 deliveries to it are dropped and counted while it stays so.
//! - offline persistent: everything but QoS 0 is queued; beyond the bounds the oldest is
//!   dropped, counted per session and reported as `queue_overflow`.
//! - clean session gone: the session is discarded with whatever it held.
//!
//! A persistent session's changes are recorded in the durable store ([`crate::store`]) where
//! they are made, under this session's lock: its creation, subscriptions, each QoS 1/2 delivery
//! queued, a QoS 2 delivery's packet id and release, each delivery completed or dropped, and the
//! QoS 2 packet ids it awaits PUBREL for. The caller gets the record's [`Ticket`] where an
//! acknowledgement depends on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use super::{Env, Limits, SubscribeRefused, TooManyUnreleased};
use crate::kick::Kick;
use crate::message::{unix_millis, Delivery, QoS, SubscriptionOptions};
use crate::metrics::DropReason;
use crate::reason::KickReason;
use crate::store::{StoredSession, Ticket};
use crate::will::DelayedWill;

/// A Session Expiry Interval that never runs out (MQTT 5 section 3.1.2.11.2).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// How often a session's drops are reported again while they continue.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The router's state for one client id.
pub(crate) struct Session {
    /// The client key, as logs and metrics name the session.
    pub(crate) client: Arc<str>,
    /// Shared subscription groups are formed only among sessions with the same scope.
    pub(crate) share_scope: Arc<str>,
    state: Mutex<State>,
    /// Wakes the owner when a delivery is waiting.
    consumer: AtomicWaker,
    /// Online with room in the queue: read without the lock to pick a shared group's member.
    accepting: AtomicBool,
    /// Deliveries this session lost to the overflow rule, for the per-session metric.
    overflowed: AtomicU64,
    /// Wakes the owner when a QoS 2 message it received a resend of has been routed.
    routing: AtomicWaker,
}

struct State {
    owner: Option<Owner>,
    /// Recorded in the store (where there is one) and kept while detached.
    persistent: bool,
    /// Seconds the session outlives a connection: 0 ends it with the connection,
    /// [`NEVER_EXPIRES`] keeps it until a clean session replaces it.
    expiry: u32,
    /// While detached with a finite expiry: when it ends.
    expires_at: Option<Instant>,
    /// The deadline the router's expiry schedule holds for this session, if any: one entry per
    /// session, so that a client reconnecting in a loop cannot grow the schedule.
    scheduled: Option<Instant>,
    /// The will of the connection that left, waiting out its delay.
    pending_will: Option<Arc<DelayedWill>>,
    /// Set once a clean session ends or is replaced: nothing is queued here again.
    discarded: bool,
    /// Filters as the client named them (with any `$share/` prefix) and their options.
    subscriptions: Vec<(Box<str>, SubscriptionOptions)>,
    queue: VecDeque<Delivery>,
    /// Topic and payload bytes of the deliveries in `queue`.
    queued_bytes: usize,
    inflight: VecDeque<Inflight>,
    next_pkid: u16,
    /// Packet ids handed out so far: tells when a new one could collide with a live one.
    pkids_issued: u64,
    /// QoS 2 packet ids received from the client and not yet released by its PUBREL.
    awaiting_release: Vec<Unreleased>,
    /// Publishers waiting for room in the queue.
    space_waiters: Vec<Waker>,
    /// Since when publishers have been refused for lack of room without the owner taking
    /// anything from the queue; cleared whenever it takes something. A subscriber that is
    /// merely the slowest part of a busy flow keeps clearing it; one that stopped reading or
    /// acknowledging does not.
    full_since: Option<Instant>,
    qos0_drops: Reporter,
    overflow_drops: Reporter,
}

/// A QoS 2 message received from the client, awaiting its PUBREL.
struct Unreleased {
    pkid: u16,
    /// Its publication is complete: queued everywhere it goes (and recorded, where that is
    /// needed). Until then a resend is not acknowledged: the first routing may still be waiting
    /// for room, on a connection that was taken over.
    routed: bool,
}

/// The connection attached to a session.
struct Owner {
    generation: u64,
    kick: Arc<Kick>,
    max_inflight: usize,
}

/// A delivery handed to the owner and not yet completed.
struct Inflight {
    pkid: u16,
    /// `pkids_issued` when this pkid was issued.
    issued: u64,
    delivery: Delivery,
    released: bool,
    /// Whether the current owner has been sent it (PUBLISH, or PUBREL once released).
    sent: bool,
    /// Whether it went out before: sent again, it carries DUP.
    resend: bool,
    /// What must be durable before it goes out (again): a stored QoS 2 delivery's packet id, or
    /// its release, so that after a crash it is resent under the packet id the client holds.
    after: Ticket,
}

/// What the owner must write next.
pub enum Outgoing<'a> {
    /// A PUBLISH (with DUP when it is a resend to a reconnected session).
    Publish {
        /// What to send.
        delivery: &'a Delivery,
        /// Its packet id (0 for QoS 0).
        pkid: u16,
        /// Whether this is a redelivery.
        dup: bool,
    },
    /// A PUBREL to resend after a reconnect.
    PubRel(u16),
}

/// How a delivery is offered to a session's queue.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// A routed message: QoS 0 is dropped when the queue is full.
    Route,
    /// Retained messages for a session's own new subscription: everything waits for room.
    Backlog,
}

/// The outcome of an offer.
pub(crate) enum Offered {
    /// In the queue.
    Queued,
    /// The owner's queue is full: try again when there is room (or the owner is kicked).
    Full(Delivery),
    /// Not queued, for this reason (already counted).
    Dropped,
}

/// A rate-limited report of drops: the first at once, then at most one per [`REPORT_EVERY`].
#[derive(Default)]
pub(crate) struct Reporter {
    unreported: u64,
    last: Option<Instant>,
}

impl Reporter {
    /// Notes `n` more drops; the count to report now, if due.
    pub(crate) fn note(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.unreported += n;
        if self.last.is_some_and(|last| now.duration_since(last) < REPORT_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

impl Session {
    pub(crate) fn new(client: Arc<str>, share_scope: Arc<str>, expiry: u32) -> Self {
        Self {
            client,
            share_scope,
            state: Mutex::new(State {
                owner: None,
                persistent: expiry > 0,
                expiry,
                expires_at: None,
                scheduled: None,
                pending_will: None,
                discarded: false,
                subscriptions: Vec::new(),
                queue: VecDeque::new(),
                queued_bytes: 0,
                inflight: VecDeque::new(),
                next_pkid: 1,
                pkids_issued: 0,
                awaiting_release: Vec::new(),
                space_waiters: Vec::new(),
                full_since: None,
                qos0_drops: Reporter::default(),
                overflow_drops: Reporter::default(),
            }),
            consumer: AtomicWaker::new(),
            accepting: AtomicBool::new(false),
            overflowed: AtomicU64::new(0),
            routing: AtomicWaker::new(),
        }
    }

    /// A persistent session as the store kept it, detached: QoS 2 deliveries that went out are
    /// resent with their packet ids (or their PUBREL, once released); everything else waits
    /// in the queue in its original order.
    pub(crate) fn restore(stored: StoredSession, env: &Env) -> Self {
        let session = Self::new(stored.client, stored.share_scope, stored.expiry);
        {
            let mut state = session.lock();
            state.subscriptions = stored.subscriptions;
            state.awaiting_release = stored
                .awaiting_release
                .into_iter()
                .map(|pkid| Unreleased { pkid, routed: true })
                .collect();
            // The restored packet ids are not in issue order: every new one is checked against them.
            state.pkids_issued = u64::from(u16::MAX);
            for entry in stored.deliveries {
                match entry.pkid {
                    Some(pkid) => state.inflight.push_back(Inflight {
                        pkid,
                        issued: 0,
                        delivery: entry.delivery,
                        released: entry.released,
                        sent: false,
                        resend: true,
                        after: Ticket::default(),
                    }),
                    _ => {
                        let size = entry.delivery.message.size();
                        state.queued_bytes += size;
                        state.queue.push_back(entry.delivery);
                        env.metrics.queued(1, size as i64);
                    }
                }
            }
        }
        session
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its subscriptions (filter as the client named it, options).
    pub(crate) fn subscriptions(&self) -> Vec<(Box<str>, SubscriptionOptions)> {
        self.lock().subscriptions.clone()
    }

    /// A restored session starts its expiry now, as if its connection had just left: the
    /// broker's downtime never shortens a session.
    pub(crate) fn expires_at_restore(&self, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        state.expires_at = state.deadline(now);
        state.scheduled = state.expires_at;
        state.expires_at
    }

    /// The deadline the router's schedule holds for this session, taken off it (the caller
    /// removes the entry: the session was resumed or replaced).
    pub(crate) fn take_scheduled(&self) -> Option<Instant> {
        self.lock().scheduled.take()
    }

    /// Changes the expiry interval (an MQTT 5 DISCONNECT may); recorded for a stored session.
    pub(crate) fn set_expiry(&self, generation: u64, expiry: u32, env: &Env) {
        let mut state = self.lock();
        if !state.owned_by(generation) || state.expiry == expiry {
            return;
        }
        state.expiry = expiry;
        if let (true, true, Some(store)) = (state.persistent, expiry > 0, &env.store) {
            store.session(&self.client, &self.share_scope, expiry);
        }
    }

    /// Keeps a will of the connection `generation` with the session while it waits out its
    /// delay of `delay` seconds: a connection that resumes the session cancels it, one that
    /// starts it afresh (or the session's end) has it published at once (MQTT 5 section
    /// 3.1.3.2.2). Decided under the session's lock, so a reconnect is seen either way.
    pub(crate) fn hold_will(&self, generation: u64, delay: u32) -> WillHold {
        let mut state = self.lock();
        if state.discarded {
            return WillHold::PublishNow;
        }
        if !state.owned_by(generation) {
            // Resumed by a newer connection already (MQTT-3.1.2-8: no will then).
            return WillHold::Cancelled;
        }
        let delay = delay.min(state.expiry);
        if delay == 0 {
            return WillHold::PublishNow;
        }
        let will = Arc::new(DelayedWill::default());
        if let Some(earlier) = state.pending_will.replace(will.clone()) {
            earlier.publish_now();
        }
        WillHold::Held(delay, will)
    }

    /// Ends the session if it is still detached and due at `deadline`: its filters, for the
    /// caller to take out of the tree and the registry.
    pub(crate) fn expire(&self, deadline: Instant, env: &Env) -> Option<Vec<Box<str>>> {
        let mut state = self.lock();
        if state.scheduled == Some(deadline) {
            state.scheduled = None;
        }
        if state.owner.is_some() || state.discarded || state.expires_at != Some(deadline) {
            return None;
        }
        Some(self.discard_locked(&mut state, env))
    }

    /// Whether a shared group may prefer this member: online with room.
    pub(crate) fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Deliveries dropped by the overflow rule so far.
    pub(crate) fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Whether the session is persistent and not discarded (for takeover decisions).
    pub(crate) fn is_resumable(&self) -> bool {
        let state = self.lock();
        state.persistent && !state.discarded
    }

    /// Attaches a new connection, kicking the one attached before. Unfinished deliveries will
    /// be sent again (with DUP) to the new owner.
    pub(crate) fn attach(&self, generation: u64, kick: Arc<Kick>, max_inflight: usize, expiry: u32, env: &Env) {
        let waiters = {
            let mut state = self.lock();
            if let Some(will) = state.pending_will.take() {
                will.cancel();
            }
            if let Some(old) = state.owner.take() {
                old.kick.take_over(kick.clone());
            }
            state.owner = Some(Owner {
                generation,
                kick,
                max_inflight,
            });
            // A stored session resumed to end with this connection stays recorded until then, so
            // that its end removes it from the store.
            state.persistent |= expiry > 0;
            state.expiry = expiry;
            state.expires_at = None;
            state.full_since = None;
            for entry in &mut state.inflight {
                entry.sent = false;
            }
            self.update_accepting(&state, &env.limits);
            std::mem::take(&mut state.space_waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Detaches the connection with `generation`, if it is still the owner. A session that
    /// does not outlive its connection is discarded (what it held counted as dropped) and its
    /// filters returned, for the caller to remove it from the tree and the registry; one that
    /// expires gets its deadline.
    pub(crate) fn detach(&self, generation: u64, env: &Env) -> Detached {
        let (detached, waiters) = {
            let mut state = self.lock();
            if !state.owned_by(generation) {
                return Detached::Kept;
            }
            state.owner = None;
            state.full_since = None;
            for entry in &mut state.inflight {
                entry.sent = false;
            }
            self.accepting.store(false, Ordering::Relaxed);
            let detached = if state.expiry == 0 {
                Detached::Discarded(self.discard_locked(&mut state, env))
            } else {
                state.expires_at = state.deadline(Instant::now());
                match state.expires_at {
                    Some(deadline) => Detached::Expires {
                        deadline,
                        replaces: state.scheduled.replace(deadline),
                    },
                    None => Detached::Kept,
                }
            };
            (detached, std::mem::take(&mut state.space_waiters))
        };
        waiters.into_iter().for_each(Waker::wake);
        detached
    }

    /// Discards the session for a clean session (of `successor`'s connection) that replaces it:
    /// kicks its owner and returns its filters so the caller can remove them from the tree.
    pub(crate) fn discard(&self, successor: &Arc<Kick>, env: &Env) -> Vec<Box<str>> {
        let (filters, waiters) = {
            let mut state = self.lock();
            if let Some(owner) = state.owner.take() {
                owner.kick.take_over(successor.clone());
            }
            let filters = self.discard_locked(&mut state, env);
            (filters, std::mem::take(&mut state.space_waiters))
        };
        waiters.into_iter().for_each(Waker::wake);
        filters
    }

    /// Marks the session discarded, counts what it held as dropped, publishes a will waiting
    /// out its delay; returns its filters.
    fn discard_locked(&self, state: &mut State, env: &Env) -> Vec<Box<str>> {
        state.discarded = true;
        if let Some(will) = state.pending_will.take() {
            will.publish_now();
        }
        if let (true, Some(store)) = (state.persistent, &env.store) {
            let held = state.queue.iter().chain(state.inflight.iter().map(|e| &e.delivery));
            let (ids, bytes) = held.filter_map(|d| d.stored.map(|id| (id, d.message.size()))).fold(
                (Vec::new(), 0),
                |(mut ids, bytes), (id, size)| {
                    ids.push(id);
                    (ids, bytes + size)
                },
            );
            store.session_gone(&self.client, ids, bytes);
        }
        let held = state.queue.len() + state.inflight.len();
        env.metrics
            .queued(-(state.queue.len() as i64), -(state.queued_bytes as i64));
        env.metrics.dropped(DropReason::SessionEnded, held as u64);
        state.queue = VecDeque::new();
        state.inflight = VecDeque::new();
        state.queued_bytes = 0;
        state.awaiting_release = Vec::new();
        self.accepting.store(false, Ordering::Relaxed);
        state.expires_at = None;
        std::mem::take(&mut state.subscriptions)
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    /// Offers a delivery to the queue (see the module docs for the rules at the bounds).
    /// What it recorded in the store is added to `ticket`.
    pub(crate) fn offer(
        &self,
        delivery: Delivery,
        policy: Policy,
        now: Instant,
        env: &Env,
        ticket: &mut Ticket,
    ) -> Offered {
        let limits = &env.limits;
        let mut report = None;
        let outcome = {
            let mut state = self.lock();
            let online = state.owner.as_ref().is_some_and(|o| o.kick.reason().is_none());
            let qos0 = delivery.qos == QoS::AtMostOnce && policy == Policy::Route;
            if state.discarded {
                env.metrics.dropped(DropReason::SessionEnded, 1);
                Offered::Dropped
            } else if online && state.has_room(delivery.message.size(), limits) {
                let was_empty = state.queue.is_empty();
                state.push(&self.client, delivery, env, ticket);
                self.update_accepting(&state, limits);
                drop(state);
                if was_empty {
                    self.consumer.wake();
                }
                return Offered::Queued;
            } else if online && qos0 && state.full_for(now) >= limits.slow_subscriber_timeout {
                env.metrics.dropped(DropReason::Qos0SubscriberFull, 1);
                report = state
                    .qos0_drops
                    .note(1, now)
                    .map(|n| (DropReason::Qos0SubscriberFull, n));
                Offered::Dropped
            } else if online {
                state.full_since.get_or_insert(now);
                Offered::Full(delivery)
            } else if !state.persistent {
                // Its connection is ending and takes the session with it.
                env.metrics.dropped(DropReason::SessionEnded, 1);
                Offered::Dropped
            } else if qos0 {
                env.metrics.dropped(DropReason::OfflineQos0, 1);
                Offered::Dropped
            } else {
                state.push(&self.client, delivery, env, ticket);
                let mut dropped = 0;
                let over_disk = || env.store.as_ref().is_some_and(|store| store.over_budget());
                while state.queue.len() > 1
                    && (state.queue.len() > limits.max_queued_messages
                        || state.queued_bytes > limits.max_queued_bytes
                        || over_disk())
                {
                    if let Some(oldest) = state.pop(env) {
                        forget(&oldest, env);
                    }
                    dropped += 1;
                }
                if dropped > 0 {
                    self.overflowed.fetch_add(dropped, Ordering::Relaxed);
                    env.metrics.dropped(DropReason::QueueOverflow, dropped);
                    report = state
                        .overflow_drops
                        .note(dropped, now)
                        .map(|n| (DropReason::QueueOverflow, n));
                }
                Offered::Queued
            }
        };
        if let Some((reason, count)) = report {
            env.audit.deliveries_dropped(&self.client, reason, count);
        }
        outcome
    }

    /// After `delivery` was refused: registers `waker` for room. Returns when to
    /// check again (the slow-subscriber timeout's end), or `None` if the caller should offer
    /// again now. Once the queue has been full for the timeout, a QoS 1/2 delivery kicks the
    /// owner as a slow subscriber, and a QoS 0 delivery stops waiting (offered again, it is
    /// dropped): QoS 0 alone never disconnects a subscriber.
    /// A subscription's own retained backlog (`Policy::Backlog`) waits without a deadline: a
    /// client reading its retained messages is not slow, however many there are.
    pub(crate) fn wait_for_room(
        &self,
        waker: &Waker,
        delivery: &Delivery,
        now: Instant,
        policy: Policy,
        env: &Env,
    ) -> Option<Instant> {
        let mut state = self.lock();
        let online = state.owner.as_ref().is_some_and(|o| o.kick.reason().is_none());
        // The same test as `offer`'s, so that "room" here is never "full" there.
        if !online || state.discarded || state.has_room(delivery.message.size(), &env.limits) {
            return None;
        }
        if !state.space_waiters.iter().any(|w| w.will_wake(waker)) {
            state.space_waiters.push(waker.clone());
        }
        if policy == Policy::Backlog {
            return Some(now + env.limits.slow_subscriber_timeout);
        }
        let since = *state.full_since.get_or_insert(now);
        let due = since + env.limits.slow_subscriber_timeout;
        if now >= due && delivery.qos == QoS::AtMostOnce {
            return None;
        }
        if now >= due {
            if let Some(owner) = &state.owner {
                owner.kick.give(KickReason::SlowSubscriber);
            }
            self.accepting.store(false, Ordering::Relaxed);
            drop(state);
            env.audit
                .slow_subscriber(&self.client, env.limits.slow_subscriber_timeout);
            return None;
        }
        Some(due)
    }

    /// Hands the owner (`generation`) what it should write next, at most `budget` packets.
    /// Returns how many were handed out; when none, the owner is woken once there are some.
    /// A stored QoS 2 delivery goes out only once its packet id is durable (and its PUBREL once
    /// its release is); `durable_wait` then names what to wait for.
    pub(crate) fn poll_outgoing(
        &self,
        generation: u64,
        cx: &mut Context<'_>,
        budget: usize,
        env: &Env,
        durable_wait: &mut Option<Ticket>,
        out: &mut dyn FnMut(Outgoing<'_>),
    ) -> usize {
        let mut state = self.lock();
        let Some(max_inflight) = state
            .owner
            .as_ref()
            .filter(|o| o.generation == generation)
            .map(|o| o.max_inflight)
        else {
            return 0;
        };
        // Only the owner registers (a connection taken over must not take its successor's
        // wake-ups), and under the lock, so an offer that follows finds it.
        self.consumer.register(cx.waker());
        let mut handed = 0;
        let durable = |ticket: Ticket| env.store.as_ref().is_none_or(|store| store.is_durable(ticket));
        for entry in state.inflight.iter_mut().filter(|e| !e.sent) {
            if handed == budget {
                return handed;
            }
            if !durable(entry.after) {
                let first = durable_wait.get_or_insert(entry.after);
                *first = (*first).min(entry.after);
                continue;
            }
            entry.sent = true;
            handed += 1;
            if entry.released {
                out(Outgoing::PubRel(entry.pkid));
            } else {
                out(Outgoing::Publish {
                    delivery: &entry.delivery,
                    pkid: entry.pkid,
                    dup: entry.resend,
                });
                entry.resend = true;
            }
        }
        let mut popped = 0;
        let mut expired = 0;
        let now = unix_millis();
        while handed < budget {
            let Some(front) = state.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && state.inflight.len() >= max_inflight && !front.message.is_expired(now) {
                break;
            }
            let Some(delivery) = state.pop(env) else { break };
            popped += 1;
            if delivery.message.is_expired(now) {
                // Never delivered once expired (MQTT-3.3.2-5).
                forget(&delivery, env);
                expired += 1;
                continue;
            }
            handed += 1;
            if delivery.qos == QoS::AtMostOnce {
                out(Outgoing::Publish {
                    delivery: &delivery,
                    pkid: 0,
                    dup: false,
                });
                continue;
            }
            let (pkid, issued) = state.issue_pkid();
            // A stored delivery's packet id is recorded, so that after a restart it is resent
            // with DUP under the id the client saw (MQTT-4.4.0-1). A QoS 2 one goes out only
            // once that is on disk: under another id the client would take it for a new message.
            // A QoS 1 one need not wait: the worst a lost record costs is a duplicate.
            let after = match (delivery.qos, delivery.stored, &env.store) {
                (QoS::ExactlyOnce, Some(id), Some(store)) => store.sent(id, pkid),
                (QoS::AtLeastOnce, Some(id), Some(store)) => {
                    store.sent(id, pkid);
                    Ticket::default()
                }
                _ => Ticket::default(),
            };
            let ready = durable(after);
            state.inflight.push_back(Inflight {
                pkid,
                issued,
                delivery,
                released: false,
                sent: ready,
                resend: ready,
                after,
            });
            if !ready {
                handed -= 1;
                durable_wait.get_or_insert(after);
                continue;
            }
            if let Some(entry) = state.inflight.back() {
                out(Outgoing::Publish {
                    delivery: &entry.delivery,
                    pkid,
                    dup: false,
                });
            }
        }
        if expired > 0 {
            env.metrics.dropped(DropReason::Expired, expired);
        }
        if popped == 0 {
            return handed;
        }
        state.full_since = None;
        self.update_accepting(&state, &env.limits);
        let waiters = if state.space_waiters.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut state.space_waiters)
        };
        drop(state);
        waiters.into_iter().for_each(Waker::wake);
        handed
    }

    /// PUBACK from the owner: completes a QoS 1 delivery. False for an unknown packet id.
    pub(crate) fn puback(&self, generation: u64, pkid: u16, env: &Env) -> bool {
        self.complete(generation, pkid, env, |e| e.delivery.qos == QoS::AtLeastOnce)
    }

    /// PUBCOMP from the owner: completes a released QoS 2 delivery.
    pub(crate) fn pubcomp(&self, generation: u64, pkid: u16, env: &Env) -> bool {
        self.complete(generation, pkid, env, |e| e.released)
    }

    /// A delivery handed out that the owner's connection cannot send (larger than the client's
    /// Maximum Packet Size): done as if delivered (MQTT-3.1.2-25).
    pub(crate) fn abandon(&self, generation: u64, pkid: u16, env: &Env) -> bool {
        self.complete(generation, pkid, env, |_| true)
    }

    fn complete(&self, generation: u64, pkid: u16, env: &Env, matches: impl Fn(&Inflight) -> bool) -> bool {
        let mut state = self.lock();
        if !state.owned_by(generation) {
            return false;
        }
        match state.inflight.iter().position(|e| e.pkid == pkid && matches(e)) {
            Some(at) => {
                if let Some(done) = state.inflight.remove(at) {
                    forget(&done.delivery, env);
                }
                true
            }
            None => false,
        }
    }

    /// PUBREC from the owner: the QoS 2 delivery is now awaiting PUBCOMP. If the packet id is
    /// known, the caller must answer PUBREL once the returned ticket (the release, recorded for
    /// a stored delivery) is durable: a PUBREL that a crash could forget would have the
    /// PUBLISH sent again for a message the client has completed.
    pub(crate) fn pubrec(&self, generation: u64, pkid: u16, env: &Env) -> Option<Ticket> {
        let mut state = self.lock();
        if !state.owned_by(generation) {
            return None;
        }
        let entry = state
            .inflight
            .iter_mut()
            // Only one that went out: a PUBREC for a delivery still held back is not for it.
            .find(|e| e.pkid == pkid && e.delivery.qos == QoS::ExactlyOnce && (e.sent || e.resend))?;
        if let (false, Some(id), Some(store)) = (entry.released, entry.delivery.stored, &env.store) {
            entry.after = store.released(id);
        }
        entry.released = true;
        entry.sent = true;
        Some(entry.after)
    }

    /// A QoS 2 PUBLISH from the client with `pkid`: true if it is new and must be routed, false
    /// if it is a resend of one not yet released (answer PUBREC, do not route it again). For a
    /// persistent session the packet id is recorded; `ticket` covers that.
    pub(crate) fn receive_exactly_once(
        &self,
        generation: u64,
        pkid: u16,
        env: &Env,
        ticket: &mut Ticket,
    ) -> Result<bool, TooManyUnreleased> {
        let mut state = self.lock();
        if !state.owned_by(generation) {
            // A connection taken over: its session is someone else's now. Not routed.
            return Ok(false);
        }
        if state.awaiting_release.iter().any(|u| u.pkid == pkid) {
            return Ok(false);
        }
        if state.awaiting_release.len() >= env.limits.max_inflight {
            return Err(TooManyUnreleased);
        }
        state.awaiting_release.push(Unreleased { pkid, routed: false });
        if let (true, Some(store)) = (state.persistent, &env.store) {
            ticket.cover(store.await_release(&self.client, pkid));
        }
        Ok(true)
    }

    /// The publication of the QoS 2 message `pkid` is complete (`routed`), or was given up
    /// (then the entry goes: a resend is routed afresh). Whichever connection routed it.
    pub(crate) fn exactly_once_done(&self, pkid: u16, routed: bool) {
        let mut state = self.lock();
        if routed {
            if let Some(entry) = state.awaiting_release.iter_mut().find(|u| u.pkid == pkid) {
                entry.routed = true;
            }
        } else {
            state.awaiting_release.retain(|u| u.pkid != pkid);
        }
        drop(state);
        self.routing.wake();
    }

    /// Ready once the QoS 2 message `pkid` the client resent has been routed (or is unknown).
    pub(crate) fn poll_routed(&self, pkid: u16, cx: &mut Context<'_>) -> Poll<()> {
        let state = self.lock();
        if state.awaiting_release.iter().all(|u| u.pkid != pkid || u.routed) {
            return Poll::Ready(());
        }
        self.routing.register(cx.waker());
        Poll::Pending
    }

    /// PUBREL from the client. The ticket covers recording it: until then the PUBCOMP must wait,
    /// or after a crash the client's next QoS 2 message with this packet id would be taken for
    /// a resend and lost.
    pub(crate) fn release(&self, generation: u64, pkid: u16, env: &Env) -> Ticket {
        let mut state = self.lock();
        let mut ticket = Ticket::default();
        if state.owned_by(generation) {
            let before = state.awaiting_release.len();
            state.awaiting_release.retain(|u| u.pkid != pkid);
            if let (true, Some(store)) = (state.persistent, &env.store) {
                ticket = if before != state.awaiting_release.len() {
                    store.release_received(&self.client, pkid)
                } else {
                    // A PUBREL resent after a reconnect: its first may still be on its way to
                    // the disk, recorded by the connection before.
                    store.head()
                };
            }
        }
        ticket
    }

    /// Records a subscription (replacing one with the same filter) and runs `insert` (the tree
    /// update) under the session's lock, so the tree never holds a subscription of a session
    /// that was discarded meanwhile. Refused beyond `max` subscriptions.
    /// Whether it existed before is returned (MQTT 5 Retain Handling 1 asks).
    pub(crate) fn add_subscription(
        &self,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
        env: &Env,
        insert: impl FnOnce(),
    ) -> Result<bool, SubscribeRefused> {
        let mut state = self.lock();
        if state.discarded || !state.owned_by(generation) {
            return Err(SubscribeRefused::SessionEnded);
        }
        let count = state.subscriptions.len();
        let existed = match state.subscriptions.iter_mut().find(|(f, _)| &**f == filter) {
            Some(existing) => {
                existing.1 = options;
                true
            }
            None if count >= env.limits.max_subscriptions => return Err(SubscribeRefused::TooManySubscriptions),
            None => {
                state.subscriptions.push((filter.into(), options));
                false
            }
        };
        if let (true, Some(store)) = (state.persistent, &env.store) {
            store.subscribe(&self.client, filter, &options);
        }
        insert();
        Ok(existed)
    }

    /// Forgets a subscription, running `remove` (the tree update) under the session's lock;
    /// true if it existed.
    pub(crate) fn remove_subscription(&self, generation: u64, filter: &str, env: &Env, remove: impl FnOnce()) -> bool {
        let mut state = self.lock();
        if !state.owned_by(generation) {
            return false;
        }
        let before = state.subscriptions.len();
        state.subscriptions.retain(|(f, _)| &**f != filter);
        let existed = state.subscriptions.len() != before;
        if existed {
            if let (true, Some(store)) = (state.persistent, &env.store) {
                store.unsubscribe(&self.client, filter);
            }
            remove();
        }
        existed
    }

    fn update_accepting(&self, state: &State, limits: &Limits) {
        let online = state.owner.as_ref().is_some_and(|o| o.kick.reason().is_none());
        self.accepting.store(
            online && !state.discarded && state.has_room(0, limits),
            Ordering::Relaxed,
        );
    }

    /// Messages and bytes waiting in the queue (tests and metrics).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> (usize, usize) {
        let state = self.lock();
        (state.queue.len(), state.inflight.len())
    }
}

/// What became of a session when its connection detached.
pub(crate) enum Detached {
    /// It ended with the connection: its filters, to take out of the tree.
    Discarded(Vec<Box<str>>),
    /// It waits for its next connection until `deadline`; the schedule's entry for it moves
    /// from `replaces`, if it had one.
    Expires {
        deadline: Instant,
        replaces: Option<Instant>,
    },
    /// It waits without an end (or another connection owns it).
    Kept,
}

/// What becomes of a will that has a delay, when its connection ends.
pub enum WillHold {
    /// The session holds it for this many seconds (the delay, or the session's expiry if
    /// shorter), until the decision of the [`DelayedWill`].
    Held(u32, Arc<DelayedWill>),
    /// Publish it now: no delay is left, or the session has ended.
    PublishNow,
    /// Never: a newer connection resumed the session.
    Cancelled,
}

impl State {
    /// When a session detached at `now` ends, if its interval is finite.
    fn deadline(&self, now: Instant) -> Option<Instant> {
        (self.expiry != NEVER_EXPIRES).then(|| now + Duration::from_secs(u64::from(self.expiry)))
    }

    /// How long publishers have been refused for lack of room.
    fn full_for(&self, now: Instant) -> Duration {
        self.full_since
            .map_or(Duration::ZERO, |since| now.duration_since(since))
    }

    fn owned_by(&self, generation: u64) -> bool {
        self.owner.as_ref().is_some_and(|o| o.generation == generation)
    }

    /// Room for a delivery of `size` bytes. An empty queue takes any one delivery, so a message
    /// larger than `max_queued_bytes` is slow, never stuck.
    fn has_room(&self, size: usize, limits: &Limits) -> bool {
        self.queue.is_empty()
            || (self.queue.len() < limits.max_queued_messages && self.queued_bytes + size <= limits.max_queued_bytes)
    }

    /// Queues `delivery`; a QoS 1/2 delivery to a persistent session is recorded in the store
    /// first (its ticket added to `ticket`).
    fn push(&mut self, client: &Arc<str>, mut delivery: Delivery, env: &Env, ticket: &mut Ticket) {
        if let (true, QoS::AtLeastOnce | QoS::ExactlyOnce, Some(store)) = (self.persistent, delivery.qos, &env.store) {
            let (id, recorded) = store.enqueue(client, &delivery);
            delivery.stored = Some(id);
            ticket.cover(recorded);
        }
        let size = delivery.message.size();
        self.queued_bytes += size;
        self.queue.push_back(delivery);
        env.metrics.queued(1, size as i64);
    }

    fn pop(&mut self, env: &Env) -> Option<Delivery> {
        let delivery = self.queue.pop_front()?;
        let size = delivery.message.size();
        self.queued_bytes -= size;
        env.metrics.queued(-1, -(size as i64));
        if self.queue.is_empty() && self.queue.capacity() > 16 {
            // A burst's queue is given back; an idle session holds none.
            self.queue = VecDeque::new();
        }
        Some(delivery)
    }

    /// The next free packet id, and its issue number.
    fn issue_pkid(&mut self) -> (u16, u64) {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            self.pkids_issued += 1;
            // Ids are issued in order, so one can collide with a live delivery only once the
            // oldest live one is a whole cycle of ids old.
            let may_collide = self
                .inflight
                .front()
                .is_some_and(|oldest| self.pkids_issued - oldest.issued >= u64::from(u16::MAX));
            if !may_collide || !self.inflight.iter().any(|e| e.pkid == pkid) {
                return (pkid, self.pkids_issued);
            }
        }
    }
}

/// A delivery that is done (completed or dropped) leaves the store too.
fn forget(delivery: &Delivery, env: &Env) {
    if let (Some(id), Some(store)) = (delivery.stored, &env.store) {
        store.remove(id, delivery.message.size());
    }
}
