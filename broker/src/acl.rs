//! Topic access control: templates rendered with the peer's identity.
//!
//! A topic or SUBSCRIBE filter is allowed only if one of the rendered templates *covers* it: every
//! topic the filter can match is matched by the template (see [`crate::topic::covers`]). So a
//! device allowed `devices/{id}/#` may subscribe to `devices/{id}/cmd/+` but not to
//! `devices/+/telemetry` or `#`. Shared subscriptions (`$share/<group>/<filter>`) are judged by
//! their filter. Topics starting with `$` (such as `$SYS/...`) are matched only by templates that
//! name the `$` level explicitly, as in MQTT itself.

use fleet_identity::{Identity, Role};
use serde::Deserialize;

use crate::topic::{covers, validate_filter, validate_topic_name, FilterError, SubscriptionFilter};

/// What to do with a PUBLISH the ACL denies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeniedPublish {
    /// Drop it (a QoS 1 publish is still acknowledged, as Mosquitto does) and log it.
    #[default]
    Drop,
    /// Close the connection.
    Disconnect,
}

/// The `[acl]` section of the broker configuration: topic filter templates per role.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Templates a device may publish to; `{id}` is its device id.
    pub device_publish: Vec<String>,
    /// Templates a device may subscribe to.
    pub device_subscribe: Vec<String>,
    /// Templates a service may publish to; `{id}` is its service name.
    pub service_publish: Vec<String>,
    /// Templates a service may subscribe to.
    pub service_subscribe: Vec<String>,
    /// What to do with a denied PUBLISH.
    pub on_denied_publish: OnDeniedPublish,
}

impl Default for AclConfig {
    fn default() -> Self {
        Self {
            device_publish: vec!["devices/{id}/#".into()],
            device_subscribe: vec!["devices/{id}/#".into()],
            service_publish: vec!["#".into()],
            service_subscribe: vec!["#".into()],
            on_denied_publish: OnDeniedPublish::Drop,
        }
    }
}

/// Why a template in the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("acl.{field}: template {template:?} is not a valid topic filter: {reason}")]
pub struct TemplateError {
    field: &'static str,
    template: String,
    reason: FilterError,
}

impl AclConfig {
    /// Checks every template renders to a valid filter (with a sample id).
    pub fn validate(&self) -> Result<(), TemplateError> {
        let fields: [(&'static str, &Vec<String>); 4] = [
            ("device_publish", &self.device_publish),
            ("device_subscribe", &self.device_subscribe),
            ("service_publish", &self.service_publish),
            ("service_subscribe", &self.service_subscribe),
        ];
        for (field, templates) in fields {
            for template in templates {
                validate_filter(&render(template, "sample-id")).map_err(|reason| TemplateError {
                    field,
                    template: template.clone(),
                    reason,
                })?;
            }
        }
        Ok(())
    }

    /// The rules for one peer, rendered once at CONNECT.
    pub fn for_identity(&self, identity: &Identity) -> TopicRules {
        let (publish, subscribe) = match identity.role {
            Role::Device => (&self.device_publish, &self.device_subscribe),
            Role::Service => (&self.service_publish, &self.service_subscribe),
            // Refused at the handshake (`gateway_identity`); were one to get here, it may nothing.
            Role::Gateway => return TopicRules::none(),
        };
        let id = identity.id.as_str();
        TopicRules {
            publish: publish.iter().map(|t| render(t, id)).collect(),
            subscribe: subscribe.iter().map(|t| render(t, id)).collect(),
        }
    }
}

fn render(template: &str, id: &str) -> String {
    template.replace("{id}", id)
}

/// A peer's rendered templates.
#[derive(Clone, Debug)]
pub struct TopicRules {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl TopicRules {
    /// The rules of a device admitted under `renewal_grace_days` with an expired certificate:
    /// its renewal request and reply topics, nothing else (whatever the configured templates).
    pub fn renewal_only(identity: &Identity) -> Self {
        use fleet_identity::renewal::RenewalTopic;
        let id = identity.id.as_str();
        Self {
            publish: vec![RenewalTopic::Request.topic(id)],
            subscribe: vec![RenewalTopic::Reply.topic(id)],
        }
    }
}

/// The outcome of an ACL check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The topic or filter is covered by a template.
    Allowed,
    /// It is well-formed but not covered.
    Denied,
    /// It is not a valid topic name or filter at all.
    Invalid(FilterError),
}

impl TopicRules {
    /// Rules that allow nothing.
    fn none() -> Self {
        Self {
            publish: Vec::new(),
            subscribe: Vec::new(),
        }
    }

    /// May this peer publish to `topic` (a topic name: no wildcards)?
    pub fn may_publish(&self, topic: &str) -> Verdict {
        if let Err(e) = validate_topic_name(topic) {
            return Verdict::Invalid(e);
        }
        covered_by_any(&self.publish, topic)
    }

    /// May this peer subscribe to `filter`?
    pub fn may_subscribe(&self, filter: &str) -> Verdict {
        match SubscriptionFilter::parse(filter) {
            Ok(parsed) => covered_by_any(&self.subscribe, parsed.filter),
            Err(e) => Verdict::Invalid(e),
        }
    }
}

fn covered_by_any(templates: &[String], filter: &str) -> Verdict {
    if templates.iter().any(|t| covers(t, filter)) {
        Verdict::Allowed
    } else {
        Verdict::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> TopicRules {
        let identity = Identity {
            role: Role::Device,
            id: id.parse().unwrap(),
        };
        AclConfig::default().for_identity(&identity)
    }

    fn service() -> TopicRules {
        let identity = Identity {
            role: Role::Service,
            id: "ingest".parse().unwrap(),
        };
        AclConfig::default().for_identity(&identity)
    }

    #[test]
    fn a_device_is_confined_to_its_own_namespace() {
        let d = device("dev-1");
        assert_eq!(d.may_publish("devices/dev-1/telemetry"), Verdict::Allowed);
        assert_eq!(d.may_publish("devices/dev-1"), Verdict::Allowed);
        assert_eq!(d.may_publish("devices/dev-2/telemetry"), Verdict::Denied);
        assert_eq!(d.may_publish("devices/dev-1x/telemetry"), Verdict::Denied);
        assert_eq!(d.may_publish("elsewhere"), Verdict::Denied);
        assert_eq!(d.may_subscribe("devices/dev-1/cmd/#"), Verdict::Allowed);
        assert_eq!(d.may_subscribe("devices/dev-1/+/x"), Verdict::Allowed);
        assert_eq!(d.may_subscribe("devices/dev-1/#"), Verdict::Allowed);
    }

    #[test]
    fn wildcards_that_reach_beyond_the_namespace_are_denied() {
        let d = device("dev-1");
        for filter in [
            "#",
            "+",
            "devices/+/telemetry",
            "devices/#",
            "+/dev-1/#",
            "devices/+/#",
            "$SYS/#",
            "$share/g/#",
        ] {
            assert_eq!(d.may_subscribe(filter), Verdict::Denied, "{filter}");
        }
        assert_eq!(d.may_subscribe("$share/g/devices/dev-1/cmd/#"), Verdict::Allowed);
        assert_eq!(d.may_subscribe("$share/g/devices/dev-2/#"), Verdict::Denied);
    }

    #[test]
    fn a_service_may_use_every_topic_but_dollar_topics() {
        let s = service();
        for filter in [
            "#",
            "devices/+/telemetry",
            "devices/dev-9/cmd/reboot",
            "$share/workers/devices/+/telemetry",
        ] {
            assert_eq!(s.may_subscribe(filter), Verdict::Allowed, "{filter}");
        }
        assert_eq!(s.may_publish("devices/dev-9/cmd/reboot"), Verdict::Allowed);
        assert_eq!(s.may_subscribe("$SYS/#"), Verdict::Denied);
        assert_eq!(s.may_publish("$SYS/broker/x"), Verdict::Denied);
    }

    #[test]
    fn malformed_topics_and_filters_are_invalid_not_merely_denied() {
        let s = service();
        assert_eq!(s.may_publish("a/+/b"), Verdict::Invalid(FilterError::WildcardInTopic));
        assert_eq!(s.may_publish(""), Verdict::Invalid(FilterError::Empty));
        assert_eq!(s.may_publish("a\0b"), Verdict::Invalid(FilterError::Nul));
        assert_eq!(
            s.may_subscribe("a/#/b"),
            Verdict::Invalid(FilterError::MisplacedWildcard)
        );
        assert_eq!(
            s.may_subscribe("a/b#"),
            Verdict::Invalid(FilterError::MisplacedWildcard)
        );
        assert_eq!(
            s.may_subscribe("a+/b"),
            Verdict::Invalid(FilterError::MisplacedWildcard)
        );
        assert_eq!(
            s.may_subscribe("$share/g"),
            Verdict::Invalid(FilterError::BadSharedSubscription)
        );
        assert_eq!(
            s.may_subscribe("$share//a"),
            Verdict::Invalid(FilterError::BadSharedSubscription)
        );
    }

    #[test]
    fn a_device_in_its_renewal_grace_may_only_renew() {
        let identity = Identity {
            role: Role::Device,
            id: "dev-1".parse().unwrap(),
        };
        let d = TopicRules::renewal_only(&identity);
        assert_eq!(d.may_publish("devices/dev-1/renew/request"), Verdict::Allowed);
        assert_eq!(d.may_subscribe("devices/dev-1/renew/reply"), Verdict::Allowed);
        for topic in [
            "devices/dev-1/telemetry",
            "devices/dev-1/renew/confirm",
            "devices/dev-1/renew/reply",
        ] {
            assert_eq!(d.may_publish(topic), Verdict::Denied, "{topic}");
        }
        for filter in ["devices/dev-1/#", "devices/dev-1/cmd/#", "devices/dev-1/renew/+"] {
            assert_eq!(d.may_subscribe(filter), Verdict::Denied, "{filter}");
        }
    }

    #[test]
    fn templates_are_validated() {
        let mut acl = AclConfig::default();
        assert!(acl.validate().is_ok());
        acl.device_publish = vec!["devices/{id}/#/x".into()];
        let msg = acl.validate().unwrap_err().to_string();
        assert!(msg.contains("acl.device_publish") && msg.contains("'#'"), "{msg}");
    }
}
