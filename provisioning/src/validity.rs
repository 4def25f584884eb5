//! How long a leaf certificate is valid: days in production, seconds in tests.
//!
//! Certificate renewal is tested through several real cycles, which needs certificates that
//! live for a minute or two: `--validity 90s`. Everything else keeps `--validity-days`.

use std::str::FromStr;

use time::Duration;

/// A certificate's validity from the moment it is signed (positive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity(Duration);

impl Validity {
    /// `days` days; at least one.
    pub fn days(days: u32) -> Self {
        Self(Duration::days(i64::from(days.max(1))))
    }

    /// The duration.
    pub fn duration(self) -> Duration {
        self.0
    }

    /// How far before the signing moment notBefore is set, so a device whose clock runs a
    /// little slow accepts a fresh certificate: five minutes, but never more than a tenth of
    /// the validity (a certificate valid for a minute must not be mostly in the past, or it
    /// would be due for renewal the moment it is issued).
    pub fn backdate(self) -> Duration {
        std::cmp::min(self.0 / 10_i32, Duration::minutes(5))
    }
}

/// Why a `--validity` value is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a validity: write a positive number with a unit, e.g. 90s, 10m, 12h or 365d")]
pub struct ValidityError(String);

impl FromStr for Validity {
    type Err = ValidityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ValidityError(text.to_owned());
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, unit) = text.split_at(split);
        let number: i64 = number.parse().map_err(|_| bad())?;
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        match number.checked_mul(seconds) {
            Some(total) if total > 0 && total <= 100 * 365 * 86_400 => Ok(Self(Duration::seconds(total))),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validities_read_with_a_unit_and_short_ones_are_barely_backdated() {
        let short: Validity = "90s".parse().unwrap();
        assert_eq!(short.duration(), Duration::seconds(90));
        assert_eq!(short.backdate(), Duration::seconds(9));
        assert_eq!("2d".parse::<Validity>().unwrap(), Validity::days(2));
        assert_eq!(Validity::days(365).backdate(), Duration::minutes(5));
        for bad in ["", "90", "s", "0s", "-5m", "5 m", "10y", "99999999999999d"] {
            assert!(bad.parse::<Validity>().is_err(), "{bad}");
        }
    }
}
