//! rumqttd's router, used as a library: our front terminates TLS and authorises, and hands each
//! authenticated connection to the router through a local link.
//!
//! A link costs about 30 KiB (rumqttd pre-allocates its buffers per link), so sessions open one
//! only when they first need the router; this handle remembers which client ids may have a
//! session stored in the router, since those need their link at CONNECT.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{LastWill, Packet};
use rumqttd::{Notification, Router, RouterConfig};

use crate::codec::will_publish;

/// Builds a link for a client id. rumqttd's router channel type is unnameable outside the crate
/// (its event type is private), so it is captured in this closure.
type MakeLink = dyn for<'a> Fn(&'a str) -> LinkBuilder<'a> + Send + Sync;

/// The router client id of the link that publishes wills.
const WILLS_CLIENT_ID: &str = "front:wills";

/// A handle to the running router.
#[derive(Clone)]
pub struct RouterHandle {
    make_link: Arc<MakeLink>,
    /// Client ids that connected with `clean_session = false` and have not connected clean since.
    stored_sessions: Arc<Mutex<HashSet<String>>>,
    /// The link wills are published through: a session may have no link of its own.
    wills: Arc<tokio::sync::Mutex<LinkTx>>,
}

/// The router did not accept a session (rumqttd's own error is large; its message is kept).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LinkRefused(String);

impl From<LinkError> for LinkRefused {
    fn from(e: LinkError) -> Self {
        LinkRefused(e.to_string())
    }
}

/// A connection's two ends of a router link, and the CONNACK the router produced.
pub type Link = (LinkTx, LinkRx, Notification);

impl RouterHandle {
    /// Starts the router on its own thread, and the link that publishes wills.
    pub fn spawn(max_connections: usize) -> Result<Self, LinkRefused> {
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
        let make_link: Arc<MakeLink> = Arc::new(move |client_id| LinkBuilder::new(client_id, router_tx.clone()));
        let (wills, wills_rx, _) = make_link(WILLS_CLIENT_ID).dynamic_filters(true).build()?;
        std::thread::Builder::new()
            .name("wills-acks".into())
            .spawn(move || drain(wills_rx))
            .map_err(|e| LinkRefused(format!("cannot start the wills link's thread: {e}")))?;
        Ok(Self {
            make_link,
            stored_sessions: Arc::default(),
            wills: Arc::new(tokio::sync::Mutex::new(wills)),
        })
    }

    fn stored_sessions(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.stored_sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a CONNECT must open its link at once: to resume or discard a session the router
    /// may hold. Otherwise the link can wait for the first packet that needs the router.
    pub fn needs_link_at_connect(&self, client_id: &str, clean_session: bool) -> bool {
        !clean_session || self.stored_sessions().contains(client_id)
    }

    /// Connects `client_id` to the router. Blocks on the router's answer: call it from a
    /// blocking thread.
    pub fn connect(&self, client_id: &str, clean_session: bool) -> Result<Link, LinkRefused> {
        let link = (self.make_link)(client_id)
            .clean_session(clean_session)
            .dynamic_filters(true)
            .build()?;
        if clean_session {
            self.stored_sessions().remove(client_id);
        } else {
            self.stored_sessions().insert(client_id.to_owned());
        }
        Ok(link)
    }

    /// Publishes a will, after everything its session already handed to the router (the
    /// router takes events in the order they were sent).
    pub async fn publish_will(&self, will: &LastWill) -> Result<(), LinkRefused> {
        self.wills
            .lock()
            .await
            .send(Packet::Publish(will_publish(will), None))
            .await?;
        Ok(())
    }
}

/// Reads and discards what the router sends the wills link (PUBACKs), so its buffers never fill.
fn drain(mut rx: LinkRx) {
    loop {
        match rx.recv() {
            Ok(Some(notification)) => {
                // No packet means the router paused the link and waits for it to be ready.
                if Option::<Packet>::from(notification).is_none() && rx.ready().is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}
