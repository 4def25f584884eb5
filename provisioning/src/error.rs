//! The provisioning tool's errors: each names the file, field or rule at fault.

use std::path::PathBuf;

use fleet_identity::pem::PemError;
use fleet_identity::DeviceIdError;

/// Everything that can go wrong while provisioning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `init` was pointed at a directory that already holds a PKI.
    #[error("{}: already holds a PKI ({} exists); refusing to overwrite it", dir.display(), existing.display())]
    PkiExists {
        /// The PKI directory.
        dir: PathBuf,
        /// The file that proves it.
        existing: PathBuf,
    },
    /// The directory is not a PKI made by `provision init`.
    #[error("{}: not a PKI directory ({} is missing); create one with `provision init --pki {}`", dir.display(), missing, dir.display())]
    NotAPki {
        /// The directory given.
        dir: PathBuf,
        /// The first expected file that is missing.
        missing: &'static str,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A PEM file could not be loaded.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// A CA private key is unusable or does not belong to its certificate.
    #[error("{}: {reason}", path.display())]
    CaKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An id broke the id rules.
    #[error("invalid id {value:?} ({origin}): {source}")]
    InvalidId {
        /// The rejected id.
        value: String,
        /// Where it came from (a flag, a manifest line, a CSR's CN).
        origin: String,
        /// The rule it broke.
        source: DeviceIdError,
    },
    /// A certificate signing request is unusable.
    #[error("{}: {reason}", path.display())]
    Csr {
        /// The CSR file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An output file or directory already exists.
    #[error("{}: already exists; refusing to overwrite it (pass --force to replace it)", .0.display())]
    OutputExists(PathBuf),
    /// The id already has an active certificate.
    #[error("{role} {id:?} already has an active certificate (serial {serial}); revoke it first, or for a CSR pass --rotate")]
    AlreadyActive {
        /// Role of the existing certificate.
        role: String,
        /// The id.
        id: String,
        /// Serial of the active certificate.
        serial: String,
    },
    /// A manifest is malformed.
    #[error("{}: {reason}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `revoke --id` named an id that both a device and a service hold.
    #[error("id {id:?} names both an active device and an active service; say which to revoke with --kind device or --kind service")]
    AmbiguousId {
        /// The id.
        id: String,
    },
    /// Certificates were recorded in the registry, but writing their files failed.
    #[error("{source}\nThe registry already records {} as active, but {they} did not reach the output folder in full. Device or service certificates: revoke {them} (`provision revoke --pki {} --serial SERIAL`) before issuing again. A broker certificate: run `provision broker` again (with --force).", count(serials), pki.display(), they = if serials.len() == 1 { "it" } else { "they" }, them = if serials.len() == 1 { "it" } else { "them" })]
    RecordedNotWritten {
        /// The PKI directory.
        pki: PathBuf,
        /// Serials of the certificates recorded.
        serials: Vec<String>,
        /// Why writing failed.
        source: Box<Error>,
    },
    /// A revocation was committed to the registry, but the CRL carrying it was not published.
    #[error("revoked {} in the registry, but the CRL was not published: {source}\nThe revocation stands; once the cause is fixed, run `provision crl --pki {}` to publish it.", serials.join(", "), pki.display())]
    CrlNotPublished {
        /// The PKI directory.
        pki: PathBuf,
        /// Serials revoked.
        serials: Vec<String>,
        /// Why publishing failed.
        source: Box<Error>,
    },
    /// Swapping new outputs into place failed, and some of the old ones could not be put back.
    #[error("{}: {source}; some of the previous files could not be put back: they are kept in {}", out.display(), kept.display())]
    NotRestored {
        /// The output directory.
        out: PathBuf,
        /// Where the previous files are.
        kept: PathBuf,
        /// Why the swap failed.
        source: Box<Error>,
    },
    /// Nothing matched what was asked for.
    #[error("{0}")]
    NotFound(String),
    /// A flag's value is unusable.
    #[error("{flag}: {reason}")]
    BadArgument {
        /// The flag.
        flag: &'static str,
        /// Why.
        reason: String,
    },
    /// The registry database failed.
    #[error("registry {}: {source}", path.display())]
    Registry {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// Certificate or CRL generation failed.
    #[error("cannot create {what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
}

/// "1 certificate (serial S)" or "3 certificates (serials A, B, C)", for messages about serials.
fn count(serials: &[String]) -> String {
    /// Serials named in a message; `provision list` shows every one.
    const SHOWN: usize = 5;
    let shown = serials.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match serials.len() {
        1 => format!("1 certificate (serial {shown})"),
        n if n <= SHOWN => format!("{n} certificates (serials {shown})"),
        n => format!(
            "{n} certificates (serials {shown} and {} more; `provision list --status active` shows them)",
            n - SHOWN
        ),
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}

/// Adds what was being generated to an rcgen error.
pub(crate) trait GenerateContext<T> {
    fn generating(self, what: impl Into<String>) -> Result<T>;
}

impl<T> GenerateContext<T> for std::result::Result<T, rcgen::Error> {
    fn generating(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Generate {
            what: what.into(),
            source,
        })
    }
}
