//! Device ids: the rules and the newtype that enforces them.

use std::fmt;
use std::str::FromStr;

/// The longest id accepted, in bytes (all characters are ASCII, so also in characters).
pub const MAX_ID_LEN: usize = 64;

/// A validated device or service id.
///
/// An id is 1 to 64 characters from `[A-Za-z0-9._-]` and does not start with `.` or `-`. That makes
/// it exactly one MQTT topic level: `/`, `+`, `#`, NUL, whitespace and non-ASCII cannot occur, so
/// an id rendered into an ACL template can never widen it. Service names follow the same rules.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a string is not a valid id. Each variant names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// The id was empty.
    #[error("id is empty: an id has 1 to {MAX_ID_LEN} characters")]
    Empty,
    /// The id was longer than [`MAX_ID_LEN`].
    #[error("id is {len} characters long: at most {MAX_ID_LEN} are allowed")]
    TooLong {
        /// Length of the rejected id, in characters.
        len: usize,
    },
    /// The id contained a character outside `[A-Za-z0-9._-]`.
    #[error("id contains {found:?} at position {position}: only letters A-Z a-z, digits, '.', '_' and '-' are allowed (an id is one MQTT topic level)")]
    BadCharacter {
        /// The offending character.
        found: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
    /// The id started with `.` or `-`.
    #[error("id starts with {0:?}: an id may not start with '.' or '-'")]
    BadFirstCharacter(char),
}

impl DeviceId {
    /// Parses and validates an id. Same as `s.parse()`.
    pub fn parse(s: &str) -> Result<Self, DeviceIdError> {
        validate(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(s: &str) -> Result<(), DeviceIdError> {
    let len = s.chars().count();
    if len == 0 {
        return Err(DeviceIdError::Empty);
    }
    if len > MAX_ID_LEN {
        return Err(DeviceIdError::TooLong { len });
    }
    if let Some((position, found)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(DeviceIdError::BadCharacter { found, position });
    }
    match s.chars().next() {
        Some(first @ ('.' | '-')) => Err(DeviceIdError::BadFirstCharacter(first)),
        _ => Ok(()),
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({:?})", self.0)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_made_of_allowed_characters() {
        for ok in ["a", "dev-1", "Sensor_42.b", "0", "a-", &"x".repeat(64)] {
            assert_eq!(DeviceId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_each_rule_with_its_own_reason() {
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(DeviceIdError::TooLong { len: 65 })
        );
        assert_eq!(
            DeviceId::parse("dev/1"),
            Err(DeviceIdError::BadCharacter {
                found: '/',
                position: 3
            })
        );
        for (bad, c) in [("a+b", '+'), ("#", '#'), ("é", 'é'), ("a b", ' '), ("a\0", '\0')] {
            assert!(
                matches!(DeviceId::parse(bad), Err(DeviceIdError::BadCharacter { found, .. }) if found == c),
                "{bad:?}"
            );
        }
        assert_eq!(DeviceId::parse(".a"), Err(DeviceIdError::BadFirstCharacter('.')));
        assert_eq!(DeviceId::parse("-a"), Err(DeviceIdError::BadFirstCharacter('-')));
    }

    #[test]
    fn error_messages_name_the_rule() {
        let msg = DeviceId::parse("dev/1").unwrap_err().to_string();
        assert!(msg.contains("'/'") && msg.contains("one MQTT topic level"), "{msg}");
        let msg = DeviceId::parse(&"x".repeat(65)).unwrap_err().to_string();
        assert!(msg.contains("at most 64"), "{msg}");
    }
}
