//! The device agent: presents the device's factory-provisioned certificate, trusts only the
//! pinned broker CA, carries messages both ways, reconnects with backoff and jitter, and never
//! silently loses a message (an on-disk queue holds every QoS 1 message until acknowledged),
//! and renews its own certificate before it expires, with a key generated on the device.
//!
//! Kept small on purpose: rumqttc with rustls and ring, no rcgen (CSRs are built by
//! [`keygen`]), no SQLite, nothing from the broker or the provisioning tool.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod check;
pub mod config;
pub mod diagnosis;
pub mod fault;
pub mod identity_files;
pub mod input;
pub mod keygen;
pub mod outbound;
pub mod queue;
pub mod renewal;
pub mod session;
pub mod trust;
