//! The real `provision serve` (the renewal issuer) as a child process, its JSON log read as
//! events.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::event_log::EventLog;

/// A running issuer. Killed when dropped.
pub struct IssuerProcess {
    child: Child,
    /// Its log.
    pub log: EventLog,
}

impl IssuerProcess {
    /// Starts `provision serve` for the PKI in `pki`, connecting to the broker on
    /// `localhost:port` with the service bundle in `service` (service.crt, service.key), plus
    /// `extra` flags; waits until it has subscribed.
    pub fn start(provision: &Path, pki: &Path, port: u16, service: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(provision)
            .arg("serve")
            .arg("--pki")
            .arg(pki)
            .args(["--broker-url", &format!("mqtts://localhost:{port}"), "--log-json"])
            .arg("--cert")
            .arg(service.join("service.crt"))
            .arg("--key")
            .arg(service.join("service.key"))
            .args(extra)
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", provision.display()));
        let log = EventLog::read(child.stderr.take().expect("piped stderr"));
        log.wait_for("the issuer's serving event", Duration::from_secs(20), |e| {
            e["event"] == "serving"
        });
        Self { child, log }
    }

    /// Kills it with SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IssuerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
