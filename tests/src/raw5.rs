//! MQTT 5 on top of [`crate::raw`]: packet builders with properties, and parsers for what the
//! broker sends back (reason codes and properties), so a test can assert every byte MQTT 5 adds.

use crate::raw::{packets::remaining_length, RawPacket};

/// Property identifiers the tests use (MQTT 5 table 2-4).
pub mod id {
    /// Payload Format Indicator.
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    /// Message Expiry Interval.
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    /// Content Type.
    pub const CONTENT_TYPE: u8 = 0x03;
    /// Response Topic.
    pub const RESPONSE_TOPIC: u8 = 0x08;
    /// Correlation Data.
    pub const CORRELATION_DATA: u8 = 0x09;
    /// Subscription Identifier.
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    /// Session Expiry Interval.
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    /// Assigned Client Identifier.
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    /// Server Keep Alive.
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    /// Authentication Method.
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    /// Will Delay Interval.
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    /// Reason String.
    pub const REASON_STRING: u8 = 0x1F;
    /// Receive Maximum.
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    /// Topic Alias Maximum.
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic Alias.
    pub const TOPIC_ALIAS: u8 = 0x23;
    /// User Property.
    pub const USER_PROPERTY: u8 = 0x26;
    /// Maximum Packet Size.
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// A property list being built, in the order given.
#[derive(Clone, Debug, Default)]
pub struct Props(pub Vec<u8>);

impl Props {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// A one-byte property.
    pub fn byte(mut self, id: u8, value: u8) -> Self {
        self.0.extend_from_slice(&[id, value]);
        self
    }

    /// A two-byte property.
    pub fn two(mut self, id: u8, value: u16) -> Self {
        self.0.push(id);
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A four-byte property.
    pub fn four(mut self, id: u8, value: u32) -> Self {
        self.0.push(id);
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A Variable Byte Integer property.
    pub fn varint(mut self, id: u8, value: u32) -> Self {
        self.0.push(id);
        remaining_length(value as usize, &mut self.0);
        self
    }

    /// A string or binary property.
    pub fn bytes(mut self, id: u8, value: &[u8]) -> Self {
        self.0.push(id);
        put_binary(value, &mut self.0);
        self
    }

    /// A user property.
    pub fn user(mut self, name: &str, value: &str) -> Self {
        self.0.push(id::USER_PROPERTY);
        put_binary(name.as_bytes(), &mut self.0);
        put_binary(value.as_bytes(), &mut self.0);
        self
    }

    fn write(&self, out: &mut Vec<u8>) {
        remaining_length(self.0.len(), out);
        out.extend_from_slice(&self.0);
    }
}

fn put_binary(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A will: topic, payload, QoS, retain, its properties.
pub type Will<'a> = (&'a str, &'a [u8], u8, bool, Props);

/// CONNECT (MQTT 5).
pub fn connect(client_id: &str, clean_start: bool, keepalive: u16, props: &Props, will: Option<Will<'_>>) -> Vec<u8> {
    let mut flags = if clean_start { 0x02 } else { 0x00 };
    if let Some((_, _, qos, retain, _)) = &will {
        flags |= 0x04 | (qos << 3) | if *retain { 0x20 } else { 0 };
    }
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, flags];
    body.extend_from_slice(&keepalive.to_be_bytes());
    props.write(&mut body);
    put_binary(client_id.as_bytes(), &mut body);
    if let Some((topic, payload, _, _, will_props)) = &will {
        will_props.write(&mut body);
        put_binary(topic.as_bytes(), &mut body);
        put_binary(payload, &mut body);
    }
    packet(0x10, &body)
}

/// PUBLISH (MQTT 5).
pub fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool, props: &Props) -> Vec<u8> {
    let mut body = Vec::new();
    put_binary(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    props.write(&mut body);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

/// SUBSCRIBE (MQTT 5): filters with their options byte (QoS | 0x04 No Local | 0x08 Retain As
/// Published | Retain Handling << 4).
pub fn subscribe(pkid: u16, props: &Props, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    props.write(&mut body);
    for (filter, options) in filters {
        put_binary(filter.as_bytes(), &mut body);
        body.push(*options);
    }
    packet(0x82, &body)
}

/// DISCONNECT (MQTT 5) with a reason code and properties.
pub fn disconnect(reason: u8, props: &Props) -> Vec<u8> {
    let mut body = vec![reason];
    props.write(&mut body);
    packet(0xE0, &body)
}

/// An acknowledgement (PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70) with a reason code.
pub fn ack(first: u8, pkid: u16, reason: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(reason);
    packet(first, &body)
}

/// A property as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A number (one, two or four bytes, or a Variable Byte Integer).
    Number(u32),
    /// A string or binary data.
    Bytes(Vec<u8>),
    /// A user property.
    Pair(String, String),
}

/// Properties as received, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received(pub Vec<(u8, Value)>);

impl Received {
    /// The first value of property `id`.
    pub fn get(&self, id: u8) -> Option<&Value> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// The number of property `id`.
    pub fn number(&self, id: u8) -> Option<u32> {
        match self.get(id)? {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// Every number of property `id` (Subscription Identifiers).
    pub fn numbers(&self, id: u8) -> Vec<u32> {
        self.0
            .iter()
            .filter_map(|(i, v)| match v {
                Value::Number(n) if *i == id => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// The string of property `id`.
    pub fn string(&self, id: u8) -> Option<String> {
        match self.get(id)? {
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The user properties.
    pub fn users(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter_map(|(_, v)| match v {
                Value::Pair(k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }
}

fn varint(body: &[u8], at: &mut usize) -> u32 {
    let (mut value, mut shift) = (0u32, 0);
    loop {
        let byte = body[*at];
        *at += 1;
        value |= u32::from(byte & 0x7F) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return value;
        }
    }
}

fn binary(body: &[u8], at: &mut usize) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([body[*at], body[*at + 1]]));
    let value = body[*at + 2..*at + 2 + len].to_vec();
    *at += 2 + len;
    value
}

/// Reads a property list at `at`, moving past it.
pub fn properties(body: &[u8], at: &mut usize) -> Received {
    let len = varint(body, at) as usize;
    let end = *at + len;
    let mut found = Vec::new();
    while *at < end {
        let id = body[*at];
        *at += 1;
        let value = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                *at += 1;
                Value::Number(u32::from(body[*at - 1]))
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                *at += 2;
                Value::Number(u32::from(u16::from_be_bytes([body[*at - 2], body[*at - 1]])))
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                *at += 4;
                Value::Number(u32::from_be_bytes([
                    body[*at - 4],
                    body[*at - 3],
                    body[*at - 2],
                    body[*at - 1],
                ]))
            }
            0x0B => Value::Number(varint(body, at)),
            0x26 => {
                let k = binary(body, at);
                let v = binary(body, at);
                Value::Pair(
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            }
            _ => Value::Bytes(binary(body, at)),
        };
        found.push((id, value));
    }
    Received(found)
}

/// A CONNACK, parsed.
#[derive(Clone, Debug)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// The reason code.
    pub code: u8,
    /// Its properties.
    pub props: Received,
}

/// A PUBLISH from the broker, parsed.
#[derive(Clone, Debug)]
pub struct Publish {
    /// Topic name (empty when a topic alias stands for it).
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// RETAIN flag.
    pub retain: bool,
    /// Its properties.
    pub props: Received,
}

/// The parsed packets of MQTT 5.
pub trait Parsed {
    /// A CONNACK.
    fn connack(&self) -> Option<ConnAck>;
    /// A PUBLISH.
    fn publish5(&self) -> Option<Publish>;
    /// The reason code of an acknowledgement or DISCONNECT (0 where it is left out).
    fn reason(&self) -> u8;
    /// The reason codes of a SUBACK or UNSUBACK.
    fn codes(&self) -> Vec<u8>;
    /// The properties of a DISCONNECT.
    fn disconnect_props(&self) -> Received;
}

impl Parsed for RawPacket {
    fn connack(&self) -> Option<ConnAck> {
        if self.kind() != 2 {
            return None;
        }
        let mut at = 2;
        Some(ConnAck {
            session_present: self.body[0] & 1 != 0,
            code: self.body[1],
            props: properties(&self.body, &mut at),
        })
    }

    fn publish5(&self) -> Option<Publish> {
        if self.kind() != 3 {
            return None;
        }
        let qos = (self.first >> 1) & 3;
        let mut at = 0;
        let topic = String::from_utf8_lossy(&binary(&self.body, &mut at)).into_owned();
        let pkid = if qos > 0 {
            at += 2;
            u16::from_be_bytes([self.body[at - 2], self.body[at - 1]])
        } else {
            0
        };
        let props = properties(&self.body, &mut at);
        Some(Publish {
            topic,
            payload: self.body[at..].to_vec(),
            qos,
            pkid,
            retain: self.first & 1 != 0,
            props,
        })
    }

    fn reason(&self) -> u8 {
        let at = if self.kind() == 14 { 0 } else { 2 };
        self.body.get(at).copied().unwrap_or(0)
    }

    fn codes(&self) -> Vec<u8> {
        let mut at = 2;
        properties(&self.body, &mut at);
        self.body[at..].to_vec()
    }

    fn disconnect_props(&self) -> Received {
        let mut at = 1;
        if self.body.len() <= 1 {
            return Received::default();
        }
        properties(&self.body, &mut at)
    }
}

/// Appends a PUBLISH without properties to `out` (no allocation: what a load generator sends).
pub fn write_publish(out: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, pkid: u16) {
    let pkid_len = if qos > 0 { 2 } else { 0 };
    out.push(0x30 | (qos << 1));
    remaining_length(2 + topic.len() + pkid_len + 1 + payload.len(), out);
    put_binary(topic.as_bytes(), out);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.push(0);
    out.extend_from_slice(payload);
}
