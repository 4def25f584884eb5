//! MQTT 5 packets (OASIS MQTT Version 5.0), decoded with every length, flag and property
//! checked (see `properties`), and the server's packets encoded.

use bytes::{BufMut, BytesMut};

use super::properties::{self, allowed, id, Value, Writer};
use super::wire::{put_binary, put_varint, varint_len, Reader, MAX_VARINT};
use super::{
    Connect, Disconnect, FilterRequest, FrameError, Inbound, InboundPublish, Outbound, OutgoingPublish,
    PublishProperties, ReasonCode, RetainHandling, Subscribe, Unsubscribe, Version, Will,
};
use crate::message::QoS;

/// A fixed header: the first byte and where the packet ends.
struct Header {
    byte1: u8,
    /// Bytes of the fixed header itself.
    len: usize,
    remaining: usize,
}

/// The fixed header at the start of `buf`; `None` until its length bytes are all there.
fn header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(&byte1) = buf.first() else { return Ok(None) };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                len: 2 + i,
                remaining,
            }));
        }
    }
    Err(FrameError::Malformed("remaining length longer than four bytes".into()))
}

/// The protocol level of the CONNECT at the start of `buf`, once its bytes are there; level 4
/// for anything that is not a CONNECT naming protocol "MQTT", which 3.1.1's decoder refuses.
pub(super) fn connect_level(buf: &[u8]) -> Result<Option<u8>, FrameError> {
    let Some(header) = header(buf)? else { return Ok(None) };
    if header.byte1 >> 4 != 1 {
        return Ok(Some(4));
    }
    let name_at = header.len;
    let level_at = name_at + 2 + 4;
    let frame_end = header.len + header.remaining;
    if level_at >= frame_end {
        return Ok(Some(4));
    }
    match buf.get(name_at..=level_at) {
        None => Ok(None),
        Some(&[0, 4, b'M', b'Q', b'T', b'T', level]) => Ok(Some(level)),
        Some(_) => Ok(Some(4)),
    }
}

/// Takes the next complete packet out of `buf`, or `None` if more bytes are needed.
pub(super) fn decode(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Option<Inbound>, FrameError> {
    let Some(header) = header(buf)? else { return Ok(None) };
    if header.remaining > max_packet_bytes {
        return Err(FrameError::TooLarge(header.remaining));
    }
    if buf.len() < header.len + header.remaining {
        return Ok(None);
    }
    let mut frame = buf.split_to(header.len + header.remaining).freeze();
    let body = frame.split_off(header.len);
    let kind = header.byte1 >> 4;
    let flags = header.byte1 & 0x0F;
    let required_flags = match kind {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != required_flags {
        return Err(FrameError::Malformed(format!(
            "packet type {kind} with reserved flags {flags:#06b}"
        )));
    }
    let mut r = Reader::new(body);
    let packet = match kind {
        1 => Inbound::Connect(Box::new(connect(&mut r)?)),
        3 => Inbound::Publish(publish(flags, &mut r)?),
        4 => Inbound::PubAck(ack(&mut r, "PUBACK")?.0),
        5 => {
            let (pkid, code) = ack(&mut r, "PUBREC")?;
            Inbound::PubRec {
                pkid,
                refused: code >= 0x80,
            }
        }
        6 => Inbound::PubRel(ack(&mut r, "PUBREL")?.0),
        7 => Inbound::PubComp(ack(&mut r, "PUBCOMP")?.0),
        8 => Inbound::Subscribe(subscribe(&mut r)?),
        10 => Inbound::Unsubscribe(unsubscribe(&mut r)?),
        12 => Inbound::PingReq,
        14 => Inbound::Disconnect(disconnect(&mut r)?),
        15 => {
            if r.remaining() > 0 {
                r.u8("AUTH's reason code")?;
                properties::read(&mut r, "AUTH", allowed::AUTH, |_, _, _| Ok(()))?;
            }
            Inbound::Auth
        }
        2 => Inbound::ServerOnly("CONNACK"),
        9 => Inbound::ServerOnly("SUBACK"),
        11 => Inbound::ServerOnly("UNSUBACK"),
        13 => Inbound::ServerOnly("PINGRESP"),
        _ => return Err(FrameError::Malformed(format!("reserved packet type {kind}"))),
    };
    if r.remaining() > 0 && !matches!(packet, Inbound::ServerOnly(_)) {
        return Err(FrameError::Malformed(format!(
            "{} has {} bytes beyond its content",
            packet.name(),
            r.remaining()
        )));
    }
    Ok(Some(packet))
}

fn connect(r: &mut Reader) -> Result<Connect, FrameError> {
    r.string("the protocol name")?;
    r.u8("the protocol level")?;
    let flags = r.u8("the connect flags")?;
    if flags & 0x01 != 0 {
        return Err(FrameError::Malformed("CONNECT's reserved flag is set".into()));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(FrameError::Malformed(
            "CONNECT has will QoS or retain without a will".into(),
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or_else(|| FrameError::Malformed("will QoS 3".into()))?;
    let keep_alive = r.u16("the keepalive")?;
    let mut connect = Connect {
        version: Version::V5,
        client_id: String::new(),
        clean_start: flags & 0x02 != 0,
        keep_alive,
        will: None,
        session_expiry: 0,
        receive_maximum: u16::MAX,
        maximum_packet_size: None,
        topic_alias_maximum: 0,
        authentication_method: None,
    };
    let mut authentication_data = false;
    properties::read(r, "CONNECT", allowed::CONNECT, |pid, value, _| {
        match pid {
            id::SESSION_EXPIRY_INTERVAL => connect.session_expiry = value.four(),
            id::RECEIVE_MAXIMUM => {
                connect.receive_maximum = value.two();
                if connect.receive_maximum == 0 {
                    return Err(FrameError::Protocol("CONNECT: Receive Maximum 0".into()));
                }
            }
            id::MAXIMUM_PACKET_SIZE => {
                if value.four() == 0 {
                    return Err(FrameError::Protocol("CONNECT: Maximum Packet Size 0".into()));
                }
                connect.maximum_packet_size = Some(value.four());
            }
            id::TOPIC_ALIAS_MAXIMUM => connect.topic_alias_maximum = value.two(),
            id::REQUEST_PROBLEM_INFORMATION | id::REQUEST_RESPONSE_INFORMATION => {
                properties::flag("CONNECT", pid, &value)?;
            }
            id::AUTHENTICATION_METHOD => {
                connect.authentication_method = Some(String::from_utf8_lossy(&value.bytes()).into_owned());
            }
            id::AUTHENTICATION_DATA => authentication_data = true,
            _ => {}
        }
        Ok(())
    })?;
    if authentication_data && connect.authentication_method.is_none() {
        return Err(FrameError::Protocol(
            "CONNECT carries Authentication Data without an Authentication Method".into(),
        ));
    }
    connect.client_id = r.owned_string("the client id")?;
    if will_flag {
        let mut delay = 0;
        let mut forwarded = BytesMut::new();
        let mut message_expiry = None;
        properties::read(r, "the will", allowed::WILL, |pid, value, raw| {
            match pid {
                id::WILL_DELAY_INTERVAL => delay = value.four(),
                id::MESSAGE_EXPIRY_INTERVAL => message_expiry = Some(value.four()),
                _ => forward(pid, &value, raw, &mut forwarded, "the will")?,
            }
            Ok(())
        })?;
        let topic = r.string("the will topic")?;
        let payload = r.binary("the will payload")?;
        connect.will = Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay,
            properties: PublishProperties {
                message_expiry,
                forwarded: forwarded.freeze(),
            },
        });
    }
    if flags & 0x80 != 0 {
        r.string("the user name")?;
    }
    if flags & 0x40 != 0 {
        r.binary("the password")?;
    }
    Ok(connect)
}

/// Keeps a property that travels with the message, after checking what the specification asks
/// of it.
fn forward(pid: u8, value: &Value, raw: &[u8], forwarded: &mut BytesMut, packet: &str) -> Result<(), FrameError> {
    match pid {
        id::PAYLOAD_FORMAT_INDICATOR => {
            properties::flag(packet, pid, value)?;
        }
        id::RESPONSE_TOPIC => {
            let topic = value.bytes();
            if topic.is_empty() || topic.iter().any(|b| *b == b'+' || *b == b'#') {
                return Err(FrameError::Protocol(format!(
                    "{packet}: the Response Topic must be a topic name, without wildcards"
                )));
            }
        }
        _ => {}
    }
    forwarded.extend_from_slice(raw);
    Ok(())
}

/// Checks a property list holds only properties a PUBLISH carries on to subscribers.
pub(super) fn check_forwarded(list: bytes::Bytes) -> Result<(), FrameError> {
    let mut r = Reader::new(list);
    let mut sink = BytesMut::new();
    properties::read(&mut r, "stored properties", allowed::FORWARDED, |pid, value, raw| {
        forward(pid, &value, raw, &mut sink, "stored properties")
    })
}

fn publish(flags: u8, r: &mut Reader) -> Result<InboundPublish, FrameError> {
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or_else(|| FrameError::Malformed("PUBLISH with QoS 3".into()))?;
    let dup = flags & 0b1000 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(FrameError::Malformed("PUBLISH with QoS 0 and DUP set".into()));
    }
    let topic = r.string("the topic name")?;
    let pkid = match qos {
        QoS::AtMostOnce => 0,
        _ => r.u16("the packet id")?,
    };
    if qos != QoS::AtMostOnce && pkid == 0 {
        return Err(FrameError::Malformed("PUBLISH with packet id 0".into()));
    }
    let mut topic_alias = None;
    let mut message_expiry = None;
    let mut forwarded = BytesMut::new();
    properties::read(r, "PUBLISH", allowed::PUBLISH, |pid, value, raw| {
        match pid {
            id::TOPIC_ALIAS => topic_alias = Some(value.two()),
            id::MESSAGE_EXPIRY_INTERVAL => message_expiry = Some(value.four()),
            _ => forward(pid, &value, raw, &mut forwarded, "PUBLISH")?,
        }
        Ok(())
    })?;
    Ok(InboundPublish {
        topic,
        payload: r.rest(),
        qos,
        pkid,
        dup,
        retain: flags & 0b0001 != 0,
        topic_alias,
        properties: PublishProperties {
            message_expiry,
            forwarded: forwarded.freeze(),
        },
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then an optional reason code and properties.
fn ack(r: &mut Reader, packet: &str) -> Result<(u16, u8), FrameError> {
    let pkid = r.u16("the packet id")?;
    if pkid == 0 {
        return Err(FrameError::Malformed(format!("{packet} with packet id 0")));
    }
    let mut code = 0;
    if r.remaining() > 0 {
        code = r.u8("the reason code")?;
        if r.remaining() > 0 {
            properties::read(r, packet, allowed::ACK, |_, _, _| Ok(()))?;
        }
    }
    Ok((pkid, code))
}

fn subscribe(r: &mut Reader) -> Result<Subscribe, FrameError> {
    let pkid = r.u16("the packet id")?;
    if pkid == 0 {
        return Err(FrameError::Malformed("SUBSCRIBE with packet id 0".into()));
    }
    let mut identifier = None;
    properties::read(r, "SUBSCRIBE", allowed::SUBSCRIBE, |pid, value, _| {
        if pid == id::SUBSCRIPTION_IDENTIFIER {
            let value = value.four();
            if value == 0 {
                return Err(FrameError::Protocol("SUBSCRIBE: Subscription Identifier 0".into()));
            }
            identifier = Some(value);
        }
        Ok(())
    })?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.owned_string("a topic filter")?;
        let options = r.u8("the subscription options")?;
        if options & 0xC0 != 0 {
            return Err(FrameError::Malformed(format!(
                "SUBSCRIBE to {filter:?}: reserved option bits set"
            )));
        }
        let qos = QoS::from_u8(options & 0b11)
            .ok_or_else(|| FrameError::Malformed(format!("SUBSCRIBE to {filter:?} with QoS 3")))?;
        let retain_handling = match (options >> 4) & 0b11 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscription,
            2 => RetainHandling::Never,
            _ => {
                return Err(FrameError::Protocol(format!(
                    "SUBSCRIBE to {filter:?} with Retain Handling 3"
                )))
            }
        };
        let no_local = options & 0b0100 != 0;
        if no_local && filter.starts_with("$share/") {
            return Err(FrameError::Protocol(format!(
                "SUBSCRIBE: No Local on the shared subscription {filter:?} (MQTT-3.8.3-4)"
            )));
        }
        filters.push(FilterRequest {
            filter,
            qos,
            no_local,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(FrameError::Protocol("SUBSCRIBE without a topic filter".into()));
    }
    Ok(Subscribe {
        pkid,
        identifier,
        filters,
    })
}

fn unsubscribe(r: &mut Reader) -> Result<Unsubscribe, FrameError> {
    let pkid = r.u16("the packet id")?;
    if pkid == 0 {
        return Err(FrameError::Malformed("UNSUBSCRIBE with packet id 0".into()));
    }
    properties::read(r, "UNSUBSCRIBE", allowed::UNSUBSCRIBE, |_, _, _| Ok(()))?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        filters.push(r.owned_string("a topic filter")?);
    }
    if filters.is_empty() {
        return Err(FrameError::Protocol("UNSUBSCRIBE without a topic filter".into()));
    }
    Ok(Unsubscribe { pkid, filters })
}

fn disconnect(r: &mut Reader) -> Result<Disconnect, FrameError> {
    let mut disconnect = Disconnect::default();
    if r.remaining() == 0 {
        return Ok(disconnect);
    }
    disconnect.reason_code = r.u8("the reason code")?;
    if r.remaining() > 0 {
        properties::read(r, "DISCONNECT", allowed::DISCONNECT, |pid, value, _| {
            match pid {
                id::SESSION_EXPIRY_INTERVAL => disconnect.session_expiry = Some(value.four()),
                id::SERVER_REFERENCE => {
                    return Err(FrameError::Protocol("a client may not send a Server Reference".into()));
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    Ok(disconnect)
}

/// Appends a fixed header and `body`.
fn put_packet(out: &mut BytesMut, byte1: u8, body: &[u8]) {
    out.reserve(body.len() + 5);
    out.put_u8(byte1);
    put_varint(out, body.len());
    out.put_slice(body);
}

/// Appends `packet` as MQTT 5.
pub(super) fn encode(packet: &Outbound<'_>, out: &mut BytesMut) -> Result<(), FrameError> {
    let mut body = BytesMut::new();
    let byte1 = match packet {
        Outbound::ConnAck {
            session_present,
            code,
            properties,
        } => {
            body.put_u8(u8::from(*session_present));
            body.put_u8(*code as u8);
            let mut props = Writer::default();
            if let Some(v) = properties.session_expiry {
                props.four(id::SESSION_EXPIRY_INTERVAL, v);
            }
            if let Some(v) = properties.receive_maximum {
                props.two(id::RECEIVE_MAXIMUM, v);
            }
            if let Some(v) = properties.maximum_packet_size {
                props.four(id::MAXIMUM_PACKET_SIZE, v);
            }
            if let Some(v) = &properties.assigned_client_identifier {
                props.string(id::ASSIGNED_CLIENT_IDENTIFIER, v);
            }
            if let Some(v) = properties.topic_alias_maximum {
                props.two(id::TOPIC_ALIAS_MAXIMUM, v);
            }
            if let Some(v) = &properties.reason_string {
                props.string(id::REASON_STRING, v);
            }
            if let Some(v) = properties.server_keep_alive {
                props.two(id::SERVER_KEEP_ALIVE, v);
            }
            if code.is_failure() {
                // Nothing but the reason after a refusal.
                props = Writer::default();
                if let Some(v) = &properties.reason_string {
                    props.string(id::REASON_STRING, v);
                }
            }
            // Maximum QoS (2), retained, wildcard, shared subscriptions and subscription
            // identifiers are all available: what absent properties say (MQTT 5 section
            // 3.2.2.3; a Maximum QoS of 2 on the wire would even be a protocol error).
            props.finish(&mut body);
            0x20
        }
        Outbound::PubAck { pkid, code } => {
            put_ack(&mut body, *pkid, *code);
            0x40
        }
        Outbound::PubRec { pkid, code } => {
            put_ack(&mut body, *pkid, *code);
            0x50
        }
        Outbound::PubRel(pkid) => {
            put_ack(&mut body, *pkid, ReasonCode::Success);
            0x62
        }
        Outbound::PubComp(pkid) => {
            put_ack(&mut body, *pkid, ReasonCode::Success);
            0x70
        }
        Outbound::SubAck { pkid, codes } | Outbound::UnsubAck { pkid, codes } => {
            body.put_u16(*pkid);
            body.put_u8(0);
            body.extend(codes.iter().map(|c| *c as u8));
            if matches!(packet, Outbound::SubAck { .. }) {
                0x90
            } else {
                0xB0
            }
        }
        Outbound::PingResp => 0xD0,
        Outbound::Disconnect { code, reason } => {
            body.put_u8(*code as u8);
            let mut props = Writer::default();
            props.string(id::REASON_STRING, reason);
            props.finish(&mut body);
            0xE0
        }
    };
    put_packet(out, byte1, &body);
    Ok(())
}

/// An acknowledgement's packet id, and its reason code unless it is success (MQTT 5 section
/// 3.4.2.1: it may then be left out).
fn put_ack(body: &mut BytesMut, pkid: u16, code: ReasonCode) {
    body.put_u16(pkid);
    if code != ReasonCode::Success {
        body.put_u8(code as u8);
    }
}

/// The property bytes of an outgoing PUBLISH (without their length prefix).
fn publish_properties_len(publish: &OutgoingPublish<'_>) -> usize {
    publish.message_expiry.map_or(0, |_| 5)
        + publish.topic_alias.map_or(0, |_| 3)
        + publish
            .subscription_ids
            .iter()
            .map(|id| 1 + varint_len(*id as usize))
            .sum::<usize>()
        + publish.properties.len()
}

fn publish_remaining(publish: &OutgoingPublish<'_>) -> usize {
    let properties = publish_properties_len(publish);
    let pkid = if publish.qos == QoS::AtMostOnce { 0 } else { 2 };
    2 + publish.topic.len() + pkid + varint_len(properties) + properties + publish.payload.len()
}

/// The whole packet's size.
pub(super) fn publish_size(publish: &OutgoingPublish<'_>) -> usize {
    let remaining = publish_remaining(publish);
    1 + varint_len(remaining) + remaining
}

/// Appends a PUBLISH as MQTT 5.
pub(super) fn encode_publish(publish: &OutgoingPublish<'_>, out: &mut BytesMut) -> Result<(), FrameError> {
    let remaining = publish_remaining(publish);
    if remaining > MAX_VARINT as usize {
        return Err(FrameError::Malformed(format!(
            "a PUBLISH of {remaining} bytes is beyond MQTT's largest packet"
        )));
    }
    let with_pkid = publish.qos != QoS::AtMostOnce;
    out.reserve(remaining + 5);
    out.put_u8(
        0b0011_0000 | (u8::from(publish.dup && with_pkid) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain),
    );
    put_varint(out, remaining);
    put_binary(out, publish.topic.as_bytes());
    if with_pkid {
        out.put_u16(publish.pkid);
    }
    put_varint(out, publish_properties_len(publish));
    if let Some(expiry) = publish.message_expiry {
        out.put_u8(id::MESSAGE_EXPIRY_INTERVAL);
        out.put_u32(expiry);
    }
    if let Some(alias) = publish.topic_alias {
        out.put_u8(id::TOPIC_ALIAS);
        out.put_u16(alias);
    }
    for id in publish.subscription_ids {
        out.put_u8(id::SUBSCRIPTION_IDENTIFIER);
        put_varint(out, *id as usize);
    }
    out.put_slice(publish.properties);
    out.put_slice(publish.payload);
    Ok(())
}
