//! The broker's configuration: one serde struct, loaded by the `config` crate from the TOML file
//! and then from `BROKER__*` environment variables (e.g. `BROKER__LISTEN=0.0.0.0:8883`,
//! `BROKER__LIMITS__MAX_CONNECTIONS=20000`). Relative paths resolve against the file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::acl::AclConfig;

/// The largest remaining length MQTT's four-byte length field can say.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Everything `broker.toml` can say.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Addresses to listen on (IPv4 and/or IPv6); one address or a list. Port 0 picks a free port.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// The broker's certificate chain (leaf first), PEM.
    pub server_cert: PathBuf,
    /// The broker's private key, PEM.
    pub server_key: PathBuf,
    /// The device CA bundle clients must chain to (several CAs allowed for a rollover), PEM.
    pub client_ca: PathBuf,
    /// The CRL files (PEM or DER), one per client CA, each written by its own PKI; one path or
    /// a list. Checked at every handshake and watched for changes. None: revocation is off.
    #[serde(default, deserialize_with = "paths")]
    pub crl: Vec<PathBuf>,
    /// SHA-256 fingerprints (hex) of client CAs whose certificates are accepted without a CRL.
    /// Any other client CA without one has its certificates refused (`crl_missing`).
    #[serde(default)]
    pub crl_exempt_cas: Vec<String>,
    /// Days after expiry during which a device certificate that is otherwise valid and not
    /// revoked is still admitted, to its renewal topics only (`expired_grace`). 0, the default:
    /// off. See the README for the threat model.
    #[serde(default)]
    pub renewal_grace_days: u32,
    /// Topic ACL templates.
    #[serde(default)]
    pub acl: AclConfig,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The durable store. Absent: persistent sessions and retained messages live in memory only
    /// and a restart loses them (said at start).
    #[serde(default)]
    pub persistence: Option<PersistenceConfig>,
    /// The uplink to a central broker. Absent: no bridge.
    #[serde(default)]
    pub bridge: Option<crate::bridge::BridgeConfig>,
}

/// `[persistence]`: where persistent sessions and retained messages survive restarts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceConfig {
    /// The directory of the store (created 0700; relative to this file).
    pub dir: PathBuf,
    /// `always` (the default): a QoS 1/2 publish that reaches a persistent session is
    /// acknowledged only once it is fsynced. `interval`: acknowledged at once and fsynced every
    /// `interval_ms`; a crash or power cut loses up to that much acknowledged traffic.
    #[serde(default)]
    pub sync: SyncMode,
    /// With `sync = "interval"`: how often the store commits. Default 100 ms.
    #[serde(default = "default_sync_interval_ms")]
    pub interval_ms: u64,
    /// Topic and payload bytes queued on disk for persistent sessions, at most; beyond, an
    /// offline session drops its oldest (`queue_overflow`). Default 1 GiB.
    #[serde(default = "default_persistence_max_bytes")]
    pub max_bytes: u64,
}

/// `persistence.sync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Acknowledge only what is fsynced.
    #[default]
    Always,
    /// Acknowledge at once, fsync every `interval_ms`.
    Interval,
}

fn default_sync_interval_ms() -> u64 {
    100
}

fn default_persistence_max_bytes() -> u64 {
    1024 * 1024 * 1024
}

impl PersistenceConfig {
    /// The store's settings.
    pub fn settings(&self) -> crate::store::StoreSettings {
        crate::store::StoreSettings {
            dir: self.dir.clone(),
            sync: match self.sync {
                SyncMode::Always => crate::store::SyncPolicy::Always,
                SyncMode::Interval => {
                    crate::store::SyncPolicy::Interval(std::time::Duration::from_millis(self.interval_ms))
                }
            },
            max_bytes: self.max_bytes,
        }
    }
}

/// `[limits]`: what one peer, or all of them, may cost.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open sessions (and handshakes in progress) at most. Default 10000.
    pub max_connections: usize,
    /// Deadline for the TLS handshake, per connection. Default 10000 ms.
    pub handshake_timeout_ms: u64,
    /// Deadline for CONNECT after the handshake. Default 10000 ms.
    pub connect_timeout_ms: u64,
    /// Largest MQTT packet accepted (remaining length), bytes. Default 256 KiB.
    pub max_packet_bytes: usize,
    /// Messages waiting for one session (not yet sent to it). Default 1000.
    pub max_queued_messages: usize,
    /// Topic and payload bytes waiting for one session. Default 1 MiB.
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages sent to one session and not yet acknowledged; also the QoS 2 messages
    /// a client may have awaiting PUBREL. Default 100.
    pub max_inflight: usize,
    /// How long an online subscriber's queue may stay full, with nothing taken from it, while
    /// publishers wait for it before it is disconnected (`slow_subscriber`). Default 10000 ms.
    pub slow_subscriber_timeout_ms: u64,
    /// Subscriptions per session. Default 100.
    pub max_subscriptions: usize,
    /// Topics holding a retained message. Default 10000.
    pub max_retained_messages: usize,
    /// Topic and payload bytes of all retained messages. Default 64 MiB.
    pub max_retained_bytes: usize,
    /// The longest Session Expiry Interval an MQTT 5 client gets, seconds: a longer one (or
    /// "never") is cut to this and said in CONNACK. Default 604800 (7 days). MQTT 3.1.1
    /// persistent sessions never expire.
    pub max_session_expiry_secs: u32,
    /// The longest keepalive an MQTT 5 client gets, seconds: a client asking for more, or for
    /// none, is told this one in CONNACK (Server Keep Alive). Default 1200 (AWS IoT Core's
    /// maximum: long enough for battery devices on cellular links).
    pub max_keep_alive_secs: u16,
    /// Topic aliases per MQTT 5 connection, each way: how many the client may use (CONNACK
    /// Topic Alias Maximum) and how many the broker uses towards a client that allows them.
    /// Default 10; 0 turns them off.
    pub max_topic_aliases: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            max_packet_bytes: 256 * 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_inflight: 100,
            slow_subscriber_timeout_ms: 10_000,
            max_subscriptions: 100,
            max_retained_messages: 10_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_keep_alive_secs: 1200,
            max_topic_aliases: 10,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve Prometheus text metrics (any path), e.g. `127.0.0.1:9090`. Off if unset.
    pub listen: Option<SocketAddr>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment override is unreadable or malformed.
    #[error("{}: {source}", path.display())]
    Load {
        /// The configuration file.
        path: PathBuf,
        /// What the config crate said.
        source: config::ConfigError,
    },
    /// A value is out of range.
    #[error("{}: {field}: {reason}", path.display())]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl BrokerConfig {
    /// Loads `path`, applies `BROKER__*` overrides, resolves relative paths and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let load_error = |source| ConfigError::Load {
            path: path.to_owned(),
            source,
        };
        let mut loaded: BrokerConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("BROKER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(load_error)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut loaded.server_cert, &mut loaded.server_key, &mut loaded.client_ca] {
            *file = base.join(&*file);
        }
        for crl in &mut loaded.crl {
            *crl = base.join(&*crl);
        }
        if let Some(persistence) = &mut loaded.persistence {
            persistence.dir = base.join(&persistence.dir);
        }
        if let Some(bridge) = &mut loaded.bridge {
            bridge.resolve_paths(base);
        }
        loaded.validate(path)?;
        Ok(loaded)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.into(),
        };
        if self.listen.is_empty() {
            return Err(invalid("listen", "give at least one address, e.g. \"0.0.0.0:8883\""));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.handshake_timeout_ms == 0 || self.limits.connect_timeout_ms == 0 {
            return Err(invalid("limits", "timeouts must be at least 1 ms"));
        }
        if !(64..=MQTT_MAX_PACKET).contains(&self.limits.max_packet_bytes) {
            return Err(invalid(
                "limits.max_packet_bytes",
                "must be between 64 and 268435455 (the largest packet MQTT can frame)",
            ));
        }
        let at_least_one: [(&'static str, usize); 6] = [
            ("limits.max_queued_messages", self.limits.max_queued_messages),
            ("limits.max_queued_bytes", self.limits.max_queued_bytes),
            ("limits.max_subscriptions", self.limits.max_subscriptions),
            ("limits.max_retained_messages", self.limits.max_retained_messages),
            ("limits.max_retained_bytes", self.limits.max_retained_bytes),
            (
                "limits.slow_subscriber_timeout_ms",
                self.limits.slow_subscriber_timeout_ms as usize,
            ),
        ];
        if let Some((field, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(field, "must be at least 1"));
        }
        if self.limits.max_keep_alive_secs == 0 {
            return Err(invalid("limits.max_keep_alive_secs", "must be at least 1"));
        }
        if !(1..=65_000).contains(&self.limits.max_inflight) {
            return Err(invalid(
                "limits.max_inflight",
                "must be between 1 and 65000 (MQTT packet ids are 16 bits)",
            ));
        }
        if let Some(persistence) = &self.persistence {
            if persistence.sync == SyncMode::Interval && persistence.interval_ms == 0 {
                return Err(invalid("persistence.interval_ms", "must be at least 1"));
            }
            if persistence.max_bytes == 0 {
                return Err(invalid("persistence.max_bytes", "must be at least 1"));
            }
        }
        if let Some(bridge) = &self.bridge {
            bridge.validate().map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                field: e.field,
                reason: e.reason,
            })?;
            if let Some(persistence) = &self.persistence {
                if bridge.outbox_max_bytes as u64 > persistence.max_bytes {
                    return Err(invalid(
                        "bridge.outbox_max_bytes",
                        "is larger than persistence.max_bytes, which the outbox shares with offline sessions",
                    ));
                }
            }
        }
        self.acl.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            field: "acl",
            reason: e.to_string(),
        })
    }
}

/// A value given as one string or a list of strings (environment overrides give one string;
/// commas separate several there).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => one.split(',').map(str::trim).map(str::to_owned).collect(),
            OneOrMany::Many(many) => many,
        }
    }
}

fn paths<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<PathBuf>, D::Error> {
    Ok(OneOrMany::deserialize(deserializer)?
        .into_vec()
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect())
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error> {
    let texts = OneOrMany::deserialize(deserializer)?.into_vec();
    texts
        .iter()
        .map(|t| {
            t.parse().map_err(|e| {
                serde::de::Error::custom(format!(
                    "listen: {t:?} is not an address like 0.0.0.0:8883 or [::]:8883: {e}"
                ))
            })
        })
        .collect()
}
