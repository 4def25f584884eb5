//! Hot reload: the TLS configuration in force, and the watcher that replaces it when the CRL,
//! the client CA bundle or the server certificate or key change (or on SIGHUP).
//!
//! New files are loaded and checked completely before anything is swapped; if they do not parse
//! or do not fit together, the old configuration stays in force and the error is logged. A bad
//! file never locks the fleet out.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::audit::Audit;
use crate::crl::RevocationKey;
use crate::live::LiveSessions;
use crate::tls::{TlsFiles, TlsMaterial};

/// How often the watched files are checked. A revoked device is kicked within this plus the
/// time to load the new files, well inside the 2 seconds promised.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often a stale CRL is reported again.
const STALE_REMINDER: Duration = Duration::from_secs(3600);

/// The TLS material in force, swappable while handshakes run.
pub struct TlsState {
    current: RwLock<Arc<TlsMaterial>>,
}

impl TlsState {
    /// Starts with `material`.
    pub fn new(material: TlsMaterial) -> Self {
        Self {
            current: RwLock::new(Arc::new(material)),
        }
    }

    /// The material for the next handshake.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, material: TlsMaterial) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
    }

    /// Gauges of the material in force (server certificate expiry, CRL age), Prometheus text.
    pub fn render_metrics(&self, now: i64, out: &mut String) {
        use std::fmt::Write as _;
        let material = self.current();
        let _ = writeln!(
            out,
            "# HELP broker_server_cert_expiry_seconds Seconds until the server certificate expires.\n# TYPE broker_server_cert_expiry_seconds gauge\nbroker_server_cert_expiry_seconds {}",
            material.server.not_after - now
        );
        if let Some(crl) = &material.crl {
            let _ = writeln!(
                out,
                "# HELP broker_crl_age_seconds Seconds since the CRL's thisUpdate.\n# TYPE broker_crl_age_seconds gauge\nbroker_crl_age_seconds {}\n# TYPE broker_crl_entries gauge\nbroker_crl_entries {}",
                now - crl.this_update,
                crl.revoked.len()
            );
        }
    }

    /// Whether the certificate with `serial` is revoked by the CRL in force.
    pub fn is_revoked(&self, certificate: &RevocationKey) -> bool {
        self.current()
            .crl
            .as_ref()
            .is_some_and(|crl| crl.revoked.contains(certificate))
    }
}

/// A file's identity, version and permissions, to notice a change (including an atomic rename
/// over it, and a `chmod` that makes an unreadable file readable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    /// The inode change time: moves on chmod and chown as well as writes.
    changed: (i64, i64),
    mode: u32,
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
        changed: (meta.ctime(), meta.ctime_nsec()),
        mode: meta.mode(),
    })
}

/// How often a reload that keeps failing is reported again.
const FAILURE_REMINDER: Duration = Duration::from_secs(60);

/// The current stamp of every watched file, in `TlsFiles::all` order.
fn stamps(files: &TlsFiles) -> Vec<Option<FileStamp>> {
    files.all().iter().map(|(_, path)| stamp(path)).collect()
}

/// Watches the TLS files and swaps in new material.
pub struct Reloader {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    state: Arc<TlsState>,
    sessions: Arc<LiveSessions>,
    audit: Audit,
    /// The files behind the material in force: what a reload reports as changed.
    in_force: Vec<Option<FileStamp>>,
    /// The files at the last poll: a reload is tried only when these change, so a bad file is
    /// reported once, not at every poll.
    seen: Vec<Option<FileStamp>>,
    stale_reported: Option<Instant>,
    /// The last reload's error and when it was reported: while set, every poll tries again (a
    /// file the broker cannot read yet, say, becomes readable without changing).
    failing: Option<(String, Instant)>,
}

impl Reloader {
    /// A watcher for `files`, whose material is already in `state`.
    pub fn new(
        files: TlsFiles,
        provider: Arc<CryptoProvider>,
        state: Arc<TlsState>,
        sessions: Arc<LiveSessions>,
        audit: Audit,
    ) -> Self {
        let in_force = stamps(&files);
        Self {
            files,
            provider,
            state,
            sessions,
            audit,
            seen: in_force.clone(),
            in_force,
            stale_reported: None,
            failing: None,
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        self.report_if_stale();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(changed) = self.changed_files() {
                        self.reload(&changed);
                    } else if self.failing.is_some() {
                        self.reload("files that failed to load");
                    }
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.seen = stamps(&self.files);
                    self.reload("all files (SIGHUP)");
                }
                _ = shutdown.changed() => return,
            }
            self.report_if_stale();
        }
    }

    /// The files that differ from those in force, if any file changed since the last poll.
    /// (A writer replacing the certificate and then the key can be seen half-way: that attempt
    /// fails or is discarded, and the next one reports both files.)
    fn changed_files(&mut self) -> Option<String> {
        let fresh = stamps(&self.files);
        if fresh == self.seen {
            return None;
        }
        self.seen = fresh;
        let changed: Vec<&str> = self
            .files
            .all()
            .iter()
            .zip(self.in_force.iter().zip(&self.seen))
            .filter(|(_, (old, new))| old != new)
            .map(|((name, _), _)| *name)
            .collect();
        (!changed.is_empty()).then(|| changed.join(", "))
    }

    /// Loads the files and swaps them in, or keeps the old material if they are unusable.
    pub fn reload(&mut self, what: &str) {
        let loaded = TlsMaterial::load(&self.files, &self.provider);
        if stamps(&self.files) != self.seen {
            // Written while they were read (a certificate and then its key, say): the next poll
            // sees the change, loads them again and reports everything that changed.
            return;
        }
        match loaded {
            Ok(material) => {
                let revoked = material.crl.as_ref().map(|crl| crl.revoked.clone()).unwrap_or_default();
                self.audit.revocation_coverage(material.crl.as_ref());
                self.state.replace(material);
                self.in_force = self.seen.clone();
                self.audit.reload(what);
                self.stale_reported = None;
                self.failing = None;
                // Sessions log `revoked_kick` themselves as they close.
                self.sessions.kick_revoked(&revoked);
            }
            Err(e) => {
                let error = e.to_string();
                let due = self
                    .failing
                    .as_ref()
                    .is_none_or(|(last, at)| *last != error || at.elapsed() >= FAILURE_REMINDER);
                if due {
                    self.audit.reload_failed(&error);
                    self.failing = Some((error, Instant::now()));
                }
            }
        }
    }

    fn report_if_stale(&mut self) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let material = self.state.current();
        let Some(crl) = material.crl.as_ref().filter(|crl| crl.is_stale(now)) else {
            return;
        };
        if self.stale_reported.is_some_and(|at| at.elapsed() < STALE_REMINDER) {
            return;
        }
        self.stale_reported = Some(Instant::now());
        let next_update = crl
            .next_update
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        let path = self
            .files
            .crl
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.audit.crl_stale(&path, &next_update);
    }
}
