//! rustls configurations with the project's security defaults.
//!
//! TLS 1.3 is preferred; TLS 1.2 is offered only with ECDHE key exchange and AEAD ciphers. The
//! crypto provider is the caller's choice (the broker uses aws-lc-rs, the device agent ring), so
//! this crate pulls in neither.

use std::sync::Arc;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::time_provider::TimeProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest as _;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Protocol versions offered, most preferred first.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No trust anchor was given.
    #[error("no CA certificate to trust")]
    NoTrustAnchors,
    /// A CA certificate could not be used as a trust anchor.
    #[error("CA certificate #{index} cannot be used as a trust anchor: {source}")]
    BadTrustAnchor {
        /// Position of the certificate in the bundle, from 0.
        index: usize,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The certificate verifier could not be built (for instance a CRL that does not parse).
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// The certificate chain and private key cannot be used together.
    #[error("certificate and private key are unusable together: {0}")]
    CertificateKey(rustls::Error),
    /// The provider offers none of the allowed protocol versions or suites.
    #[error("crypto provider unusable: {0}")]
    Provider(rustls::Error),
}

/// The provider restricted to TLS 1.3 suites and TLS 1.2 ECDHE + AEAD suites, in the order we
/// prefer: TLS 1.3 first; within a version AES-128-GCM, then ChaCha20-Poly1305, then AES-256-GCM.
/// The 256-bit suite's SHA-384 has no hardware acceleration on common CPUs and cost the broker
/// about 6% of its handshake time; the peer's own preference is still honoured.
pub fn hardened_provider(provider: CryptoProvider) -> Arc<CryptoProvider> {
    let mut cipher_suites: Vec<SupportedCipherSuite> = provider
        .cipher_suites
        .iter()
        .copied()
        .filter(is_allowed_suite)
        .collect();
    cipher_suites.sort_by_key(suite_rank);
    Arc::new(CryptoProvider {
        cipher_suites,
        ..provider
    })
}

fn suite_rank(suite: &SupportedCipherSuite) -> (u8, u8) {
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => 0,
        SupportedCipherSuite::Tls12(_) => 1,
    };
    let name = format!("{:?}", suite.suite());
    let cipher = if name.contains("AES_128_GCM") {
        0
    } else if name.contains("CHACHA20") {
        1
    } else {
        2
    };
    (version, cipher)
}

fn is_allowed_suite(suite: &SupportedCipherSuite) -> bool {
    match suite {
        SupportedCipherSuite::Tls13(_) => true,
        SupportedCipherSuite::Tls12(_) => {
            let name = format!("{:?}", suite.suite());
            name.contains("_ECDHE_")
                && (name.ends_with("_GCM_SHA256")
                    || name.ends_with("_GCM_SHA384")
                    || name.contains("CHACHA20_POLY1305"))
        }
    }
}

/// A root store holding exactly `anchors`: never the system or webpki roots.
pub fn root_store(anchors: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    if anchors.is_empty() {
        return Err(TlsError::NoTrustAnchors);
    }
    let mut roots = RootCertStore::empty();
    for (index, anchor) in anchors.iter().enumerate() {
        roots
            .add(anchor.clone())
            .map_err(|source| TlsError::BadTrustAnchor { index, source })?;
    }
    Ok(roots)
}

/// The standard client-certificate verifier: chains to one of `client_cas`, checked against `crls`.
///
/// Only the end entity's revocation is checked, and a certificate whose issuer has no CRL is not
/// rejected for that (so a second CA during a rollover works before its first CRL exists). A CRL
/// past its nextUpdate is still enforced: a stale CRL never locks the fleet out.
pub fn client_verifier(
    provider: Arc<CryptoProvider>,
    client_cas: &[CertificateDer<'static>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = Arc::new(root_store(client_cas)?);
    Ok(WebPkiClientVerifier::builder_with_provider(roots, provider)
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()?)
}

/// A server configuration that requires a client certificate accepted by `verifier`.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(TlsError::Provider)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::CertificateKey)
}

/// The standard server-certificate verifier: chains to one of `server_cas`, name checked.
pub fn server_verifier(
    provider: Arc<CryptoProvider>,
    server_cas: &[CertificateDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = Arc::new(root_store(server_cas)?);
    Ok(WebPkiServerVerifier::builder_with_provider(roots, provider).build()?)
}

/// How a device (or a service) trusts the broker: the certificate chains to one of the pinned
/// broker CAs (never system roots), names the broker, and, if pins are given, carries one of
/// the pinned keys. The only verifier [`client_config`] takes, so no caller can build a client
/// configuration that trusts less.
#[derive(Debug)]
pub struct PinnedBrokerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<String>,
    /// The name to verify, when it is not the host the socket connected to (a device's
    /// configured `server_name`).
    server_name: Option<ServerName<'static>>,
}

/// The broker's key is not one of the pins.
#[derive(Debug, thiserror::Error)]
#[error("broker key SHA-256 {0} is not in pin_sha256")]
pub struct PinMismatch(pub String);

impl PinnedBrokerVerifier {
    /// Trusts `broker_cas` only; verifies `server_name` if given (else the host connected to);
    /// with `pins` (base64 SHA-256 of SubjectPublicKeyInfo), only those broker keys.
    pub fn new(
        provider: Arc<CryptoProvider>,
        broker_cas: &[CertificateDer<'static>],
        server_name: Option<ServerName<'static>>,
        pins: Vec<String>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            inner: server_verifier(provider, broker_cas)?,
            pins,
            server_name,
        })
    }
}

/// Base64 SHA-256 of a certificate's SubjectPublicKeyInfo (the form a pin takes).
pub fn spki_sha256(cert: &[u8]) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let digest = sha2::Sha256::digest(parsed.public_key().raw);
    Some(base64::engine::general_purpose::STANDARD.encode(digest))
}

impl ServerCertVerifier for PinnedBrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        host: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.server_name.as_ref().unwrap_or(host);
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)?;
        if self.pins.is_empty() {
            return Ok(verified);
        }
        let hash = spki_sha256(end_entity).unwrap_or_default();
        if self.pins.contains(&hash) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(PinMismatch(hash)),
            ))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration that presents `chain`/`key` and trusts the broker as `verifier` says.
///
/// `time` is the clock certificates are validated against (devices without a real-time clock
/// substitute a floor; see the device agent).
pub fn client_config(
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
    verifier: Arc<PinnedBrokerVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, TlsError> {
    ClientConfig::builder_with_details(provider, time)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(TlsError::Provider)?
        // The custom verifier is ours, and stricter than the standard one (see above).
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::CertificateKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardened_provider_keeps_only_tls13_and_ecdhe_aead_suites() {
        let provider = hardened_provider(rustls::crypto::ring::default_provider());
        assert!(!provider.cipher_suites.is_empty());
        for suite in &provider.cipher_suites {
            let name = format!("{:?}", suite.suite());
            assert!(name.starts_with("TLS13_") || name.contains("_ECDHE_"), "{name}");
        }
    }

    #[test]
    fn tls13_aes128_is_preferred() {
        let provider = hardened_provider(rustls::crypto::ring::default_provider());
        assert_eq!(
            format!("{:?}", provider.cipher_suites[0].suite()),
            "TLS13_AES_128_GCM_SHA256"
        );
    }

    #[test]
    fn an_empty_trust_store_is_refused() {
        assert!(matches!(root_store(&[]), Err(TlsError::NoTrustAnchors)));
    }
}
