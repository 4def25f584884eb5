//! The durable store: what must survive a restart, `kill -9` or a power cut. That is the
//! persistent sessions (`clean_session = false`) with their subscriptions, the QoS 1/2
//! deliveries queued or in flight for them and the QoS 2 packet ids they have not yet seen
//! released, and the retained messages. QoS 0, and whatever only clean sessions receive, is
//! never written.
//!
//! # Design
//!
//! Memory stays the truth while the broker runs. The store is a copy written behind it and read
//! only at start ([`Store::open`] returns what it holds, [`crate::router::Router::restore`]
//! puts it back). The router records each change as it makes it, under the lock of the session
//! concerned, so the order of the records is the order of the changes. Each record gets a
//! sequence number, its [`Ticket`].
//!
//! One committer thread takes everything recorded so far and writes it in one SQLite
//! transaction (group commit). With `sync = "always"` the commit is fsynced before the durable
//! watermark moves past those tickets. A connection that owes its client a PUBACK, PUBREC or
//! PUBCOMP keeps it back until the watermark covers the publication's ticket, so nothing is
//! acknowledged before it is on disk for every persistent session it was queued for. The
//! connection keeps reading and routing meanwhile; only its acknowledgements wait, in order.
//! A delivery that its online subscriber acknowledges before the committer reached it is
//! written not at all: a subscriber that keeps up costs the disk almost nothing.
//!
//! When a write fails (disk full, I/O error) the batch is kept and retried; acknowledgements
//! wait, so publishers keep their messages, and the log says why until the write succeeds.
//!
//! SQLite in WAL mode was chosen over a log of our own: it survives `kill -9` and power loss by
//! design, detects damage, needs nothing installed, and an operator can inspect it with
//! `sqlite3`. The figures that decided it are in BENCHMARKS.md.

mod committer;
mod database;
mod recovery;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use atomic_waker::AtomicWaker;

use crate::message::{Delivery, Message, SubscriptionOptions};
pub use recovery::{Recovered, StoredDelivery, StoredSession};

/// When acknowledgements wait for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every acknowledgement waits until what it covers is fsynced (group commit).
    Always,
    /// Acknowledgements never wait; the store commits (and fsyncs) this often. A crash or power
    /// cut loses up to this much acknowledged traffic.
    Interval(Duration),
}

/// A position in the store's record: an acknowledgement that waits for it waits until
/// everything recorded up to it is durable. The default (nothing) is always durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Ticket {
    /// Waits for `other` as well.
    pub fn cover(&mut self, other: Ticket) {
        self.0 = self.0.max(other.0);
    }
}

/// A change to durable state, in the order the router made it.
enum Record {
    /// A persistent session now exists (or exists again, or has a new expiry interval).
    Session {
        client: Arc<str>,
        share_scope: Arc<str>,
        expiry: u32,
    },
    /// A persistent session ended (replaced by a clean one): its rows go, these deliveries too.
    SessionGone {
        client: Arc<str>,
        deliveries: Vec<u64>,
    },
    Subscribe {
        client: Arc<str>,
        filter: Box<str>,
        options: SubscriptionOptions,
    },
    Unsubscribe {
        client: Arc<str>,
        filter: Box<str>,
    },
    /// A QoS 1/2 delivery queued for a persistent session.
    Enqueue {
        id: u64,
        client: Arc<str>,
        delivery: Delivery,
    },
    /// A QoS 1/2 delivery was sent with this packet id (resent with it, DUP, after a restart).
    Sent {
        id: u64,
        pkid: u16,
    },
    /// A QoS 2 delivery's PUBREC came: only its PUBREL is owed now.
    Released {
        id: u64,
    },
    /// A delivery is complete or was dropped.
    Remove {
        id: u64,
    },
    /// A QoS 2 packet id received from a persistent session, not yet released.
    AwaitRelease {
        client: Arc<str>,
        pkid: u16,
    },
    /// Its PUBREL came.
    ReleaseReceived {
        client: Arc<str>,
        pkid: u16,
    },
    /// A topic's retained message set, or deleted (`None`).
    Retain {
        topic: Box<str>,
        message: Option<Arc<Message>>,
    },
}

/// The handle the router and the connections share. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    sync: SyncPolicy,
    /// Topic and payload bytes of the deliveries on disk, at most (`persistence.max_bytes`).
    max_bytes: u64,
    journal: Mutex<Journal>,
    /// Signals the committer that the journal is no longer empty, or that it should stop.
    recorded: Condvar,
    /// Everything up to this sequence number is durable.
    durable: AtomicU64,
    waiting: Mutex<Vec<(Ticket, Arc<DurableWaiter>)>>,
    next_delivery: AtomicU64,
    /// Topic and payload bytes of the deliveries the store holds (or is about to).
    queued_bytes: AtomicU64,
    /// The last write failed and is being retried.
    failing: AtomicBool,
    commits: AtomicU64,
    committer: Mutex<Option<JoinHandle<()>>>,
    /// Held (locked) while this broker uses the directory.
    _lock: std::fs::File,
}

/// Records not yet taken by the committer.
struct Journal {
    records: Vec<Record>,
    /// The sequence number of the last record.
    last: u64,
    closing: bool,
}

/// A connection's registration for "the watermark moved": one per connection, queued at most
/// once at a time, so many waiting publishers cost one entry each.
#[derive(Default)]
pub struct DurableWaiter {
    waker: AtomicWaker,
    queued: AtomicBool,
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory cannot be created or used.
    #[error("persistence.dir {}: {source}", dir.display())]
    Dir {
        /// `persistence.dir`.
        dir: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The database cannot be opened or prepared.
    #[error("store {}: {reason}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// What went wrong, in words an operator can act on.
        reason: String,
    },
}

/// `[persistence]`, as the store needs it.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The directory holding the database.
    pub dir: PathBuf,
    /// When acknowledgements wait for the disk.
    pub sync: SyncPolicy,
    /// Topic and payload bytes queued on disk at most.
    pub max_bytes: u64,
}

/// The database's file name inside `persistence.dir`.
const DATABASE_FILE: &str = "broker.sqlite";

impl Store {
    /// Opens (or creates) the store in `settings.dir`, recovers what it holds and starts the
    /// committer. A damaged database is set aside and what could be read is kept (logged).
    pub fn open(settings: &StoreSettings) -> Result<(Store, Recovered), StoreError> {
        let path = settings.dir.join(DATABASE_FILE);
        let (database, recovered, dir_lock) = recovery::open(&settings.dir, &path)?;
        let next_delivery = recovered.max_delivery_id().saturating_add(1);
        let queued_bytes = recovered.queued_bytes();
        let shared = Arc::new(Shared {
            path,
            sync: settings.sync,
            max_bytes: settings.max_bytes,
            journal: Mutex::new(Journal {
                records: Vec::new(),
                last: 0,
                closing: false,
            }),
            recorded: Condvar::new(),
            durable: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            next_delivery: AtomicU64::new(next_delivery),
            queued_bytes: AtomicU64::new(queued_bytes),
            failing: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            committer: Mutex::new(None),
            _lock: dir_lock,
        });
        let handle = committer::start(shared.clone(), database).map_err(|source| StoreError::Dir {
            dir: settings.dir.clone(),
            source,
        })?;
        *lock(&shared.committer) = Some(handle);
        Ok((Store { shared }, recovered))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn record(&self, record: Record) -> Ticket {
        let mut journal = lock(&self.shared.journal);
        journal.last += 1;
        journal.records.push(record);
        if journal.records.len() == 1 {
            self.shared.recorded.notify_one();
        }
        Ticket(journal.last)
    }

    /// Everything recorded so far.
    pub fn head(&self) -> Ticket {
        Ticket(lock(&self.shared.journal).last)
    }

    /// Whether everything up to `ticket` is durable. With `sync = interval`, always, unless
    /// writes are failing: then acknowledgements wait, so that a full disk cannot make the
    /// broker hold ever more unwritten records in memory.
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        let interval = matches!(self.shared.sync, SyncPolicy::Interval(_));
        (interval && !self.shared.failing.load(Ordering::Relaxed))
            || self.shared.durable.load(Ordering::SeqCst) >= ticket.0
    }

    /// Ready once `ticket` is durable; otherwise `waiter` is woken when the watermark moves.
    pub fn poll_durable(&self, ticket: Ticket, waiter: &Arc<DurableWaiter>, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_durable(ticket) {
            return Poll::Ready(());
        }
        waiter.waker.register(cx.waker());
        if !waiter.queued.swap(true, Ordering::SeqCst) {
            lock(&self.shared.waiting).push((ticket, waiter.clone()));
        }
        // The committer may have moved the watermark before it saw us queued.
        if self.is_durable(ticket) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether the deliveries on disk exceed `persistence.max_bytes`.
    pub fn over_budget(&self) -> bool {
        self.shared.queued_bytes.load(Ordering::Relaxed) > self.shared.max_bytes
    }

    /// A persistent session was created, or its expiry interval (seconds) changed.
    pub fn session(&self, client: &Arc<str>, share_scope: &Arc<str>, expiry: u32) -> Ticket {
        self.record(Record::Session {
            client: client.clone(),
            share_scope: share_scope.clone(),
            expiry,
        })
    }

    /// A persistent session ended; `deliveries` are the ids (and their total size) it held.
    pub fn session_gone(&self, client: &Arc<str>, deliveries: Vec<u64>, bytes: usize) -> Ticket {
        self.shared.queued_bytes.fetch_sub(bytes as u64, Ordering::Relaxed);
        self.record(Record::SessionGone {
            client: client.clone(),
            deliveries,
        })
    }

    /// A persistent session subscribed (or changed a subscription's options).
    pub fn subscribe(&self, client: &Arc<str>, filter: &str, options: &SubscriptionOptions) -> Ticket {
        self.record(Record::Subscribe {
            client: client.clone(),
            filter: filter.into(),
            options: *options,
        })
    }

    /// A persistent session unsubscribed.
    pub fn unsubscribe(&self, client: &Arc<str>, filter: &str) -> Ticket {
        self.record(Record::Unsubscribe {
            client: client.clone(),
            filter: filter.into(),
        })
    }

    /// Queues `delivery` on disk for `client`; returns its store id.
    pub fn enqueue(&self, client: &Arc<str>, delivery: &Delivery) -> (u64, Ticket) {
        let id = self.shared.next_delivery.fetch_add(1, Ordering::Relaxed);
        self.shared
            .queued_bytes
            .fetch_add(delivery.message.size() as u64, Ordering::Relaxed);
        let mut stored = delivery.clone();
        stored.stored = Some(id);
        let ticket = self.record(Record::Enqueue {
            id,
            client: client.clone(),
            delivery: stored,
        });
        (id, ticket)
    }

    /// A QoS 1/2 delivery went out with `pkid`.
    pub fn sent(&self, id: u64, pkid: u16) -> Ticket {
        self.record(Record::Sent { id, pkid })
    }

    /// A QoS 2 delivery was received by its subscriber (PUBREC).
    pub fn released(&self, id: u64) -> Ticket {
        self.record(Record::Released { id })
    }

    /// A delivery of `size` bytes is complete or dropped.
    pub fn remove(&self, id: u64, size: usize) -> Ticket {
        self.shared.queued_bytes.fetch_sub(size as u64, Ordering::Relaxed);
        self.record(Record::Remove { id })
    }

    /// A persistent session's QoS 2 PUBLISH with `pkid` was routed; its PUBREL is awaited.
    pub fn await_release(&self, client: &Arc<str>, pkid: u16) -> Ticket {
        self.record(Record::AwaitRelease {
            client: client.clone(),
            pkid,
        })
    }

    /// The PUBREL for `pkid` came.
    pub fn release_received(&self, client: &Arc<str>, pkid: u16) -> Ticket {
        self.record(Record::ReleaseReceived {
            client: client.clone(),
            pkid,
        })
    }

    /// `topic`'s retained message is now `message` (`None`: deleted).
    pub fn retain(&self, topic: &str, message: Option<Arc<Message>>) -> Ticket {
        self.record(Record::Retain {
            topic: topic.into(),
            message,
        })
    }

    /// Writes what is still recorded and stops the committer (at shutdown).
    pub fn close(&self) {
        lock(&self.shared.journal).closing = true;
        self.shared.recorded.notify_one();
        if let Some(handle) = lock(&self.shared.committer).take() {
            let _ = handle.join();
        }
    }

    /// The store's gauges and counters in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let shared = &self.shared;
        let _ = writeln!(
            out,
            "# HELP broker_store_queued_bytes Topic and payload bytes queued on disk for persistent sessions.\n# TYPE broker_store_queued_bytes gauge\nbroker_store_queued_bytes {}\n# HELP broker_store_failing 1 while writes to the store fail (acknowledgements wait).\n# TYPE broker_store_failing gauge\nbroker_store_failing {}\n# TYPE broker_store_commits_total counter\nbroker_store_commits_total {}",
            shared.queued_bytes.load(Ordering::Relaxed),
            u8::from(shared.failing.load(Ordering::Relaxed)),
            shared.commits.load(Ordering::Relaxed),
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
