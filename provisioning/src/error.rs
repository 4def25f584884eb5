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
