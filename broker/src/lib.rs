//! The gateway broker: only certified devices get in, each confined to its own topics.
//!
//! The broker terminates mutual TLS itself (tokio-rustls, CRL-aware, hot-reloadable), binds the
//! MQTT client id to the certificate's identity, checks every PUBLISH and SUBSCRIBE against
//! topic templates, and hands authorised traffic to rumqttd's router through local links. See
//! `shared/design/broker.md` for why rumqttd's own TLS listener is not used.
//!
//! Module map: [`listener`] (accept loop, limits, shutdown) → [`session`] (one connection's life:
//! handshake, CONNECT, close) → `pump` (its packets both ways), using [`tls`] / [`reload`] (TLS
//! material and its hot swap), [`live`] (revocation kicks and takeover), [`acl`], [`codec`],
//! [`link`] and [`router`]; [`audit`] and [`metrics`] record every decision.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acl;
pub mod audit;
pub mod codec;
pub mod config;
pub mod link;
pub mod listener;
pub mod live;
pub mod metrics;
mod pump;
pub mod reload;
pub mod router;
pub mod session;
pub mod tls;

pub use config::BrokerConfig;
pub use listener::{Broker, StartError};
