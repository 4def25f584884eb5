//! Reconnect delays: exponential backoff with full jitter, so ten thousand devices that lost the
//! gateway at the same moment do not come back in lockstep.

use std::time::Duration;

/// Exponential backoff with full jitter between a floor and a ceiling.
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// Delays from `min_ms` up to `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        Self {
            min_ms,
            max_ms,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [min, min(max, min * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min_ms
            .saturating_mul(1u64 << self.attempt.min(32))
            .min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(self.min_ms + random_below(ceiling - self.min_ms + 1))
    }

    /// The longest delay (jittered in its upper half), for a refusal that retrying will not fix.
    pub fn longest(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(self.max_ms / 2 + random_below(self.max_ms / 2 + 1))
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random number below `bound` (0 for a bound of 0 or 1).
pub fn random_below(bound: u64) -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes) % bound.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_within_bounds_and_are_jittered() {
        let mut backoff = Backoff::new(100, 1_000);
        for attempt in 0..20 {
            let delay = backoff.next_delay().as_millis() as u64;
            let ceiling = (100u64 << attempt.min(32)).min(1_000);
            assert!((100..=ceiling).contains(&delay), "attempt {attempt}: {delay}");
        }
        let samples: std::collections::HashSet<u128> = (0..20).map(|_| backoff.next_delay().as_millis()).collect();
        assert!(samples.len() > 5, "jittered: {samples:?}");
        backoff.reset();
        assert!(backoff.next_delay().as_millis() <= 100);
        assert!(backoff.longest().as_millis() >= 500);
    }
}
