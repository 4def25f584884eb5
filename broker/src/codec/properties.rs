//! MQTT 5 properties (section 2.2.2): each packet's property list is read within its stated
//! length, a property the packet may not carry or one given twice is a protocol error
//! (MQTT-2.2.2-2 and each property's "more than once" rule), and the properties an application
//! message carries to its subscribers are kept as the bytes they arrived as.

use bytes::{Bytes, BytesMut};

use super::wire::{put_varint, Reader};
use super::FrameError;

/// Property identifiers (MQTT 5 table 2-4).
pub(super) mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The properties a client may put on each packet it sends.
pub(super) mod allowed {
    use super::id::*;
    pub const CONNECT: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REQUEST_PROBLEM_INFORMATION,
        REQUEST_RESPONSE_INFORMATION,
        RECEIVE_MAXIMUM,
        TOPIC_ALIAS_MAXIMUM,
        USER_PROPERTY,
        MAXIMUM_PACKET_SIZE,
    ];
    pub const WILL: &[u8] = &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        WILL_DELAY_INTERVAL,
        USER_PROPERTY,
    ];
    pub const PUBLISH: &[u8] = &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ];
    /// What a PUBLISH carries on to subscribers as it came (the rest is the broker's).
    pub const FORWARDED: &[u8] = &[
        PAYLOAD_FORMAT_INDICATOR,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ];
    pub const ACK: &[u8] = &[REASON_STRING, USER_PROPERTY];
    pub const SUBSCRIBE: &[u8] = &[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY];
    pub const UNSUBSCRIBE: &[u8] = &[USER_PROPERTY];
    pub const DISCONNECT: &[u8] = &[SESSION_EXPIRY_INTERVAL, REASON_STRING, USER_PROPERTY, SERVER_REFERENCE];
    pub const AUTH: &[u8] = &[AUTHENTICATION_METHOD, AUTHENTICATION_DATA, REASON_STRING, USER_PROPERTY];
}

/// The properties of an application message that travel with it to MQTT 5 subscribers
/// (MQTT-3.3.2-4 and following): Payload Format Indicator, Content Type, Response Topic,
/// Correlation Data and User Properties, kept encoded, in the order they came (MQTT-3.3.2-18),
/// and the Message Expiry Interval apart, since what is left of it is sent (MQTT-3.3.2-6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// The Message Expiry Interval as published, seconds.
    pub message_expiry: Option<u32>,
    /// The forwarded properties, encoded as on the wire.
    pub forwarded: Bytes,
}

/// A property's value.
pub(super) enum Value {
    Byte(u8),
    Two(u16),
    Four(u32),
    VarInt(u32),
    /// A UTF-8 string or binary data.
    Bytes(Bytes),
    /// A user property's name and value.
    Pair,
}

impl Value {
    pub(super) fn byte(&self) -> u8 {
        match self {
            Value::Byte(b) => *b,
            _ => 0,
        }
    }

    pub(super) fn two(&self) -> u16 {
        match self {
            Value::Two(v) => *v,
            _ => 0,
        }
    }

    pub(super) fn four(&self) -> u32 {
        match *self {
            Value::Four(v) | Value::VarInt(v) => v,
            _ => 0,
        }
    }

    pub(super) fn bytes(&self) -> Bytes {
        match self {
            Value::Bytes(b) => b.clone(),
            _ => Bytes::new(),
        }
    }
}

/// Reads a property list (its length, then the properties within it) of a packet that may
/// carry `allowed`, calling `each` with every property's identifier, value and bytes as sent.
pub(super) fn read(
    reader: &mut Reader,
    packet: &str,
    allowed: &[u8],
    mut each: impl FnMut(u8, Value, &[u8]) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let len = reader.varint("the property length")? as usize;
    if len > reader.remaining() {
        return Err(FrameError::Malformed(format!(
            "{packet}: property length {len} is more than the {} bytes left in the packet",
            reader.remaining()
        )));
    }
    let mut list = Reader::new(reader.take(len, "the properties")?);
    let mut seen = 0u64;
    while list.remaining() > 0 {
        let before = list.remaining();
        let all = list.rest();
        let mut one = Reader::new(all.clone());
        let id = one.varint("a property identifier")?;
        let id = u8::try_from(id)
            .ok()
            .filter(|id| allowed.contains(id))
            .ok_or_else(|| FrameError::Protocol(format!("{packet} may not carry property 0x{id:02X}")))?;
        let value = match id {
            id::PAYLOAD_FORMAT_INDICATOR
            | id::REQUEST_PROBLEM_INFORMATION
            | id::REQUEST_RESPONSE_INFORMATION
            | id::MAXIMUM_QOS
            | id::RETAIN_AVAILABLE
            | id::WILDCARD_SUBSCRIPTION_AVAILABLE
            | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | id::SHARED_SUBSCRIPTION_AVAILABLE => Value::Byte(one.u8("a property")?),
            id::SERVER_KEEP_ALIVE | id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM | id::TOPIC_ALIAS => {
                Value::Two(one.u16("a property")?)
            }
            id::MESSAGE_EXPIRY_INTERVAL
            | id::SESSION_EXPIRY_INTERVAL
            | id::WILL_DELAY_INTERVAL
            | id::MAXIMUM_PACKET_SIZE => Value::Four(one.u32("a property")?),
            id::SUBSCRIPTION_IDENTIFIER => Value::VarInt(one.varint("a subscription identifier")?),
            id::CORRELATION_DATA | id::AUTHENTICATION_DATA => Value::Bytes(one.binary("a property")?),
            id::USER_PROPERTY => {
                one.string("a user property's name")?;
                one.string("a user property's value")?;
                Value::Pair
            }
            _ => Value::Bytes(one.string("a property")?),
        };
        if id != id::USER_PROPERTY {
            let bit = 1u64 << id;
            if seen & bit != 0 {
                return Err(FrameError::Protocol(format!(
                    "{packet} carries property 0x{id:02X} twice"
                )));
            }
            seen |= bit;
        }
        let used = before - one.remaining();
        each(id, value, &all[..used])?;
        list = one;
    }
    Ok(())
}

/// Checks a byte-valued property that may only be 0 or 1.
pub(super) fn flag(packet: &str, id: u8, value: &Value) -> Result<bool, FrameError> {
    match value.byte() {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(FrameError::Protocol(format!(
            "{packet}: property 0x{id:02X} must be 0 or 1, not {other}"
        ))),
    }
}

/// A property list being written: collected, then written with its length in front.
#[derive(Default)]
pub(super) struct Writer {
    buf: BytesMut,
}

impl Writer {
    pub(super) fn two(&mut self, id: u8, value: u16) {
        self.buf.extend_from_slice(&[id]);
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn four(&mut self, id: u8, value: u32) {
        self.buf.extend_from_slice(&[id]);
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn string(&mut self, id: u8, value: &str) {
        self.buf.extend_from_slice(&[id]);
        super::wire::put_binary(&mut self.buf, value.as_bytes());
    }

    pub(super) fn finish(self, out: &mut BytesMut) {
        put_varint(out, self.buf.len());
        out.extend_from_slice(&self.buf);
    }
}
