//! The key algorithms the fleet PKI can use, and the one form their private keys are written in.

use rcgen::{KeyPair, SignatureAlgorithm};

use crate::error::{GenerateContext, Result};

/// A key algorithm for a CA or a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: small, fast, supported everywhere (the default).
    #[default]
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    #[value(name = "ecdsa-p384")]
    EcdsaP384,
    /// Ed25519: the cheapest handshakes; some older TLS stacks lack it.
    #[value(name = "ed25519")]
    Ed25519,
    /// RSA 2048 with SHA-256: costs a device 2.5 to 4 times more CPU per connection.
    #[value(name = "rsa-2048")]
    Rsa2048,
}

impl KeyType {
    /// The rcgen signature algorithm for this key type.
    pub fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// Every key type.
    pub const ALL: [KeyType; 4] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Ed25519,
        KeyType::Rsa2048,
    ];

    /// The key type whose signature algorithm is `algorithm` (what a CSR was signed with).
    pub fn of_algorithm(algorithm: &SignatureAlgorithm) -> Option<Self> {
        Self::ALL.into_iter().find(|key_type| key_type.algorithm() == algorithm)
    }

    /// The key type's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<KeyPair> {
        KeyPair::generate_for(self.algorithm()).generating(format!("{self:?} key"))
    }
}

/// `key` as a PEM `PRIVATE KEY` that every common TLS stack reads
/// ([`fleet_identity::pem::portable_pkcs8`]: for Ed25519, PKCS#8 v1 without the public key).
pub fn private_key_pem(key: &KeyPair) -> String {
    let der = fleet_identity::pem::portable_pkcs8(key.serialized_der());
    pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_type_is_written_in_a_form_that_reads_back_as_the_same_key() {
        for key_type in [
            KeyType::EcdsaP256,
            KeyType::EcdsaP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
        ] {
            let key = key_type.generate().unwrap();
            let pem = private_key_pem(&key);
            let back = KeyPair::from_pem(&pem).unwrap_or_else(|e| panic!("{key_type:?}: {e}"));
            assert_eq!(back.public_key_raw(), key.public_key_raw(), "{key_type:?}");
        }
    }
}
