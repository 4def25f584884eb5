//! The table of live sessions, so a revocation can reach a session that is already connected.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleet_identity::Identity;
use tokio::sync::Notify;

/// One registered session.
struct Entry {
    identity: Identity,
    serial: String,
    kick: Arc<Notify>,
}

/// Live sessions by registration number.
#[derive(Default)]
pub struct LiveSessions {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// A session's place in the table; removes it when dropped.
pub struct Registration {
    table: Arc<LiveSessions>,
    key: u64,
    /// Notified when the session must close because its certificate was revoked.
    pub kick: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic elsewhere while holding the lock leaves the map consistent (single inserts and
        // removes), so keep using it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session authenticated by the certificate with `serial`.
    pub fn register(self: &Arc<Self>, identity: Identity, serial: String) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        self.lock().insert(
            key,
            Entry {
                identity,
                serial,
                kick: kick.clone(),
            },
        );
        Registration {
            table: self.clone(),
            key,
            kick,
        }
    }

    /// Tells every session whose certificate serial is in `revoked` to close; returns who.
    pub fn kick_revoked(&self, revoked: &HashSet<String>) -> Vec<(Identity, String)> {
        self.lock()
            .values()
            .filter(|e| revoked.contains(&e.serial))
            .map(|e| {
                e.kick.notify_one();
                (e.identity.clone(), e.serial.clone())
            })
            .collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
