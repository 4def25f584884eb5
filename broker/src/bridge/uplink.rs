//! The uplink: one MQTT 3.1.1 connection at a time to an upstream node, over mutual TLS with the
//! gateway's certificate, that publishes the outbox at QoS 1 and delivers what the upstream
//! sends down.
//!
//! Our own small client on rumqttd's codec ([`crate::codec`]), not rumqttc: the outbox, not the
//! client, must own what is in flight. Each PUBLISH gets a packet id that maps to its outbox
//! entry, at most `bridge.max_inflight` are unacknowledged, and an entry leaves the outbox only
//! on its PUBACK. rumqttc keeps its own copy of what is in flight, resends it itself on
//! reconnect (only with `clean_session = false`), and hides which request a packet id belongs
//! to; the bridge would have to mirror that state and could still lose track across a
//! reconnect. Here a reconnect just rewinds the outbox.
//!
//! Failover: the upstreams are tried in the configured order, starting at the first; when a
//! connection to one ends, the next is tried first (so a dead node is left at once), and after a
//! whole round failed the bridge waits `bridge.retry_ms`, doubling up to 30 s, and starts over.
//! Every connect, failover and disconnect is audited with its reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fleet_identity::BrokerUrl;
use rumqttd::protocol::{
    Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Packet, PingReq, PubAck, PubAckReason,
    RetainForwardRule, Subscribe,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::downstream::{self, Downstream};
use super::Shared;
use crate::codec::{decode_from_server, encode_from_client, encode_publish, FromServer, OutgoingPublish, Version};
use crate::router::QoS;

/// The longest pause between two rounds of attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Largest packet accepted from an upstream.
const MAX_PACKET: usize = 1024 * 1024;
/// Downstream messages read and not yet delivered locally, at most; beyond, reading waits.
const DOWNSTREAM_WINDOW: usize = 64;

/// Why a connection to an upstream could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// TCP connect failed.
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        /// The upstream.
        url: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The TLS handshake failed (e.g. the upstream's certificate does not chain to
    /// `bridge.upstream_ca`, or it refused ours).
    #[error("TLS handshake with {url} failed: {source}")]
    Tls {
        /// The upstream.
        url: String,
        /// What rustls said.
        source: std::io::Error,
    },
    /// `bridge.connect_timeout_ms` passed.
    #[error("{url} did not complete the {stage} within {timeout:?}")]
    Timeout {
        /// The upstream.
        url: String,
        /// TCP connect, TLS handshake, CONNACK or SUBACK.
        stage: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The upstream refused the CONNECT.
    #[error("{url} refused the connection: CONNACK {code:?}")]
    Refused {
        /// The upstream.
        url: String,
        /// Its return code.
        code: ConnectReturnCode,
    },
    /// The connection failed or the upstream broke the protocol.
    #[error("{url}: {detail}")]
    Connection {
        /// The upstream.
        url: String,
        /// The stable word for the audit log (`io_error`, `peer_closed`, `keepalive_timeout`,
        /// `protocol_error`).
        reason: &'static str,
        /// What happened.
        detail: String,
    },
}

impl UplinkError {
    /// The stable word for the audit log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            UplinkError::Unreachable { .. } => "unreachable",
            UplinkError::Tls { .. } => "tls_error",
            UplinkError::Timeout { .. } => "timeout",
            UplinkError::Refused { .. } => "refused",
            UplinkError::Connection { reason, .. } => reason,
        }
    }
}

/// How to reach the upstreams: everything an attempt needs.
#[derive(Clone)]
pub struct Dialer {
    /// The TLS client configuration: the gateway's certificate, trusting `bridge.upstream_ca`.
    pub tls: Arc<rustls::ClientConfig>,
    /// The name to verify instead of each URL's host.
    pub server_name: Option<ServerName<'static>>,
    /// Deadline for each stage of an attempt.
    pub timeout: Duration,
}

impl Dialer {
    /// TCP and the TLS handshake to `url`.
    pub async fn handshake(&self, url: &BrokerUrl) -> Result<TlsStream<TcpStream>, UplinkError> {
        let shown = url.to_string();
        let timeout = |stage| UplinkError::Timeout {
            url: shown.clone(),
            stage,
            timeout: self.timeout,
        };
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| timeout("TCP connect"))?
            .map_err(|source| UplinkError::Unreachable {
                url: shown.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(url.host.clone()).map_err(|e| UplinkError::Tls {
                url: shown.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?,
        };
        tokio::time::timeout(self.timeout, TlsConnector::from(self.tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| timeout("TLS handshake"))?
            .map_err(|source| UplinkError::Tls { url: shown, source })
    }
}

/// How long a probe waits for the upstream to refuse the gateway's certificate.
const PROBE_VERDICT: Duration = Duration::from_millis(500);

impl Dialer {
    /// The TLS handshake with `url`, then a moment for the upstream to refuse our certificate:
    /// with TLS 1.3 a client learns that only from an alert after its own handshake is done.
    /// An MQTT server then waits for CONNECT, so silence means the certificate was accepted.
    pub async fn probe(&self, url: &BrokerUrl) -> Result<(), UplinkError> {
        let mut stream = self.handshake(url).await?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PROBE_VERDICT, stream.read(&mut byte)).await {
            Err(_) => Ok(()),
            Ok(Ok(0)) => Err(closed(&url.to_string())),
            Ok(Ok(_)) => Err(protocol(&url.to_string(), "sent data before any CONNECT".into())),
            Ok(Err(source)) => Err(UplinkError::Tls {
                url: url.to_string(),
                source,
            }),
        }
    }
}

/// The uplink's settings.
pub struct Uplink {
    /// The upstreams, in the order tried.
    pub urls: Vec<BrokerUrl>,
    /// How to connect.
    pub dialer: Dialer,
    /// The MQTT client id upstream: the gateway's name.
    pub client_id: String,
    /// MQTT keepalive.
    pub keepalive: Duration,
    /// Pause after a round of failed attempts (doubling).
    pub retry: Duration,
    /// Unacknowledged PUBLISHes at most.
    pub max_inflight: usize,
    /// The filters subscribed upstream.
    pub subscriptions: Vec<String>,
}

impl Uplink {
    /// Connects, forwards and fails over, forever.
    pub async fn run(self, shared: Arc<Shared>) {
        let mut next = 0;
        let mut last_connected: Option<usize> = None;
        let mut pause = self.retry;
        let mut failed_in_a_row = 0;
        loop {
            let at = next % self.urls.len();
            let url = &self.urls[at];
            next = at + 1;
            match self.connect(url).await {
                Ok((stream, rest)) => {
                    failed_in_a_row = 0;
                    pause = self.retry;
                    if let Some(from) = last_connected.filter(|&from| from != at) {
                        shared.failover(&self.urls[from], url);
                    }
                    last_connected = Some(at);
                    let end = self.session(url, stream, rest, &shared).await;
                    shared.disconnected(url, &end);
                }
                Err(error) => {
                    shared.connect_failed(url, &error);
                    failed_in_a_row += 1;
                    if failed_in_a_row >= self.urls.len() {
                        failed_in_a_row = 0;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_RETRY);
                    }
                }
            }
        }
    }

    /// TLS, CONNECT and CONNACK; returns the stream and what was read after the CONNACK.
    async fn connect(&self, url: &BrokerUrl) -> Result<(TlsStream<TcpStream>, BytesMut), UplinkError> {
        let mut stream = self.dialer.handshake(url).await?;
        let shown = url.to_string();
        let connect = Packet::Connect(
            Connect {
                keep_alive: u16::try_from(self.keepalive.as_secs()).unwrap_or(u16::MAX),
                client_id: self.client_id.clone(),
                // The upstream keeps the subscriptions and the commands queued for this gateway
                // while it is away; what the gateway sends is kept in its own outbox.
                clean_session: false,
            },
            None,
            None,
            None,
            None,
        );
        let mut out = BytesMut::new();
        encode_from_client(connect, &mut out).map_err(|e| protocol(&shown, e.to_string()))?;
        let mut rbuf = BytesMut::with_capacity(4096);
        let handshake = async {
            stream.write_all(&out).await?;
            stream.flush().await?;
            loop {
                match decode_from_server(&mut rbuf, MAX_PACKET) {
                    Ok(Some(packet)) => return Ok(Ok(packet)),
                    Ok(None) => {}
                    Err(e) => return Ok(Err(e.to_string())),
                }
                if stream.read_buf(&mut rbuf).await? == 0 {
                    return Ok(Err("closed the connection before CONNACK".to_owned()));
                }
            }
        };
        let first = tokio::time::timeout(self.dialer.timeout, handshake)
            .await
            .map_err(|_| UplinkError::Timeout {
                url: shown.clone(),
                stage: "CONNACK",
                timeout: self.dialer.timeout,
            })?
            .map_err(|e: std::io::Error| io(&shown, &e))?
            .map_err(|detail| protocol(&shown, detail))?;
        match first {
            FromServer::ConnAck(_, ConnectReturnCode::Success) => Ok((stream, rbuf)),
            FromServer::ConnAck(_, code) => Err(UplinkError::Refused { url: shown, code }),
            other => Err(protocol(&shown, format!("sent {other:?} instead of CONNACK"))),
        }
    }

    /// One connection's life: subscribes, then publishes the outbox and handles what comes,
    /// until the connection fails. The outbox is rewound at the end.
    async fn session(
        &self,
        url: &BrokerUrl,
        stream: TlsStream<TcpStream>,
        mut rbuf: BytesMut,
        shared: &Arc<Shared>,
    ) -> UplinkError {
        let mut connection = Connection {
            url: url.to_string(),
            wbuf: BytesMut::new(),
            inflight: HashMap::new(),
            next_pkid: 1,
            subscribed: self.subscriptions.is_empty(),
        };
        if connection.subscribed {
            shared.connected(&connection.url, &[]);
        } else {
            let filters = self
                .subscriptions
                .iter()
                .map(|path| Filter {
                    path: path.clone(),
                    qos: rumqttd::protocol::QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                })
                .collect();
            let subscribe = Packet::Subscribe(Subscribe { pkid: 1, filters }, None);
            if let Err(e) = encode_from_client(subscribe, &mut connection.wbuf) {
                return protocol(&connection.url, e.to_string());
            }
            connection.next_pkid = 2;
        }
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (down_tx, down_rx) = mpsc::channel::<Downstream>(DOWNSTREAM_WINDOW);
        let (ack_tx, mut ack_rx) = mpsc::channel::<u16>(DOWNSTREAM_WINDOW);
        // Ends by itself once this connection's channel closes and what it holds is delivered
        // (whose PUBACKs then go nowhere: the upstream resends those).
        tokio::spawn(downstream::deliver(shared.clone(), down_rx, ack_tx));
        let mut held: Option<Downstream> = None;
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        // A node that accepts the connection but cannot subscribe us (a cluster still electing
        // the leader of its session store, say) is given up like one that cannot connect.
        let subscribe_by = Instant::now() + self.dialer.timeout;
        let end = loop {
            connection.fill(shared, self.max_inflight);
            if !connection.wbuf.is_empty() {
                let written = async {
                    writer.write_all(&connection.wbuf).await?;
                    writer.flush().await
                };
                if let Err(e) = written.await {
                    break io(&connection.url, &e);
                }
                connection.wbuf.clear();
                last_write = Instant::now();
            }
            // Packets already read, until one must wait for room downstream.
            while held.is_none() {
                match decode_from_server(&mut rbuf, MAX_PACKET) {
                    Ok(Some(packet)) => match connection.on_packet(packet, shared, &self.subscriptions) {
                        Ok(Some(down)) => {
                            if let Err(mpsc::error::TrySendError::Full(down)) = down_tx.try_send(down) {
                                held = Some(down);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return self.ended(shared, e),
                    },
                    Ok(None) => break,
                    Err(e) => return self.ended(shared, protocol(&connection.url, e.to_string())),
                }
            }
            let ping_due = last_write + self.keepalive;
            let silent_since = last_read + self.keepalive * 3 / 2;
            let room = connection.inflight.len() < self.max_inflight;
            tokio::select! {
                read = reader.read_buf(&mut rbuf), if held.is_none() => match read {
                    Ok(0) => break closed(&connection.url),
                    Ok(_) => last_read = Instant::now(),
                    Err(e) => break io(&connection.url, &e),
                },
                permit = down_tx.reserve(), if held.is_some() => {
                    if let (Ok(permit), Some(down)) = (permit, held.take()) {
                        permit.send(down);
                    }
                }
                Some(pkid) = ack_rx.recv() => {
                    let ack = Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None);
                    if let Err(e) = encode_from_client(ack, &mut connection.wbuf) {
                        break protocol(&connection.url, e.to_string());
                    }
                }
                () = shared.arrived.notified(), if room => {}
                () = tokio::time::sleep_until(ping_due.into()) => {
                    if let Err(e) = encode_from_client(Packet::PingReq(PingReq), &mut connection.wbuf) {
                        break protocol(&connection.url, e.to_string());
                    }
                }
                () = tokio::time::sleep_until(subscribe_by.into()), if !connection.subscribed => {
                    break UplinkError::Timeout {
                        url: connection.url.clone(),
                        stage: "SUBACK",
                        timeout: self.dialer.timeout,
                    };
                }
                () = tokio::time::sleep_until(silent_since.into()) => {
                    break UplinkError::Connection {
                        url: connection.url.clone(),
                        reason: "keepalive_timeout",
                        detail: format!("nothing from the upstream for {:?}", self.keepalive * 3 / 2),
                    };
                }
            }
        };
        // A last word, so the upstream need not wait for the keepalive to notice.
        let mut bye = BytesMut::new();
        let disconnect = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        if encode_from_client(Packet::Disconnect(disconnect, None), &mut bye).is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(200), writer.write_all(&bye)).await;
        }
        self.ended(shared, end)
    }

    /// What every end of a session does: the outbox goes out again from its oldest.
    fn ended(&self, shared: &Shared, end: UplinkError) -> UplinkError {
        shared.outbox().rewind();
        end
    }
}

/// One connection's state.
struct Connection {
    url: String,
    wbuf: BytesMut,
    /// Packet id → outbox entry, of the PUBLISHes not yet acknowledged.
    inflight: HashMap<u16, u64>,
    next_pkid: u16,
    /// The SUBACK came (or nothing was to be subscribed).
    subscribed: bool,
}

impl Connection {
    /// Moves outbox entries into the write buffer while the inflight window has room.
    fn fill(&mut self, shared: &Shared, max_inflight: usize) {
        if self.inflight.len() >= max_inflight {
            return;
        }
        let mut outbox = shared.outbox();
        while self.inflight.len() < max_inflight {
            let Some(entry) = outbox.next_unsent() else { break };
            let pkid = self.issue_pkid();
            let publish = OutgoingPublish {
                topic: &entry.message.topic,
                payload: &entry.message.payload,
                qos: QoS::AtLeastOnce,
                pkid,
                dup: false,
                retain: false,
                // The uplink speaks MQTT 3.1.1: MQTT 5 properties do not travel upstream.
                topic_alias: None,
                message_expiry: None,
                subscription_ids: &[],
                properties: &[],
            };
            if encode_publish(&publish, Version::V311, &mut self.wbuf).is_err() {
                // Cannot happen: the intake keeps topics MQTT can frame, and the local broker took
                // no packet larger than MQTT can frame. Were it to, the entry stays in the outbox,
                // counted in its depth, rather than stop the others.
                tracing::error!(topic = %entry.message.topic, "cannot encode a PUBLISH for the upstream");
            }
            self.inflight.insert(pkid, entry.seq);
        }
    }

    fn issue_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    /// Handles a packet from the upstream; a PUBLISH comes back to be delivered locally.
    fn on_packet(
        &mut self,
        packet: FromServer,
        shared: &Shared,
        subscriptions: &[String],
    ) -> Result<Option<Downstream>, UplinkError> {
        match packet {
            FromServer::PubAck(pkid) => {
                if let Some(seq) = self.inflight.remove(&pkid) {
                    if shared.outbox().acknowledged(seq) {
                        shared.forwarded();
                    }
                }
            }
            FromServer::Publish(publish) => {
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    return Err(protocol(&self.url, "a PUBLISH topic is not UTF-8".into()));
                };
                return Ok(Some(Downstream {
                    topic: topic.into(),
                    payload: publish.payload,
                    ack: (publish.qos != QoS::AtMostOnce).then_some(publish.pkid),
                }));
            }
            FromServer::SubAck(_, granted) => {
                if !self.subscribed {
                    self.subscribed = true;
                    let refused: Vec<&str> = subscriptions
                        .iter()
                        .zip(granted.iter().chain(std::iter::repeat(&false)))
                        .filter(|(_, ok)| !**ok)
                        .map(|(filter, _)| filter.as_str())
                        .collect();
                    shared.connected(&self.url, &refused);
                }
            }
            FromServer::PingResp => {}
            FromServer::ConnAck(..) => return Err(protocol(&self.url, "a second CONNACK".into())),
            FromServer::Unexpected(name) => return Err(protocol(&self.url, format!("unexpected {name}"))),
        }
        Ok(None)
    }
}

fn io(url: &str, error: &std::io::Error) -> UplinkError {
    UplinkError::Connection {
        url: url.to_owned(),
        reason: "io_error",
        detail: error.to_string(),
    }
}

fn closed(url: &str) -> UplinkError {
    UplinkError::Connection {
        url: url.to_owned(),
        reason: "peer_closed",
        detail: "the upstream closed the connection".into(),
    }
}

fn protocol(url: &str, detail: String) -> UplinkError {
    UplinkError::Connection {
        url: url.to_owned(),
        reason: "protocol_error",
        detail,
    }
}
