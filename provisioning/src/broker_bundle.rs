//! The broker's server certificate and a ready-to-run broker configuration.
//!
//! The bundle is written all or nothing: minted in memory, recorded in the registry, written into
//! a staging folder in the output directory and swapped in together, so a failure half-way
//! (`--force` over an old bundle included) never leaves a new certificate beside an old key.

use std::net::IpAddr;
use std::path::Path;

use crate::error::{Error, GenerateContext, IoContext, Result};
use crate::fault;
use crate::issue::issued_record;
use crate::key_type::private_key_pem;
use crate::key_type::KeyType;
use crate::output::{ensure_writable, write_new, Overwrite, KEY_MODE, PUBLIC_MODE};
use crate::pki::{Pki, DEVICE_CA_CERT};
use crate::registry::Issued;
use crate::staging::Staging;

/// Default validity of a broker certificate: two years.
pub const DEFAULT_BROKER_VALIDITY_DAYS: u32 = 2 * 365;
/// The broker's server certificate.
pub const BROKER_CERT: &str = "broker.crt";
/// The broker's private key.
pub const BROKER_KEY: &str = "broker.key";
/// The broker configuration.
pub const BROKER_CONFIG: &str = "broker.toml";
/// The files `provision broker` writes.
pub const BROKER_FILES: [&str; 4] = [BROKER_CERT, BROKER_KEY, DEVICE_CA_CERT, BROKER_CONFIG];

/// What the broker certificate names.
#[derive(Clone, Debug)]
pub struct BrokerRequest {
    /// DNS names devices use to reach the broker.
    pub dns: Vec<String>,
    /// IP addresses devices use to reach the broker.
    pub ips: Vec<IpAddr>,
    /// Certificate validity.
    pub validity_days: u32,
    /// Replace existing files.
    pub overwrite: Overwrite,
}

/// Issues a broker certificate and writes `broker.crt`, `broker.key`, `device-ca.crt` and
/// `broker.toml` into `out`.
pub fn issue_broker(pki: &mut Pki, out: &Path, request: &BrokerRequest) -> Result<Issued> {
    // The bundle's device-ca.crt would replace the PKI's own, and a swap set it aside.
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same(out, &pki.dir) {
        return Err(Error::BadArgument {
            flag: "--out",
            reason: "is the PKI directory: write the broker's bundle to a folder of its own".into(),
        });
    }
    for file in BROKER_FILES {
        let path = out.join(file);
        ensure_writable(&path, request.overwrite)?;
        if path.is_dir() {
            return Err(Error::BadArgument {
                flag: "--out",
                reason: format!(
                    "{} is a directory where the bundle's {file} goes; move it away",
                    path.display()
                ),
            });
        }
    }
    // Made first, so an output directory that cannot be written is refused before anything is
    // minted or recorded.
    let staging = Staging::new(out)?;
    let params = crate::profile::broker(&pki.fleet, &request.dns, &request.ips, request.validity_days)?;
    let key = KeyType::EcdsaP256.generate()?;
    let cert = params
        .signed_by(&key, &pki.broker_ca.issuer)
        .generating("the broker certificate")?;
    let name = request
        .dns
        .first()
        .cloned()
        .or_else(|| request.ips.first().map(IpAddr::to_string))
        .unwrap_or_default();
    let issued = issued_record(&name, "broker", cert.der())?;
    let crl = pki.crl_path().canonicalize().at(pki.crl_path())?;
    let config = broker_config(&crl);
    pki.record_then_write(std::slice::from_ref(&issued), false, |pki| {
        write_new(
            &staging.path(BROKER_CERT),
            cert.pem().as_bytes(),
            PUBLIC_MODE,
            Overwrite::Refuse,
        )?;
        fault::point("bundle-cert-written");
        write_new(
            &staging.path(BROKER_KEY),
            private_key_pem(&key).as_bytes(),
            KEY_MODE,
            Overwrite::Refuse,
        )?;
        write_new(
            &staging.path(DEVICE_CA_CERT),
            pki.device_ca.cert_pem.as_bytes(),
            PUBLIC_MODE,
            Overwrite::Refuse,
        )?;
        write_new(
            &staging.path(BROKER_CONFIG),
            config.as_bytes(),
            PUBLIC_MODE,
            Overwrite::Refuse,
        )?;
        staging.swap_in(&BROKER_FILES, request.overwrite)
    })?;
    Ok(issued)
}

/// The broker configuration: these files, the PKI's CRL, and the documented defaults.
pub fn broker_config(crl: &Path) -> String {
    format!(
        r##"# Broker configuration written by `provision broker`.
# Relative paths resolve against this file's folder. Environment variables override any key,
# e.g. BROKER__LISTEN=0.0.0.0:8883 or BROKER__LIMITS__MAX_CONNECTIONS=20000.
listen = ["0.0.0.0:8883"]
server_cert = "broker.crt"
server_key = "broker.key"
client_ca = "device-ca.crt"
# The device CA's CRL. The broker re-reads it when it changes; `provision revoke` rewrites it.
crl = "{crl}"

[acl]
# Topic filter templates; {{id}} is the certificate's id. A SUBSCRIBE filter is granted only if
# every topic it can match is covered by one of these.
device_publish = ["devices/{{id}}/#"]
device_subscribe = ["devices/{{id}}/#"]
service_publish = ["#"]
service_subscribe = ["#"]
# "drop" (acknowledge and discard, logged) or "disconnect".
on_denied_publish = "drop"

[limits]
max_connections = 10000
handshake_timeout_ms = 10000
connect_timeout_ms = 10000
max_packet_bytes = 262144

[persistence]
# Persistent sessions (clean_session = false), their queued QoS 1/2 messages and the retained
# messages survive restarts, kill -9 and power cuts here (SQLite, WAL mode; back it up with
# `sqlite3 store/broker.sqlite ".backup copy.sqlite"` while the broker runs).
dir = "store"
# "always": a QoS 1/2 publish that reaches a persistent session is acknowledged only once it is
# on disk (fsynced). "interval": acknowledged at once, fsynced every interval_ms; a crash or
# power cut then loses up to interval_ms of acknowledged messages.
sync = "always"
# Topic and payload bytes queued on disk for offline sessions, at most (oldest dropped beyond).
max_bytes = 1073741824

[log]
# "text" or "json"
format = "text"
"##,
        crl = crl.display()
    )
}
