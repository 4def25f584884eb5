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
}

impl Message {
    /// A message copied out of a packet's fields.
    pub fn new(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
        })
    }

    /// Bytes counted against queue and retained-store bounds: topic plus payload.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
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
}
