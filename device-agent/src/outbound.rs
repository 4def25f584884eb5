//! What a message from the device's application must be to be queued and sent: a topic below
//! `devices/<id>/` without wildcards, in a QoS 1 PUBLISH no larger than `max_packet_bytes`.
//!
//! rumqttc measures every packet before writing it and ends the connection on one larger than its
//! outgoing limit; a queued message it refused would end every later connection the same way. So
//! the size is measured here exactly as rumqttc measures it, when a message is accepted (it is
//! never queued if it does not fit) and again before a queued one is sent (the limit may have been
//! lowered since, or an older agent queued it).

/// MQTT gives a topic a 16-bit length: rumqttc would write a longer topic's length truncated.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a message cannot be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The suffix is empty, starts with `/`, or holds a wildcard or NUL.
    #[error("topic suffix {0:?} is not a topic below devices/<id>/ without wildcards (expected \"<topic-suffix> <payload>\")")]
    BadSuffix(String),
    /// The whole topic is longer than MQTT can frame.
    #[error("its topic is {0} bytes long, more than MQTT's {MAX_TOPIC_BYTES}")]
    TopicTooLong(usize),
    /// The PUBLISH would be larger than `max_packet_bytes`.
    #[error("its PUBLISH would be {size} bytes, larger than max_packet_bytes ({limit})")]
    TooLarge {
        /// The whole PUBLISH: fixed header, topic, packet id and payload.
        size: usize,
        /// `max_packet_bytes`.
        limit: usize,
    },
}

/// The rules for one device: its topic namespace and its packet limit.
#[derive(Clone, Debug)]
pub struct MessageRules {
    /// `devices/<id>/`: every suffix is appended to it.
    topic_prefix: String,
    /// `max_packet_bytes`: the largest PUBLISH, fixed header included.
    max_packet_bytes: usize,
}

impl MessageRules {
    /// The rules for device `device_id` with the configured `max_packet_bytes`.
    pub fn new(device_id: &str, max_packet_bytes: usize) -> Self {
        Self {
            topic_prefix: format!("devices/{device_id}/"),
            max_packet_bytes,
        }
    }

    /// The full topic of `suffix`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.topic_prefix)
    }

    /// Whether `suffix` and `payload` make a QoS 1 PUBLISH that rumqttc and the broker accept.
    pub fn check(&self, suffix: &str, payload: &[u8]) -> Result<(), Refusal> {
        if !valid_suffix(suffix) {
            return Err(Refusal::BadSuffix(suffix.to_owned()));
        }
        let topic_bytes = self.topic_prefix.len() + suffix.len();
        if topic_bytes > MAX_TOPIC_BYTES {
            return Err(Refusal::TopicTooLong(topic_bytes));
        }
        let size = qos1_publish_bytes(topic_bytes, payload.len());
        if size > self.max_packet_bytes {
            return Err(Refusal::TooLarge {
                size,
                limit: self.max_packet_bytes,
            });
        }
        Ok(())
    }
}

/// Whether `suffix` is a topic below `devices/<id>/`: not empty, no leading `/`, no wildcard,
/// no NUL.
fn valid_suffix(suffix: &str) -> bool {
    !suffix.is_empty() && !suffix.starts_with('/') && !suffix.contains(['+', '#', '\0'])
}

/// A QoS 1 PUBLISH's size on the wire, as rumqttc's `Publish::size` counts it against its
/// outgoing limit: the type byte, 1 to 4 bytes of remaining length, the topic with its 2-byte
/// length, the 2-byte packet id, and the payload. (The broker counts only the remaining length,
/// so what fits here fits there.)
pub fn qos1_publish_bytes(topic_bytes: usize, payload_bytes: usize) -> usize {
    let remaining = 2 + topic_bytes + 2 + payload_bytes;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_exactly_what_rumqttc_counts_against_its_limit() {
        let topic = "devices/dev-1/t";
        // On each side of each boundary of the remaining length's encoding.
        let boundaries = [128, 16_384, 2_097_152].map(|remaining| remaining - (2 + topic.len() + 2));
        for payload_bytes in boundaries.into_iter().flat_map(|b| [b - 1, b]).chain([0, 1]) {
            let mut publish = rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, vec![0; payload_bytes]);
            publish.pkid = 1;
            assert_eq!(
                qos1_publish_bytes(publish.topic.len(), payload_bytes),
                publish.size(),
                "payload of {payload_bytes} bytes"
            );
        }
    }

    #[test]
    fn a_message_that_fits_exactly_is_accepted_and_one_byte_more_refused() {
        let rules = MessageRules::new("dev-1", 1024);
        // Type byte, 2 bytes of remaining length, topic length, 23-byte topic, packet id.
        let fits = 1024 - (1 + 2 + 2 + "devices/dev-1/telemetry".len() + 2);
        assert_eq!(rules.check("telemetry", &vec![b'x'; fits]), Ok(()));
        assert_eq!(
            rules.check("telemetry", &vec![b'x'; fits + 1]),
            Err(Refusal::TooLarge {
                size: 1025,
                limit: 1024
            })
        );
    }

    #[test]
    fn bad_suffixes_and_topics_mqtt_cannot_frame_are_refused() {
        let rules = MessageRules::new("dev-1", 1 << 20);
        for bad in ["", "/abs", "a/+", "a/#", "a\0b"] {
            assert_eq!(rules.check(bad, b""), Err(Refusal::BadSuffix(bad.into())), "{bad:?}");
        }
        let long = "t".repeat(MAX_TOPIC_BYTES);
        assert_eq!(
            rules.check(&long, b""),
            Err(Refusal::TopicTooLong(MAX_TOPIC_BYTES + "devices/dev-1/".len()))
        );
        assert_eq!(rules.topic("a/b"), "devices/dev-1/a/b");
    }
}
