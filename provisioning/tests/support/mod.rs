//! What the `provision` integration tests share: the binary under test and a fresh PKI to run it
//! against.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::run_ok;
use fleet_identity::pem;
use rcgen::PublicKeyData;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The `provision` binary this crate builds.
pub fn provision() -> Command {
    Command::new(env!("CARGO_BIN_EXE_provision"))
}

/// A fresh PKI (`provision init --fleet acme`) in a temporary directory.
pub struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    pub fn new() -> Self {
        let fleet = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        run_ok(
            provision()
                .args(["init", "--fleet", "acme"])
                .arg("--pki")
                .arg(fleet.pki()),
        );
        fleet
    }

    /// The PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// A path inside the temporary directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `provision <sub> --pki <this PKI>`, ready for more arguments.
    pub fn cmd(&self, sub: &str) -> Command {
        let mut c = provision();
        c.arg(sub).arg("--pki").arg(self.pki());
        c
    }

    /// Issues device `id` into `devices/`; returns its bundle directory.
    /// `provision broker` for `gw.local` into `out`.
    pub fn broker_cmd(&self, out: &Path) -> Command {
        let mut command = self.cmd("broker");
        command.args(["--dns", "gw.local", "--out"]).arg(out);
        command
    }

    pub fn device(&self, id: &str) -> PathBuf {
        run_ok(self.cmd("device").args(["--id", id, "--out"]).arg(self.path("devices")));
        self.path("devices").join(id)
    }
}

/// Whether the key file holds the private key of the certificate file.
pub fn key_matches(cert: &Path, key: &Path) -> bool {
    let der = pem::load_certs(cert).unwrap().remove(0);
    let (_, parsed) = X509Certificate::from_der(&der).unwrap();
    let key = rcgen::KeyPair::from_pem(&fs::read_to_string(key).unwrap()).unwrap();
    parsed.public_key().raw == key.subject_public_key_info().as_slice()
}
