//! The device's key and certificate on disk, and the swap to renewed ones that no crash can
//! break.
//!
//! Beside the current pair (`cert`, `key` in `agent.toml`) a renewal writes a pending pair,
//! `<stem>.next.<ext>` (`device.next.key`, then `device.next.crt`), each written to a temporary
//! name, fsynced, renamed and the folder fsynced. The pending pair is tried first on the next
//! connection; only when the broker accepted it (CONNACK 0) is it committed: the certificate is
//! renamed over the current one, then the key. A broker that refuses it (handshake or CONNACK)
//! rolls it back: the pending files are removed and the current pair is used again.
//!
//! So at every instant the disk holds a pair that connects, and [`IdentityFiles::recover`]
//! (run at start) finishes what a crash interrupted:
//! - a pending key alone: the request was sent or not, the certificate never arrived; removed;
//! - the current certificate already renamed but the key not yet: it fits the pending key; the
//!   commit is finished;
//! - a complete pending pair: kept, tried first.
//!
//! Nothing here touches the message queue.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::fault;
use crate::trust::crypto_provider;

/// The current and pending key and certificate files of this device.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// The current certificate (`cert` in agent.toml).
    pub cert: PathBuf,
    /// The current key (`key` in agent.toml).
    pub key: PathBuf,
}

/// Which pair a connection presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The current certificate and key.
    Current,
    /// The renewed pair, not yet accepted by the broker.
    Pending,
}

impl IdentityFiles {
    /// The files `agent.toml` names.
    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        Self { cert, key }
    }

    /// The pending certificate: `device.next.crt` beside `device.crt`.
    pub fn pending_cert(&self) -> PathBuf {
        pending(&self.cert)
    }

    /// The pending key: `device.next.key` beside `device.key`.
    pub fn pending_key(&self) -> PathBuf {
        pending(&self.key)
    }

    /// The certificate and key files of `slot`.
    pub fn paths(&self, slot: Slot) -> (PathBuf, PathBuf) {
        match slot {
            Slot::Current => (self.cert.clone(), self.key.clone()),
            Slot::Pending => (self.pending_cert(), self.pending_key()),
        }
    }

    /// The pair to try first: the pending one if complete.
    pub fn first_choice(&self) -> Slot {
        if self.pending_cert().exists() && self.pending_key().exists() {
            Slot::Pending
        } else {
            Slot::Current
        }
    }

    /// Finishes or undoes what a crash interrupted (see the module documentation). Returns
    /// what it did, for the log, if anything.
    pub fn recover(&self) -> io::Result<Option<&'static str>> {
        let (pending_cert, pending_key) = (self.pending_cert(), self.pending_key());
        match (pending_cert.exists(), pending_key.exists()) {
            (false, true) => {
                // Judged by the current pair, never by the pending key alone: a pending key is
                // removed only while the current pair still fits together without it.
                let cert = fleet_identity::pem::load_certs(&self.cert).map_err(io::Error::other)?;
                if key_matches(&self.key, &self.cert, &cert[0]).is_ok() {
                    remove_synced(&pending_key)?;
                    Ok(Some("removed the key of a renewal whose certificate never arrived"))
                } else {
                    rename_synced(&pending_key, &self.key)?;
                    Ok(Some("finished a renewal interrupted while it was being committed"))
                }
            }
            (true, false) => {
                remove_synced(&pending_cert)?;
                Ok(Some("removed a renewed certificate without its key"))
            }
            _ => Ok(None),
        }
    }

    /// Writes the pending key (0600), durably, replacing an earlier one.
    pub fn write_pending_key(&self, pem: &str) -> io::Result<()> {
        write_synced(&self.pending_key(), pem.as_bytes(), 0o600)?;
        fault::point("renew-key-written");
        Ok(())
    }

    /// Writes the pending certificate, durably: from now on the next connection tries it.
    pub fn write_pending_cert(&self, pem: &str) -> io::Result<()> {
        write_synced(&self.pending_cert(), pem.as_bytes(), 0o644)?;
        fault::point("renew-cert-written");
        Ok(())
    }

    /// The marker of a committed renewal the issuer has not yet acknowledged hearing of:
    /// `device.unconfirmed` beside `device.crt`.
    pub fn unconfirmed(&self) -> PathBuf {
        self.cert.with_extension("unconfirmed")
    }

    /// Makes the pending pair the current one (the broker accepted it). The marker
    /// [`IdentityFiles::unconfirmed`] is written first, so the confirmation survives a crash.
    pub fn commit(&self) -> io::Result<()> {
        write_synced(&self.unconfirmed(), b"", 0o644)?;
        rename_synced(&self.pending_cert(), &self.cert)?;
        fault::point("renew-commit-half");
        rename_synced(&self.pending_key(), &self.key)?;
        fault::point("renew-committed");
        Ok(())
    }

    /// The issuer acknowledged the confirmation: the marker goes.
    pub fn confirmed(&self) -> io::Result<()> {
        match remove_synced(&self.unconfirmed()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Removes the pending pair (the broker refused it, or the renewal was abandoned).
    pub fn rollback(&self) -> io::Result<()> {
        for file in [self.pending_cert(), self.pending_key()] {
            if file.exists() {
                remove_synced(&file)?;
            }
        }
        Ok(())
    }
}

/// `dir/device.crt` -> `dir/device.next.crt`; `dir/device` -> `dir/device.next`.
fn pending(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.next.{}", ext.to_string_lossy()),
        None => format!("{stem}.next"),
    };
    path.with_file_name(name)
}

fn folder(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    rename_synced(&temp, path)
}

fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    File::open(folder(to))?.sync_all()
}

fn remove_synced(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    File::open(folder(path))?.sync_all()
}

/// Whether the private key in `key_path` belongs to `cert` (read from `cert_path`); the reason if
/// not.
pub fn key_matches(key_path: &Path, cert_path: &Path, cert: &CertificateDer<'_>) -> Result<(), String> {
    let key = fleet_identity::pem::load_key(key_path).map_err(|e| e.to_string())?;
    let signing = crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", key_path.display()))?;
    let public = signing
        .public_key()
        .ok_or_else(|| format!("{}: cannot derive the public key", key_path.display()))?;
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    if public.as_ref() == parsed.public_key().raw {
        Ok(())
    } else {
        Err(format!(
            "{} does not belong to {}",
            key_path.display(),
            cert_path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_files_sit_beside_the_current_ones() {
        let files = IdentityFiles::new("/etc/fleet/device.crt".into(), "/etc/fleet/device.key".into());
        assert_eq!(files.pending_cert(), Path::new("/etc/fleet/device.next.crt"));
        assert_eq!(files.pending_key(), Path::new("/etc/fleet/device.next.key"));
        assert_eq!(pending(Path::new("key")), Path::new("key.next"));
    }
}
