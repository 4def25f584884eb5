//! Whom the agent trusts, and by which clock.
//!
//! The root store holds only the configured broker CA(s): never system or webpki roots. The
//! broker's name is verified. Optional SPKI pins narrow it further to specific broker keys. On a
//! device without a real-time clock, a clock earlier than the agent's build time is replaced by
//! the build time, so a valid broker is never refused because the clock says 1970.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_identity::{pem, tls, Identity, Role};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::ClientConfig;

use crate::config::Agent;

/// When this agent was built (Unix seconds): the floor for the clock.
pub fn build_time() -> u64 {
    env!("DEVICE_AGENT_BUILD_UNIX").parse().unwrap_or(0)
}

/// A clock that never reads earlier than a floor.
#[derive(Debug)]
pub struct FlooredClock {
    floor: u64,
    now: fn() -> u64,
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl FlooredClock {
    /// The system clock, floored at the build time.
    pub fn system() -> Self {
        Self {
            floor: build_time(),
            now: system_now,
        }
    }

    /// `now`, floored at `floor` (tests inject both).
    pub fn new(floor: u64, now: fn() -> u64) -> Self {
        Self { floor, now }
    }

    /// Whether the underlying clock reads earlier than the floor.
    pub fn is_behind(&self) -> bool {
        (self.now)() < self.floor
    }

    /// The time certificates are judged against, Unix seconds.
    pub fn seconds(&self) -> u64 {
        (self.now)().max(self.floor)
    }
}

impl TimeProvider for FlooredClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(self.seconds())))
    }
}

/// Why the device's own files are unusable.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A PEM file.
    #[error(transparent)]
    Pem(#[from] pem::PemError),
    /// The device certificate carries no valid device identity.
    #[error("{}: {reason}", path.display())]
    Identity {
        /// The certificate file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS configuration could not be built (key does not match, CA unusable).
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("server_name {0:?} is not a DNS name or IP address")]
    ServerName(String),
}

/// The agent's crypto provider: ring (small, portable to ARM cross compilers), restricted to
/// TLS 1.3 and ECDHE + AEAD TLS 1.2 suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    tls::hardened_provider(rustls::crypto::ring::default_provider())
}

/// Reads the device's identity from its certificate: it must be a device certificate.
pub fn device_identity(cert_path: &Path) -> Result<(Identity, CertificateDer<'static>), LocalError> {
    let cert = pem::load_certs(cert_path)?.remove(0);
    Ok((identity_of(cert_path, &cert)?, cert))
}

/// The device identity in `cert` (read from `cert_path`, named in errors).
fn identity_of(cert_path: &Path, cert: &CertificateDer<'_>) -> Result<Identity, LocalError> {
    let bad = |reason: String| LocalError::Identity {
        path: cert_path.to_owned(),
        reason,
    };
    let identity = Identity::from_der(cert).map_err(|e| bad(e.to_string()))?;
    if identity.role != Role::Device {
        return Err(bad(format!(
            "this is a {} certificate, not a device certificate",
            identity.role
        )));
    }
    Ok(identity)
}

/// What the device presents and trusts, read from its files once.
pub struct Credentials {
    /// The device's identity, from its certificate.
    pub identity: Identity,
    /// The device certificate (the leaf).
    pub cert: CertificateDer<'static>,
    /// The TLS client configuration presenting it.
    pub tls: Arc<ClientConfig>,
}

/// Loads the device's certificate chain and key, the pinned broker CA(s) and pins: the identity
/// to connect as and the rustls configuration, validated against `clock`.
pub fn load_credentials(agent: &Agent, clock: Arc<FlooredClock>) -> Result<Credentials, LocalError> {
    load_credentials_from(agent, clock, &agent.config.cert, &agent.config.key)
}

/// Like [`load_credentials`], presenting the certificate and key in `cert_path` and `key_path`
/// (a renewed pair not yet committed).
pub fn load_credentials_from(
    agent: &Agent,
    clock: Arc<FlooredClock>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Credentials, LocalError> {
    let chain = pem::load_certs(cert_path)?;
    let cert = chain[0].clone();
    let identity = identity_of(cert_path, &cert)?;
    let tls = client_config(agent, clock, chain, key_path)?;
    Ok(Credentials { identity, cert, tls })
}

fn client_config(
    agent: &Agent,
    clock: Arc<FlooredClock>,
    chain: Vec<CertificateDer<'static>>,
    key_path: &Path,
) -> Result<Arc<ClientConfig>, LocalError> {
    let provider = crypto_provider();
    let roots = pem::load_certs(&agent.config.ca)?;
    let server_name = ServerName::try_from(agent.server_name.clone())
        .map_err(|_| LocalError::ServerName(agent.server_name.clone()))?;
    let verifier = Arc::new(tls::PinnedBrokerVerifier::new(
        provider.clone(),
        &roots,
        Some(server_name),
        agent.config.pin_sha256.clone(),
    )?);
    let key = pem::load_key(key_path)?;
    Ok(Arc::new(tls::client_config(provider, clock, verifier, chain, key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_before_the_build_time_reads_the_build_time() {
        let clock = FlooredClock::new(1_800_000_000, || 0);
        assert!(clock.is_behind());
        assert_eq!(clock.seconds(), 1_800_000_000);
        let clock = FlooredClock::new(1_800_000_000, || 1_900_000_000);
        assert!(!clock.is_behind());
        assert_eq!(clock.seconds(), 1_900_000_000);
    }

    #[test]
    fn the_build_time_is_recorded() {
        assert!(build_time() > 1_700_000_000);
    }
}
