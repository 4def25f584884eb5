//! `agent.toml`: the file `provision device` writes, plus `DEVICE_AGENT__*` environment overrides.

use std::path::{Path, PathBuf};

use fleet_identity::BrokerUrl;
use serde::Deserialize;

/// The agent's configuration. Paths are relative to the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `mqtts://HOST:PORT`.
    pub broker_url: String,
    /// The name the broker's certificate must carry (defaults to the URL's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Broker CA bundle: the only trust anchors (several allowed, for a CA rollover).
    pub ca: PathBuf,
    /// This device's certificate.
    pub cert: PathBuf,
    /// This device's private key.
    pub key: PathBuf,
    /// Optional leaf pins: base64 SHA-256 of the broker certificate's SubjectPublicKeyInfo.
    #[serde(default)]
    pub pin_sha256: Vec<String>,
    /// MQTT keepalive, seconds. Default 30.
    #[serde(default = "defaults::keep_alive_s")]
    pub keep_alive_s: u64,
    /// Where unacknowledged messages are kept. Default `queue` beside the config file.
    #[serde(default = "defaults::queue_dir")]
    pub queue_dir: PathBuf,
    /// Most messages kept; beyond it the oldest are dropped and counted. Default 10000.
    #[serde(default = "defaults::queue_max_messages")]
    pub queue_max_messages: usize,
    /// Smallest reconnect delay, ms. Default 500.
    #[serde(default = "defaults::backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Largest reconnect delay, ms. Default 60000.
    #[serde(default = "defaults::backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Heartbeat period, seconds (0 turns it off). Default 60.
    #[serde(default = "defaults::heartbeat_s")]
    pub heartbeat_s: u64,
    /// The largest MQTT packet sent or accepted, bytes: set it to the broker's
    /// `limits.max_packet_bytes` (default 262144, the broker's default). A message whose PUBLISH
    /// would be larger is refused before it is queued; see [`crate::outbound`] and
    /// [`crate::session::mqtt_options`] for how each direction is measured.
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Certificate renewal ([`crate::renewal`]).
    #[serde(default)]
    pub renewal: RenewalConfig,
}

/// `[renewal]`: when and how the agent renews its certificate by itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenewalConfig {
    /// Renew once this fraction of the certificate's validity has passed. Default 2/3: the
    /// issuer's default window opens there.
    pub renew_after: f64,
    /// Plus a random share of the validity up to this fraction, drawn once per certificate, so
    /// a fleet issued together does not ask together. Default 0.1.
    pub jitter: f64,
    /// How long to wait for the issuer's reply, seconds. Default 30.
    pub reply_timeout_s: u64,
    /// Shortest wait before asking again after a failure, seconds. Default 60 (the issuer's
    /// default rate limit).
    pub retry_min_s: u64,
    /// Longest wait before asking again, seconds; also the wait after a refusal that needs an
    /// operator. Default 3600.
    pub retry_max_s: u64,
    /// The new key's type. Default ecdsa-p256.
    pub key_type: crate::keygen::KeyType,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            renew_after: 2.0 / 3.0,
            jitter: 0.1,
            reply_timeout_s: 30,
            retry_min_s: 60,
            retry_max_s: 3600,
            key_type: crate::keygen::KeyType::EcdsaP256,
        }
    }
}

/// The smallest `max_packet_bytes`: room for the CONNECT, the command subscription and the
/// heartbeat of a device with the longest id (each under 300 bytes), with margin.
pub const MIN_PACKET_BYTES: usize = 1024;

/// The largest `max_packet_bytes`: the largest remaining length MQTT can frame.
pub const MAX_PACKET_BYTES: usize = 268_435_455;

mod defaults {
    use std::path::PathBuf;
    pub fn keep_alive_s() -> u64 {
        30
    }
    pub fn queue_dir() -> PathBuf {
        PathBuf::from("queue")
    }
    pub fn queue_max_messages() -> usize {
        10_000
    }
    pub fn backoff_min_ms() -> u64 {
        500
    }
    pub fn backoff_max_ms() -> u64 {
        60_000
    }
    pub fn heartbeat_s() -> u64 {
        60
    }
    pub fn max_packet_bytes() -> usize {
        256 * 1024
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable or malformed.
    #[error("{}: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The config crate's reason.
        source: config::ConfigError,
    },
    /// A value is unusable.
    #[error("{}: {field}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// A loaded configuration with the URL parsed and paths resolved.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The settings.
    pub config: AgentConfig,
    /// The parsed broker URL.
    pub broker: BrokerUrl,
    /// The name to verify on the broker's certificate.
    pub server_name: String,
}

impl Agent {
    /// Loads `path` and `DEVICE_AGENT__*` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: AgentConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("DEVICE_AGENT")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|source| ConfigError::Load {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        let broker: BrokerUrl = config
            .broker_url
            .parse()
            .map_err(|e: fleet_identity::BrokerUrlError| invalid("broker_url", e.to_string()))?;
        if config.backoff_min_ms == 0 || config.backoff_max_ms < config.backoff_min_ms {
            return Err(invalid(
                "backoff_min_ms/backoff_max_ms",
                "need 0 < backoff_min_ms <= backoff_max_ms".into(),
            ));
        }
        if config.queue_max_messages == 0 {
            return Err(invalid("queue_max_messages", "must be at least 1".into()));
        }
        if !(MIN_PACKET_BYTES..=MAX_PACKET_BYTES).contains(&config.max_packet_bytes) {
            return Err(invalid(
                "max_packet_bytes",
                format!(
                    "{} is outside {MIN_PACKET_BYTES}..={MAX_PACKET_BYTES}: set it to the broker's limits.max_packet_bytes",
                    config.max_packet_bytes
                ),
            ));
        }
        let renewal = &config.renewal;
        if !(renewal.renew_after > 0.0 && renewal.jitter >= 0.0 && renewal.renew_after + renewal.jitter < 1.0) {
            return Err(invalid(
                "renewal.renew_after/renewal.jitter",
                "need 0 < renew_after and 0 <= jitter with renew_after + jitter < 1 (fractions of the validity)".into(),
            ));
        }
        if renewal.reply_timeout_s == 0 || renewal.retry_min_s == 0 || renewal.retry_max_s < renewal.retry_min_s {
            return Err(invalid(
                "renewal.reply_timeout_s/retry_min_s/retry_max_s",
                "need reply_timeout_s > 0 and 0 < retry_min_s <= retry_max_s".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut config.ca, &mut config.cert, &mut config.key, &mut config.queue_dir] {
            *file = base.join(&*file);
        }
        let server_name = config.server_name.clone().unwrap_or_else(|| broker.host.clone());
        Ok(Self {
            config,
            broker,
            server_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(extra: &str) -> Result<Agent, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "broker_url = \"mqtts://gateway:8883\"\nca = \"ca.crt\"\ncert = \"d.crt\"\nkey = \"d.key\"\n{extra}"
            ),
        )
        .unwrap();
        Agent::load(&path)
    }

    #[test]
    fn max_packet_bytes_defaults_to_the_brokers_default() {
        assert_eq!(load_with("").unwrap().config.max_packet_bytes, 262_144);
        assert_eq!(
            load_with("max_packet_bytes = 1048576").unwrap().config.max_packet_bytes,
            1_048_576
        );
    }

    #[test]
    fn an_unusable_max_packet_bytes_is_refused_naming_the_field() {
        for bad in ["0", "1023", "268435456"] {
            let error = load_with(&format!("max_packet_bytes = {bad}")).unwrap_err().to_string();
            assert!(
                error.contains("agent.toml: max_packet_bytes: ") && error.contains(bad),
                "{error}"
            );
        }
    }
}
