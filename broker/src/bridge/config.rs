//! `[bridge]` in broker.toml: the upstream brokers, the gateway's own certificate, the topics
//! that go up and come down, and the outbox's bounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_identity::{BrokerUrl, DeviceId};
use serde::Deserialize;

use crate::topic::{validate_filter, validate_topic_name};

/// `[bridge]`: one uplink from this gateway to a central broker (a cluster's nodes, tried in
/// order). Absent: no bridge.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The gateway's name: the `urn:gateway:<name>` of its certificate, its MQTT client id
    /// upstream, and `{name}` in `prefix`. One topic level (the id rules).
    pub name: String,
    /// `mqtts://HOST:PORT` of each upstream node, tried in this order; on failure the next.
    pub upstreams: Vec<String>,
    /// The gateway's client certificate chain (`provision gateway`), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA bundle the upstreams' server certificates must chain to, PEM (never system roots).
    pub upstream_ca: PathBuf,
    /// The name the upstreams' certificates must carry, when it is not the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// What local topics are published under upstream (and what upstream topics are stripped
    /// of to find their local topic). `{name}` is the gateway's name. Default `sites/{name}/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Local topic filters forwarded upstream (as `prefix` + topic), at QoS 1.
    #[serde(default)]
    pub up: Vec<String>,
    /// Local topic filters, each under `devices/`, that upstream messages are delivered to:
    /// the bridge subscribes upstream to `prefix` + filter and publishes what comes as the
    /// topic without the prefix, to the device it names, if that device may subscribe to it.
    #[serde(default)]
    pub down: Vec<String>,
    /// Messages waiting to be forwarded (on disk with `[persistence]`), at most; beyond, the
    /// oldest goes (`outbox_overflow`). Default 1000000.
    #[serde(default = "default_outbox_max_messages")]
    pub outbox_max_messages: usize,
    /// Topic and payload bytes waiting to be forwarded, at most. Default 256 MiB.
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: usize,
    /// QoS 1 messages sent upstream and not yet acknowledged, at most. Default 256.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// MQTT keepalive towards the upstream, seconds. Default 30.
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u16,
    /// Deadline for TCP, TLS and CONNACK, per attempt. Default 5000 ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Pause after every upstream in the list failed, before the first is tried again; it
    /// doubles up to 30 s while they keep failing. Default 500 ms.
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
}

fn default_prefix() -> String {
    "sites/{name}/".into()
}
fn default_outbox_max_messages() -> usize {
    1_000_000
}
fn default_outbox_max_bytes() -> usize {
    256 * 1024 * 1024
}
fn default_max_inflight() -> usize {
    256
}
fn default_keepalive_s() -> u16 {
    30
}
fn default_connect_timeout_ms() -> u64 {
    5000
}
fn default_retry_ms() -> u64 {
    500
}

/// A `[bridge]` value that cannot be used: the key and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct BridgeConfigError {
    /// The key, e.g. `bridge.upstreams`.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> BridgeConfigError {
    BridgeConfigError {
        field,
        reason: reason.into(),
    }
}

impl BridgeConfig {
    /// Resolves the file paths against the configuration file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        for file in [&mut self.cert, &mut self.key, &mut self.upstream_ca] {
            *file = base.join(&*file);
        }
    }

    /// The gateway's name, checked.
    pub fn gateway(&self) -> Result<DeviceId, BridgeConfigError> {
        DeviceId::parse(&self.name).map_err(|e| invalid("bridge.name", format!("{:?}: {e}", self.name)))
    }

    /// The upstream URLs, parsed, in the order they are tried.
    pub fn upstream_urls(&self) -> Result<Vec<BrokerUrl>, BridgeConfigError> {
        if self.upstreams.is_empty() {
            return Err(invalid(
                "bridge.upstreams",
                "give at least one, e.g. [\"mqtts://cluster-1:8883\"]",
            ));
        }
        self.upstreams
            .iter()
            .map(|url| {
                url.parse()
                    .map_err(|e: fleet_identity::BrokerUrlError| invalid("bridge.upstreams", e.to_string()))
            })
            .collect()
    }

    /// `prefix` with `{name}` rendered.
    pub fn rendered_prefix(&self) -> String {
        self.prefix.replace("{name}", &self.name)
    }

    /// How long one connection attempt may take.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks every value: the name, URLs, prefix, filters and bounds.
    pub fn validate(&self) -> Result<(), BridgeConfigError> {
        self.gateway()?;
        self.upstream_urls()?;
        let prefix = self.rendered_prefix();
        if !prefix.ends_with('/') || validate_topic_name(prefix.trim_end_matches('/')).is_err() {
            return Err(invalid(
                "bridge.prefix",
                format!("{prefix:?} must be topic levels without wildcards, ending in '/', e.g. \"sites/{{name}}/\""),
            ));
        }
        if self.up.is_empty() && self.down.is_empty() {
            return Err(invalid(
                "bridge.up",
                "neither `up` nor `down` names a topic: the bridge would carry nothing",
            ));
        }
        for filter in &self.up {
            validate_filter(filter).map_err(|e| invalid("bridge.up", format!("{filter:?}: {e}")))?;
            if filter.starts_with('$') {
                return Err(invalid("bridge.up", format!("{filter:?}: `$` topics stay local")));
            }
        }
        for filter in &self.down {
            validate_filter(filter).map_err(|e| invalid("bridge.down", format!("{filter:?}: {e}")))?;
            if !filter.starts_with("devices/") {
                return Err(invalid(
                    "bridge.down",
                    format!("{filter:?}: downstream messages go to devices, so each filter starts with `devices/`"),
                ));
            }
        }
        let at_least_one: [(&'static str, u64); 6] = [
            ("bridge.outbox_max_messages", self.outbox_max_messages as u64),
            ("bridge.outbox_max_bytes", self.outbox_max_bytes as u64),
            ("bridge.max_inflight", self.max_inflight as u64),
            ("bridge.keepalive_s", u64::from(self.keepalive_s)),
            ("bridge.connect_timeout_ms", self.connect_timeout_ms),
            ("bridge.retry_ms", self.retry_ms),
        ];
        if let Some((field, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(field, "must be at least 1"));
        }
        if self.max_inflight > 65_000 {
            return Err(invalid(
                "bridge.max_inflight",
                "must be at most 65000 (MQTT packet ids are 16 bits)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(upstreams: &str, extra: &str) -> Result<BridgeConfig, String> {
        let text = format!(
            "name = \"site-a\"\nupstreams = [{upstreams}]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\nupstream_ca = \"upstream-ca.crt\"\nup = [\"devices/+/telemetry\"]\n{extra}"
        );
        let config: BridgeConfig = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    const TWO: &str = "\"mqtts://n1:8883\", \"mqtts://n2:8883\"";

    #[test]
    fn defaults_render_the_prefix_and_keep_the_upstream_order() {
        let config = config(TWO, "").unwrap();
        assert_eq!(config.rendered_prefix(), "sites/site-a/");
        let urls = config.upstream_urls().unwrap();
        assert_eq!((urls[0].host.as_str(), urls[1].host.as_str()), ("n1", "n2"));
        assert_eq!(config.outbox_max_messages, 1_000_000);
    }

    #[test]
    fn every_unusable_value_is_named() {
        for (upstreams, extra, field) in [
            (TWO, "down = [\"cmd/#\"]", "bridge.down"),
            (TWO, "down = [\"devices/#/x\"]", "bridge.down"),
            (TWO, "prefix = \"sites/+/\"", "bridge.prefix"),
            (TWO, "prefix = \"sites\"", "bridge.prefix"),
            (TWO, "outbox_max_messages = 0", "bridge.outbox_max_messages"),
            (TWO, "max_inflight = 70000", "bridge.max_inflight"),
            ("\"mqtt://n1:1883\"", "", "bridge.upstreams"),
            ("", "", "bridge.upstreams"),
        ] {
            let error = config(upstreams, extra).unwrap_err();
            assert!(error.starts_with(field), "{upstreams} {extra}: {error}");
        }
    }
}
