//! Writing files the way a PKI must: keys 0600, nothing overwritten by accident, and files that
//! readers watch (the CRL) replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Permissions of a private key file.
pub const KEY_MODE: u32 = 0o600;
/// Permissions of a certificate, CRL or config file.
pub const PUBLIC_MODE: u32 = 0o644;

/// Whether an existing output may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse to touch an existing file (the default).
    Refuse,
    /// Replace it (`--force`).
    Replace,
}

/// Fails with [`Error::OutputExists`] if `path` exists and may not be replaced.
pub fn ensure_writable(path: &Path, overwrite: Overwrite) -> Result<()> {
    if overwrite == Overwrite::Refuse && path.symlink_metadata().is_ok() {
        return Err(Error::OutputExists(path.to_owned()));
    }
    Ok(())
}

/// Writes a new file with `mode`. The mode is set at creation, so a key is never readable by
/// others, not even for an instant.
pub fn write_new(path: &Path, contents: &[u8], mode: u32, overwrite: Overwrite) -> Result<()> {
    ensure_writable(path, overwrite)?;
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    match overwrite {
        Overwrite::Refuse => options.create_new(true),
        Overwrite::Replace => options.create(true).truncate(true),
    };
    let mut file = options.open(path).at(path)?;
    file.write_all(contents).at(path)?;
    // `mode` at creation is masked by the umask and ignored for an existing file: set it outright.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).at(path)
}

/// Replaces `path` atomically: a temporary file beside it is written, synced and renamed over it,
/// so a reader (the broker watching the CRL) sees the old file or the new one, never half of one.
/// The file gets `mode` whatever the umask: a CRL written 0600 under `umask 077` would lock an
/// unprivileged broker out of revocation updates.
pub fn replace_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .at(&temp)?;
        file.write_all(contents).at(&temp)?;
        fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(mode)).at(&temp)?;
        file.sync_all().at(&temp)?;
        fs::rename(&temp, path).at(path)?;
        File::open(dir).and_then(|d| d.sync_all()).at(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Creates a directory (and its parents) readable only by its owner.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_written_0600_and_never_overwritten_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("a.key");
        write_new(&key, b"secret", KEY_MODE, Overwrite::Refuse).unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            write_new(&key, b"x", KEY_MODE, Overwrite::Refuse),
            Err(Error::OutputExists(_))
        ));
        write_new(&key, b"new", KEY_MODE, Overwrite::Replace).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"new");
    }

    #[test]
    fn atomic_replacement_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let crl = dir.path().join("crl.pem");
        replace_atomically(&crl, b"one", PUBLIC_MODE).unwrap();
        replace_atomically(&crl, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&crl).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
