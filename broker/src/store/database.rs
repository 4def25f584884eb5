//! The SQLite database behind the store: its schema, and how a batch of records is written.
//!
//! One row per thing that must survive: a session, a subscription, a queued delivery, a QoS 2
//! packet id awaiting PUBREL, a retained message. Deliveries reference their session by its row
//! id, so a queued 64-byte message costs little more than its topic and payload. The database
//! runs in WAL mode with `synchronous = FULL` (a commit is fsynced); readers such as `sqlite3`
//! may look at it while the broker runs.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::Record;

/// The schema's version, in `meta`; a database of another version is not read.
pub(super) const SCHEMA_VERSION: &str = "2";

/// What schema 2 (MQTT 5: session expiry, subscription options, message properties and
/// expiry) adds to a schema 1 database, which is migrated in place at start.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE sessions ADD COLUMN expiry INTEGER NOT NULL DEFAULT 4294967295;
ALTER TABLE subscriptions ADD COLUMN options INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subscriptions ADD COLUMN identifier INTEGER;
ALTER TABLE deliveries ADD COLUMN properties BLOB;
ALTER TABLE deliveries ADD COLUMN expires_at INTEGER;
ALTER TABLE deliveries ADD COLUMN subscription_ids BLOB;
ALTER TABLE retained ADD COLUMN properties BLOB;
ALTER TABLE retained ADD COLUMN expires_at INTEGER;
UPDATE meta SET value = '2' WHERE key = 'schema';
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id          INTEGER PRIMARY KEY,
    client      TEXT NOT NULL UNIQUE,
    share_scope TEXT NOT NULL,
    -- Seconds the session outlives a connection; 4294967295: never expires.
    expiry      INTEGER NOT NULL DEFAULT 4294967295
);
CREATE TABLE IF NOT EXISTS subscriptions (
    session INTEGER NOT NULL,
    filter  TEXT NOT NULL,
    qos     INTEGER NOT NULL,
    -- Bit 0: No Local; bit 1: Retain As Published.
    options    INTEGER NOT NULL DEFAULT 0,
    identifier INTEGER,
    PRIMARY KEY (session, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id       INTEGER PRIMARY KEY,
    session  INTEGER NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    qos      INTEGER NOT NULL,
    retain   INTEGER NOT NULL,
    pkid     INTEGER,
    released INTEGER NOT NULL DEFAULT 0,
    -- MQTT 5 properties as received; expiry in milliseconds since the Unix epoch; subscription
    -- identifiers as 4-byte big-endian numbers.
    properties       BLOB,
    expires_at       INTEGER,
    subscription_ids BLOB
);
CREATE TABLE IF NOT EXISTS awaiting_release (
    session INTEGER NOT NULL,
    pkid    INTEGER NOT NULL,
    PRIMARY KEY (session, pkid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL,
    properties BLOB,
    expires_at INTEGER
);
";

/// An open store database.
pub(super) struct Database {
    conn: Connection,
    /// Session row ids by client key.
    sessions: HashMap<Arc<str>, i64>,
}

impl Database {
    /// Opens `path` (creating it), with the pragmas the store's promises rest on.
    pub(super) fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the database would not switch to WAL mode (it is in {mode} mode)"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        Ok(Self {
            conn,
            sessions: HashMap::new(),
        })
    }

    /// Creates the tables if they are missing and checks the schema version.
    pub(super) fn prepare(&mut self) -> rusqlite::Result<Option<String>> {
        self.conn.execute_batch(SCHEMA)?;
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?1)",
            [SCHEMA_VERSION],
        )?;
        let read_version = |conn: &Connection| -> rusqlite::Result<String> {
            conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| row.get(0))
        };
        if read_version(&self.conn)? == "1" {
            self.conn
                .execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATE_1_TO_2} COMMIT;"))?;
        }
        let version = read_version(&self.conn)?;
        Ok((version != SCHEMA_VERSION).then_some(version))
    }

    /// Moves everything from the WAL into the main file and empties the WAL; fails unless all
    /// of it moved (so that the main file alone holds the database, e.g. before it is renamed).
    pub(super) fn checkpoint(&self) -> rusqlite::Result<()> {
        let (busy, _, _): (i64, i64, i64) = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
        if busy != 0 {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("the WAL could not be checkpointed completely".into()),
            ));
        }
        Ok(())
    }

    /// The connection, for recovery's reads.
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Remembers a session's row id (recovery found it).
    pub(super) fn know_session(&mut self, client: Arc<str>, id: i64) {
        self.sessions.insert(client, id);
    }

    /// Writes `batch` in one transaction. With `skip_passed`, a delivery enqueued and removed
    /// within the batch is not written at all. On error the batch may be tried again.
    pub(super) fn write(&mut self, batch: &[Record], skip_passed: bool) -> rusqlite::Result<()> {
        let mut enqueued = HashSet::new();
        let mut removed = HashSet::new();
        for record in batch {
            match record {
                Record::Enqueue { id, .. } => {
                    enqueued.insert(*id);
                }
                Record::Remove { id } => {
                    removed.insert(*id);
                }
                _ => {}
            }
        }
        let passed: HashSet<u64> = if skip_passed {
            enqueued.intersection(&removed).copied().collect()
        } else {
            HashSet::new()
        };
        let needed = batch.iter().any(|record| match record {
            Record::Enqueue { id, .. } | Record::Remove { id } | Record::Sent { id, .. } | Record::Released { id } => {
                !passed.contains(id)
            }
            _ => true,
        });
        if !needed {
            return Ok(());
        }
        // A transaction left open by a failed attempt (an I/O error can leave one) goes first.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let mut added = Vec::new();
        let result = self.write_in_transaction(batch, &passed, &mut added);
        if result.is_err() {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            // Session ids learnt in a rolled-back transaction do not exist; ids forgotten in it
            // are found again by `lookup`.
            for client in added {
                self.sessions.remove(&client);
            }
        }
        result
    }

    fn write_in_transaction(
        &mut self,
        batch: &[Record],
        passed: &HashSet<u64>,
        added: &mut Vec<Arc<str>>,
    ) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        for record in batch {
            match record {
                Record::Session {
                    client,
                    share_scope,
                    expiry,
                } => {
                    let id: i64 = self
                        .conn
                        .prepare_cached(
                            "INSERT INTO sessions (client, share_scope, expiry) VALUES (?1, ?2, ?3)
                         ON CONFLICT (client) DO UPDATE SET share_scope = excluded.share_scope, expiry = excluded.expiry
                         RETURNING id",
                        )?
                        .query_row(params![&**client, &**share_scope, *expiry], |row| row.get(0))?;
                    self.sessions.insert(client.clone(), id);
                    added.push(client.clone());
                }
                Record::SessionGone { client, deliveries } => {
                    {
                        let mut delete = self.conn.prepare_cached("DELETE FROM deliveries WHERE id = ?1")?;
                        for id in deliveries.iter().filter(|id| !passed.contains(id)) {
                            delete.execute([*id as i64])?;
                        }
                    }
                    if let Some(session) = self.lookup(client)? {
                        for sql in [
                            "DELETE FROM subscriptions WHERE session = ?1",
                            "DELETE FROM awaiting_release WHERE session = ?1",
                            "DELETE FROM deliveries WHERE session = ?1",
                            "DELETE FROM sessions WHERE id = ?1",
                        ] {
                            self.conn.prepare_cached(sql)?.execute([session])?;
                        }
                        self.sessions.remove(client);
                    }
                }
                Record::Subscribe {
                    client,
                    filter,
                    options,
                } => {
                    let session = self.session_id(client, added)?;
                    let flags = u8::from(options.no_local) | (u8::from(options.retain_as_published) << 1);
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO subscriptions (session, filter, qos, options, identifier)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            session,
                            &**filter,
                            options.qos as u8,
                            flags,
                            options.identifier
                        ])?;
                }
                Record::Unsubscribe { client, filter } => {
                    if let Some(session) = self.lookup(client)? {
                        self.conn
                            .prepare_cached("DELETE FROM subscriptions WHERE session = ?1 AND filter = ?2")?
                            .execute(params![session, &**filter])?;
                    }
                }
                Record::Enqueue { id, client, delivery } => {
                    if passed.contains(id) {
                        continue;
                    }
                    let session = self.session_id(client, added)?;
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO deliveries
                             (id, session, topic, payload, qos, retain, properties, expires_at, subscription_ids)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        )?
                        .execute(params![
                            *id as i64,
                            session,
                            &*delivery.message.topic,
                            &delivery.message.payload[..],
                            delivery.qos as u8,
                            delivery.retain,
                            optional_blob(&delivery.message.properties),
                            delivery.message.expires_at.map(|at| at as i64),
                            (!delivery.subscription_ids.is_empty()).then(|| encode_ids(&delivery.subscription_ids)),
                        ])?;
                }
                Record::Sent { id, pkid } => {
                    if !passed.contains(id) {
                        self.conn
                            .prepare_cached("UPDATE deliveries SET pkid = ?2 WHERE id = ?1")?
                            .execute(params![*id as i64, *pkid])?;
                    }
                }
                Record::Released { id } => {
                    if !passed.contains(id) {
                        self.conn
                            .prepare_cached("UPDATE deliveries SET released = 1 WHERE id = ?1")?
                            .execute([*id as i64])?;
                    }
                }
                Record::Remove { id } => {
                    if !passed.contains(id) {
                        self.conn
                            .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                            .execute([*id as i64])?;
                    }
                }
                Record::AwaitRelease { client, pkid } => {
                    let session = self.session_id(client, added)?;
                    self.conn
                        .prepare_cached("INSERT OR IGNORE INTO awaiting_release (session, pkid) VALUES (?1, ?2)")?
                        .execute(params![session, *pkid])?;
                }
                Record::ReleaseReceived { client, pkid } => {
                    if let Some(session) = self.lookup(client)? {
                        self.conn
                            .prepare_cached("DELETE FROM awaiting_release WHERE session = ?1 AND pkid = ?2")?
                            .execute(params![session, *pkid])?;
                    }
                }
                Record::Retain { topic, message } => match message {
                    Some(message) => {
                        self.conn
                            .prepare_cached(
                                "INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                            )?
                            .execute(params![
                                &**topic,
                                &message.payload[..],
                                message.qos as u8,
                                optional_blob(&message.properties),
                                message.expires_at.map(|at| at as i64),
                            ])?;
                    }
                    None => {
                        self.conn
                            .prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                            .execute([&**topic])?;
                    }
                },
            }
        }
        self.conn.execute_batch("COMMIT")
    }

    /// The row id of `client`'s session if it has one. The cache may lack it after a failed
    /// write (its rollback may have restored a row the cache had forgotten), so the table is
    /// asked then.
    fn lookup(&mut self, client: &Arc<str>) -> rusqlite::Result<Option<i64>> {
        if let Some(&id) = self.sessions.get(client) {
            return Ok(Some(id));
        }
        let id: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM sessions WHERE client = ?1")?
            .query_row([&**client], |row| row.get(0))
            .optional()?;
        if let Some(id) = id {
            self.sessions.insert(client.clone(), id);
        }
        Ok(id)
    }

    /// The row id of `client`'s session. A session is recorded before anything of it, so the
    /// row exists; should it not, one is made (with no share scope) rather than lose the
    /// delivery or stall every later write on it.
    fn session_id(&mut self, client: &Arc<str>, added: &mut Vec<Arc<str>>) -> rusqlite::Result<i64> {
        if let Some(id) = self.lookup(client)? {
            return Ok(id);
        }
        let id: i64 = self
            .conn
            .prepare_cached("INSERT INTO sessions (client, share_scope) VALUES (?1, '') RETURNING id")?
            .query_row([&**client], |row| row.get(0))?;
        self.sessions.insert(client.clone(), id);
        added.push(client.clone());
        Ok(id)
    }
}

/// A BLOB column's value: NULL for nothing.
fn optional_blob(bytes: &[u8]) -> Option<&[u8]> {
    (!bytes.is_empty()).then_some(bytes)
}

/// Subscription identifiers as the `subscription_ids` column holds them.
pub(super) fn encode_ids(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

/// The `subscription_ids` column read back; `None` unless it is whole 4-byte numbers.
pub(super) fn decode_ids(bytes: &[u8]) -> Option<Box<[u32]>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}
