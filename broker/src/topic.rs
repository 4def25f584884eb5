//! MQTT topic names and filters: what is well-formed, what matches what, and when one filter
//! covers another. The ACL and the router both judge topics, so the rules live once, here.
//!
//! As in MQTT, `+` and `#` never match a first level that starts with `$` (such as `$SYS`):
//! such topics are reached only by filters that name that level.

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
    /// More levels than [`MAX_LEVELS`].
    #[error("it has more than {MAX_LEVELS} levels")]
    TooManyLevels,
}

/// The most levels a topic or filter may have. MQTT sets no limit, but every level is a node in
/// the broker's trees and a step of its walks; 128 is as many as EMQX allows by default.
pub const MAX_LEVELS: usize = 128;

fn validate_common(s: &str) -> Result<(), FilterError> {
    if s.is_empty() {
        return Err(FilterError::Empty);
    }
    if s.contains('\0') {
        return Err(FilterError::Nul);
    }
    if s.bytes().filter(|b| *b == b'/').count() >= MAX_LEVELS {
        return Err(FilterError::TooManyLevels);
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

/// Checks a topic filter (what SUBSCRIBE carries), without a `$share/` prefix.
pub fn validate_filter(filter: &str) -> Result<(), FilterError> {
    validate_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let misplaced_hash = level.contains('#') && (level != "#" || !last);
        let misplaced_plus = level.contains('+') && level != "+";
        if misplaced_hash || misplaced_plus {
            return Err(FilterError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// A SUBSCRIBE filter split into its shared-subscription group (if `$share/<group>/...`) and the
/// filter that matches topics. The filter is validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionFilter<'a> {
    /// The group of a shared subscription.
    pub group: Option<&'a str>,
    /// The topic filter proper.
    pub filter: &'a str,
}

impl<'a> SubscriptionFilter<'a> {
    /// Parses and validates what a SUBSCRIBE or UNSUBSCRIBE names.
    pub fn parse(text: &'a str) -> Result<Self, FilterError> {
        let (group, filter) = match text.strip_prefix("$share/") {
            None => (None, text),
            Some(rest) => match rest.split_once('/') {
                Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() => {
                    (Some(group), inner)
                }
                _ => return Err(FilterError::BadSharedSubscription),
            },
        };
        validate_filter(filter)?;
        Ok(Self { group, filter })
    }
}

/// Whether `filter` (valid, no `$share/` prefix) matches the topic name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
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

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("+", "a"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/#", "a/$x"));
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
    fn filters_are_validated() {
        assert_eq!(validate_filter("a/#/b"), Err(FilterError::MisplacedWildcard));
        assert_eq!(validate_filter("a/b#"), Err(FilterError::MisplacedWildcard));
        assert_eq!(validate_filter("a+/b"), Err(FilterError::MisplacedWildcard));
        assert_eq!(validate_topic_name("a/+/b"), Err(FilterError::WildcardInTopic));
        assert_eq!(validate_topic_name(""), Err(FilterError::Empty));
        let deep = vec!["a"; MAX_LEVELS + 1].join("/");
        assert_eq!(validate_topic_name(&deep), Err(FilterError::TooManyLevels));
        assert_eq!(validate_filter(&deep), Err(FilterError::TooManyLevels));
        assert!(validate_topic_name(&vec!["a"; MAX_LEVELS].join("/")).is_ok());
        assert_eq!(
            SubscriptionFilter::parse("$share/g"),
            Err(FilterError::BadSharedSubscription)
        );
        assert_eq!(
            SubscriptionFilter::parse("$share//a"),
            Err(FilterError::BadSharedSubscription)
        );
        assert_eq!(
            SubscriptionFilter::parse("$share/g/a/+"),
            Ok(SubscriptionFilter {
                group: Some("g"),
                filter: "a/+"
            })
        );
    }
}
