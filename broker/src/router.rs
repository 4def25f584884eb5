//! rumqttd's router, used as a library: our front terminates TLS and authorises, and hands each
//! authenticated connection to the router through a local link.

use std::sync::Arc;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

/// Builds a link for a client id. rumqttd's router channel type is unnameable outside the crate
/// (its event type is private), so it is captured in this closure.
type MakeLink = dyn for<'a> Fn(&'a str) -> LinkBuilder<'a> + Send + Sync;

/// A handle to the running router.
#[derive(Clone)]
pub struct RouterHandle {
    make_link: Arc<MakeLink>,
}

/// The router did not accept a session (rumqttd's own error is large; its message is kept).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LinkRefused(String);

/// A connection's two ends of a router link, and the CONNACK the router produced.
pub type Link = (LinkTx, LinkRx, Notification);

impl RouterHandle {
    /// Starts the router on its own thread.
    pub fn spawn(max_connections: usize) -> Self {
        let config = RouterConfig {
            max_connections,
            // Unacknowledged QoS 1 messages in flight to one subscriber.
            max_outgoing_packet_count: 1000,
            // Each filter's log: 10 segments of 100 MiB before the oldest is dropped.
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        };
        let router_tx = Router::new(0, config).spawn();
        Self {
            make_link: Arc::new(move |client_id| LinkBuilder::new(client_id, router_tx.clone())),
        }
    }

    /// Connects `client_id` to the router. Blocks on the router's answer: call it from a
    /// blocking thread.
    pub fn connect(&self, client_id: &str, clean_session: bool) -> Result<Link, LinkRefused> {
        (self.make_link)(client_id)
            .clean_session(clean_session)
            .dynamic_filters(true)
            .build()
            .map_err(|e: LinkError| LinkRefused(e.to_string()))
    }
}
