//! The bridge's side of the local router: a persistent router session under the reserved key
//! `bridge:<name>` (no client can name it: devices are `device:`, services `service:`),
//! subscribed to the `up` filters at QoS 1, drained into the outbox as fast as deliveries come.
//!
//! Because the session is persistent, a device's QoS 1 publish that reaches it is acknowledged
//! only once the delivery is on disk, and the delivery is acknowledged to the router (which
//! removes it from the store) only after it is recorded in the outbox. The bridge never leaves
//! its queue full, so devices are never slowed by the uplink: the outbox takes the backlog and
//! its own bounds decide what an outage costs.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use super::Shared;
use crate::kick::Kick;
use crate::router::{
    Attached, Message, Outgoing, QoS, Router, SessionKey, SubscribeRefused, SubscriptionOptions, NEVER_EXPIRES,
};

/// Deliveries taken from the router per round.
const BATCH: usize = 512;

/// The bridge's router session: attached, subscribed to exactly the `up` filters.
pub struct Intake {
    router: Router,
    key: SessionKey,
    attached: Attached,
    /// How the router tells the owner of a session to let go (only a slow subscriber could
    /// be told: nothing else knows this key).
    kick: Arc<Kick>,
}

impl Intake {
    /// Attaches (resuming what a previous run left queued) and subscribes; a filter a previous
    /// configuration had and this one does not is dropped.
    pub fn attach(router: &Router, name: &str, filters: &[String]) -> Result<Self, SubscribeRefused> {
        let key = SessionKey {
            client: format!("bridge:{name}").into(),
            share_scope: format!("bridge:{name}").into(),
        };
        let kick = Arc::new(Kick::default());
        let attached = router.attach(key.clone(), false, NEVER_EXPIRES, kick.clone(), BATCH);
        for old in attached.subscriptions() {
            if !filters.iter().any(|f| **f == *old) {
                attached.unsubscribe(&old);
            }
        }
        for filter in filters {
            attached.subscribe(filter, SubscriptionOptions::qos(QoS::AtLeastOnce))?;
        }
        Ok(Self {
            router: router.clone(),
            key,
            attached,
            kick,
        })
    }

    /// Moves every delivery into the outbox, forever.
    pub async fn run(mut self, shared: Arc<Shared>) {
        let mut taken: Vec<(u16, Arc<Message>)> = Vec::with_capacity(BATCH);
        loop {
            // Taking everything at once, the intake is never slow; should it have been starved
            // of CPU for the slow-subscriber timeout, it takes its session back, so that the
            // session does not stay treated as offline.
            if self.kick.reason().is_some() {
                self.kick = Arc::new(Kick::default());
                self.attached = self
                    .router
                    .attach(self.key.clone(), false, NEVER_EXPIRES, self.kick.clone(), BATCH);
            }
            poll_fn(|cx| {
                // Only QoS 0/1 reach this session (it subscribes at QoS 1), so nothing waits
                // for the disk before it is handed out.
                let mut durable_wait = None;
                let handed = self
                    .attached
                    .poll_outgoing(cx, BATCH, &mut durable_wait, &mut |outgoing| {
                        if let Outgoing::Publish { delivery, pkid, .. } = outgoing {
                            taken.push((pkid, delivery.message.clone()));
                        }
                    });
                if handed == 0 {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            {
                let mut outbox = shared.outbox();
                for (_, message) in &taken {
                    let topic = shared.topics.upstream_topic(&message.topic);
                    if topic.len() > usize::from(u16::MAX) {
                        shared.too_long(&message.topic);
                        continue;
                    }
                    outbox.push(Message::new(&topic, &message.payload, QoS::AtLeastOnce, false));
                }
            }
            // After the outbox records: the store writes in order, so the router's removal never
            // reaches the disk before the outbox entry does.
            for (pkid, _) in taken.drain(..) {
                if pkid != 0 {
                    self.attached.puback(pkid);
                }
            }
            shared.arrived.notify_one();
            // Let the rest of this worker's tasks run between batches.
            tokio::task::yield_now().await;
        }
    }
}
