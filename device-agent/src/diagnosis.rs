//! Why a connection attempt failed, in words an operator understands, with a distinct exit code
//! for `device-agent check`.

use std::error::Error as StdError;
use std::fmt;

use rumqttc::{ConnectReturnCode, ConnectionError};
use rustls::{AlertDescription, CertificateError};

use fleet_identity::tls::PinMismatch;

/// The outcome of a connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Diagnosis {
    /// Connected and accepted.
    Ok,
    /// The device's own files are unusable (detail says which and why).
    LocalProblem(String),
    /// The broker's certificate is not signed by the pinned broker CA.
    Impersonation,
    /// The broker's certificate is not valid for the configured server name.
    NameMismatch,
    /// The broker's key is not one of `pin_sha256`.
    PinMismatch,
    /// The broker's certificate is outside its validity period (by our clock).
    BrokerCertificateInvalid(String),
    /// The broker refused our certificate as expired.
    OurCertificateExpired,
    /// The broker refused our certificate as revoked.
    OurCertificateRevoked,
    /// The broker refused our certificate (unknown CA, or otherwise unacceptable).
    OurCertificateRefused(String),
    /// The broker refused the client id.
    ClientIdRefused,
    /// The broker could not be reached in time.
    Unreachable(String),
    /// Anything else.
    Other(String),
}

impl Diagnosis {
    /// The exit code of `device-agent check`.
    pub fn exit_code(&self) -> u8 {
        match self {
            Diagnosis::Ok => 0,
            Diagnosis::LocalProblem(_) => 10,
            Diagnosis::Impersonation => 20,
            Diagnosis::NameMismatch => 21,
            Diagnosis::PinMismatch => 22,
            Diagnosis::BrokerCertificateInvalid(_) => 23,
            Diagnosis::OurCertificateExpired => 30,
            Diagnosis::OurCertificateRevoked => 31,
            Diagnosis::OurCertificateRefused(_) => 32,
            Diagnosis::ClientIdRefused => 40,
            Diagnosis::Unreachable(_) => 50,
            Diagnosis::Other(_) => 60,
        }
    }

    /// Whether the broker refused who we are: retrying soon cannot help, so back off fully.
    pub fn identity_refused(&self) -> bool {
        matches!(
            self,
            Diagnosis::OurCertificateExpired
                | Diagnosis::OurCertificateRevoked
                | Diagnosis::OurCertificateRefused(_)
                | Diagnosis::ClientIdRefused
        )
    }

    /// Reads a rumqttc connection error.
    pub fn of(error: &ConnectionError) -> Self {
        if let ConnectionError::ConnectionRefused(code) = error {
            return match code {
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadClientId => Diagnosis::ClientIdRefused,
                other => Diagnosis::Other(format!("the broker refused the connection ({other:?})")),
            };
        }
        if matches!(error, ConnectionError::NetworkTimeout) {
            return Diagnosis::Unreachable("no answer in time".into());
        }
        if let Some(tls) = rustls_error(error) {
            return Self::of_tls(tls);
        }
        if let Some(io) = io_error(error) {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable | AddrNotAvailable | NotFound
            ) {
                return Diagnosis::Unreachable(io.to_string());
            }
            if matches!(io.kind(), ConnectionReset | UnexpectedEof | ConnectionAborted) {
                return Diagnosis::OurCertificateRefused(format!(
                    "the broker closed the connection during setup ({io})"
                ));
            }
        }
        Diagnosis::Other(error.to_string())
    }

    fn of_tls(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Diagnosis::Impersonation,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    Diagnosis::NameMismatch
                }
                CertificateError::Other(other) if other.0.downcast_ref::<PinMismatch>().is_some() => {
                    Diagnosis::PinMismatch
                }
                other => Diagnosis::BrokerCertificateInvalid(format!("{other:?}")),
            },
            rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => Diagnosis::OurCertificateExpired,
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked) => Diagnosis::OurCertificateRevoked,
            rustls::Error::AlertReceived(alert) => Diagnosis::OurCertificateRefused(format!("TLS alert {alert:?}")),
            other => Diagnosis::Other(other.to_string()),
        }
    }
}

fn io_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a std::io::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The rustls error inside a connection error (rumqttc and tokio-rustls wrap it in `io::Error`).
fn rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnosis::Ok => f.write_str("OK: connected, the broker accepted this device"),
            Diagnosis::LocalProblem(detail) => write!(f, "this device's own files are unusable: {detail}"),
            Diagnosis::Impersonation => f.write_str("the broker's certificate is NOT signed by the pinned broker CA: possible impersonation; do not trust this network path, check the broker address and the CA file"),
            Diagnosis::NameMismatch => f.write_str("the broker's certificate does not name the server_name this device expects: check broker_url/server_name, or reissue the broker certificate with `provision broker --dns/--ip`"),
            Diagnosis::PinMismatch => f.write_str("the broker's key is not one of pin_sha256: the broker was re-keyed or this is not our broker; update the pins only if the change was planned"),
            Diagnosis::BrokerCertificateInvalid(detail) => write!(f, "the broker's certificate is not valid now ({detail}): renew it on the gateway, or check this device's clock"),
            Diagnosis::OurCertificateExpired => f.write_str("the broker refused this device's certificate as EXPIRED: re-provision the device (new certificate)"),
            Diagnosis::OurCertificateRevoked => f.write_str("the broker refused this device's certificate as REVOKED: the operator revoked it; contact the operator"),
            Diagnosis::OurCertificateRefused(detail) => write!(f, "the broker refused this device's certificate ({detail}): it is not from this fleet's device CA, or not acceptable to this broker"),
            Diagnosis::ClientIdRefused => f.write_str("the broker refused the client id: it must be the device id in the certificate"),
            Diagnosis::Unreachable(detail) => write!(f, "the broker is unreachable ({detail}): check the network and broker_url"),
            Diagnosis::Other(detail) => write!(f, "connection failed: {detail}"),
        }
    }
}
