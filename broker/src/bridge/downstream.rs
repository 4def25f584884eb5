//! Messages from the upstream, delivered to local devices: each only once its topic maps to a
//! device that may subscribe to it ([`super::topics`]), and acknowledged upstream only once the
//! local routing is complete and, for persistent sessions, on disk, as the front does for a
//! device's own QoS 1 publish. One at a time per connection, in the order they came.

use std::future::poll_fn;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Shared;
use crate::router::{Message, QoS};
use crate::store::DurableWaiter;

/// A PUBLISH from the upstream.
pub struct Downstream {
    /// Its topic, upstream's name for it.
    pub topic: Box<str>,
    /// Its payload.
    pub payload: Bytes,
    /// The packet id to acknowledge (QoS 1), if any.
    pub ack: Option<u16>,
}

/// Delivers what comes on `incoming` and sends the packet ids to acknowledge on `acks`, until
/// the connection's channel closes.
pub async fn deliver(shared: Arc<Shared>, mut incoming: mpsc::Receiver<Downstream>, acks: mpsc::Sender<u16>) {
    let waiter = Arc::new(DurableWaiter::default());
    while let Some(down) = incoming.recv().await {
        match shared.topics.downstream_topic(&down.topic, &shared.acl) {
            Ok(local) => {
                let qos = if down.ack.is_some() {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                // Retained state stays upstream's: a command is delivered, not retained here.
                let message = Message::new(local, &down.payload, qos, false);
                shared.router.publish(message).finish().await;
                if let Some(store) = shared.router.store() {
                    let routed = store.head();
                    poll_fn(|cx| store.poll_durable(routed, &waiter, cx)).await;
                }
                shared.delivered_down();
            }
            // Acknowledged all the same: the upstream resending it would change nothing.
            Err(refusal) => shared.refused_down(&down.topic, &refusal),
        }
        if let Some(pkid) = down.ack {
            if acks.send(pkid).await.is_err() {
                // The connection ended: the upstream resends it to the next one.
                continue;
            }
        }
    }
}
