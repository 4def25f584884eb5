//! The operator's side of the fleet PKI: creating the two CAs, minting device, service and
//! broker certificates (one at a time or by the thousand), signing CSRs, revoking, and the
//! inventory of everything issued. The `provision` binary is a thin CLI over this library; the
//! demo and the tests use the same code paths.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod broker_bundle;
pub mod csr;
pub mod error;
pub mod fault;
pub mod issue;
pub mod key_type;
pub mod output;
pub mod parallel;
pub mod pki;
pub mod profile;
pub mod registry;
pub mod renewal;
pub mod revocation;
pub mod serial;
pub mod serve;
pub mod staging;
pub mod validity;

pub use error::{Error, Result};
