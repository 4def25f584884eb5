//! What the router carries: application messages, shared by every queue they wait in, and the
//! per-subscriber deliveries that point at them.

use std::sync::Arc;

use bytes::Bytes;

/// MQTT quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once: no acknowledgement, may be dropped.
    AtMostOnce = 0,
    /// At least once: PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: PUBREC, PUBREL, PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS of a wire value, if valid.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// An application message. Immutable once routed: a fan-out shares one copy.
///
/// Topic and payload are owned copies, never slices of a connection's read buffer, so what a
/// queue holds is exactly what it counts (see [`Message::size`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic name (validated by the caller).
    pub topic: Box<str>,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// Whether it was published with the retain flag.
    pub retain: bool,
    /// The MQTT 5 properties it carries to MQTT 5 subscribers (Payload Format Indicator,
    /// Content Type, Response Topic, Correlation Data, User Properties), encoded as they
    /// arrived; empty from MQTT 3.1.1 publishers. MQTT 3.1.1 subscribers get none of them.
    pub properties: Bytes,
    /// When it expires, in milliseconds since the Unix epoch (MQTT 5 Message Expiry Interval):
    /// from then on it is never delivered. Wall-clock time, so that it survives a restart;
    /// milliseconds, so that an interval of 1 s is never cut short by rounding.
    pub expires_at: Option<u64>,
}

impl Message {
    /// A message copied out of a packet's fields, without MQTT 5 properties.
    pub fn new(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Arc<Self> {
        Self::carrying(topic, payload, qos, retain, &[], None)
    }

    /// A message with MQTT 5 properties (`properties` encoded, `expiry` the Message Expiry
    /// Interval in seconds, counted from now).
    pub fn carrying(
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
        properties: &[u8],
        expiry: Option<u32>,
    ) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
            properties: Bytes::copy_from_slice(properties),
            expires_at: expiry.map(|secs| unix_millis() + u64::from(secs) * 1000),
        })
    }

    /// Bytes counted against queue and retained-store bounds: topic, payload and properties.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.properties.len()
    }

    /// Whether it has expired by `now` (milliseconds since the Unix epoch).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// What is left of its expiry interval at `now` (milliseconds since the Unix epoch), in
    /// whole seconds rounded up, for the PUBLISH that carries it (MQTT-3.3.2-6); `None` if it
    /// never expires.
    pub fn expiry_left(&self, now: u64) -> Option<u32> {
        self.expires_at
            .map(|at| u32::try_from(at.saturating_sub(now).div_ceil(1000)).unwrap_or(u32::MAX))
    }
}

/// Milliseconds since the Unix epoch (0 if the clock says before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a subscription asked for beyond its filter (MQTT 5 section 3.8.3.1; a 3.1.1
/// subscription has only its QoS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// The highest QoS it takes.
    pub qos: QoS,
    /// Never send the subscriber what it published itself.
    pub no_local: bool,
    /// Keep the RETAIN flag messages were published with.
    pub retain_as_published: bool,
    /// The Subscription Identifier its messages carry.
    pub identifier: Option<u32>,
}

impl SubscriptionOptions {
    /// A subscription with nothing but a QoS (MQTT 3.1.1's).
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            identifier: None,
        }
    }
}

/// One message on its way to one subscriber.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message.
    pub message: Arc<Message>,
    /// The lower of the published QoS and the QoS the subscription granted.
    pub qos: QoS,
    /// The RETAIN flag on the wire: set only for retained messages sent because of a new
    /// subscription (MQTT-3.3.1-8, -9).
    pub retain: bool,
    /// Its id in the durable store, when a persistent session's queue holds it on disk.
    pub stored: Option<u64>,
    /// The MQTT 5 Subscription Identifiers of the subscriptions it matched (MQTT-3.3.4-3).
    pub subscription_ids: Box<[u32]>,
}
