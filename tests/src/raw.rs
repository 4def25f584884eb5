//! A minimal MQTT 3.1.1 client over mutual TLS that shows and sends exactly what is on the wire:
//! DUP and RETAIN flags, packet ids, a QoS 2 exchange left half-way, a client that never reads.
//! The broker tests use it where a full client library would hide the detail under test, and
//! the benchmark uses it because it costs the load generator almost nothing per message.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Packet builders.
pub mod packets {
    /// Appends an MQTT remaining length.
    pub fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                return;
            }
        }
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        remaining_length(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A will: topic, message, QoS, retain.
    pub type Will<'a> = (&'a str, &'a [u8], u8, bool);

    /// CONNECT (MQTT 3.1.1).
    pub fn connect(client_id: &str, clean: bool, keepalive: u16, will: Option<Will<'_>>) -> Vec<u8> {
        let mut flags = if clean { 0x02 } else { 0x00 };
        if let Some((_, _, qos, retain)) = will {
            flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
        }
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 4, flags];
        body.extend_from_slice(&keepalive.to_be_bytes());
        string(client_id.as_bytes(), &mut body);
        if let Some((topic, message, _, _)) = will {
            string(topic.as_bytes(), &mut body);
            string(message, &mut body);
        }
        packet(0x10, &body)
    }

    /// The fields of a PUBLISH to build.
    #[derive(Clone, Copy, Debug)]
    pub struct Publish<'a> {
        /// Topic name.
        pub topic: &'a str,
        /// Payload.
        pub payload: &'a [u8],
        /// QoS.
        pub qos: u8,
        /// Packet id (ignored for QoS 0).
        pub pkid: u16,
        /// DUP flag.
        pub dup: bool,
        /// RETAIN flag.
        pub retain: bool,
    }

    impl<'a> Publish<'a> {
        /// A PUBLISH to `topic` at `qos` with packet id `pkid`, no flags.
        pub fn new(topic: &'a str, payload: &'a [u8], qos: u8, pkid: u16) -> Self {
            Self {
                topic,
                payload,
                qos,
                pkid,
                dup: false,
                retain: false,
            }
        }

        /// Appends the PUBLISH to `out`.
        pub fn write(&self, out: &mut Vec<u8>) {
            out.push(0x30 | (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain));
            let len = 2 + self.topic.len() + if self.qos > 0 { 2 } else { 0 } + self.payload.len();
            remaining_length(len, out);
            string(self.topic.as_bytes(), out);
            if self.qos > 0 {
                out.extend_from_slice(&self.pkid.to_be_bytes());
            }
            out.extend_from_slice(self.payload);
        }

        /// The PUBLISH as bytes.
        pub fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            self.write(&mut out);
            out
        }
    }

    /// SUBSCRIBE with (filter, QoS) pairs.
    pub fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for (filter, qos) in filters {
            string(filter.as_bytes(), &mut body);
            body.push(*qos);
        }
        packet(0x82, &body)
    }

    /// UNSUBSCRIBE.
    pub fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for filter in filters {
            string(filter.as_bytes(), &mut body);
        }
        packet(0xa2, &body)
    }

    /// PUBACK.
    pub fn puback(pkid: u16) -> Vec<u8> {
        packet(0x40, &pkid.to_be_bytes())
    }

    /// PUBREC.
    pub fn pubrec(pkid: u16) -> Vec<u8> {
        packet(0x50, &pkid.to_be_bytes())
    }

    /// PUBREL.
    pub fn pubrel(pkid: u16) -> Vec<u8> {
        packet(0x62, &pkid.to_be_bytes())
    }

    /// PUBCOMP.
    pub fn pubcomp(pkid: u16) -> Vec<u8> {
        packet(0x70, &pkid.to_be_bytes())
    }

    /// PINGREQ.
    pub const PINGREQ: [u8; 2] = [0xc0, 0x00];
    /// DISCONNECT.
    pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];
}

/// Control packet types, as the first byte's high nibble.
pub mod kind {
    /// CONNACK.
    pub const CONNACK: u8 = 2;
    /// PUBLISH.
    pub const PUBLISH: u8 = 3;
    /// PUBACK.
    pub const PUBACK: u8 = 4;
    /// PUBREC.
    pub const PUBREC: u8 = 5;
    /// PUBREL.
    pub const PUBREL: u8 = 6;
    /// PUBCOMP.
    pub const PUBCOMP: u8 = 7;
    /// SUBACK.
    pub const SUBACK: u8 = 9;
    /// UNSUBACK.
    pub const UNSUBACK: u8 = 11;
    /// PINGRESP.
    pub const PINGRESP: u8 = 13;
}

/// Where the packet starting at `at` in `buf` has its body, if the whole packet is there.
fn frame(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let (mut len, mut shift, mut i) = (0usize, 0, at + 1);
    loop {
        let byte = *buf.get(i)?;
        len |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (buf.len() >= i + len).then_some((i, i + len))
}

/// Splits whole MQTT packets off the front of `buf`, calling `each(first byte, body)`; a partial
/// packet stays in `buf`.
pub fn split_packets(buf: &mut Vec<u8>, mut each: impl FnMut(u8, &[u8])) {
    let mut at = 0;
    while let Some((start, end)) = frame(buf, at) {
        each(buf[at], &buf[start..end]);
        at = end;
    }
    buf.drain(..at);
}

/// Takes the first whole packet off the front of `buf`, if there is one.
fn take_packet(buf: &mut Vec<u8>) -> Option<RawPacket> {
    let (start, end) = frame(buf, 0)?;
    let packet = RawPacket {
        first: buf[0],
        body: buf[start..end].to_vec(),
    };
    buf.drain(..end);
    Some(packet)
}

/// A packet from the broker.
#[derive(Clone, Debug)]
pub struct RawPacket {
    /// The first byte: type and flags.
    pub first: u8,
    /// Everything after the remaining length.
    pub body: Vec<u8>,
}

/// A PUBLISH from the broker, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedPublish {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// DUP flag.
    pub dup: bool,
    /// RETAIN flag.
    pub retain: bool,
}

impl RawPacket {
    /// The control packet type.
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet id of an acknowledgement (the first two body bytes).
    pub fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// The parsed PUBLISH, if this is one.
    pub fn publish(&self) -> Option<ReceivedPublish> {
        if self.kind() != kind::PUBLISH {
            return None;
        }
        let qos = (self.first >> 1) & 3;
        let topic_len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8_lossy(&self.body[2..2 + topic_len]).into_owned();
        let mut at = 2 + topic_len;
        let pkid = if qos > 0 {
            at += 2;
            u16::from_be_bytes([self.body[at - 2], self.body[at - 1]])
        } else {
            0
        };
        Some(ReceivedPublish {
            topic,
            payload: self.body[at..].to_vec(),
            qos,
            pkid,
            dup: self.first & 0x08 != 0,
            retain: self.first & 0x01 != 0,
        })
    }
}

/// A raw MQTT connection over mutual TLS.
pub struct RawClient {
    /// The TLS stream (split it for concurrent reading and writing).
    pub tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawClient {
    /// A completed mTLS handshake to 127.0.0.1:`port`, no MQTT yet.
    pub async fn handshake(port: u16, config: Arc<rustls::ClientConfig>) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        // The server completes its side when it reads our Finished: send it now.
        tls.flush().await?;
        Ok(Self { tls, buf: Vec::new() })
    }

    /// A connected session: handshake, `connect` sent, CONNACK 0 received. The error names the
    /// CONNACK's return code otherwise.
    pub async fn connect(port: u16, config: Arc<rustls::ClientConfig>, connect: &[u8]) -> std::io::Result<Self> {
        let mut client = Self::handshake(port, config).await?;
        client.send(connect).await?;
        match client.recv(Duration::from_secs(10)).await {
            Some(ack) if ack.kind() == kind::CONNACK && ack.body.get(1) == Some(&0) => Ok(client),
            other => Err(std::io::Error::other(format!("no CONNACK 0: {other:?}"))),
        }
    }

    /// Bytes already read from the stream that no packet was taken from yet: a caller that goes
    /// on reading `tls` directly starts with these.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Writes `bytes` and flushes them out of rustls's buffer.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await
    }

    /// The next packet, or `None` on close, error or after `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Option<RawPacket> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(packet) = take_packet(&mut self.buf) {
                return Some(packet);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Packets until one matches `wanted` (returned) or `limit` passes; the others are dropped.
    pub async fn recv_until(&mut self, limit: Duration, wanted: impl Fn(&RawPacket) -> bool) -> Option<RawPacket> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let packet = self.recv(left).await?;
            if wanted(&packet) {
                return Some(packet);
            }
        }
    }

    /// Whether the broker closed the connection within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}
