//! Certificate serial numbers: random, positive, 128 bits.

use rcgen::SerialNumber;

/// A fresh random positive serial of exactly 16 bytes (RFC 5280 allows up to 20).
///
/// The top bit is cleared so the DER INTEGER is positive without a padding byte, and the first
/// byte is kept at 0x10 or above so every serial prints as exactly 32 hex digits, the same in the
/// registry, in `provision list` and in `openssl x509 -serial` (about 126 random bits remain).
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes[0] &= 0x7f;
    if bytes[0] < 0x10 {
        bytes[0] |= 0x10;
    }
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_16_byte_and_distinct() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] >= 0x10);
        assert_ne!(a, b);
    }
}
