//! The table of connected sessions by certificate: lets a revocation reach a session that is
//! already connected, and a shutdown reach every session.
//!
//! Takeover of a client id is the router's business (its sessions are keyed by client id); this
//! table knows connections by the certificate they authenticated with.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fleet_identity::{Identity, Serial};

use crate::crl::RevocationKey;
use crate::kick::Kick;
use crate::reason::KickReason;

/// One registered connection.
struct Entry {
    identity: Identity,
    revocation: RevocationKey,
    kick: Arc<Kick>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    /// Set at shutdown: connections registering afterwards are told to close at once.
    closing: bool,
}

/// Connected sessions by registration number.
#[derive(Default)]
pub struct LiveSessions {
    next: AtomicU64,
    table: Mutex<Table>,
}

/// A connection's place in the table; removes it when dropped.
pub struct Registration {
    table: Arc<LiveSessions>,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().entries.remove(&self.key);
    }
}

impl LiveSessions {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Single inserts and removes: a panic elsewhere cannot leave the map inconsistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection authenticated by the certificate with `serial`, closed through
    /// `kick`.
    pub fn register(self: &Arc<Self>, identity: Identity, revocation: RevocationKey, kick: Arc<Kick>) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        if table.closing {
            kick.give(KickReason::Shutdown);
        }
        table.entries.insert(
            key,
            Entry {
                identity,
                revocation,
                kick,
            },
        );
        Registration {
            table: self.clone(),
            key,
        }
    }

    /// Tells every connection whose certificate serial is in `revoked` to close; returns who.
    pub fn kick_revoked(&self, revoked: &HashSet<RevocationKey>) -> Vec<(Identity, Serial)> {
        self.lock()
            .entries
            .values()
            .filter(|e| revoked.contains(&e.revocation))
            .map(|e| {
                e.kick.give(KickReason::Revoked);
                (e.identity.clone(), e.revocation.serial.clone())
            })
            .collect()
    }

    /// Tells every connection, and every one that registers from now on, to close.
    pub fn close_all(&self) {
        let mut table = self.lock();
        table.closing = true;
        for entry in table.entries.values() {
            entry.kick.give(KickReason::Shutdown);
        }
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use fleet_identity::{DeviceId, Role};

    use super::*;

    fn device(table: &Arc<LiveSessions>, id: &str, issuer: &str, serial: &str) -> (Registration, Arc<Kick>) {
        let identity = Identity {
            role: Role::Device,
            id: DeviceId::parse(id).unwrap(),
        };
        let kick = Arc::new(Kick::default());
        let key = RevocationKey {
            issuer: issuer.as_bytes().to_vec(),
            serial: Serial::parse(serial).unwrap(),
        };
        (table.register(identity, key, kick.clone()), kick)
    }

    #[test]
    fn revocation_kicks_by_issuer_and_serial_and_registrations_leave_when_dropped() {
        let table = Arc::new(LiveSessions::default());
        let (revoked, revoked_kick) = device(&table, "dev-1", "CA A", "0a");
        let (_kept, kept_kick) = device(&table, "dev-2", "CA A", "0b");
        // The same serial from another CA is another certificate.
        let (_other, other_kick) = device(&table, "dev-3", "CA B", "0a");
        // Written as a CRL entry's bytes would give it, and as the session registered it.
        let kicked = table.kick_revoked(&HashSet::from([RevocationKey {
            issuer: b"CA A".to_vec(),
            serial: Serial::from_be_bytes(&[0x0a]),
        }]));
        assert_eq!(kicked.len(), 1);
        assert_eq!(revoked_kick.reason(), Some(KickReason::Revoked));
        assert_eq!(kept_kick.reason(), None);
        assert_eq!(other_kick.reason(), None);
        drop(revoked);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn shutdown_reaches_connections_registered_after_it() {
        let table = Arc::new(LiveSessions::default());
        let (_before, before) = device(&table, "dev-1", "CA", "01");
        table.close_all();
        let (_after, after) = device(&table, "dev-2", "CA", "02");
        assert_eq!(before.reason(), Some(KickReason::Shutdown));
        assert_eq!(after.reason(), Some(KickReason::Shutdown));
    }
}
