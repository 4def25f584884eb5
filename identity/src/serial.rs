//! Certificate serial numbers in the one form the fleet writes them: lower-case hex without
//! separators or leading zeros. The registry, the CRL `provision` signs, the broker's revoked
//! set and its live revocation kick all compare serials; one type, built in one way from a
//! certificate, a CRL entry or an operator's typing, is what makes those comparisons agree.

use std::fmt;

/// A certificate serial number (see the module docs for its form).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

impl Serial {
    /// The serial of a DER INTEGER's big-endian content bytes (as a certificate or a CRL entry
    /// carries them).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let hex = hex::encode(bytes);
        let trimmed = hex.trim_start_matches('0');
        Self(if trimmed.is_empty() { "0".into() } else { trimmed.into() })
    }

    /// A serial as an operator may type it (`0A:1B:..`, `0x0a1b..`, any case, leading zeros),
    /// if it is one.
    pub fn parse(input: &str) -> Option<Self> {
        let digits: String = input
            .trim()
            .trim_start_matches("0x")
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let trimmed = digits.trim_start_matches('0');
        Some(Self(if trimmed.is_empty() { "0".into() } else { trimmed.into() }))
    }

    /// The serial as big-endian bytes (for signing it into a CRL).
    pub fn to_be_bytes(&self) -> Vec<u8> {
        let even = if self.0.len() % 2 == 1 {
            format!("0{}", self.0)
        } else {
            self.0.clone()
        };
        hex::decode(even).unwrap_or_default()
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_of_writing_a_serial_gives_the_same_one() {
        let bytes = [0x00, 0x0a, 0x1b, 0xff];
        let from_bytes = Serial::from_be_bytes(&bytes);
        assert_eq!(from_bytes.as_str(), "a1bff");
        for typed in ["a1bff", "0A:1B:FF", "0x000a1bff", " 0a1bFF "] {
            assert_eq!(Serial::parse(typed), Some(from_bytes.clone()), "{typed}");
        }
        assert_eq!(from_bytes.to_be_bytes(), vec![0x0a, 0x1b, 0xff]);
        assert_eq!(Serial::from_be_bytes(&[0]).as_str(), "0");
        assert_eq!(Serial::parse("xyz"), None);
        assert_eq!(Serial::parse(""), None);
    }
}
