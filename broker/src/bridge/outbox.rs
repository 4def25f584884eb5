//! The bridge's outbox: messages taken from the local router that the upstream has not yet
//! acknowledged, oldest first, on disk while the uplink is down or slow.
//!
//! On disk it is one more session of the durable store (key `bridge:<name>:outbox`, never a
//! router session, so no client can reach it): each message is enqueued when it enters and
//! removed when the upstream's PUBACK comes, with the store's group commit, recovery and damage
//! handling. The router delivery it came from is acknowledged only after the outbox record
//! (the store writes records in order, so once that acknowledgement is on disk, so is the
//! message here): a crash at any point leaves every message a device was acknowledged for
//! either in the bridge's router session or here.
//!
//! Bounded by its own `bridge.outbox_max_messages`/`outbox_max_bytes`, not the per-device
//! limits: an outbox must hold a site's traffic through an outage. Beyond, the oldest goes,
//! counted (`broker_messages_dropped_total{reason="outbox_overflow"}`) and audited. One queue
//! for all devices, so each device's messages leave in the order they came.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::Audit;
use crate::message::{Delivery, Message, QoS};
use crate::metrics::DropReason;
use crate::router::{Reporter, NEVER_EXPIRES};
use crate::store::{Store, StoredSession};

/// One message waiting for the upstream.
struct Entry {
    /// Its place in the outbox, for matching the upstream's PUBACK.
    seq: u64,
    /// The message as it goes upstream (topic already mapped).
    message: Arc<Message>,
    /// Its id in the store.
    stored: Option<u64>,
    /// When it entered (for a recovered one: when the broker started).
    since: Instant,
}

/// Messages waiting for the upstream, and how far the current connection has sent them.
pub struct Outbox {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Entries at the front handed to the current connection (sent, not yet acknowledged).
    sent: usize,
    next_seq: u64,
    max_messages: usize,
    max_bytes: usize,
    store: Option<Store>,
    /// The outbox's session key in the store.
    client: Arc<str>,
    audit: Audit,
    overflow: Reporter,
    /// Messages lost to the bounds so far.
    dropped: u64,
}

/// An entry handed to the uplink to send.
pub struct Outgoing {
    /// Pass back to [`Outbox::acknowledged`].
    pub seq: u64,
    /// What to publish.
    pub message: Arc<Message>,
}

impl Outbox {
    /// The store key of the outbox of gateway `name`.
    pub fn store_key(name: &str) -> Arc<str> {
        format!("bridge:{name}:outbox").into()
    }

    /// An outbox holding what the store kept of it (`recovered`), in order.
    pub fn new(
        name: &str,
        max_messages: usize,
        max_bytes: usize,
        store: Option<Store>,
        recovered: Option<StoredSession>,
        audit: Audit,
    ) -> Self {
        let client = Self::store_key(name);
        if let Some(store) = &store {
            store.session(&client, &client, NEVER_EXPIRES);
        }
        let mut outbox = Self {
            entries: VecDeque::new(),
            bytes: 0,
            sent: 0,
            next_seq: 0,
            max_messages,
            max_bytes,
            store,
            client,
            audit,
            overflow: Reporter::default(),
            dropped: 0,
        };
        let now = Instant::now();
        for stored in recovered.into_iter().flat_map(|s| s.deliveries) {
            outbox.append(stored.delivery.message, stored.delivery.stored, now);
        }
        outbox.enforce_bounds(now);
        outbox
    }

    /// Adds a message (recorded in the store first), dropping the oldest beyond the bounds.
    pub fn push(&mut self, message: Arc<Message>) {
        let stored = self.store.as_ref().map(|store| {
            let delivery = Delivery {
                message: message.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                stored: None,
                subscription_ids: Box::default(),
            };
            store.enqueue(&self.client, &delivery).0
        });
        let now = Instant::now();
        self.append(message, stored, now);
        self.enforce_bounds(now);
    }

    fn append(&mut self, message: Arc<Message>, stored: Option<u64>, since: Instant) {
        self.bytes += message.size();
        self.entries.push_back(Entry {
            seq: self.next_seq,
            message,
            stored,
            since,
        });
        self.next_seq += 1;
    }

    fn enforce_bounds(&mut self, now: Instant) {
        let mut dropped = 0;
        while self.entries.len() > 1 && (self.entries.len() > self.max_messages || self.bytes > self.max_bytes) {
            if let Some(oldest) = self.entries.pop_front() {
                self.forget(&oldest);
                self.sent = self.sent.saturating_sub(1);
                dropped += 1;
            }
        }
        if dropped == 0 {
            return;
        }
        self.dropped += dropped;
        self.audit.metrics().dropped(DropReason::OutboxOverflow, dropped);
        if let Some(count) = self.overflow.note(dropped, now) {
            self.audit
                .deliveries_dropped(&self.client, DropReason::OutboxOverflow, count);
        }
    }

    fn forget(&mut self, entry: &Entry) {
        let size = entry.message.size();
        self.bytes -= size;
        if let (Some(id), Some(store)) = (entry.stored, &self.store) {
            store.remove(id, size);
        }
    }

    /// The next message the current connection has not been sent, if any.
    pub fn next_unsent(&mut self) -> Option<Outgoing> {
        let entry = self.entries.get(self.sent)?;
        self.sent += 1;
        Some(Outgoing {
            seq: entry.seq,
            message: entry.message.clone(),
        })
    }

    /// The upstream acknowledged `seq`: it leaves the outbox (and the store). False if it had
    /// already gone (dropped by the bounds meanwhile).
    pub fn acknowledged(&mut self, seq: u64) -> bool {
        // Acknowledgements come in the order sent, so this is almost always the front.
        let Some(at) = self.entries.iter().take(self.sent).position(|e| e.seq == seq) else {
            return false;
        };
        if let Some(entry) = self.entries.remove(at) {
            self.forget(&entry);
            self.sent -= 1;
        }
        true
    }

    /// The connection ended: what it was sent and did not acknowledge goes out again, first.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// Messages and bytes waiting (sent or not).
    pub fn depth(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// How long the oldest message has waited.
    pub fn oldest_age(&self, now: Instant) -> Duration {
        self.entries
            .front()
            .map_or(Duration::ZERO, |e| now.saturating_duration_since(e.since))
    }

    /// Messages lost to the bounds since the broker started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    fn outbox(max_messages: usize) -> Outbox {
        Outbox::new(
            "gw",
            max_messages,
            1 << 20,
            None,
            None,
            Audit::new(Arc::new(Metrics::default())),
        )
    }

    fn message(n: usize) -> Arc<Message> {
        Message::new(&format!("devices/d{n}/telemetry"), b"x", QoS::AtLeastOnce, false)
    }

    #[test]
    fn messages_leave_in_order_and_only_once_acknowledged() {
        let mut outbox = outbox(10);
        for n in 0..3 {
            outbox.push(message(n));
        }
        let first = outbox.next_unsent().unwrap();
        let second = outbox.next_unsent().unwrap();
        assert_eq!(&*first.message.topic, "devices/d0/telemetry");
        assert!(outbox.acknowledged(first.seq));
        assert_eq!(outbox.depth().0, 2);
        // The connection drops: the unacknowledged second goes out again, before the third.
        outbox.rewind();
        assert_eq!(outbox.next_unsent().unwrap().seq, second.seq);
        assert_eq!(&*outbox.next_unsent().unwrap().message.topic, "devices/d2/telemetry");
        assert!(outbox.next_unsent().is_none());
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_it() {
        let mut outbox = outbox(2);
        for n in 0..3 {
            outbox.push(message(n));
        }
        assert_eq!(outbox.depth().0, 2);
        assert_eq!(outbox.dropped(), 1);
        assert_eq!(&*outbox.next_unsent().unwrap().message.topic, "devices/d1/telemetry");
    }

    #[test]
    fn an_acknowledgement_for_a_dropped_message_is_ignored() {
        let mut outbox = outbox(1);
        outbox.push(message(0));
        let sent = outbox.next_unsent().unwrap();
        outbox.push(message(1));
        assert!(!outbox.acknowledged(sent.seq));
        assert_eq!(&*outbox.next_unsent().unwrap().message.topic, "devices/d1/telemetry");
    }
}
