//! The table of live sessions: lets a revocation reach a session that is already connected, and
//! makes a new connection under a client id take over the one already using it.
//!
//! Takeover is decided here rather than left to rumqttd's router because a session only opens a
//! router link when it first needs the router (see `session`): two connections for one client id
//! may both be link-less, and the router would never see the second one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use fleet_identity::Identity;
use tokio::sync::Notify;

/// Why a live session is told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// Its certificate was revoked.
    Revoked,
    /// A newer connection authenticated under the same client id (MQTT-3.1.4-2).
    TakenOver,
}

/// The signal a session waits on; the first reason given wins.
#[derive(Default)]
pub struct Kick {
    reason: OnceLock<KickReason>,
    notify: Notify,
}

impl Kick {
    fn give(&self, reason: KickReason) {
        let _ = self.reason.set(reason);
        self.notify.notify_one();
    }

    /// Waits until the session is told to close, and says why.
    pub async fn wait(&self) -> KickReason {
        loop {
            if let Some(reason) = self.reason.get() {
                return *reason;
            }
            self.notify.notified().await;
        }
    }
}

/// One registered session.
struct Entry {
    identity: Identity,
    serial: String,
    client_id: String,
    kick: Arc<Kick>,
    gate: Arc<Mutex<()>>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    /// Every router client id with live sessions.
    client_ids: HashMap<String, ClientId>,
}

/// The sessions of one router client id.
#[derive(Default)]
struct ClientId {
    /// The newest registration, while it lives.
    newest: Option<u64>,
    /// Held while one of the id's sessions opens its router link.
    gate: Arc<Mutex<()>>,
}

/// Live sessions by registration number.
#[derive(Default)]
pub struct LiveSessions {
    next: AtomicU64,
    table: Mutex<Table>,
}

/// A session's place in the table; removes it when dropped.
pub struct Registration {
    table: Arc<LiveSessions>,
    key: u64,
    /// Notified when the session must close.
    pub kick: Arc<Kick>,
}

impl Registration {
    /// What opening this session's router link needs, usable from a blocking thread.
    pub fn link_claim(&self) -> LinkClaim {
        let gate = self.table.lock().entries.get(&self.key).map(|e| e.gate.clone());
        LinkClaim {
            table: self.table.clone(),
            key: self.key,
            gate: gate.unwrap_or_default(),
        }
    }
}

/// The right to open a router link for a client id, for as long as the session is the newest
/// one with that id.
///
/// rumqttd gives a client id to the last link that connects with it. Sessions of one client id
/// open their links one at a time, each checking before and after that it is still the newest:
/// so the newest session's link is always the last to connect, and an older session that raced
/// it disconnects its own link instead of taking the id back.
pub struct LinkClaim {
    table: Arc<LiveSessions>,
    key: u64,
    gate: Arc<Mutex<()>>,
}

impl LinkClaim {
    /// Holds the client id's gate.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no newer connection has taken over the client id.
    pub fn is_current(&self) -> bool {
        let table = self.table.lock();
        let client_id = table.entries.get(&self.key).map(|e| e.client_id.as_str());
        client_id.and_then(|id| table.client_ids.get(id)?.newest) == Some(self.key)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        let Some(entry) = table.entries.remove(&self.key) else {
            return;
        };
        let Some(id) = table.client_ids.get_mut(&entry.client_id) else {
            return;
        };
        if id.newest == Some(self.key) {
            id.newest = None;
        }
        // The table's and this entry's: no other session of the id is left.
        if Arc::strong_count(&entry.gate) == 2 {
            table.client_ids.remove(&entry.client_id);
        }
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves the maps consistent (single inserts and
        // removes), so keep using them.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session authenticated by the certificate with `serial` under the router
    /// client id `client_id`, telling the session that held that id before, if any, to close.
    pub fn register(self: &Arc<Self>, identity: Identity, serial: String, client_id: String) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Kick::default());
        let mut table = self.lock();
        let id = table.client_ids.entry(client_id.clone()).or_default();
        let previous = id.newest.replace(key);
        let gate = id.gate.clone();
        if let Some(entry) = previous.and_then(|previous| table.entries.get(&previous)) {
            entry.kick.give(KickReason::TakenOver);
        }
        table.entries.insert(
            key,
            Entry {
                identity,
                serial,
                client_id,
                kick: kick.clone(),
                gate,
            },
        );
        drop(table);
        Registration {
            table: self.clone(),
            key,
            kick,
        }
    }

    /// Tells every session whose certificate serial is in `revoked` to close; returns who.
    pub fn kick_revoked(&self, revoked: &HashSet<String>) -> Vec<(Identity, String)> {
        self.lock()
            .entries
            .values()
            .filter(|e| revoked.contains(&e.serial))
            .map(|e| {
                e.kick.give(KickReason::Revoked);
                (e.identity.clone(), e.serial.clone())
            })
            .collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use fleet_identity::{DeviceId, Role};

    use super::*;

    fn device(table: &Arc<LiveSessions>, id: &str, serial: &str) -> Registration {
        let identity = Identity {
            role: Role::Device,
            id: DeviceId::parse(id).unwrap(),
        };
        table.register(identity, serial.into(), format!("device:{id}"))
    }

    fn reason(registration: &Registration) -> Option<KickReason> {
        registration.kick.reason.get().copied()
    }

    #[test]
    fn a_newer_registration_takes_over_the_client_id() {
        let table = Arc::new(LiveSessions::default());
        let first = device(&table, "dev-1", "01");
        let other = device(&table, "dev-2", "02");
        let second = device(&table, "dev-1", "03");
        assert_eq!(reason(&first), Some(KickReason::TakenOver));
        assert!(!first.link_claim().is_current());
        assert!(second.link_claim().is_current() && other.link_claim().is_current());
        assert_eq!(reason(&second), None);
        // The old session ending does not unseat the new one.
        drop(first);
        assert!(second.link_claim().is_current());
        assert_eq!(table.len(), 2);
        drop((second, other));
        assert!(
            table.lock().client_ids.is_empty(),
            "a client id goes with its last session"
        );
    }

    #[test]
    fn revocation_kicks_by_serial_and_the_first_reason_sticks() {
        let table = Arc::new(LiveSessions::default());
        let revoked = device(&table, "dev-1", "0a");
        let kept = device(&table, "dev-2", "0b");
        let kicked = table.kick_revoked(&HashSet::from(["0a".to_owned()]));
        assert_eq!(kicked.len(), 1);
        assert_eq!(reason(&revoked), Some(KickReason::Revoked));
        assert_eq!(reason(&kept), None);
        let _newer = device(&table, "dev-1", "0c");
        assert_eq!(reason(&revoked), Some(KickReason::Revoked));
    }
}
