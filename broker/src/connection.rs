//! A client's connection as MQTT packets: the TLS stream, a read buffer that packets are decoded
//! from and a write buffer that packets are encoded into. The only place that moves bytes
//! between the socket and packets.
//!
//! Both buffers start empty, grow with traffic and are given back while the client is quiet,
//! so an idle session holds no buffer of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttd::protocol::Packet;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::codec::{self, FrameError, Inbound, OutgoingPublish};

/// The TLS stream of a client connection.
pub type Tls = TlsStream<TcpStream>;

/// Read buffer growth step while the client is sending.
const READ_CHUNK: usize = 4096;
/// Read buffer while waiting on a quiet client: enough for a PINGREQ or a small PUBLISH.
const IDLE_READ: usize = 64;

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a valid packet.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The client closed the connection.
    #[error("connection closed")]
    Closed,
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A client connection, framed.
pub struct Connection {
    stream: Tls,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes handed to TLS that may still sit in its buffer.
    unflushed: bool,
    max_packet_bytes: usize,
}

impl Connection {
    /// Frames `stream`, refusing packets larger than `max_packet_bytes`.
    pub fn new(stream: Tls, max_packet_bytes: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            unflushed: false,
            max_packet_bytes,
        }
    }

    /// The TLS stream (for its negotiated parameters).
    pub fn tls(&self) -> &Tls {
        &self.stream
    }

    /// The next packet among the bytes already read, if a whole one is there.
    pub fn next_packet(&mut self) -> Result<Option<Inbound>, FrameError> {
        codec::decode(&mut self.rbuf, self.max_packet_bytes)
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

    /// Reads whatever bytes have arrived into the read buffer; `Ok(0)` when the client closed.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let read = poll_once(self.stream.read_buf(&mut self.rbuf), cx);
        if read.is_pending() && self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_READ {
            // Quiet: give the buffer back. The waker is registered; the next bytes go here.
            self.rbuf = BytesMut::with_capacity(IDLE_READ);
        }
        read
    }

    /// Encodes a control packet (anything but PUBLISH) for writing.
    pub fn queue(&mut self, packet: Packet) -> Result<(), FrameError> {
        codec::encode(packet, &mut self.wbuf)
    }

    /// Encodes a PUBLISH for writing.
    pub fn queue_publish(&mut self, publish: &OutgoingPublish<'_>) {
        codec::encode_publish(publish, &mut self.wbuf);
    }

    /// Bytes encoded and not yet handed to TLS.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes what is queued and flushes TLS. Ready(Ok(true)) if anything was written, Ready(Ok(false))
    /// if there was nothing to write, Pending while the socket is full.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let mut wrote = false;
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    self.unflushed = true;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if wrote => return Poll::Ready(Ok(true)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if wrote => return Poll::Ready(Ok(true)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.wbuf.capacity() > 0 {
            // Everything is out: an idle session holds no write buffer.
            self.wbuf = BytesMut::new();
        }
        Poll::Ready(Ok(wrote))
    }

    /// Writes `packet` and everything queued before it, now.
    pub async fn write_now(&mut self, packet: Packet) -> std::io::Result<()> {
        self.queue(packet).map_err(std::io::Error::other)?;
        while std::future::poll_fn(|cx| self.poll_write(cx)).await? {}
        Ok(())
    }

    /// Sends TLS close_notify and closes, giving up after `limit`.
    pub async fn close(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while std::future::poll_fn(|cx| self.poll_write(cx)).await? {}
            self.stream.shutdown().await
        })
        .await;
    }
}

/// Polls a future once, in the caller's context.
fn poll_once<F: Future>(future: F, cx: &mut Context<'_>) -> Poll<F::Output> {
    std::pin::pin!(future).poll(cx)
}
