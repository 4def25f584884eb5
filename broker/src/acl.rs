//! Topic access control: templates rendered with the peer's identity, and filter containment.
//!
//! A topic or SUBSCRIBE filter is allowed only if one of the rendered templates *covers* it: every
//! topic the filter can match is matched by the template. So a device allowed `devices/{id}/#`
//! may subscribe to `devices/{id}/cmd/+` but not to `devices/+/telemetry` or `#`. Shared
//! subscriptions (`$share/<group>/<filter>`) are judged by their filter. Topics starting with `$`
//! (such as `$SYS/...`) are matched only by templates that name the `$` level explicitly, as in
//! MQTT itself, where `#` and `+` never match a leading `$` level.

use fleet_identity::{Identity, Role};
use serde::Deserialize;

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
    /// May this peer publish to `topic` (a topic name: no wildcards)?
    pub fn may_publish(&self, topic: &str) -> Verdict {
        if let Err(e) = validate_topic_name(topic) {
            return Verdict::Invalid(e);
        }
        covered_by_any(&self.publish, topic)
    }

    /// May this peer subscribe to `filter`?
    pub fn may_subscribe(&self, filter: &str) -> Verdict {
        let filter = match strip_shared(filter) {
            Ok(inner) => inner,
            Err(e) => return Verdict::Invalid(e),
        };
        if let Err(e) = validate_filter(filter) {
            return Verdict::Invalid(e);
        }
        covered_by_any(&self.subscribe, filter)
    }
}

fn covered_by_any(templates: &[String], filter: &str) -> Verdict {
    if templates.iter().any(|t| covers(t, filter)) {
        Verdict::Allowed
    } else {
        Verdict::Denied
    }
}

/// Why a topic or filter is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Empty string.
    #[error("it is empty")]
    Empty,
    /// Contains U+0000.
    #[error("it contains a NUL character")]
    Nul,
    /// A topic name (PUBLISH, will) contains `+` or `#`.
    #[error("a topic name may not contain the wildcards '+' or '#'")]
    WildcardInTopic,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("'#' must be the whole last level and '+' a whole level")]
    MisplacedWildcard,
    /// `$share/` without a group and a filter.
    #[error("a shared subscription needs $share/<group>/<filter>")]
    BadSharedSubscription,
}

fn validate_common(s: &str) -> Result<(), FilterError> {
    if s.is_empty() {
        return Err(FilterError::Empty);
    }
    if s.contains('\0') {
        return Err(FilterError::Nul);
    }
    Ok(())
}

/// Checks a topic name (what PUBLISH and wills carry).
pub fn validate_topic_name(topic: &str) -> Result<(), FilterError> {
    validate_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(FilterError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a topic filter (what SUBSCRIBE carries).
pub fn validate_filter(filter: &str) -> Result<(), FilterError> {
    validate_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        let misplaced_hash = level.contains('#') && (*level != "#" || i != last);
        let misplaced_plus = level.contains('+') && *level != "+";
        if misplaced_hash || misplaced_plus {
            return Err(FilterError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// `$share/<group>/<filter>` -> `<filter>`; anything else unchanged.
fn strip_shared(filter: &str) -> Result<&str, FilterError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(filter);
    };
    match rest.split_once('/') {
        Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() => Ok(inner),
        _ => Err(FilterError::BadSharedSubscription),
    }
}

/// Whether every topic matched by `filter` is matched by `template`. Both must be valid filters.
pub fn covers(template: &str, filter: &str) -> bool {
    let mut t = template.split('/');
    let mut f = filter.split('/');
    let mut first = true;
    loop {
        match (t.next(), f.next()) {
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            // "a/#" also matches "a" itself.
            (Some("#"), None) => return true,
            (Some(_), Some("#")) | (Some(_), None) | (None, Some(_)) => return false,
            (Some("+"), Some(level)) => {
                if level == "#" || (first && level.starts_with('$')) {
                    return false;
                }
            }
            (Some(_), Some("+")) => return false,
            (Some(tl), Some(fl)) => {
                if tl != fl {
                    return false;
                }
            }
            (None, None) => return true,
        }
        first = false;
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
    fn containment_follows_mqtt_matching() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(!covers("a/b/c", "a/b"));
        assert!(covers("+/b", "x/b"));
        assert!(!covers("+/b", "$x/b"));
        assert!(covers("$SYS/#", "$SYS/broker/load"));
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
