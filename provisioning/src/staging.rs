//! Writing a set of outputs all or nothing: each is written into a staging folder inside the
//! output directory, and only when all are complete are they renamed into place.
//!
//! Renames within one directory cannot fail half-way through a file, and the staging folder is
//! on the same filesystem as the outputs because it is inside their directory. Outputs being
//! replaced (`--force`) are all set aside into the staging folder before the first new one is
//! renamed in, so a crash half-way can leave an output missing but never a new certificate
//! beside an old key; an error half-way puts the old ones back. Staged files (the broker's
//! bundle) and the folders are fsynced before and after the renames, so for them a power cut is
//! a crash like any other (a rename onto a missing target gets no implicit flush from the
//! filesystem). Staged folders (device bundles, thousands in a batch) are not flushed file by
//! file: a power cut seconds after a batch may leave empty files in a bundle whose certificate
//! the registry knows; revoke and issue it again.
//!
//! Each run makes a staging folder of its own (never one a crashed run left behind: process ids
//! repeat, in containers especially) and removes only that one.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::output::{create_private_dir, Overwrite};

/// Folder inside the staging folder where the outputs being replaced wait until the swap is done.
/// No output is named like it: ids may not start with a dot.
const PREVIOUS: &str = ".previous";

/// Tells apart the staging folders of one process (a library user may issue from threads).
static NEXT_STAGING: AtomicU64 = AtomicU64::new(0);

/// A hidden `OUT/.staging-<pid>-<n>/` folder, removed when dropped (a crash leaves it behind,
/// with nothing in it the registry does not know).
pub struct Staging {
    /// The output directory.
    out: PathBuf,
    /// The staging folder inside it.
    dir: PathBuf,
    /// Set when old outputs could not be put back: the folder then holds them and must stay.
    keep: bool,
}

impl Staging {
    /// Creates the staging folder (owner-only), and the output directory if it is missing.
    pub fn new(out: &Path) -> Result<Self> {
        create_private_dir(out)?;
        let dir = loop {
            let n = NEXT_STAGING.fetch_add(1, Ordering::Relaxed);
            let dir = out.join(format!(".staging-{}-{n}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                // Left by a crashed run with the same process id: its files stay where they are.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).at(&dir),
            }
        };
        Ok(Self {
            out: out.to_owned(),
            dir,
            keep: false,
        })
    }

    /// Where the output `name` is written before it is swapped in.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Renames every staged output of `names` into the output directory.
    ///
    /// An existing output is refused unless `overwrite` allows replacing it; every output being
    /// replaced is set aside before the first new one goes in, and if any rename fails the new
    /// ones are taken out again and the old ones put back.
    pub fn swap_in(mut self, names: &[&str], overwrite: Overwrite) -> Result<()> {
        fault::point("outputs-staged");
        for &name in names {
            sync_path(&self.path(name))?;
        }
        sync_path(&self.dir)?;
        let previous = self.dir.join(PREVIOUS);
        let mut set_aside = Vec::new();
        let mut placed = Vec::new();
        let swapped = (|| {
            for &name in names {
                let target = self.out.join(name);
                if target.symlink_metadata().is_err() {
                    continue;
                }
                if overwrite == Overwrite::Refuse {
                    return Err(Error::OutputExists(target));
                }
                create_private_dir(&previous)?;
                fs::rename(&target, previous.join(name)).at(&target)?;
                set_aside.push(name);
            }
            if !set_aside.is_empty() {
                fault::point("outputs-set-aside");
            }
            for &name in names {
                let target = self.out.join(name);
                fs::rename(self.path(name), &target).at(&target)?;
                placed.push(name);
                fault::point("output-placed");
            }
            // The renames are on disk before the old outputs go with the staging folder.
            sync_path(&self.out)
        })();
        let Err(failure) = swapped else {
            return Ok(());
        };
        // Every rename is tried, even after one fails: each old output put back is one saved.
        let mut restored = true;
        for name in &placed {
            restored &= fs::rename(self.out.join(name), self.path(name)).is_ok();
        }
        for name in &set_aside {
            restored &= fs::rename(previous.join(name), self.out.join(name)).is_ok();
        }
        if restored {
            return Err(failure);
        }
        self.keep = true;
        Err(Error::NotRestored {
            out: self.out.clone(),
            kept: previous,
            source: Box::new(failure),
        })
    }
}

/// Flushes a file, or a directory's entries (not the files inside it), to disk.
fn sync_path(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).at(path)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_swap_replaces_every_output_and_leaves_no_staging_folder() {
        let out = tempfile::tempdir().unwrap();
        write(&out.path().join("a.crt"), "old cert");
        let staging = Staging::new(out.path()).unwrap();
        write(&staging.path("a.crt"), "new cert");
        write(&staging.path("a.key"), "new key");
        staging.swap_in(&["a.crt", "a.key"], Overwrite::Replace).unwrap();
        assert_eq!(read(&out.path().join("a.crt")), "new cert");
        assert_eq!(read(&out.path().join("a.key")), "new key");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 2, "no staging folder left");
    }

    #[test]
    fn a_swap_that_fails_half_way_puts_the_old_outputs_back() {
        let out = tempfile::tempdir().unwrap();
        write(&out.path().join("a.crt"), "old cert");
        write(&out.path().join("a.key"), "old key");
        write(&out.path().join("a.toml"), "old config");
        let staging = Staging::new(out.path()).unwrap();
        write(&staging.path("a.crt"), "new cert");
        write(&staging.path("a.key"), "new key");
        // a.toml was never staged: its rename fails after the certificate and key went in.
        let err = staging
            .swap_in(&["a.crt", "a.key", "a.toml"], Overwrite::Replace)
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(read(&out.path().join("a.crt")), "old cert");
        assert_eq!(read(&out.path().join("a.key")), "old key");
        assert_eq!(read(&out.path().join("a.toml")), "old config");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 3, "no staging folder left");
    }

    #[test]
    fn a_swap_refuses_an_existing_output_unless_forced() {
        let out = tempfile::tempdir().unwrap();
        write(&out.path().join("b"), "old");
        let staging = Staging::new(out.path()).unwrap();
        write(&staging.path("a"), "new a");
        write(&staging.path("b"), "new b");
        let err = staging.swap_in(&["a", "b"], Overwrite::Refuse).unwrap_err();
        assert!(matches!(err, Error::OutputExists(_)), "{err}");
        assert!(!out.path().join("a").exists());
        assert_eq!(read(&out.path().join("b")), "old");
    }
}
