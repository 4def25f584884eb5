//! MQTT 3.1.1 framing over rumqttd's codec, with the guards that keep hostile bytes from
//! reaching code paths in it that panic.

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::{self, v4::V4, ConnAck, ConnectReturnCode, LastWill, Packet, Protocol, Publish};

/// Why bytes from a client could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The packet is larger than `limits.max_packet_bytes`.
    #[error("packet of {0} bytes exceeds limits.max_packet_bytes")]
    TooLarge(usize),
    /// A CONNECT for a protocol level other than 4 (MQTT 3.1.1), e.g. 5.
    #[error("MQTT protocol level {0} is not supported (only 3.1.1, level 4)")]
    UnsupportedProtocolLevel(u8),
    /// Anything else malformed.
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Takes the next complete packet out of `buf`, or `None` if more bytes are needed.
pub fn decode(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Option<Packet>, FrameError> {
    let Some(first) = buf.first() else { return Ok(None) };
    // Types 0 and 15 (AUTH) are not MQTT 3.1.1; rumqttd's decoder would hit `unreachable!` on 15.
    let kind = first >> 4;
    if kind == 0 || kind == 15 {
        return Err(FrameError::Malformed(format!("reserved packet type {kind}")));
    }
    match V4.read_mut(buf, max_packet_bytes) {
        Ok(packet) => Ok(Some(packet)),
        Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(protocol::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n)),
        Err(protocol::Error::InvalidProtocolLevel(level)) => Err(FrameError::UnsupportedProtocolLevel(level)),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Appends `packet` to `buf` as MQTT 3.1.1.
///
/// Properties (MQTT 5 only) are dropped and CONNACK codes outside 3.1.1 are mapped to "server
/// unavailable", because rumqttd's v4 encoder panics on both.
pub fn encode(packet: Packet, buf: &mut BytesMut) -> Result<(), FrameError> {
    let packet = match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(ack, _) => Packet::ConnAck(v4_connack(ack), None),
        Packet::PingResp(p) => Packet::PingResp(p),
        // Servers send nothing else in 3.1.1 (not even DISCONNECT): drop it.
        _ => return Ok(()),
    };
    V4.write(packet, buf)
        .map(|_| ())
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

fn v4_connack(ack: ConnAck) -> ConnAck {
    let code = match ack.code {
        code @ (ConnectReturnCode::Success
        | ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::ClientIdentifierNotValid
        | ConnectReturnCode::ServiceUnavailable
        | ConnectReturnCode::BadUserNamePassword
        | ConnectReturnCode::NotAuthorized) => code,
        _ => ConnectReturnCode::ServiceUnavailable,
    };
    ConnAck {
        session_present: ack.session_present,
        code,
    }
}

/// A CONNACK with `code` and no session present: a refusal, or the front accepting a clean
/// session itself.
pub fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// A PUBLISH carrying the will at its QoS. rumqttd keeps a publish's QoS private, so it is built
/// through the crate's own serialisation format.
pub fn will_publish(will: &LastWill) -> Publish {
    let qos = will.qos as u8;
    let mut raw = BytesMut::with_capacity(5 + will.topic.len() + will.message.len());
    raw.put_u8(0b0011_0000 | u8::from(will.retain) | (qos << 1));
    raw.put_u16(u16::from(qos > 0));
    raw.put_u16(will.topic.len() as u16);
    raw.extend_from_slice(&will.topic);
    raw.extend_from_slice(&will.message);
    Publish::deserialize(raw.freeze())
}

/// The packet's name as the MQTT specification writes it, for logs.
pub fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

/// QoS and packet id of a client's PUBLISH (private fields in rumqttd, read from its encoding).
pub fn qos_and_pkid(publish: &Publish) -> (u8, u16) {
    let raw = publish.serialize();
    ((raw[0] >> 1) & 0b11, u16::from_be_bytes([raw[1], raw[2]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_packet_types_are_refused_without_reaching_the_decoder() {
        for first in [0x00u8, 0xF0] {
            let mut buf = BytesMut::from(&[first, 0x02, 0x00, 0x00][..]);
            assert!(matches!(decode(&mut buf, 1024), Err(FrameError::Malformed(_))));
        }
    }

    #[test]
    fn truncated_packets_wait_for_more_bytes() {
        let mut buf = BytesMut::from(&[0x30u8, 0x10, 0x00][..]);
        assert!(matches!(decode(&mut buf, 1024), Ok(None)));
        assert_eq!(buf.len(), 3, "nothing consumed");
    }

    #[test]
    fn oversized_packets_are_refused_before_they_are_buffered() {
        // PUBLISH announcing 2 MiB of remaining length.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(decode(&mut buf, 1024), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn an_mqtt5_connect_is_recognised() {
        // CONNECT, protocol name "MQTT", level 5, flags, keepalive, properties length 0, client id "a".
        let body = [
            0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x01, b'a',
        ];
        let mut buf = BytesMut::from(&[0x10, body.len() as u8][..]);
        buf.extend_from_slice(&body);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(FrameError::UnsupportedProtocolLevel(5))
        ));
    }

    #[test]
    fn mqtt5_only_connack_codes_are_not_sent_to_a_311_client() {
        let mut buf = BytesMut::new();
        encode(connack(ConnectReturnCode::Banned), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x20, 0x02, 0x00, 0x03]);
    }
}
