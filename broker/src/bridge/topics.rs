//! Which topics cross the bridge, and what they are called on the other side.
//!
//! Up: a local topic the `up` filters match is published upstream as `prefix` + topic, so
//! every site's telemetry lands in one namespace per gateway (`sites/<gw>/devices/...`).
//! Down: the bridge subscribes upstream to `prefix` + each `down` filter; a message that comes
//! is delivered locally as its topic without the prefix, only if that topic is under
//! `devices/<id>/`, matches a `down` filter, and is one the device `<id>` may subscribe to by
//! the local ACL. So the upstream can reach devices, each only where its own ACL lets it read,
//! and never inject into any other local topic.

use fleet_identity::{DeviceId, Identity, Role};

use crate::acl::{AclConfig, Verdict};
use crate::topic::matches;

/// The bridge's topic rules, rendered for this gateway.
#[derive(Clone, Debug)]
pub struct TopicMap {
    prefix: String,
    up: Vec<String>,
    down: Vec<String>,
}

/// Why a message from the upstream is not delivered locally.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DownstreamRefusal {
    /// The topic is not under this gateway's prefix.
    #[error("the topic is not under this gateway's prefix {0:?}")]
    OutsidePrefix(String),
    /// No `down` filter matches the local topic.
    #[error("no bridge.down filter matches {0:?}")]
    NoRule(String),
    /// The local topic does not name a device (`devices/<id>/...` with a valid id).
    #[error("{0:?} does not name a device (devices/<id>/...)")]
    NotADevice(String),
    /// The device's ACL does not let it subscribe to the topic.
    #[error("device {device} may not subscribe to {topic:?}")]
    AclDenied {
        /// The device the topic names.
        device: String,
        /// The local topic.
        topic: String,
    },
}

impl TopicMap {
    /// The rules for a gateway: `prefix` already rendered with its name.
    pub fn new(prefix: String, up: Vec<String>, down: Vec<String>) -> Self {
        Self { prefix, up, down }
    }

    /// The local filters the bridge subscribes to.
    pub fn up_filters(&self) -> &[String] {
        &self.up
    }

    /// The upstream topic of a local one.
    pub fn upstream_topic(&self, local: &str) -> String {
        format!("{}{local}", self.prefix)
    }

    /// The upstream filters the bridge subscribes to.
    pub fn upstream_filters(&self) -> Vec<String> {
        self.down.iter().map(|filter| self.upstream_topic(filter)).collect()
    }

    /// The local topic an upstream message goes to, if the rules and the device's ACL allow it.
    pub fn downstream_topic<'t>(&self, upstream: &'t str, acl: &AclConfig) -> Result<&'t str, DownstreamRefusal> {
        let local = upstream
            .strip_prefix(self.prefix.as_str())
            .ok_or_else(|| DownstreamRefusal::OutsidePrefix(self.prefix.clone()))?;
        if !self.down.iter().any(|filter| matches(filter, local)) {
            return Err(DownstreamRefusal::NoRule(local.to_owned()));
        }
        let device = local
            .strip_prefix("devices/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|id| DeviceId::parse(id).ok())
            .ok_or_else(|| DownstreamRefusal::NotADevice(local.to_owned()))?;
        let identity = Identity {
            role: Role::Device,
            id: device,
        };
        match acl.for_identity(&identity).may_subscribe(local) {
            Verdict::Allowed => Ok(local),
            Verdict::Denied | Verdict::Invalid(_) => Err(DownstreamRefusal::AclDenied {
                device: identity.id.to_string(),
                topic: local.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> TopicMap {
        TopicMap::new(
            "sites/gw-a/".into(),
            vec!["devices/+/telemetry".into()],
            vec!["devices/+/cmd/#".into()],
        )
    }

    #[test]
    fn local_topics_go_up_under_the_gateway_prefix() {
        assert_eq!(
            map().upstream_topic("devices/d1/telemetry"),
            "sites/gw-a/devices/d1/telemetry"
        );
        assert_eq!(map().upstream_filters(), vec!["sites/gw-a/devices/+/cmd/#".to_owned()]);
    }

    #[test]
    fn commands_come_down_to_the_device_they_name() {
        let acl = AclConfig::default();
        assert_eq!(
            map().downstream_topic("sites/gw-a/devices/d1/cmd/reboot", &acl),
            Ok("devices/d1/cmd/reboot")
        );
    }

    #[test]
    fn downstream_cannot_reach_other_topics_or_sites() {
        let acl = AclConfig::default();
        let map = map();
        assert!(matches!(
            map.downstream_topic("sites/gw-b/devices/d1/cmd/x", &acl),
            Err(DownstreamRefusal::OutsidePrefix(_))
        ));
        assert!(matches!(
            map.downstream_topic("sites/gw-a/devices/d1/telemetry", &acl),
            Err(DownstreamRefusal::NoRule(_))
        ));
        let wide = TopicMap::new("sites/gw-a/".into(), vec![], vec!["devices/#".into()]);
        assert!(matches!(
            wide.downstream_topic("sites/gw-a/devices/.bad/cmd", &acl),
            Err(DownstreamRefusal::NotADevice(_))
        ));
        let strict = AclConfig {
            device_subscribe: vec!["devices/{id}/cmd/#".into()],
            ..AclConfig::default()
        };
        assert!(matches!(
            wide.downstream_topic("sites/gw-a/devices/d1/config", &strict),
            Err(DownstreamRefusal::AclDenied { .. })
        ));
    }
}
