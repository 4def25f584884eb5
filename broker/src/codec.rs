//! MQTT 3.1.1 packets over rumqttd's codec (`rumqttd::protocol::v4`), with the guards that keep
//! hostile bytes from reaching code paths in it that panic.
//!
//! rumqttd keeps a PUBLISH's QoS, packet id and DUP flag private, and can only build a QoS 1/2
//! PUBLISH by serialising and re-parsing it (a copy of the payload per message). So those three
//! fields are read from the frame's own header bytes on the way in, and PUBLISH is the one
//! packet this module encodes itself on the way out. Everything else is rumqttd's.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, LastWill, Packet, Protocol, Subscribe, Unsubscribe,
};

use crate::router::QoS;

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

/// A PUBLISH from a client. Topic and payload are slices of the read buffer.
#[derive(Debug)]
pub struct InboundPublish {
    /// Topic name bytes (not yet checked to be UTF-8).
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Whether the client says this is a resend.
    pub dup: bool,
    /// The retain flag.
    pub retain: bool,
}

impl InboundPublish {
    /// rumqttd's PUBLISH with the header fields it keeps private.
    fn new(publish: protocol::Publish, (qos, pkid, dup): PublishHeader) -> Self {
        Self {
            topic: publish.topic,
            payload: publish.payload,
            qos,
            pkid,
            dup,
            retain: publish.retain,
        }
    }
}

/// A decoded packet from a client, small enough to hold in a session's state.
#[derive(Debug)]
pub enum Inbound {
    /// CONNECT and its will.
    Connect(Box<(Connect, Option<LastWill>)>),
    /// PUBLISH, with the fields rumqttd does not expose.
    Publish(InboundPublish),
    /// PUBACK for a packet id.
    PubAck(u16),
    /// PUBREC for a packet id.
    PubRec(u16),
    /// PUBREL for a packet id.
    PubRel(u16),
    /// PUBCOMP for a packet id.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
    /// A packet only a server sends (CONNACK, SUBACK, ...), by name.
    ServerOnly(&'static str),
}

impl Inbound {
    /// The packet's name as the MQTT specification writes it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Inbound::Connect(_) => "CONNECT",
            Inbound::Publish(_) => "PUBLISH",
            Inbound::PubAck(_) => "PUBACK",
            Inbound::PubRec(_) => "PUBREC",
            Inbound::PubRel(_) => "PUBREL",
            Inbound::PubComp(_) => "PUBCOMP",
            Inbound::Subscribe(_) => "SUBSCRIBE",
            Inbound::Unsubscribe(_) => "UNSUBSCRIBE",
            Inbound::PingReq => "PINGREQ",
            Inbound::Disconnect => "DISCONNECT",
            Inbound::ServerOnly(name) => name,
        }
    }
}

/// Takes the next complete packet out of `buf`, or `None` if more bytes are needed.
pub fn decode(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Option<Inbound>, FrameError> {
    let Some((packet, publish_header)) = read_frame(buf, max_packet_bytes)? else {
        return Ok(None);
    };
    Ok(Some(match (packet, publish_header) {
        (Packet::Publish(publish, _), Some(header)) => Inbound::Publish(InboundPublish::new(publish, header)),
        (Packet::Connect(connect, _, will, _, _), _) => Inbound::Connect(Box::new((connect, will))),
        (Packet::PubAck(ack, _), _) => Inbound::PubAck(ack.pkid),
        (Packet::PubRec(rec, _), _) => Inbound::PubRec(rec.pkid),
        (Packet::PubRel(rel, _), _) => Inbound::PubRel(rel.pkid),
        (Packet::PubComp(comp, _), _) => Inbound::PubComp(comp.pkid),
        (Packet::Subscribe(subscribe, _), _) => Inbound::Subscribe(subscribe),
        (Packet::Unsubscribe(unsubscribe, _), _) => Inbound::Unsubscribe(unsubscribe),
        (Packet::PingReq(_), _) => Inbound::PingReq,
        (Packet::Disconnect(..), _) => Inbound::Disconnect,
        (other, _) => Inbound::ServerOnly(packet_name(&other)),
    }))
}

/// QoS, packet id and DUP of the complete PUBLISH frame at the start of `buf`.
/// A PUBLISH's QoS, packet id and DUP flag, read from its header.
type PublishHeader = (QoS, u16, bool);

/// Takes the next complete packet out of `buf`, with a PUBLISH's header fields; `None` if more
/// bytes are needed.
fn read_frame(
    buf: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<(Packet, Option<PublishHeader>)>, FrameError> {
    let header = match v4::check(buf.iter(), max_packet_bytes) {
        Ok(header) => header,
        Err(protocol::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(frame_error(e)),
    };
    // Types 0 and 15 (AUTH) are not MQTT 3.1.1; rumqttd's decoder would hit `unreachable!` on 15.
    let kind = header.byte1 >> 4;
    if kind == 0 || kind == 15 {
        return Err(FrameError::Malformed(format!("reserved packet type {kind}")));
    }
    let publish_header = (kind == 3).then(|| publish_header(buf, &header)).transpose()?;
    let packet = V4.read_mut(buf, max_packet_bytes).map_err(frame_error)?;
    Ok(Some((packet, publish_header)))
}

/// A packet from a server, as the bridge's uplink client reads it.
#[derive(Debug)]
pub enum FromServer {
    /// CONNACK: the session present flag, and the return code.
    ConnAck(bool, ConnectReturnCode),
    /// PUBLISH, with the fields rumqttd does not expose.
    Publish(InboundPublish),
    /// PUBACK for a packet id.
    PubAck(u16),
    /// SUBACK: the packet id, and per filter whether it was granted.
    SubAck(u16, Vec<bool>),
    /// PINGRESP.
    PingResp,
    /// Anything a server may not send a 3.1.1 client that subscribes at QoS 1 at most.
    Unexpected(&'static str),
}

/// Takes the next complete packet a server sent out of `buf`, or `None` if more bytes are needed.
pub fn decode_from_server(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Option<FromServer>, FrameError> {
    let Some((packet, publish_header)) = read_frame(buf, max_packet_bytes)? else {
        return Ok(None);
    };
    Ok(Some(match (packet, publish_header) {
        (Packet::ConnAck(ack, _), _) => FromServer::ConnAck(ack.session_present, ack.code),
        (Packet::Publish(publish, _), Some(header)) => FromServer::Publish(InboundPublish::new(publish, header)),
        (Packet::PubAck(ack, _), _) => FromServer::PubAck(ack.pkid),
        (Packet::SubAck(ack, _), _) => FromServer::SubAck(
            ack.pkid,
            ack.return_codes
                .iter()
                .map(|code| matches!(code, protocol::SubscribeReasonCode::Success(_)))
                .collect(),
        ),
        (Packet::PingResp(_), _) => FromServer::PingResp,
        (other, _) => FromServer::Unexpected(packet_name(&other)),
    }))
}

/// Encodes a packet a client sends (CONNECT, SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT) with
/// rumqttd's codec; PUBLISH goes through [`encode_publish`].
pub fn encode_from_client(packet: Packet, buf: &mut BytesMut) -> Result<(), FrameError> {
    V4.write(packet, buf)
        .map(|_| ())
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

fn publish_header(buf: &[u8], header: &v4::FixedHeader) -> Result<PublishHeader, FrameError> {
    let flags = header.byte1;
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or_else(|| FrameError::Malformed("PUBLISH with QoS 3".into()))?;
    let dup = flags & 0b1000 != 0;
    if qos == QoS::AtMostOnce {
        return Ok((qos, 0, dup));
    }
    let frame = &buf[..header.frame_length()];
    let at = header.fixed_header_len;
    let topic_len = frame
        .get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or_else(|| FrameError::Malformed("PUBLISH too short for its topic".into()))?;
    let pkid = frame
        .get(at + 2 + topic_len..at + 4 + topic_len)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| FrameError::Malformed("PUBLISH too short for its packet id".into()))?;
    Ok((qos, pkid, dup))
}

fn frame_error(e: protocol::Error) -> FrameError {
    match e {
        protocol::Error::PayloadSizeLimitExceeded(n) => FrameError::TooLarge(n),
        protocol::Error::InvalidProtocolLevel(level) => FrameError::UnsupportedProtocolLevel(level),
        e => FrameError::Malformed(e.to_string()),
    }
}

/// Appends `packet` (any server-to-client packet but PUBLISH) to `buf` as MQTT 3.1.1.
///
/// Properties (MQTT 5 only) are dropped and CONNACK codes outside 3.1.1 are mapped to "server
/// unavailable", because rumqttd's v4 encoder panics on both.
pub fn encode(packet: Packet, buf: &mut BytesMut) -> Result<(), FrameError> {
    let packet = match packet {
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(ack, _) => Packet::ConnAck(v4_connack(ack), None),
        Packet::PingResp(p) => Packet::PingResp(p),
        // Servers send nothing else in 3.1.1 (not even DISCONNECT), and PUBLISH goes through
        // `encode_publish`: drop it.
        _ => return Ok(()),
    };
    V4.write(packet, buf)
        .map(|_| ())
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The fields of an outgoing PUBLISH.
pub struct OutgoingPublish<'a> {
    /// Topic name (at most 65,535 bytes: it arrived in a PUBLISH or a will).
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS on the wire.
    pub qos: QoS,
    /// Packet id (ignored for QoS 0).
    pub pkid: u16,
    /// DUP flag.
    pub dup: bool,
    /// RETAIN flag.
    pub retain: bool,
}

/// Appends a PUBLISH to `buf`; refused only beyond MQTT's largest packet (256 MiB), which
/// `limits.max_packet_bytes` keeps every message below.
pub fn encode_publish(publish: &OutgoingPublish<'_>, buf: &mut BytesMut) -> Result<(), FrameError> {
    let with_pkid = publish.qos != QoS::AtMostOnce;
    let remaining = 2 + publish.topic.len() + if with_pkid { 2 } else { 0 } + publish.payload.len();
    buf.reserve(remaining + 5);
    buf.put_u8(
        0b0011_0000 | (u8::from(publish.dup && with_pkid) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain),
    );
    v4::write_remaining_length(buf, remaining).map_err(|e| FrameError::Malformed(e.to_string()))?;
    buf.put_u16(publish.topic.len() as u16);
    buf.put_slice(publish.topic.as_bytes());
    if with_pkid {
        buf.put_u16(publish.pkid);
    }
    buf.put_slice(publish.payload);
    Ok(())
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

/// A CONNACK with `code`.
pub fn connack(code: ConnectReturnCode, session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck { session_present, code }, None)
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
        encode(connack(ConnectReturnCode::Banned, false), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x20, 0x02, 0x00, 0x03]);
    }

    #[test]
    fn a_publish_round_trips_with_its_qos_packet_id_and_dup() {
        let mut buf = BytesMut::new();
        let payload = vec![7u8; 300];
        for (qos, pkid, dup, retain) in [
            (QoS::AtMostOnce, 0, false, true),
            (QoS::AtLeastOnce, 513, true, false),
            (QoS::ExactlyOnce, 65535, false, true),
        ] {
            let publish = OutgoingPublish {
                topic: "devices/dev-1/telemetry",
                payload: &payload,
                qos,
                pkid,
                dup,
                retain,
            };
            encode_publish(&publish, &mut buf).unwrap();
            let Some(Inbound::Publish(decoded)) = decode(&mut buf, 1024).unwrap() else {
                panic!("a PUBLISH");
            };
            assert_eq!(&decoded.topic[..], b"devices/dev-1/telemetry");
            assert_eq!(&decoded.payload[..], &payload[..]);
            assert_eq!(
                (decoded.qos, decoded.pkid, decoded.dup, decoded.retain),
                (qos, pkid, dup, retain)
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_publish_with_qos_3_or_cut_short_is_malformed() {
        let mut qos3 = BytesMut::from(&[0x36u8, 0x05, 0x00, 0x01, b'a', 0x00, 0x01][..]);
        assert!(matches!(decode(&mut qos3, 1024), Err(FrameError::Malformed(_))));
        // QoS 1, topic length 4 but only 1 byte of topic and no packet id in the frame.
        let mut short = BytesMut::from(&[0x32u8, 0x03, 0x00, 0x04, b'a'][..]);
        assert!(matches!(decode(&mut short, 1024), Err(FrameError::Malformed(_))));
    }
}
