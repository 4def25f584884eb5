//! MQTT packets, both versions the broker speaks: 3.1.1 (`v4`, over rumqttd's codec) and 5
//! (`v5`, our own). Both decode into the same types, so everything above this module handles a
//! client the same way whichever version it speaks, and asks the version only where the
//! protocols differ on the wire (reason codes, properties).
//!
//! Why MQTT 5 is not rumqttd's: its v5 decoder accepts a property repeated (the specification
//! makes that a protocol error), reads past a property length into the payload, reaches
//! `unreachable!` on CONNACK, UNSUBACK and AUTH from a client, and has no AUTH packet at all.
//! Each of those is a hostile client's lever; a parser that checks them is smaller than the
//! guards it would need.

mod properties;
mod v4;
mod v5;
mod wire;

use bytes::{Bytes, BytesMut};

pub use properties::PublishProperties;
pub use v4::{decode_from_server, encode_from_client, FromServer};

use crate::message::QoS;

/// The MQTT version a client speaks, fixed by its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// Why bytes from a client could not be framed or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The packet is larger than `limits.max_packet_bytes`.
    #[error("packet of {0} bytes exceeds limits.max_packet_bytes")]
    TooLarge(usize),
    /// A CONNECT for a protocol level other than 4 (MQTT 3.1.1) or 5.
    #[error("MQTT protocol level {0} is not supported (only 3.1.1, level 4, and 5)")]
    UnsupportedProtocolLevel(u8),
    /// The bytes do not form the packet they say they are.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A well-formed packet the protocol forbids here (a repeated property, a property the
    /// packet may not carry, a reserved value).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A CONNECT, with what MQTT 5 adds and 3.1.1's equivalents of it.
#[derive(Debug)]
pub struct Connect {
    /// The version the client speaks.
    pub version: Version,
    /// The client id as sent (may be empty).
    pub client_id: String,
    /// Clean Session (3.1.1) or Clean Start (5).
    pub clean_start: bool,
    /// Keepalive, seconds (0: none).
    pub keep_alive: u16,
    /// The will, if any.
    pub will: Option<Will>,
    /// MQTT 5's Session Expiry Interval, seconds; absent is 0 (the session ends with the
    /// connection). For 3.1.1 clients: 0 with clean session, never expiring without.
    pub session_expiry: u32,
    /// How many QoS 1/2 PUBLISHes the client takes unacknowledged (MQTT 5; 65535 if unsaid).
    pub receive_maximum: u16,
    /// The largest packet the client takes, if it said (MQTT 5).
    pub maximum_packet_size: Option<u32>,
    /// How many topic aliases the client lets the broker use (MQTT 5; 0 if unsaid).
    pub topic_alias_maximum: u16,
    /// An enhanced-authentication method named in CONNECT (MQTT 5): refused, the certificate is
    /// the authentication.
    pub authentication_method: Option<String>,
}

/// A will message.
#[derive(Debug)]
pub struct Will {
    /// Topic name bytes (checked to be UTF-8 and a valid topic by the caller).
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, seconds (0 for 3.1.1).
    pub delay: u32,
    /// MQTT 5 properties the will message carries.
    pub properties: PublishProperties,
}

/// A PUBLISH from a client. Topic and payload are slices of the read buffer.
#[derive(Debug)]
pub struct InboundPublish {
    /// Topic name bytes (not yet checked to be UTF-8); empty when a topic alias stands for it.
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
    /// MQTT 5 Topic Alias.
    pub topic_alias: Option<u16>,
    /// MQTT 5 properties that travel with the message.
    pub properties: PublishProperties,
}

/// What a subscription sends of the retained messages (MQTT 5 Retain Handling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainHandling {
    /// At every SUBSCRIBE (3.1.1's only behaviour).
    OnSubscribe,
    /// Only when the subscription did not exist before.
    OnNewSubscription,
    /// Never.
    Never,
}

/// One topic filter of a SUBSCRIBE, with its options.
#[derive(Debug)]
pub struct FilterRequest {
    /// The filter (with any `$share/<group>/` prefix).
    pub filter: String,
    /// Maximum QoS asked for.
    pub qos: QoS,
    /// MQTT 5 No Local: never send this client its own publications.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: keep the RETAIN flag of routed messages.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling.
    pub retain_handling: RetainHandling,
}

/// A SUBSCRIBE.
#[derive(Debug)]
pub struct Subscribe {
    /// Packet id.
    pub pkid: u16,
    /// MQTT 5 Subscription Identifier (1 to 268,435,455).
    pub identifier: Option<u32>,
    /// The filters, in order.
    pub filters: Vec<FilterRequest>,
}

/// An UNSUBSCRIBE.
#[derive(Debug)]
pub struct Unsubscribe {
    /// Packet id.
    pub pkid: u16,
    /// The filters, in order.
    pub filters: Vec<String>,
}

/// A DISCONNECT from a client.
#[derive(Debug, Default)]
pub struct Disconnect {
    /// MQTT 5 reason code (0: normal; 0x04: publish the will anyway). 0 for 3.1.1.
    pub reason_code: u8,
    /// MQTT 5: a new Session Expiry Interval for the session that ends now.
    pub session_expiry: Option<u32>,
}

/// A decoded packet from a client.
#[derive(Debug)]
pub enum Inbound {
    /// CONNECT and its will.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(InboundPublish),
    /// PUBACK for a packet id.
    PubAck(u16),
    /// PUBREC for a packet id; `refused` when an MQTT 5 client's reason code says it did not
    /// take the message (the exchange ends there, no PUBREL follows).
    PubRec {
        /// Packet id.
        pkid: u16,
        /// Reason code 0x80 or above.
        refused: bool,
    },
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
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 enhanced authentication, which this broker does not do).
    Auth,
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
            Inbound::PubRec { .. } => "PUBREC",
            Inbound::PubRel(_) => "PUBREL",
            Inbound::PubComp(_) => "PUBCOMP",
            Inbound::Subscribe(_) => "SUBSCRIBE",
            Inbound::Unsubscribe(_) => "UNSUBSCRIBE",
            Inbound::PingReq => "PINGREQ",
            Inbound::Disconnect(_) => "DISCONNECT",
            Inbound::Auth => "AUTH",
            Inbound::ServerOnly(name) => name,
        }
    }
}

/// MQTT 5 reason codes the broker sends (MQTT 5 section 2.4). For 3.1.1 clients each maps to
/// the nearest thing 3.1.1 can say, or to nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReasonCode {
    /// Success (also "granted QoS 0" in SUBACK).
    Success = 0x00,
    /// SUBACK: granted QoS 1.
    GrantedQos1 = 0x01,
    /// SUBACK: granted QoS 2.
    GrantedQos2 = 0x02,
    /// UNSUBACK: there was no such subscription.
    NoSubscriptionExisted = 0x11,
    /// Unspecified error.
    UnspecifiedError = 0x80,
    /// Malformed packet.
    MalformedPacket = 0x81,
    /// Protocol error.
    ProtocolError = 0x82,
    /// CONNACK: unsupported protocol version.
    UnsupportedProtocolVersion = 0x84,
    /// CONNACK: client identifier not valid.
    ClientIdentifierNotValid = 0x85,
    /// Not authorized.
    NotAuthorized = 0x87,
    /// DISCONNECT: server shutting down.
    ServerShuttingDown = 0x8B,
    /// CONNACK: bad authentication method.
    BadAuthenticationMethod = 0x8C,
    /// DISCONNECT: keep alive timeout.
    KeepAliveTimeout = 0x8D,
    /// DISCONNECT: session taken over.
    SessionTakenOver = 0x8E,
    /// SUBACK: topic filter invalid.
    TopicFilterInvalid = 0x8F,
    /// PUBACK/PUBREC: topic name invalid.
    TopicNameInvalid = 0x90,
    /// DISCONNECT: receive maximum exceeded.
    ReceiveMaximumExceeded = 0x93,
    /// DISCONNECT: topic alias invalid.
    TopicAliasInvalid = 0x94,
    /// DISCONNECT: packet too large.
    PacketTooLarge = 0x95,
    /// Quota exceeded (SUBACK: too many subscriptions; DISCONNECT: a slow subscriber).
    QuotaExceeded = 0x97,
    /// DISCONNECT: administrative action (a revoked certificate).
    AdministrativeAction = 0x98,
}

impl ReasonCode {
    /// Whether this code says the request failed.
    pub fn is_failure(self) -> bool {
        self as u8 >= 0x80
    }
}

/// A packet from the broker to a client (all but PUBLISH, see [`OutgoingPublish`]).
#[derive(Debug)]
pub enum Outbound<'a> {
    /// CONNACK.
    ConnAck {
        /// Session Present.
        session_present: bool,
        /// The outcome.
        code: ReasonCode,
        /// MQTT 5 properties.
        properties: &'a ConnAckProperties,
    },
    /// PUBACK.
    PubAck {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code.
        code: ReasonCode,
    },
    /// PUBREC.
    PubRec {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code.
        code: ReasonCode,
    },
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK: one code per filter.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter: granted QoS or the refusal.
        codes: &'a [ReasonCode],
    },
    /// UNSUBACK: one code per filter (MQTT 5 only puts them on the wire).
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        codes: &'a [ReasonCode],
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only: a 3.1.1 server just closes).
    Disconnect {
        /// Why.
        code: ReasonCode,
        /// The audit word, as the reason string.
        reason: &'a str,
    },
}

/// What the broker tells an MQTT 5 client in CONNACK beyond the code.
#[derive(Debug, Default)]
pub struct ConnAckProperties {
    /// The session expiry the broker uses, when it is not what the client asked.
    pub session_expiry: Option<u32>,
    /// How many QoS 1/2 PUBLISHes the broker takes unacknowledged.
    pub receive_maximum: Option<u16>,
    /// The largest packet the broker takes.
    pub maximum_packet_size: Option<u32>,
    /// The client id the broker gave a client that sent none.
    pub assigned_client_identifier: Option<String>,
    /// How many topic aliases the client may use.
    pub topic_alias_maximum: Option<u16>,
    /// Why, for a refusal.
    pub reason_string: Option<String>,
    /// The keepalive the broker uses, when it is not the client's.
    pub server_keep_alive: Option<u16>,
}

/// The fields of an outgoing PUBLISH.
pub struct OutgoingPublish<'a> {
    /// Topic name (at most 65,535 bytes: it arrived in a PUBLISH or a will); empty when the
    /// topic alias stands for it.
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
    /// MQTT 5: the topic alias to set or use.
    pub topic_alias: Option<u16>,
    /// MQTT 5: what is left of the message's expiry interval, seconds.
    pub message_expiry: Option<u32>,
    /// MQTT 5: the identifiers of the subscriptions it matched.
    pub subscription_ids: &'a [u32],
    /// MQTT 5: the message's forwarded properties, encoded as they arrived.
    pub properties: &'a [u8],
}

/// Takes the next complete packet out of `buf`, or `None` if more bytes are needed. Before the
/// CONNECT (`version` None) the CONNECT's protocol level picks the decoder.
pub fn decode(
    buf: &mut BytesMut,
    max_packet_bytes: usize,
    version: Option<Version>,
) -> Result<Option<Inbound>, FrameError> {
    let version = match version {
        Some(version) => version,
        None => match v5::connect_level(buf)? {
            None => return Ok(None),
            Some(4) => Version::V311,
            Some(5) => Version::V5,
            Some(level) => return Err(FrameError::UnsupportedProtocolLevel(level)),
        },
    };
    match version {
        Version::V311 => v4::decode(buf, max_packet_bytes),
        Version::V5 => v5::decode(buf, max_packet_bytes),
    }
}

/// Appends `packet` to `buf` in `version`'s encoding (what 3.1.1 cannot say is left out).
pub fn encode(packet: &Outbound<'_>, version: Version, buf: &mut BytesMut) -> Result<(), FrameError> {
    match version {
        Version::V311 => v4::encode(packet, buf),
        Version::V5 => v5::encode(packet, buf),
    }
}

/// Appends a PUBLISH to `buf` in `version`'s encoding; refused only beyond MQTT's largest
/// packet (256 MiB), which `limits.max_packet_bytes` keeps every message below.
pub fn encode_publish(publish: &OutgoingPublish<'_>, version: Version, buf: &mut BytesMut) -> Result<(), FrameError> {
    match version {
        Version::V311 => v4::encode_publish(publish, buf),
        Version::V5 => v5::encode_publish(publish, buf),
    }
}

/// The size on the wire of the whole PUBLISH in `version`'s encoding: what an MQTT 5 client's
/// Maximum Packet Size is compared with.
pub fn publish_size(publish: &OutgoingPublish<'_>, version: Version) -> usize {
    match version {
        Version::V311 => v4::publish_size(publish),
        Version::V5 => v5::publish_size(publish),
    }
}

/// Checks stored forwarded properties (read back from the durable store) are what a PUBLISH
/// may carry on to subscribers, so that a damaged row can never put bad bytes on the wire.
pub fn check_forwarded_properties(forwarded: &[u8]) -> Result<(), FrameError> {
    let mut list = BytesMut::new();
    wire::put_varint(&mut list, forwarded.len());
    list.extend_from_slice(forwarded);
    v5::check_forwarded(list.freeze())
}

#[cfg(test)]
mod tests;
