//! A client's connection as MQTT packets over TLS: the TCP socket, rustls's *unbuffered*
//! connection, and four buffers that this type owns: TLS records read and not yet decrypted,
//! plaintext decrypted and not yet decoded, packets encoded and not yet encrypted, and TLS
//! records not yet written. The only place that moves bytes between the socket and packets.
//!
//! Why rustls's unbuffered API: its buffered connection keeps a 4 KiB read buffer for the life
//! of every connection, the largest single cost of an idle session. Here every buffer starts
//! empty, grows with traffic and is given back while the client is quiet, so an idle session
//! holds only rustls's keys and state.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::codec::{self, FrameError, Inbound, Outbound, OutgoingPublish, Version};

/// The most read from the socket at once: a whole TLS record (at most 16 KiB and its framing).
const READ_CHUNK: usize = 17 * 1024;
/// Room for the TLS framing of each record: header, content type, AEAD tag (and TLS 1.2's
/// explicit nonce).
const RECORD_OVERHEAD: usize = 64;
/// The largest plaintext in one TLS record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// Why the TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// rustls refused the peer (its certificate, or the protocol).
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client closed the connection before the handshake finished.
    #[error("the client closed the connection during the TLS handshake")]
    Closed,
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a valid packet.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The client closed the connection.
    #[error("connection closed")]
    Closed,
    /// The socket or TLS failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A client connection, framed.
pub struct Connection {
    tcp: TcpStream,
    /// Boxed: rustls's connection state is about a kilobyte, and keeping it out of the
    /// session's task lets the task be allocated small.
    tls: Box<UnbufferedServerConnection>,
    /// TLS records read from the socket, not yet decrypted.
    tls_in: BytesMut,
    /// TLS records to write to the socket.
    tls_out: BytesMut,
    /// Plaintext decrypted, not yet decoded into packets.
    rbuf: BytesMut,
    /// Packets encoded, not yet encrypted.
    wbuf: BytesMut,
    /// The client sent close_notify, or closed the socket.
    peer_closed: bool,
    /// rustls failed: nothing more is read or sent but its alert.
    failed: bool,
    max_packet_bytes: usize,
    /// The MQTT version, once the CONNECT has said it.
    version: Option<Version>,
}

/// What the handshake needs next.
enum HandshakeStep {
    /// More TLS bytes from the client.
    Read,
    /// The handshake is over.
    Done,
}

impl Connection {
    /// Runs the server side of the TLS handshake on `tcp`. Packets larger than
    /// `max_packet_bytes` will be refused.
    pub async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        max_packet_bytes: usize,
    ) -> Result<Self, HandshakeError> {
        let mut conn = Self {
            tcp,
            tls: Box::new(UnbufferedServerConnection::new(config)?),
            tls_in: BytesMut::new(),
            tls_out: BytesMut::new(),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            peer_closed: false,
            failed: false,
            max_packet_bytes,
            version: None,
        };
        loop {
            let step = match conn.handshake_step() {
                Ok(step) => step,
                Err(e) => {
                    // rustls queued an alert for the client: send it, best effort.
                    conn.drain_alert();
                    let _ = conn.flush_tls().await;
                    return Err(e.into());
                }
            };
            conn.flush_tls().await?;
            match step {
                HandshakeStep::Done => return Ok(conn),
                HandshakeStep::Read => {
                    conn.tls_in.reserve(4096);
                    if conn.tcp.read_buf(&mut conn.tls_in).await? == 0 {
                        return Err(HandshakeError::Closed);
                    }
                }
            }
        }
    }

    /// Processes what the client sent during the handshake (a CONNECT right behind its
    /// Finished is decrypted too, and waits in the packet buffer).
    fn handshake_step(&mut self) -> Result<HandshakeStep, rustls::Error> {
        self.process(false)?;
        Ok(if self.tls.is_handshaking() {
            HandshakeStep::Read
        } else {
            HandshakeStep::Done
        })
    }

    /// Encodes what rustls still has to say (a fatal alert after an error). Only while it has
    /// records queued: each call then hands one over before it would look at the input again,
    /// which after an error it must not.
    fn drain_alert(&mut self) {
        while self.tls.wants_write() {
            let UnbufferedStatus { discard, state } = self.tls.process_tls_records(&mut self.tls_in[..]);
            let encoded = match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.tls_out, records_for(1024), |out| {
                        encode.encode(out).map_err(encode_size)
                    })
                    .is_ok()
                }
                _ => false,
            };
            self.tls_in.advance(discard);
            if !encoded {
                return;
            }
        }
    }

    /// Writes every pending TLS record.
    async fn flush_tls(&mut self) -> std::io::Result<()> {
        while !self.tls_out.is_empty() {
            let n = self.tcp.write(&self.tls_out).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.tls_out.advance(n);
        }
        if self.tls_out.capacity() > 0 {
            self.tls_out = BytesMut::new();
        }
        Ok(())
    }

    /// The TLS version negotiated.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.tls.protocol_version()
    }

    /// The MQTT version the client's CONNECT named (3.1.1 until then, for refusals).
    pub fn version(&self) -> Version {
        self.version.unwrap_or(Version::V311)
    }

    /// The next packet among the bytes already read, if a whole one is there. A CONNECT fixes
    /// the version every later packet is read and written in.
    pub fn next_packet(&mut self) -> Result<Option<Inbound>, FrameError> {
        let packet = codec::decode(&mut self.rbuf, self.max_packet_bytes, self.version);
        if let (None, Ok(Some(Inbound::Connect(connect)))) = (self.version, &packet) {
            self.version = Some(connect.version);
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        packet
    }

    /// Whether the next packet among the bytes read is a PUBLISH (by its first byte).
    pub fn next_is_publish(&self) -> bool {
        self.rbuf.first().is_some_and(|byte| byte >> 4 == 3)
    }

    /// Reads the next packet, waiting for bytes as needed.
    pub async fn read_packet(&mut self) -> Result<Inbound, ReadError> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            if std::future::poll_fn(|cx| self.poll_read(cx)).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Reads and decrypts what the client sent into the packet buffer: the number of plaintext
    /// bytes added, `Ok(0)` once the client has closed.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(std::io::Error::other("the TLS connection failed")));
        }
        loop {
            let added = self.process(false).map_err(std::io::Error::other)?;
            if added > 0 {
                return Poll::Ready(Ok(added));
            }
            if self.peer_closed {
                return Poll::Ready(Ok(0));
            }
            // Read into the stack and keep only what arrived: a quiet session holds no read
            // buffer, and a burst is read in as few calls as the socket allows.
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.peer_closed = true,
                Poll::Ready(Ok(())) => self.tls_in.extend_from_slice(read.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.tls_in.is_empty() && self.tls_in.capacity() > 0 {
                        self.tls_in = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Runs rustls over the TLS records read so far: decrypts application data into the packet
    /// buffer, encodes what rustls has to send itself (a key update), and, with `encrypt`, encrypts
    /// the queued packets once it may. Returns the plaintext bytes added.
    fn process(&mut self, encrypt: bool) -> Result<usize, rustls::Error> {
        let processed = self.process_records(encrypt);
        if processed.is_err() {
            self.failed = true;
        }
        processed
    }

    fn process_records(&mut self, encrypt: bool) -> Result<usize, rustls::Error> {
        let mut added = 0;
        loop {
            let UnbufferedStatus { mut discard, state } = self.tls.process_tls_records(&mut self.tls_in[..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // The discard is owed even now.
                    self.tls_in.advance(discard);
                    return Err(e);
                }
            };
            let more = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        self.rbuf.extend_from_slice(record.payload);
                        added += record.payload.len();
                    }
                    true
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.tls_out, records_for(1024), |out| {
                        encode.encode(out).map_err(encode_size)
                    })?;
                    true
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Written in order with everything else in `tls_out`.
                    transmit.done();
                    true
                }
                // Edge-triggered: what follows says whether we may still send.
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    true
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if encrypt && !self.wbuf.is_empty() {
                        let plaintext = &self.wbuf[..];
                        encode_into(&mut self.tls_out, records_for(plaintext.len()), |out| {
                            traffic.encrypt(plaintext, out).map_err(encrypt_size)
                        })?;
                        // Sent: an idle session holds no write buffer.
                        self.wbuf = BytesMut::new();
                    }
                    false
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    false
                }
                _ => false,
            };
            self.tls_in.advance(discard);
            if !more {
                if encrypt && !self.wbuf.is_empty() {
                    return Err(rustls::Error::General("the TLS connection can no longer send".into()));
                }
                return Ok(added);
            }
        }
    }

    /// Encodes a control packet (anything but PUBLISH) for writing.
    pub fn queue(&mut self, packet: &Outbound<'_>) -> Result<(), FrameError> {
        codec::encode(packet, self.version(), &mut self.wbuf)
    }

    /// Encodes a PUBLISH for writing.
    pub fn queue_publish(&mut self, publish: &OutgoingPublish<'_>) -> Result<(), FrameError> {
        codec::encode_publish(publish, self.version(), &mut self.wbuf)
    }

    /// Bytes encoded and not yet written.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len() + self.tls_out.len()
    }

    /// Encrypts what is queued and writes it. Ready(Ok(true)) if anything was written (or, while
    /// encrypting, client data decrypted), Ready(Ok(false)) if there was nothing to do, Pending
    /// while the socket is full.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let mut wrote = false;
        if !self.wbuf.is_empty() {
            wrote = self.process(true).map_err(std::io::Error::other)? > 0;
        }
        while !self.tls_out.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.tls_out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.tls_out.advance(n);
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if wrote => return Poll::Ready(Ok(true)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.tls_out.capacity() > 0 {
            // Everything is out: an idle session holds no write buffer.
            self.tls_out = BytesMut::new();
        }
        Poll::Ready(Ok(wrote))
    }

    /// Writes `packet` and everything queued before it, now.
    pub async fn write_now(&mut self, packet: &Outbound<'_>) -> std::io::Result<()> {
        self.queue(packet).map_err(std::io::Error::other)?;
        while std::future::poll_fn(|cx| self.poll_write(cx)).await? {}
        Ok(())
    }

    /// Sends what is queued and TLS close_notify (or, after a TLS failure, rustls's alert),
    /// and shuts the socket's sending side, giving up after `limit`. See [`Connection::linger`].
    pub async fn close(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            if self.failed {
                self.drain_alert();
            } else {
                while std::future::poll_fn(|cx| self.poll_write(cx)).await? {}
                self.queue_close_notify();
            }
            self.flush_tls().await?;
            self.tcp.shutdown().await
        })
        .await;
    }

    /// After [`Connection::close`]: reads and discards what the client still sends until it
    /// closes too (at most `limit`), then lets the socket go. A socket closed with unread bytes
    /// makes the kernel send a reset, which can destroy the last packets (an MQTT 5 DISCONNECT
    /// with its reason code) before the client has read them.
    pub async fn linger(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            let mut sink = [0u8; 4096];
            while self.tcp.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    }

    /// Encodes close_notify, after whatever rustls still has to send itself.
    fn queue_close_notify(&mut self) {
        loop {
            let UnbufferedStatus { discard, state } = self.tls.process_tls_records(&mut self.tls_in[..]);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.tls_out, records_for(1024), |out| {
                        encode.encode(out).map_err(encode_size)
                    })
                    .is_ok()
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    true
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let _ = encode_into(&mut self.tls_out, RECORD_OVERHEAD, |out| {
                        traffic.queue_close_notify(out).map_err(encrypt_size)
                    });
                    false
                }
                // Closed already, or the client's data still to read: no close_notify then.
                _ => false,
            };
            self.tls_in.advance(discard);
            if !more {
                return;
            }
        }
    }
}

/// The space a refused encoding asked for, or the error it really was.
enum Refused<E> {
    NeedSpace(usize),
    Failed(E),
}

fn encode_size(e: EncodeError) -> Refused<rustls::Error> {
    match e {
        EncodeError::InsufficientSize(size) => Refused::NeedSpace(size.required_size),
        other => Refused::Failed(rustls::Error::General(other.to_string())),
    }
}

fn encrypt_size(e: EncryptError) -> Refused<rustls::Error> {
    match e {
        EncryptError::InsufficientSize(size) => Refused::NeedSpace(size.required_size),
        other => Refused::Failed(rustls::Error::General(other.to_string())),
    }
}

/// Room for the records that carry `plaintext` bytes.
fn records_for(plaintext: usize) -> usize {
    plaintext + RECORD_OVERHEAD * (plaintext / MAX_FRAGMENT + 1)
}

/// Appends what `write` writes to `buf`, starting with `room` bytes and growing as rustls asks.
fn encode_into(
    buf: &mut BytesMut,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Refused<rustls::Error>>,
) -> Result<(), rustls::Error> {
    let start = buf.len();
    loop {
        buf.resize(start + room, 0);
        match write(&mut buf[start..]) {
            Ok(written) => {
                buf.truncate(start + written);
                return Ok(());
            }
            Err(Refused::NeedSpace(size)) => room = size,
            Err(Refused::Failed(e)) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
}
