//! Counters for the Prometheus endpoint, and the endpoint itself (a minimal HTTP responder: it
//! answers any GET with the text exposition format of whatever it is given to render).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::reason::RejectReason;

/// The broker's counters. All relaxed atomics: they are statistics, not synchronisation.
#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    devices: AtomicI64,
    services: AtomicI64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    acl_denials: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    queued_messages: AtomicI64,
    queued_bytes: AtomicI64,
    publisher_waits: AtomicU64,
    slow_subscribers: AtomicU64,
}

/// Why a delivery was not made. Each is counted in `broker_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// An offline persistent session's queue was over its bounds: its oldest delivery went.
    QueueOverflow,
    /// A QoS 0 message met a full queue of an online subscriber.
    Qos0SubscriberFull,
    /// A QoS 0 message for an offline persistent session (never queued, as MQTT allows).
    OfflineQos0,
    /// What a clean session held when it ended, or a message for a session that was ending.
    SessionEnded,
    /// A retained message that the retained store's bounds did not let it keep (the message
    /// itself was still delivered).
    RetainRefused,
    /// An MQTT 5 message whose Message Expiry Interval ran out before it could be sent.
    Expired,
    /// A message larger than the Maximum Packet Size its MQTT 5 subscriber gave (MQTT-3.1.2-25).
    TooLargeForClient,
    /// The bridge's outbox was over `bridge.outbox_max_messages`/`outbox_max_bytes`: its
    /// oldest message, not yet forwarded upstream, went.
    OutboxOverflow,
    /// A message from the upstream the bridge does not deliver: its topic maps to no device, or
    /// to a topic that device may not subscribe to.
    DownstreamRefused,
    /// A message the bridge cannot forward: with the bridge's prefix its topic is longer than
    /// MQTT's 65535 bytes.
    UpstreamTopicTooLong,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 10] = [
        DropReason::QueueOverflow,
        DropReason::Qos0SubscriberFull,
        DropReason::OfflineQos0,
        DropReason::SessionEnded,
        DropReason::RetainRefused,
        DropReason::Expired,
        DropReason::TooLargeForClient,
        DropReason::OutboxOverflow,
        DropReason::DownstreamRefused,
        DropReason::UpstreamTopicTooLong,
    ];

    /// The stable word (metric label and audit event).
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueOverflow => "queue_overflow",
            DropReason::Qos0SubscriberFull => "qos0_dropped",
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::SessionEnded => "session_ended",
            DropReason::RetainRefused => "retain_refused",
            DropReason::Expired => "message_expired",
            DropReason::TooLargeForClient => "too_large_for_client",
            DropReason::OutboxOverflow => "outbox_overflow",
            DropReason::DownstreamRefused => "downstream_refused",
            DropReason::UpstreamTopicTooLong => "upstream_topic_too_long",
        }
    }
}

impl Metrics {
    pub(crate) fn handshake_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake_rejected(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn acl_denied(&self) {
        self.acl_denials.fetch_add(1, Ordering::Relaxed);
    }

    fn sessions(&self, role: Role) -> &AtomicI64 {
        match role {
            Role::Device => &self.devices,
            // Gateways are refused at the handshake; a session of one would count as a service.
            Role::Service | Role::Gateway => &self.services,
        }
    }

    /// A session of `role` opened.
    pub fn session_opened(&self, role: Role) {
        self.sessions(role).fetch_add(1, Ordering::Relaxed);
    }

    /// A session of `role` closed.
    pub fn session_closed(&self, role: Role) {
        self.sessions(role).fetch_sub(1, Ordering::Relaxed);
    }

    /// `n` PUBLISH packets accepted from clients.
    pub fn messages_in(&self, n: u64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` PUBLISH packets delivered to clients.
    pub fn messages_out(&self, n: u64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` deliveries not made, for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Deliveries not made for `reason` so far.
    pub fn dropped_so_far(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Session queues grew (or shrank) by `messages` and `bytes`.
    pub fn queued(&self, messages: i64, bytes: i64) {
        self.queued_messages.fetch_add(messages, Ordering::Relaxed);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Deliveries waiting in session queues now.
    pub fn queued_messages(&self) -> i64 {
        self.queued_messages.load(Ordering::Relaxed)
    }

    /// A publication waited for a full subscriber.
    pub fn publisher_waited(&self) {
        self.publisher_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// A subscriber was disconnected as slow.
    pub fn slow_subscriber(&self) {
        self.slow_subscribers.fetch_add(1, Ordering::Relaxed);
    }

    /// Open sessions of `role`.
    pub fn open_sessions(&self, role: Role) -> i64 {
        self.sessions(role).load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of these counters.
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP broker_handshakes_total Connections by outcome and reject reason.\n# TYPE broker_handshakes_total counter\n");
        let _ = writeln!(
            out,
            "broker_handshakes_total{{outcome=\"accepted\",reason=\"\"}} {}",
            load(&self.accepted)
        );
        for reason in RejectReason::ALL {
            let _ = writeln!(
                out,
                "broker_handshakes_total{{outcome=\"rejected\",reason=\"{}\"}} {}",
                reason.as_str(),
                load(&self.rejected[reason.index()])
            );
        }
        out.push_str("# HELP broker_sessions Connected sessions by role.\n# TYPE broker_sessions gauge\n");
        for role in [Role::Device, Role::Service] {
            let _ = writeln!(out, "broker_sessions{{role=\"{role}\"}} {}", self.open_sessions(role));
        }
        let _ = writeln!(
            out,
            "# TYPE broker_messages_in_total counter\nbroker_messages_in_total {}",
            load(&self.messages_in)
        );
        let _ = writeln!(
            out,
            "# TYPE broker_messages_out_total counter\nbroker_messages_out_total {}",
            load(&self.messages_out)
        );
        let _ = writeln!(
            out,
            "# TYPE broker_acl_denials_total counter\nbroker_acl_denials_total {}",
            load(&self.acl_denials)
        );
        out.push_str("# HELP broker_messages_dropped_total Deliveries not made, by reason (every drop is counted here).\n# TYPE broker_messages_dropped_total counter\n");
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "broker_messages_dropped_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                load(&self.dropped[reason as usize])
            );
        }
        let _ = writeln!(
            out,
            "# HELP broker_queued_messages Deliveries waiting in session queues.\n# TYPE broker_queued_messages gauge\nbroker_queued_messages {}\n# TYPE broker_queued_bytes gauge\nbroker_queued_bytes {}",
            self.queued_messages.load(Ordering::Relaxed),
            self.queued_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP broker_publisher_waits_total Publications that waited for a full subscriber queue (flow control).\n# TYPE broker_publisher_waits_total counter\nbroker_publisher_waits_total {}",
            load(&self.publisher_waits)
        );
        let _ = writeln!(
            out,
            "# HELP broker_slow_subscriber_disconnects_total Subscribers disconnected because their queue stayed full with nothing taken from it.\n# TYPE broker_slow_subscriber_disconnects_total counter\nbroker_slow_subscriber_disconnects_total {}",
            load(&self.slow_subscribers)
        );
    }
}

/// Serves `render()` on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                // Read the request head (bounded in size and time), then answer with the metrics.
                let mut head = vec![0u8; 4096];
                let mut len = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut head[len..]).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => len += n,
                        }
                    }
                    true
                })
                .await;
                if read != Ok(true) {
                    return;
                }
                let body = render();
                let response = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}
