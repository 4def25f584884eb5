//! What a fleet identity *is*, in one place, so the provisioning tool, the broker and the device
//! agent can never disagree about it.
//!
//! - [`DeviceId`]: the only way to hold a device (or service) id is to parse one, and parsing
//!   enforces the rules that make an id exactly one MQTT topic level.
//! - [`Identity`]: the role and id carried by a certificate, read with [`Identity::from_der`].
//! - [`pem`]: loading certificates, keys and CRLs with errors that name the file.
//! - [`tls`]: rustls configurations with this project's security defaults.
//! - [`renewal`]: the certificate renewal protocol's topics, payloads and error codes.
//!
//! ```
//! use fleet_identity::{DeviceId, Role};
//! let id: DeviceId = "sensor-0042".parse().unwrap();
//! assert_eq!(id.as_str(), "sensor-0042");
//! assert_eq!(Role::Device.san_uri(&id), "urn:device:sensor-0042");
//! assert!("dev/1".parse::<DeviceId>().is_err());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod broker_url;
mod device_id;
mod identity;
pub mod pem;
pub mod renewal;
mod serial;
pub mod tls;

pub use broker_url::{BrokerUrl, BrokerUrlError, DEFAULT_MQTTS_PORT};
pub use device_id::{DeviceId, DeviceIdError, MAX_ID_LEN};
pub use identity::{sha256_hex, CertificateSummary, Identity, IdentityError, Role};
pub use serial::Serial;
