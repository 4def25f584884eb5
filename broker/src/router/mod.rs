//! The router: who is subscribed to what, each session's outgoing queue and inflight window,
//! and the retained messages. The front (TLS, identity, ACL) calls it through a small typed API:
//! [`Router::attach`] for a connection's session, [`Router::publish`], and the [`Attached`]
//! handle for everything a connection does with its own session.
//!
//! # Design
//!
//! There is no router thread. A publisher's own connection task matches the topic against the
//! subscription tree (`subscriptions`) (a read lock) and puts a [`Delivery`] into each matching
//! session's queue (that session's own lock); the subscriber's connection task drains its
//! queue into its socket. So fan-out runs on whichever worker thread runs the publisher, and
//! many publishers route at once on every core the runtime has.
//!
//! Memory follows what is queued: a message is one shared allocation, held by the queues and
//! inflight windows it is in and freed when the last one lets go. Nothing is kept for messages
//! that have passed.
//!
//! Every queue is bounded (`max_queued_messages`, `max_queued_bytes`) and so is every inflight
//! window (`max_inflight`). When an online subscriber's queue is full, a publication waits
//! ([`Publication`]): the publisher's connection stops reading its socket and holds back its
//! PUBACK/PUBREC until the delivery is queued, so TCP slows the publishing device instead of
//! the broker dropping or buffering without bound. A subscriber whose queue stays full while it
//! takes nothing from it for `slow_subscriber_timeout` (it stopped reading or acknowledging; a
//! subscriber that is merely the slowest part of a busy flow keeps taking) is slow: a QoS 1/2
//! publication waiting for it disconnects it,
//! after which its session (if persistent) queues offline; QoS 0 to it is dropped while it
//! stays full. Offline persistent sessions drop their oldest beyond the bounds and never queue
//! QoS 0. Every drop is counted ([`crate::metrics::DropReason`]) and reported in the audit log,
//! rate-limited per session.
//!
//! Lock order, to rule out deadlocks: session registry → one session → subscription tree. A
//! publication holds the tree's read lock only while matching, then offers to each session
//! with no other lock held; retained messages have their own lock, never held with another.
//!
//! # Room for what comes next
//!
//! - **Durable sessions** are in: a persistent session's changes are recorded in the
//!   [`crate::store`] where they are made (`Session::offer`, `poll_outgoing`, the acks,
//!   subscriptions, `attach`/discard), each record's [`Ticket`] travels with the
//!   [`Publication`], and the front holds the acknowledgement until the store has it on disk.
//!   [`Router::restore`] puts the stored sessions back before the listener opens.
//! - **MQTT 5** is in: a [`Message`] carries its publish properties and an expiry instant
//!   checked when a delivery is handed out; a subscription's options are a QoS, No Local,
//!   Retain As Published and an identifier ([`SubscriptionOptions`]); the owner's inflight
//!   bound is per connection (the client's Receive Maximum); a detached session with a finite
//!   expiry is discarded by [`Router::expire_sessions`], run every second by the listener.
//! - **A bridge** is in ([`crate::bridge`]): one more attached persistent session, under a key
//!   no client can name, that its owner drains at once into an outbox of its own in the store.
//!   The outbox, not this queue, holds an outage's backlog: its bounds are the bridge's, since
//!   the per-session limits here are sized for a device.

mod retained;
mod session;
mod subscriptions;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use crate::message::{Delivery, Message, QoS, SubscriptionOptions};
pub use session::{Outgoing, WillHold, NEVER_EXPIRES};

use crate::audit::Audit;
use crate::kick::Kick;
use crate::metrics::{DropReason, Metrics};
use crate::store::{Recovered, Store, Ticket};
use crate::topic::SubscriptionFilter;
use retained::RetainedStore;
pub(crate) use session::Reporter;
use session::{Detached, Offered, Policy, Session};
use subscriptions::SubscriptionTree;

/// What the router bounds, per session and overall.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Deliveries waiting in one session's queue (not yet handed to its connection).
    pub max_queued_messages: usize,
    /// Topic and payload bytes waiting in one session's queue.
    pub max_queued_bytes: usize,
    /// QoS 1/2 deliveries handed to a connection and not yet acknowledged; also the QoS 2
    /// messages a client may have awaiting PUBREL.
    pub max_inflight: usize,
    /// How long an online subscriber's queue may stay full, with nothing taken from it, while
    /// publishers wait for it.
    pub slow_subscriber_timeout: Duration,
    /// Subscriptions per session.
    pub max_subscriptions: usize,
    /// Topics with a retained message.
    pub max_retained_messages: usize,
    /// Topic and payload bytes of all retained messages.
    pub max_retained_bytes: usize,
}

/// What sessions need from the router to keep their bounds and report drops.
pub(crate) struct Env {
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) audit: Audit,
    /// Where persistent sessions and retained messages are kept; `None` keeps them in memory.
    pub(crate) store: Option<Store>,
}

/// How the front names a session.
#[derive(Clone, Debug)]
pub struct SessionKey {
    /// Unique per client: a second connection with the same key takes the session over.
    pub client: Arc<str>,
    /// Shared subscription groups form only among sessions with the same scope, so that
    /// tenants who do not trust each other never split one group's messages.
    pub share_scope: Arc<str>,
}

/// The router. Cheap to clone; every clone is the same router.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

struct Shared {
    env: Env,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    tree: RwLock<SubscriptionTree>,
    retained: Mutex<RetainedStore>,
    /// Retained messages refused by the store's bounds, reported at a limited rate.
    retain_refusals: Mutex<Reporter>,
    generations: AtomicU64,
    /// Detached sessions with a finite expiry, by deadline (entries of sessions resumed since
    /// are skipped when due).
    expiring: Mutex<BTreeSet<(Instant, Arc<str>)>>,
}

/// A subscription the router did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeRefused {
    /// The session has `limits.max_subscriptions` already.
    #[error("the session already has limits.max_subscriptions subscriptions")]
    TooManySubscriptions,
    /// The filter is malformed.
    #[error("the filter is malformed")]
    Invalid,
    /// The session was discarded (its connection is being taken over).
    #[error("the session has ended")]
    SessionEnded,
}

/// More QoS 2 messages awaiting PUBREL than `limits.max_inflight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than limits.max_inflight QoS 2 messages awaiting PUBREL")]
pub struct TooManyUnreleased;

impl Router {
    /// An empty router; with a `store`, persistent sessions and retained messages are kept in it.
    pub fn new(limits: Limits, audit: Audit, store: Option<Store>) -> Self {
        let retained = RetainedStore::new(limits.max_retained_messages, limits.max_retained_bytes);
        let metrics = audit.metrics().clone();
        Self {
            shared: Arc::new(Shared {
                env: Env {
                    limits,
                    metrics,
                    audit,
                    store,
                },
                retain_refusals: Mutex::new(Reporter::default()),
                sessions: Mutex::new(HashMap::new()),
                tree: RwLock::new(SubscriptionTree::default()),
                retained: Mutex::new(retained),
                generations: AtomicU64::new(0),
                expiring: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    fn env(&self) -> &Env {
        &self.shared.env
    }

    /// The durable store, if the broker has one.
    pub fn store(&self) -> Option<&Store> {
        self.env().store.as_ref()
    }

    /// Puts back what the store held at start: persistent sessions (detached, their
    /// subscriptions in the tree) and retained messages. Before the listener opens.
    pub fn restore(&self, recovered: Recovered) {
        let env = self.env();
        let now = Instant::now();
        for stored in recovered.sessions {
            let session = Arc::new(Session::restore(stored, env));
            // Read before the tree's lock: the lock order is session, then tree.
            let subscriptions = session.subscriptions();
            {
                let mut tree = self.shared.tree.write().unwrap_or_else(|p| p.into_inner());
                for (filter, options) in subscriptions {
                    if let Ok(parsed) = SubscriptionFilter::parse(&filter) {
                        tree.insert(&parsed, &session, options);
                    }
                }
            }
            if let Some(deadline) = session.expires_at_restore(now) {
                self.expiring().insert((deadline, session.client.clone()));
            }
            self.sessions().insert(session.client.clone(), session);
        }
        let mut retained = self.retained();
        for message in recovered.retained {
            if retained.store(&message).is_err() {
                env.metrics.dropped(DropReason::RetainRefused, 1);
            }
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.shared.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn retained(&self) -> MutexGuard<'_, RetainedStore> {
        self.shared.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expiring(&self) -> MutexGuard<'_, BTreeSet<(Instant, Arc<str>)>> {
        self.shared.expiring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the detached sessions whose expiry interval has run out by `now` (their queues
    /// counted as dropped, their stored rows removed); returns how many ended.
    pub fn expire_sessions(&self, now: Instant) -> usize {
        let due: Vec<(Instant, Arc<str>)> = {
            let mut expiring = self.expiring();
            let later = expiring.split_off(&(now, Arc::from("\u{10FFFF}")));
            std::mem::replace(&mut *expiring, later).into_iter().collect()
        };
        let mut ended = 0;
        for (deadline, client) in due {
            let mut sessions = self.sessions();
            let Some(session) = sessions.get(&client).cloned() else {
                continue;
            };
            let Some(filters) = session.expire(deadline, self.env()) else {
                continue;
            };
            sessions.remove(&client);
            drop(sessions);
            self.remove_from_tree(&session, &filters);
            self.env().audit.session_expired(&client);
            ended += 1;
        }
        ended
    }

    /// Attaches a connection to the session named by `key`: with `clean_start` a session starts
    /// empty (discarding any stored one); otherwise a stored persistent session is resumed. A
    /// connection attached to it before is kicked (taken over by `kick`'s connection).
    /// `expiry` is how long the session outlives this connection, in seconds (0: not at all,
    /// [`NEVER_EXPIRES`]: until a clean session replaces it); `max_inflight` bounds what this
    /// connection is handed unacknowledged.
    pub fn attach(
        &self,
        key: SessionKey,
        clean_start: bool,
        expiry: u32,
        kick: Arc<Kick>,
        max_inflight: usize,
    ) -> Attached {
        let env = self.env();
        let generation = self.shared.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let mut sessions = self.sessions();
        if let Some(deadline) = sessions.get(&key.client).and_then(|s| s.take_scheduled()) {
            // Resumed or replaced now: its expiry entry goes (one entry per session at most).
            self.expiring().remove(&(deadline, key.client.clone()));
        }
        let (session, session_present) = match sessions.get(&key.client) {
            Some(existing) if !clean_start && existing.is_resumable() => (existing.clone(), true),
            existing => {
                if let Some(existing) = existing.cloned() {
                    let filters = existing.discard(&kick, env);
                    self.remove_from_tree(&existing, &filters);
                }
                let session = Arc::new(Session::new(key.client.clone(), key.share_scope.clone(), expiry));
                if let (true, Some(store)) = (expiry > 0, &env.store) {
                    store.session(&key.client, &key.share_scope, expiry);
                }
                sessions.insert(key.client.clone(), session.clone());
                (session, false)
            }
        };
        // Under the registry's lock: a clean session replacing this one meanwhile would leave us
        // attached to a discarded session.
        if let (true, true, Some(store)) = (session_present, expiry > 0, &env.store) {
            // A resumed session keeps the expiry this connection asked for.
            store.session(&key.client, &key.share_scope, expiry);
        }
        session.attach(generation, kick, max_inflight.max(1), expiry, env);
        drop(sessions);
        Attached {
            router: self.clone(),
            session,
            generation,
            session_present,
        }
    }

    fn remove_from_tree(&self, session: &Arc<Session>, filters: &[Box<str>]) {
        if filters.is_empty() {
            return;
        }
        let mut tree = self.shared.tree.write().unwrap_or_else(|p| p.into_inner());
        for filter in filters {
            if let Ok(parsed) = SubscriptionFilter::parse(filter) {
                tree.remove(&parsed, session);
            }
        }
    }

    /// Routes `message` to every matching subscription (and stores it if retained). The
    /// publication is complete when [`Publication::is_complete`]; otherwise it waits for full
    /// queues and must be driven with [`Publication::poll`].
    pub fn publish(&self, message: Arc<Message>) -> Publication {
        self.route(message, None)
    }

    /// [`Router::publish`] from `origin`'s session, which its No Local subscriptions skip.
    fn route(&self, message: Arc<Message>, origin: Option<&Arc<Session>>) -> Publication {
        let env = self.env();
        let mut ticket = Ticket::default();
        if message.retain {
            self.retain(&message, &mut ticket);
        }
        let mut targets = Vec::new();
        self.shared
            .tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .matches(&message.topic, origin, &mut targets);
        let now = Instant::now();
        let mut waiting = Vec::new();
        for (session, matched) in targets {
            let delivery = Delivery {
                message: message.clone(),
                qos: message.qos.min(matched.qos),
                retain: matched.retain_as_published && message.retain,
                stored: None,
                subscription_ids: matched.ids,
            };
            if let Offered::Full(delivery) = session.offer(delivery, Policy::Route, now, env, &mut ticket) {
                waiting.push((session, Some(delivery)));
            }
        }
        if !waiting.is_empty() {
            env.metrics.publisher_waited();
        }
        Publication::new(self, Waiting::Routed(waiting), ticket)
    }

    fn retain(&self, message: &Arc<Message>, ticket: &mut Ticket) {
        let refused = {
            let mut retained = self.retained();
            let outcome = retained.store(message);
            // Recorded under the retained store's lock, so the store keeps the order of changes.
            if let (Ok(()), Some(store)) = (outcome, &self.env().store) {
                let kept = (!message.payload.is_empty()).then(|| message.clone());
                ticket.cover(store.retain(&message.topic, kept));
            }
            outcome
        };
        if let Err(why) = refused {
            let env = self.env();
            env.metrics.dropped(DropReason::RetainRefused, 1);
            let due = self
                .shared
                .retain_refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(1, Instant::now());
            if let Some(count) = due {
                env.audit.retain_refused(&message.topic, why.describe(), count);
            }
        }
    }

    /// The router's gauges and per-session counters in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let (count, bytes) = self.retained().size();
        let _ = writeln!(
            out,
            "# HELP broker_retained_messages Topics holding a retained message.\n# TYPE broker_retained_messages gauge\nbroker_retained_messages {count}\n# TYPE broker_retained_bytes gauge\nbroker_retained_bytes {bytes}"
        );
        let sessions = self.sessions();
        let _ = writeln!(
            out,
            "# HELP broker_router_sessions Sessions the router holds (connected or persistent).\n# TYPE broker_router_sessions gauge\nbroker_router_sessions {}",
            sessions.len()
        );
        let _ = writeln!(
            out,
            "# HELP broker_session_overflow_dropped_total Deliveries a session lost to the queue bounds while offline.\n# TYPE broker_session_overflow_dropped_total counter"
        );
        for session in sessions.values().filter(|s| s.overflowed() > 0) {
            let _ = writeln!(
                out,
                "broker_session_overflow_dropped_total{{client_id=\"{}\"}} {}",
                session.client.escape_default(),
                session.overflowed()
            );
        }
    }
}

impl retained::Refused {
    fn describe(self) -> &'static str {
        match self {
            retained::Refused::TooMany => "limits.max_retained_messages reached",
            retained::Refused::TooLarge => "limits.max_retained_bytes reached",
        }
    }
}

/// A publication (or a subscription's retained messages) with deliveries still waiting for
/// room in full queues. Nothing here is lost: each waiting delivery is either queued once
/// there is room, or queued offline / dropped and counted once its subscriber is kicked as slow.
#[must_use = "a waiting publication must be driven to completion before the publisher is acknowledged"]
pub struct Publication {
    router: Option<Router>,
    waiting: Waiting,
    /// What the publication recorded in the store: its acknowledgement waits for this.
    ticket: Ticket,
    /// The publisher's session and packet id of a QoS 2 message: told when it is routed.
    exactly_once: Option<(Arc<Session>, u16)>,
    /// When a waiting subscriber's timeout runs out: poll again then, even if nothing woke us.
    deadline: Option<Instant>,
}

enum Waiting {
    /// A routed message: at most one delivery per session.
    Routed(Vec<(Arc<Session>, Option<Delivery>)>),
    /// Retained messages for a session's own new subscriptions, in order.
    Backlog(Arc<Session>, VecDeque<Delivery>),
}

impl Waiting {
    fn is_empty(&self) -> bool {
        match self {
            Waiting::Routed(waiting) => waiting.is_empty(),
            Waiting::Backlog(_, deliveries) => deliveries.is_empty(),
        }
    }
}

impl Publication {
    fn new(router: &Router, waiting: Waiting, ticket: Ticket) -> Self {
        Self {
            router: (!waiting.is_empty()).then(|| router.clone()),
            waiting,
            ticket,
            exactly_once: None,
            deadline: None,
        }
    }

    /// Tells the publisher's session once everything is queued (or, abandoned, that it is not).
    fn settle(&mut self, routed: bool) {
        if let Some((session, pkid)) = self.exactly_once.take() {
            session.exactly_once_done(pkid, routed);
        }
    }

    /// Whether every delivery has been queued (or dropped and counted).
    pub fn is_complete(&self) -> bool {
        self.waiting.is_empty()
    }

    /// What must be durable before the publisher is acknowledged (see [`crate::store`]).
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// When to poll again if nothing wakes the task before.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Offers the waiting deliveries again; ready once none waits.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(router) = &self.router else {
            return Poll::Ready(());
        };
        let env = router.env();
        let now = Instant::now();
        self.deadline = None;
        match &mut self.waiting {
            Waiting::Routed(waiting) => {
                for (session, slot) in waiting.iter_mut() {
                    if let Some(delivery) = slot.take() {
                        if let Err((delivery, due)) =
                            offer_when_room(session, delivery, Policy::Route, cx, now, env, &mut self.ticket)
                        {
                            *slot = Some(delivery);
                            self.deadline = Some(self.deadline.map_or(due, |d| d.min(due)));
                        }
                    }
                }
                waiting.retain(|(_, slot)| slot.is_some());
            }
            Waiting::Backlog(session, deliveries) => {
                while let Some(delivery) = deliveries.pop_front() {
                    if let Err((delivery, due)) =
                        offer_when_room(session, delivery, Policy::Backlog, cx, now, env, &mut self.ticket)
                    {
                        deliveries.push_front(delivery);
                        self.deadline = Some(due);
                        break;
                    }
                }
            }
        }
        if self.waiting.is_empty() {
            self.settle(true);
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Gives up on what still waits (the broker is shutting down), counted as dropped.
    pub fn abandon(mut self) {
        self.settle(false);
        let waiting = match &self.waiting {
            Waiting::Routed(waiting) => waiting.len(),
            Waiting::Backlog(_, deliveries) => deliveries.len(),
        };
        if let Some(router) = &self.router {
            router.env().metrics.dropped(DropReason::SessionEnded, waiting as u64);
        }
    }

    /// Drives the publication to completion (wills, and a connection's last publication),
    /// looking again at each waiting subscriber's deadline so that a stuck one is kicked.
    pub async fn finish(mut self) {
        let timer = tokio::time::sleep(Duration::ZERO);
        let mut timer = std::pin::pin!(timer);
        std::future::poll_fn(|cx| loop {
            if self.poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let Some(deadline) = self.deadline else {
                return Poll::Pending;
            };
            timer.as_mut().reset(deadline.into());
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        })
        .await;
    }
}

/// Offers `delivery` if `session` has room (or no longer needs to be waited for); otherwise
/// hands it back with when to look again, the task registered to be woken on room.
fn offer_when_room(
    session: &Session,
    mut delivery: Delivery,
    policy: Policy,
    cx: &mut Context<'_>,
    now: Instant,
    env: &Env,
    ticket: &mut Ticket,
) -> Result<(), (Delivery, Instant)> {
    loop {
        if let Some(due) = session.wait_for_room(cx.waker(), &delivery, now, policy, env) {
            return Err((delivery, due));
        }
        match session.offer(delivery, policy, now, env, ticket) {
            Offered::Full(refused) => delivery = refused,
            Offered::Queued | Offered::Dropped => return Ok(()),
        }
    }
}

/// A connection's hold on its session. Dropping it detaches the connection: a clean session
/// ends, a persistent one keeps queueing for the next connection.
pub struct Attached {
    router: Router,
    session: Arc<Session>,
    generation: u64,
    session_present: bool,
}

impl Attached {
    /// Whether a stored session was resumed (CONNACK's session present flag).
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// Subscribes to `filter` (as the client named it, `$share/` prefix included) with
    /// `options`, replacing a subscription with the same filter; says whether one existed.
    pub fn subscribe(&self, filter: &str, options: SubscriptionOptions) -> Result<bool, SubscribeRefused> {
        let parsed = SubscriptionFilter::parse(filter).map_err(|_| SubscribeRefused::Invalid)?;
        let tree = &self.router.shared.tree;
        self.session
            .add_subscription(self.generation, filter, options, self.router.env(), || {
                tree.write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(&parsed, &self.session, options)
            })
    }

    /// Routes `message`, published by this session's client (its No Local subscriptions skip it).
    pub fn publish(&self, message: Arc<Message>) -> Publication {
        self.router.route(message, Some(&self.session))
    }

    /// The filters this session is subscribed to (as named, `$share/` prefix included), e.g. a
    /// persistent session resumed with subscriptions its owner no longer wants.
    pub fn subscriptions(&self) -> Vec<Box<str>> {
        self.session
            .subscriptions()
            .into_iter()
            .map(|(filter, _)| filter)
            .collect()
    }

    /// The retained messages that new subscriptions to `granted` (filter, options) match, as
    /// a publication to this session itself: each message once, at the highest QoS of the
    /// filters that match it, with their identifiers. Shared subscriptions get none (MQTT 5,
    /// 4.8.2); expired messages are not sent (and counted).
    pub fn retained_for(&self, granted: &[(&str, SubscriptionOptions)]) -> Publication {
        let mut found: Vec<Delivery> = Vec::new();
        let mut index: HashMap<*const Message, usize> = HashMap::new();
        let now = crate::message::unix_millis();
        let mut expired = 0;
        for (filter, options) in granted {
            let Ok(SubscriptionFilter { group: None, filter }) = SubscriptionFilter::parse(filter) else {
                continue;
            };
            // The retained store's lock is taken per filter, so many filters never hold it long.
            for message in self.router.retained().matching(filter) {
                if message.is_expired(now) {
                    expired += 1;
                    continue;
                }
                let qos = message.qos.min(options.qos);
                match index.get(&Arc::as_ptr(&message)) {
                    Some(&at) => {
                        let delivery = &mut found[at];
                        delivery.qos = delivery.qos.max(qos);
                        if let Some(id) = options.identifier {
                            delivery.subscription_ids = delivery.subscription_ids.iter().copied().chain([id]).collect();
                        }
                    }
                    None => {
                        index.insert(Arc::as_ptr(&message), found.len());
                        found.push(Delivery {
                            message,
                            qos,
                            retain: true,
                            stored: None,
                            subscription_ids: options.identifier.into_iter().collect(),
                        });
                    }
                }
            }
        }
        if expired > 0 {
            self.router.env().metrics.dropped(DropReason::Expired, expired);
        }
        Publication::new(
            &self.router,
            Waiting::Backlog(self.session.clone(), found.into()),
            Ticket::default(),
        )
    }

    /// Unsubscribes from `filter`; true if there was such a subscription.
    pub fn unsubscribe(&self, filter: &str) -> bool {
        let Ok(parsed) = SubscriptionFilter::parse(filter) else {
            return false;
        };
        let tree = &self.router.shared.tree;
        self.session
            .remove_subscription(self.generation, filter, self.router.env(), || {
                tree.write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&parsed, &self.session);
            })
    }

    /// Hands over up to `budget` packets to write (resends first, then the queue, within the
    /// inflight bound). Returns how many; when none, the task is woken once there are some. A
    /// delivery held back until the store has something on disk sets `durable_wait`: the caller
    /// waits for that ticket, then asks again.
    pub fn poll_outgoing(
        &self,
        cx: &mut Context<'_>,
        budget: usize,
        durable_wait: &mut Option<Ticket>,
        out: &mut dyn FnMut(Outgoing<'_>),
    ) -> usize {
        self.session
            .poll_outgoing(self.generation, cx, budget, self.router.env(), durable_wait, out)
    }

    /// Changes how long the session outlives this connection (an MQTT 5 DISCONNECT may).
    pub fn set_session_expiry(&self, expiry: u32) {
        self.session.set_expiry(self.generation, expiry, self.router.env());
    }

    /// Keeps the connection's will with the session while it waits out its delay of `delay`
    /// seconds (see [`crate::will::DelayedWill`] and [`WillHold`]).
    pub fn hold_will(&self, delay: u32) -> WillHold {
        self.session.hold_will(self.generation, delay)
    }

    /// A delivery handed out that cannot be sent to this client (larger than its Maximum
    /// Packet Size): completed as if delivered.
    pub fn abandon(&self, pkid: u16) -> bool {
        self.session.abandon(self.generation, pkid, self.router.env())
    }

    /// PUBACK from the client; false if no QoS 1 delivery had that packet id.
    pub fn puback(&self, pkid: u16) -> bool {
        self.session.puback(self.generation, pkid, self.router.env())
    }

    /// PUBREC from the client; if the packet id is known, the caller answers PUBREL once the
    /// ticket is durable.
    pub fn pubrec(&self, pkid: u16) -> Option<Ticket> {
        self.session.pubrec(self.generation, pkid, self.router.env())
    }

    /// PUBCOMP from the client; false if no released QoS 2 delivery had that packet id.
    pub fn pubcomp(&self, pkid: u16) -> bool {
        self.session.pubcomp(self.generation, pkid, self.router.env())
    }

    /// A QoS 2 PUBLISH from the client: `Ok(true)` if it must be routed, `Ok(false)` if it is a
    /// resend of one not yet released (whose PUBREC waits for [`Attached::poll_routed`]). What
    /// it recorded is added to `ticket`.
    pub fn receive_exactly_once(&self, pkid: u16, ticket: &mut Ticket) -> Result<bool, TooManyUnreleased> {
        self.session
            .receive_exactly_once(self.generation, pkid, self.router.env(), ticket)
    }

    /// Marks `publication` as the routing of the QoS 2 message `pkid` this client sent: a resend
    /// of it is acknowledged only once it completes ([`Attached::poll_routed`]).
    pub fn route_exactly_once(&self, publication: &mut Publication, pkid: u16) {
        if publication.is_complete() {
            self.session.exactly_once_done(pkid, true);
        } else {
            publication.exactly_once = Some((self.session.clone(), pkid));
        }
    }

    /// Ready once the QoS 2 message `pkid`, of which the client sent a resend, has been routed.
    pub fn poll_routed(&self, pkid: u16, cx: &mut Context<'_>) -> Poll<()> {
        self.session.poll_routed(pkid, cx)
    }

    /// PUBREL from the client: the QoS 2 exchange for `pkid` is over. The PUBCOMP waits for the
    /// returned ticket.
    pub fn release(&self, pkid: u16) -> Ticket {
        self.session.release(self.generation, pkid, self.router.env())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let router = &self.router;
        let filters = match self.session.detach(self.generation, router.env()) {
            Detached::Discarded(filters) => filters,
            Detached::Expires { deadline, replaces } => {
                let mut expiring = router.expiring();
                if let Some(earlier) = replaces {
                    expiring.remove(&(earlier, self.session.client.clone()));
                }
                expiring.insert((deadline, self.session.client.clone()));
                return;
            }
            Detached::Kept => return,
        };
        router.remove_from_tree(&self.session, &filters);
        let mut sessions = router.sessions();
        if sessions
            .get(&self.session.client)
            .is_some_and(|s| Arc::ptr_eq(s, &self.session))
        {
            sessions.remove(&self.session.client);
        }
    }
}

#[cfg(test)]
mod tests;
