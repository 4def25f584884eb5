//! The client's side of MQTT 3.1.1, for the bridge's uplink to an upstream broker: what a
//! server sends, decoded with the same guards as a client's packets ([`super::v4`]), and what a
//! client sends, encoded by rumqttd (PUBLISH by [`super::encode_publish`]).

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{ConnectReturnCode, Packet, Protocol, SubscribeReasonCode};

use super::v4::{inbound_publish, packet_name, read_frame};
use super::{FrameError, InboundPublish};

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

/// Encodes a packet a client sends (CONNECT, SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT).
pub fn encode_from_client(packet: Packet, buf: &mut BytesMut) -> Result<(), FrameError> {
    V4.write(packet, buf)
        .map(|_| ())
        .map_err(|e| FrameError::Malformed(e.to_string()))
}
