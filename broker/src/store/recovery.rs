//! Reading the store back at start, and what happens when it is damaged.
//!
//! A database that SQLite finds damaged (`PRAGMA quick_check`, or an error while reading), or
//! that holds rows the broker cannot use, is never written again: what could be read is kept,
//! the file is moved aside (`broker.sqlite.damaged-<unix time>`, for an operator to inspect),
//! and a fresh database is written with what was recovered. The log says exactly which table
//! stopped reading where and why, and how many rows were left behind. The broker starts either
//! way: a damaged store must not keep a gateway down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rusqlite::ErrorCode;

use super::database::{Database, SCHEMA_VERSION};
use super::{Record, StoreError};
use crate::message::{Delivery, Message, QoS, SubscriptionOptions};

/// What the store held at start.
#[derive(Default)]
pub struct Recovered {
    /// Persistent sessions, each with what it had queued.
    pub sessions: Vec<StoredSession>,
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
}

/// A persistent session as stored.
pub struct StoredSession {
    /// The session key.
    pub client: Arc<str>,
    /// Its shared-subscription scope.
    pub share_scope: Arc<str>,
    /// Seconds it outlives a connection ([`crate::router::NEVER_EXPIRES`]: never ends).
    pub expiry: u32,
    /// Filters (as the client named them) and their options.
    pub subscriptions: Vec<(Box<str>, SubscriptionOptions)>,
    /// Its deliveries, oldest first.
    pub deliveries: Vec<StoredDelivery>,
    /// QoS 2 packet ids received from it and not yet released.
    pub awaiting_release: Vec<u16>,
}

/// A queued or inflight delivery as stored.
pub struct StoredDelivery {
    /// The delivery, with its store id.
    pub delivery: Delivery,
    /// The packet id it went out with, if it did (resent with it, DUP).
    pub pkid: Option<u16>,
    /// Its PUBREC came: only the PUBREL is owed.
    pub released: bool,
}

impl Recovered {
    pub(super) fn max_delivery_id(&self) -> u64 {
        self.deliveries().filter_map(|d| d.delivery.stored).max().unwrap_or(0)
    }

    pub(super) fn queued_bytes(&self) -> u64 {
        self.deliveries().map(|d| d.delivery.message.size() as u64).sum()
    }

    fn deliveries(&self) -> impl Iterator<Item = &StoredDelivery> {
        self.sessions.iter().flat_map(|s| s.deliveries.iter())
    }

    /// Everything recovered, as records that write it into a fresh database.
    fn records(&self) -> Vec<Record> {
        let mut records = Vec::new();
        for session in &self.sessions {
            let client = &session.client;
            records.push(Record::Session {
                client: client.clone(),
                share_scope: session.share_scope.clone(),
                expiry: session.expiry,
            });
            for (filter, options) in &session.subscriptions {
                records.push(Record::Subscribe {
                    client: client.clone(),
                    filter: filter.clone(),
                    options: *options,
                });
            }
            for stored in &session.deliveries {
                let id = stored.delivery.stored.unwrap_or_default();
                records.push(Record::Enqueue {
                    id,
                    client: client.clone(),
                    delivery: stored.delivery.clone(),
                });
                if let Some(pkid) = stored.pkid {
                    records.push(Record::Sent { id, pkid });
                }
                if stored.released {
                    records.push(Record::Released { id });
                }
            }
            for &pkid in &session.awaiting_release {
                records.push(Record::AwaitRelease {
                    client: client.clone(),
                    pkid,
                });
            }
        }
        for message in &self.retained {
            records.push(Record::Retain {
                topic: message.topic.clone(),
                message: Some(message.clone()),
            });
        }
        records
    }
}

/// What made the database unusable as it is: the table, how far reading got, and why.
struct Damage {
    table: &'static str,
    read: usize,
    reason: String,
}

/// The lock file in `persistence.dir`: held while a broker uses the directory.
const LOCK_FILE: &str = "broker.lock";

/// Opens the store at `path` in `dir`, recovering what it holds (see the module docs). The
/// returned file holds the directory's lock: a second broker on the same directory is refused,
/// not interleaved.
pub(super) fn open(dir: &Path, path: &Path) -> Result<(Database, Recovered, std::fs::File), StoreError> {
    let dir_error = |source| StoreError::Dir {
        dir: dir.to_owned(),
        source,
    };
    create_private_dir(dir).map_err(dir_error)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(dir_error)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Database {
                path: path.to_owned(),
                reason: "in use by another broker process (it holds broker.lock in persistence.dir)".into(),
            })
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(dir_error(e)),
    }
    let started = Instant::now();
    let opened = Database::open(path).and_then(|mut db| db.prepare().map(|version| (db, version)));
    let (database, recovered, damage) = match opened {
        Ok((_, Some(version))) => {
            return Err(StoreError::Database {
                path: path.to_owned(),
                reason: format!(
                    "written with store schema {version}, this broker reads schema {SCHEMA_VERSION}; run the broker version that wrote it, or move the directory aside"
                ),
            })
        }
        Ok((mut database, None)) => {
            let (recovered, damage) = read(&mut database).map_err(|e| StoreError::Database {
                path: path.to_owned(),
                reason: format!("cannot read: {e}"),
            })?;
            (Some(database), recovered, damage)
        }
        Err(e) if is_damage(&e) => {
            let damage = vec![Damage {
                table: "(file)",
                read: 0,
                reason: e.to_string(),
            }];
            (None, Recovered::default(), damage)
        }
        Err(e) if in_use(&e) => {
            return Err(StoreError::Database {
                path: path.to_owned(),
                reason: format!("in use by another process: {e}"),
            })
        }
        // Permissions, I/O, a full disk: nothing says the file is damaged, so it is left alone
        // and the broker does not start on an empty store in its place.
        Err(e) => {
            return Err(StoreError::Database {
                path: path.to_owned(),
                reason: format!("cannot open: {e}"),
            })
        }
    };
    let database = match database {
        Some(database) if damage.is_empty() => database,
        database => {
            for Damage { table, read, reason } in &damage {
                tracing::error!(
                    event = "store_damaged",
                    path = %path.display(),
                    table,
                    rows_read = read,
                    %reason,
                    "store {}: table {table}: {reason} (after {read} rows); rows beyond are not recovered",
                    path.display()
                );
            }
            drop(database);
            rebuild(path, &recovered)?
        }
    };
    tracing::info!(
        event = "store_opened",
        path = %path.display(),
        sessions = recovered.sessions.len(),
        deliveries = recovered.deliveries().count(),
        retained = recovered.retained.len(),
        ms = started.elapsed().as_millis() as u64,
        "store {}: {} persistent sessions, {} queued deliveries, {} retained messages recovered",
        path.display(),
        recovered.sessions.len(),
        recovered.deliveries().count(),
        recovered.retained.len()
    );
    Ok((database, recovered, lock))
}

fn in_use(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Whether SQLite's error says the file itself is damaged (not that it cannot be reached).
fn is_damage(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

/// Writes `recovered` into a fresh database and puts it in the damaged one's place, keeping
/// the damaged file (and its WAL) beside it as `broker.sqlite.damaged-<unix time>`. The fresh
/// database is complete before it replaces anything, and the damaged file keeps its name until
/// then, so a crash at any step leaves one of the two in place.
fn rebuild(path: &Path, recovered: &Recovered) -> Result<Database, StoreError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| StoreError::Database {
        path: path.to_owned(),
        reason: format!("damaged, and {what}: {e}"),
    };
    let named = |base: &Path, suffix: &str| PathBuf::from(format!("{}{suffix}", base.display()));
    let temp = named(path, ".rebuild");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(named(&temp, suffix));
    }
    {
        let mut fresh = Database::open(&temp)
            .and_then(|mut db| db.prepare().map(|_| db))
            .map_err(|e| failed("a fresh database cannot be created", &e))?;
        fresh
            .write(&recovered.records(), true)
            .map_err(|e| failed("the recovered state cannot be written", &e))?;
        // The main file alone must hold it: only that file is renamed into place.
        fresh
            .checkpoint()
            .map_err(|e| failed("the rebuilt database cannot be completed", &e))?;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let aside = (0..)
        .map(|n| {
            named(
                path,
                &if n == 0 {
                    format!(".damaged-{stamp}")
                } else {
                    format!(".damaged-{stamp}-{n}")
                },
            )
        })
        .find(|candidate| ["", "-wal", "-shm"].iter().all(|s| !named(candidate, s).exists()))
        .unwrap_or_else(|| named(path, ".damaged"));
    if path.exists() {
        std::fs::hard_link(path, &aside).map_err(|e| failed(&format!("cannot be kept as {}", aside.display()), &e))?;
    }
    for suffix in ["-wal", "-shm"] {
        let from = named(path, suffix);
        if from.exists() {
            let to = named(&aside, suffix);
            std::fs::rename(&from, &to).map_err(|e| failed(&format!("cannot be kept as {}", to.display()), &e))?;
        }
    }
    std::fs::rename(&temp, path).map_err(|e| failed("the rebuilt database cannot replace it", &e))?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    tracing::warn!(event = "store_damaged", moved_to = %aside.display(), "damaged store file kept as {}", aside.display());
    Database::open(path)
        .and_then(|mut db| db.prepare().map(|_| db))
        .map_err(|e| failed("the rebuilt database cannot be opened", &e))
}

/// Reads every table, keeping what is usable; what is not is reported as damage. An error
/// that says nothing about the file (I/O, memory) is returned instead: the start stops, and the
/// store is left as it is.
fn read(database: &mut Database) -> Result<(Recovered, Vec<Damage>), rusqlite::Error> {
    let mut damage = Vec::new();
    let mut failed = None;
    let check: Result<Vec<String>, _> = database
        .conn()
        .prepare("PRAGMA quick_check")
        .and_then(|mut s| s.query_map([], |row| row.get(0))?.collect());
    match check {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => {}
        Ok(lines) => damage.push(Damage {
            table: "(integrity check)",
            read: 0,
            reason: lines.join("; "),
        }),
        Err(e) if is_damage(&e) => damage.push(Damage {
            table: "(integrity check)",
            read: 0,
            reason: e.to_string(),
        }),
        Err(e) => return Err(e),
    }
    let conn = database.conn();
    let mut sessions = Vec::new();
    let mut by_row: HashMap<i64, usize> = HashMap::new();
    scan(
        conn,
        "sessions",
        "SELECT id, client, share_scope, expiry FROM sessions",
        (&mut damage, &mut failed),
        |row| {
            let id: i64 = row.get(0)?;
            let client: String = row.get(1)?;
            let share_scope: String = row.get(2)?;
            let expiry: i64 = row.get(3)?;
            let Ok(expiry) = u32::try_from(expiry) else {
                return Ok(Err(format!(
                    "session {client:?}: expiry {expiry} is not 0 to 4294967295"
                )));
            };
            by_row.insert(id, sessions.len());
            sessions.push((
                id,
                StoredSession {
                    client: client.into(),
                    share_scope: share_scope.into(),
                    expiry,
                    subscriptions: Vec::new(),
                    deliveries: Vec::new(),
                    awaiting_release: Vec::new(),
                },
            ));
            Ok(Ok(()))
        },
    );
    let session_of = |id: i64, sessions: &mut Vec<(i64, StoredSession)>| -> Result<usize, String> {
        by_row
            .get(&id)
            .copied()
            .filter(|&at| at < sessions.len())
            .ok_or_else(|| format!("refers to session {id}, which does not exist"))
    };
    scan(
        conn,
        "subscriptions",
        "SELECT session, filter, qos, options, identifier FROM subscriptions",
        (&mut damage, &mut failed),
        |row| {
            let (session, filter, qos): (i64, String, u8) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let (flags, identifier): (u8, Option<u32>) = (row.get(3)?, row.get(4)?);
            Ok((|| {
                let at = session_of(session, &mut sessions)?;
                let qos = QoS::from_u8(qos).ok_or(format!("filter {filter:?}: qos {qos} is not 0, 1 or 2"))?;
                crate::topic::SubscriptionFilter::parse(&filter).map_err(|e| format!("filter {filter:?}: {e}"))?;
                if flags > 0b11 || identifier.is_some_and(|id| id == 0 || id > MAX_SUBSCRIPTION_ID) {
                    return Err(format!(
                        "filter {filter:?}: options {flags} or identifier {identifier:?} out of range"
                    ));
                }
                let options = SubscriptionOptions {
                    qos,
                    no_local: flags & 1 != 0,
                    retain_as_published: flags & 2 != 0,
                    identifier,
                };
                sessions[at].1.subscriptions.push((filter.into(), options));
                Ok(())
            })())
        },
    );
    scan(
        conn,
        "awaiting_release",
        "SELECT session, pkid FROM awaiting_release",
        (&mut damage, &mut failed),
        |row| {
            let (session, pkid): (i64, i64) = (row.get(0)?, row.get(1)?);
            Ok((|| {
                let at = session_of(session, &mut sessions)?;
                let pkid = packet_id(pkid)?;
                sessions[at].1.awaiting_release.push(pkid);
                Ok(())
            })())
        },
    );
    scan(
        conn,
        "deliveries",
        "SELECT id, session, topic, payload, qos, retain, pkid, released, properties, expires_at, subscription_ids
         FROM deliveries ORDER BY id",
        (&mut damage, &mut failed),
        |row| {
            let id: i64 = row.get(0)?;
            let session: i64 = row.get(1)?;
            let topic: String = row.get(2)?;
            let payload: Vec<u8> = row.get(3)?;
            let (qos, retain, pkid, released): (u8, bool, Option<i64>, bool) =
                (row.get(4)?, row.get(5)?, row.get(6)?, row.get(7)?);
            let (properties, expires_at, ids): (Option<Vec<u8>>, Option<i64>, Option<Vec<u8>>) =
                (row.get(8)?, row.get(9)?, row.get(10)?);
            Ok((|| {
                if id <= 0 {
                    return Err(format!("delivery id {id} is not positive"));
                }
                let at = session_of(session, &mut sessions)?;
                let qos = QoS::from_u8(qos)
                    .filter(|q| *q != QoS::AtMostOnce)
                    .ok_or(format!("delivery {id}: qos {qos} is not 1 or 2"))?;
                topic_fits(&topic).map_err(|e| format!("delivery {id}: {e}"))?;
                crate::topic::validate_topic_name(&topic)
                    .map_err(|e| format!("delivery {id}: topic {topic:?}: {e}"))?;
                let pkid = match pkid {
                    None => None,
                    Some(p) => Some(packet_id(p).map_err(|e| format!("delivery {id}: {e}"))?),
                };
                let subscription_ids: Box<[u32]> = match ids {
                    None => Box::default(),
                    Some(bytes) => super::database::decode_ids(&bytes)
                        .filter(|ids| ids.iter().all(|&id| (1..=MAX_SUBSCRIPTION_ID).contains(&id)))
                        .ok_or(format!(
                            "delivery {id}: subscription ids unreadable ({} bytes)",
                            bytes.len()
                        ))?,
                };
                let properties = stored_properties(properties).map_err(|e| format!("delivery {id}: {e}"))?;
                let message = Arc::new(Message {
                    topic: topic.into(),
                    payload: Bytes::from(payload),
                    qos,
                    retain: false,
                    properties,
                    expires_at: expires_at.map(|at| at.max(0) as u64),
                });
                sessions[at].1.deliveries.push(StoredDelivery {
                    delivery: Delivery {
                        message,
                        qos,
                        retain,
                        stored: Some(id as u64),
                        subscription_ids,
                    },
                    pkid,
                    released,
                });
                Ok(())
            })())
        },
    );
    let mut retained = Vec::new();
    scan(
        conn,
        "retained",
        "SELECT topic, payload, qos, properties, expires_at FROM retained",
        (&mut damage, &mut failed),
        |row| {
            let (topic, payload, qos): (String, Vec<u8>, u8) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let (properties, expires_at): (Option<Vec<u8>>, Option<i64>) = (row.get(3)?, row.get(4)?);
            Ok((|| {
                let qos = QoS::from_u8(qos).ok_or(format!("topic {topic:?}: qos {qos} is not 0, 1 or 2"))?;
                crate::topic::validate_topic_name(&topic).map_err(|e| format!("topic {topic:?}: {e}"))?;
                let properties = stored_properties(properties).map_err(|e| format!("topic {topic:?}: {e}"))?;
                retained.push(Arc::new(Message {
                    topic: topic.into(),
                    payload: Bytes::from(payload),
                    qos,
                    retain: true,
                    properties,
                    expires_at: expires_at.map(|at| at.max(0) as u64),
                }));
                Ok(())
            })())
        },
    );
    for (id, session) in &sessions {
        database.know_session(session.client.clone(), *id);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let recovered = Recovered {
        sessions: sessions.into_iter().map(|(_, s)| s).collect(),
        retained,
    };
    Ok((recovered, damage))
}

/// A stored topic can be sent: MQTT frames a topic with a 16-bit length.
/// The largest Subscription Identifier (a four-byte Variable Byte Integer).
const MAX_SUBSCRIPTION_ID: u32 = 268_435_455;

/// A `properties` column read back: only properties a PUBLISH may carry on to subscribers.
fn stored_properties(column: Option<Vec<u8>>) -> Result<Bytes, String> {
    let bytes = Bytes::from(column.unwrap_or_default());
    crate::codec::check_forwarded_properties(&bytes).map_err(|e| format!("properties: {e}"))?;
    Ok(bytes)
}

fn topic_fits(topic: &str) -> Result<(), String> {
    if topic.len() > usize::from(u16::MAX) {
        return Err(format!(
            "a topic of {} bytes is longer than MQTT can frame",
            topic.len()
        ));
    }
    Ok(())
}

/// A stored MQTT packet id, if it is one.
fn packet_id(value: i64) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(format!("packet id {value} is not 1..=65535"))
}

/// Runs `sql` and hands each row to `each`: an SQLite error ends the table (damage, with how
/// many rows were read, or, when it is not about the file, the first such error in `failed`); a
/// row `each` refuses (`Ok(Err(why))`) is left out and reported.
fn scan(
    conn: &rusqlite::Connection,
    table: &'static str,
    sql: &str,
    (damage, failed): (&mut Vec<Damage>, &mut Option<rusqlite::Error>),
    mut each: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<Result<(), String>>,
) {
    let mut read = 0;
    let mut refused = 0;
    let mut first_refusal = None;
    let result = (|| {
        let mut statement = conn.prepare(sql)?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            read += 1;
            match each(row) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    refused += 1;
                    first_refusal.get_or_insert(why);
                }
                // A value of the wrong type: this row is unusable, the next may be fine.
                Err(e @ rusqlite::Error::FromSqlConversionFailure(..))
                | Err(e @ rusqlite::Error::InvalidColumnType(..))
                | Err(e @ rusqlite::Error::IntegralValueOutOfRange(..)) => {
                    refused += 1;
                    first_refusal.get_or_insert(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {}
        Err(e) if is_damage(&e) => damage.push(Damage {
            table,
            read,
            reason: e.to_string(),
        }),
        Err(e) => {
            failed.get_or_insert(e);
        }
    }
    if let Some(first) = first_refusal {
        damage.push(Damage {
            table,
            read,
            reason: format!("{refused} unusable rows left out, the first: {first}"),
        });
    }
}
