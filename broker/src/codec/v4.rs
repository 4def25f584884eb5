//! MQTT 3.1.1 packets over rumqttd's codec (`rumqttd::protocol::v4`), with the guards that keep
//! hostile bytes from reaching code paths in it that panic.
//!
//! rumqttd keeps a PUBLISH's QoS, packet id and DUP flag private, and can only build a QoS 1/2
//! PUBLISH by serialising and re-parsing it (a copy of the payload per message). So those three
//! fields are read from the frame's own header bytes on the way in, and PUBLISH is the one
//! packet this module encodes itself on the way out. Everything else is rumqttd's.
//!
//! The bridge's uplink is a 3.1.1 client of an upstream broker: the packets a server sends are
//! read here too ([`decode_from_server`]), and those a client sends written
//! ([`encode_from_client`]).

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, SubAck, SubscribeReasonCode, UnsubAck,
};

use super::{
    Connect, Disconnect, FilterRequest, FrameError, Inbound, InboundPublish, Outbound, OutgoingPublish,
    PublishProperties, ReasonCode, RetainHandling, Subscribe, Unsubscribe, Version, Will,
};
use crate::message::QoS;

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

/// rumqttd's PUBLISH with the header fields it keeps private (3.1.1 has no properties).
fn inbound_publish(publish: protocol::Publish, (qos, pkid, dup): PublishHeader) -> InboundPublish {
    InboundPublish {
        topic: publish.topic,
        payload: publish.payload,
        qos,
        pkid,
        dup,
        retain: publish.retain,
        topic_alias: None,
        properties: PublishProperties::default(),
    }
}

/// Takes the next complete packet out of `buf`, or `None` if more bytes are needed.
pub(super) fn decode(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Option<Inbound>, FrameError> {
    let Some((packet, publish_header)) = read_frame(buf, max_packet_bytes)? else {
        return Ok(None);
    };
    Ok(Some(match (packet, publish_header) {
        (Packet::Publish(publish, _), Some(header)) => Inbound::Publish(inbound_publish(publish, header)),
        (Packet::Connect(connect, _, will, _, _), _) => Inbound::Connect(Box::new(Connect {
            version: Version::V311,
            session_expiry: if connect.clean_session { 0 } else { u32::MAX },
            client_id: connect.client_id,
            clean_start: connect.clean_session,
            keep_alive: connect.keep_alive,
            will: will.map(|will| Will {
                topic: will.topic,
                payload: will.message,
                qos: QoS::from_u8(will.qos as u8).unwrap_or(QoS::AtMostOnce),
                retain: will.retain,
                delay: 0,
                properties: PublishProperties::default(),
            }),
            receive_maximum: u16::MAX,
            maximum_packet_size: None,
            topic_alias_maximum: 0,
            authentication_method: None,
        })),
        (Packet::PubAck(ack, _), _) => Inbound::PubAck(ack.pkid),
        (Packet::PubRec(rec, _), _) => Inbound::PubRec {
            pkid: rec.pkid,
            refused: false,
        },
        (Packet::PubRel(rel, _), _) => Inbound::PubRel(rel.pkid),
        (Packet::PubComp(comp, _), _) => Inbound::PubComp(comp.pkid),
        (Packet::Subscribe(subscribe, _), _) => Inbound::Subscribe(Subscribe {
            pkid: subscribe.pkid,
            identifier: None,
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| FilterRequest {
                    filter: f.path,
                    qos: QoS::from_u8(f.qos as u8).unwrap_or(QoS::AtMostOnce),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::OnSubscribe,
                })
                .collect(),
        }),
        (Packet::Unsubscribe(unsubscribe, _), _) => Inbound::Unsubscribe(Unsubscribe {
            pkid: unsubscribe.pkid,
            filters: unsubscribe.filters,
        }),
        (Packet::PingReq(_), _) => Inbound::PingReq,
        (Packet::Disconnect(..), _) => Inbound::Disconnect(Disconnect::default()),
        (other, _) => Inbound::ServerOnly(packet_name(&other)),
    }))
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
        (Packet::Publish(publish, _), Some(header)) => FromServer::Publish(inbound_publish(publish, header)),
        (Packet::PubAck(ack, _), _) => FromServer::PubAck(ack.pkid),
        (Packet::SubAck(ack, _), _) => FromServer::SubAck(
            ack.pkid,
            ack.return_codes
                .iter()
                .map(|code| matches!(code, SubscribeReasonCode::Success(_)))
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

/// QoS, packet id and DUP of the complete PUBLISH frame at the start of `buf`.
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

/// Appends `packet` as MQTT 3.1.1: reason codes become 3.1.1's return codes where it has them
/// (SUBACK failure, CONNACK's six) and are left out where it has none; DISCONNECT is not sent
/// (a 3.1.1 server just closes).
pub(super) fn encode(packet: &Outbound<'_>, buf: &mut BytesMut) -> Result<(), FrameError> {
    let packet = match *packet {
        Outbound::ConnAck {
            session_present, code, ..
        } => Packet::ConnAck(
            ConnAck {
                session_present,
                code: connack_code(code),
            },
            None,
        ),
        Outbound::PubAck { pkid, .. } => Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        ),
        Outbound::PubRec { pkid, .. } => Packet::PubRec(
            PubRec {
                pkid,
                reason: PubRecReason::Success,
            },
            None,
        ),
        Outbound::PubRel(pkid) => Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success,
            },
            None,
        ),
        Outbound::PubComp(pkid) => Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success,
            },
            None,
        ),
        Outbound::SubAck { pkid, codes } => Packet::SubAck(
            SubAck {
                pkid,
                return_codes: codes
                    .iter()
                    .map(|code| match code {
                        ReasonCode::Success => SubscribeReasonCode::Success(protocol::QoS::AtMostOnce),
                        ReasonCode::GrantedQos1 => SubscribeReasonCode::Success(protocol::QoS::AtLeastOnce),
                        ReasonCode::GrantedQos2 => SubscribeReasonCode::Success(protocol::QoS::ExactlyOnce),
                        _ => SubscribeReasonCode::Failure,
                    })
                    .collect(),
            },
            None,
        ),
        Outbound::UnsubAck { pkid, .. } => Packet::UnsubAck(
            UnsubAck {
                pkid,
                reasons: Vec::new(),
            },
            None,
        ),
        Outbound::PingResp => Packet::PingResp(PingResp),
        Outbound::Disconnect { .. } => return Ok(()),
    };
    V4.write(packet, buf)
        .map(|_| ())
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The 3.1.1 CONNACK return code nearest to `code` (3.1.1 has six).
fn connack_code(code: ReasonCode) -> ConnectReturnCode {
    match code {
        ReasonCode::Success => ConnectReturnCode::Success,
        ReasonCode::UnsupportedProtocolVersion => ConnectReturnCode::RefusedProtocolVersion,
        ReasonCode::ClientIdentifierNotValid => ConnectReturnCode::ClientIdentifierNotValid,
        ReasonCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
        _ => ConnectReturnCode::ServiceUnavailable,
    }
}

fn publish_remaining(publish: &OutgoingPublish<'_>) -> usize {
    let with_pkid = publish.qos != QoS::AtMostOnce;
    2 + publish.topic.len() + if with_pkid { 2 } else { 0 } + publish.payload.len()
}

/// The whole packet's size.
pub(super) fn publish_size(publish: &OutgoingPublish<'_>) -> usize {
    let remaining = publish_remaining(publish);
    1 + super::wire::varint_len(remaining) + remaining
}

/// Appends a PUBLISH as MQTT 3.1.1 (properties and topic alias have no place in it).
pub(super) fn encode_publish(publish: &OutgoingPublish<'_>, buf: &mut BytesMut) -> Result<(), FrameError> {
    let with_pkid = publish.qos != QoS::AtMostOnce;
    let remaining = publish_remaining(publish);
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

/// The packet's name as the MQTT specification writes it, for logs.
fn packet_name(packet: &Packet) -> &'static str {
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
