//! The gateway broker: only certified devices get in, each confined to its own topics.
//!
//! The broker terminates mutual TLS itself (rustls, CRL-aware, hot-reloadable), binds the
//! MQTT client id to the certificate's identity, checks every PUBLISH and SUBSCRIBE against
//! topic templates, and routes messages with its own [`router`], which bounds every queue and
//! slows publishers down rather than lose a QoS 1/2 message, and keeps persistent sessions and
//! retained messages in a durable [`store`] that acknowledges only what is on disk. rumqttd is used only as the MQTT
//! packet codec ([`codec`]); its own TLS listener is not used because it cannot bind a client id
//! to a certificate, check revocation or bound a handshake's time, and its router because its
//! memory grows with every message routed.
//!
//! Why things are where they are, in one place each: how routing, flow control and the bounds
//! work, and how durable sessions, MQTT 5 and a bridge fit into them, is in [`router`]; why TLS
//! runs through rustls's unbuffered API is in [`connection`]; why a connection taken over closes
//! after its successor's CONNACK is in [`kick`] and `session`.
//!
//! Module map. The front: [`listener`] (accept loop, limits, shutdown) → [`session`] (one
//! connection's life) → [`handshake`] → [`connect`] (CONNECT, identity binding, the router
//! session) → [`pump`] (packets both ways), over [`connection`] (framing, buffers) and
//! [`codec`]. Beside it: [`tls`] / [`crl`] / [`reload`] (TLS material, the CRLs believed, and
//! their hot swap), [`live`]
//! (revocation and shutdown reach connected sessions through a [`kick`]), [`acl`] over
//! [`topic`]. The [`router`] is behind a small typed API and knows nothing of certificates; it
//! carries [`message`]s and records what must survive a restart in the [`store`], whose
//! watermark the [`pump`] waits for before it acknowledges.
//! [`audit`] and [`metrics`] record every decision, in the words of [`reason`]. The [`bridge`]
//! is a client of the router and the store: it forwards to an upstream broker and back.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acl;
pub mod audit;
pub mod bridge;
pub mod codec;
pub mod config;
pub mod connect;
pub mod connection;
pub mod context;
pub mod crl;
pub mod handshake;
pub mod kick;
pub mod listener;
pub mod live;
pub mod message;
pub mod metrics;
pub mod pump;
pub mod reason;
pub mod reload;
pub mod router;
pub mod session;
pub mod store;
pub mod tls;
pub mod topic;
pub mod will;

pub use config::BrokerConfig;
pub use listener::{Broker, StartError};
