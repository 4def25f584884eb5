//! The inventory of everything the PKI issued: a SQLite database in the PKI directory.
//!
//! Every change happens in an immediate (write-locked) transaction with a busy timeout, so two
//! `provision` processes on the same PKI serialise instead of failing or losing rows, and the
//! "one active certificate per id" rule is checked and enforced in the same transaction.
//!
//! The registry is written before anything else: a certificate is committed here before any file
//! of it exists, and a revocation before any CRL carries it. A crash in between then leaves the
//! registry knowing more than the disk (a certificate whose files were never written, a
//! revocation the next `provision crl` publishes), never less.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_identity::Role;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fault;

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The certificates table, for [`SCHEMA`] and for [`ALLOW_GATEWAYS`].
macro_rules! certificates_table {
    () => {
        "
CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,
    id          TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('device', 'service', 'broker', 'gateway')),
    fingerprint TEXT NOT NULL UNIQUE,
    not_before  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at   INTEGER NOT NULL,
    revoked_at  INTEGER,
    reason      TEXT,
    successor   TEXT REFERENCES certificates (serial)
);
"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);",
    certificates_table!(),
    "CREATE INDEX IF NOT EXISTS certificates_by_id ON certificates (role, id);
CREATE INDEX IF NOT EXISTS certificates_by_successor ON certificates (successor);
CREATE TABLE IF NOT EXISTS renewal_refusals (
    id     TEXT PRIMARY KEY,
    at     INTEGER NOT NULL,
    code   TEXT NOT NULL
);"
);

/// A registry made before gateways existed allows only device, service and broker rows: its
/// table is rebuilt with the same rows under the current CHECK, in one transaction.
const ALLOW_GATEWAYS: &str = concat!(
    "
BEGIN IMMEDIATE;
ALTER TABLE certificates RENAME TO certificates_before_gateways;
DROP INDEX IF EXISTS certificates_by_id;
DROP INDEX IF EXISTS certificates_by_successor;",
    certificates_table!(),
    "INSERT INTO certificates SELECT * FROM certificates_before_gateways;
DROP TABLE certificates_before_gateways;
CREATE INDEX certificates_by_id ON certificates (role, id);
CREATE INDEX certificates_by_successor ON certificates (successor);
COMMIT;"
);

/// A certificate about to be recorded.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Device id, service name, or the broker's first name.
    pub id: String,
    /// `device`, `service`, `gateway` or `broker`.
    pub role: &'static str,
    /// Lower-case hex serial.
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// One row of the inventory.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// Device id, service name, or broker name.
    pub id: String,
    /// `device`, `service`, `gateway` or `broker`.
    pub role: String,
    /// Lower-case hex serial.
    pub serial: String,
    /// SHA-256 fingerprint, lower-case hex.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// `active`, `revoked`, or `expired` (active but past notAfter).
    pub status: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
    /// Revocation reason, if revoked.
    pub reason: Option<String>,
    /// Serial of the certificate that superseded this one by rotation.
    pub successor: Option<String>,
    /// For a device certificate not revoked: where its renewal stands (see
    /// [`crate::renewal::RenewalState`]).
    pub renewal: Option<crate::renewal::RenewalState>,
}

/// What `revoke` selects.
#[derive(Clone, Debug)]
pub enum RevokeTarget {
    /// Every active certificate of this id: of the device, or of the service, by that name.
    Id {
        /// The device id or service name.
        id: String,
        /// Which of the two; `None` is refused when both a device and a service hold the id.
        kind: Option<Role>,
    },
    /// The certificate with this (normalised) serial.
    Serial(String),
    /// Every active certificate of device `id` issued before its certificate `serial`: what a
    /// renewal superseded once the device connected with `serial`. Selecting none is not an
    /// error (a confirmation received twice).
    PredecessorsOf {
        /// The device id.
        id: String,
        /// The serial of the certificate the device now uses.
        serial: String,
    },
}

/// A revoked certificate as the CRL lists it.
#[derive(Clone, Debug)]
pub struct RevokedEntry {
    /// Lower-case hex serial.
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// The reason word.
    pub reason: String,
}

/// Filters for [`Registry::list`].
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only this status (`active`, `revoked`, `expired`).
    pub status: Option<String>,
    /// Only active certificates expiring before this Unix time.
    pub expiring_before: Option<i64>,
}

/// An open registry.
pub struct Registry {
    conn: Connection,
    path: PathBuf,
}

impl Registry {
    /// Creates a new registry for `fleet`. Fails if the file already exists.
    pub fn create(path: &Path, fleet: &str) -> Result<Self> {
        if path.exists() {
            return Err(Error::OutputExists(path.to_owned()));
        }
        let registry = Self::connect(path)?;
        registry.sql(|c| c.execute_batch(SCHEMA))?;
        registry.sql(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('fleet', ?1), ('crl_number', '1')",
                [fleet],
            )
        })?;
        Ok(registry)
    }

    /// Opens an existing registry (one made before gateways existed is brought up to date).
    pub fn open(path: &Path) -> Result<Self> {
        let registry = Self::connect(path)?;
        registry.sql(|c| c.execute_batch(SCHEMA))?;
        registry.sql(|c| {
            let table: String = c.query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'certificates'",
                [],
                |row| row.get(0),
            )?;
            if table.contains("'gateway'") {
                return Ok(());
            }
            let rebuilt = c.execute_batch(ALLOW_GATEWAYS);
            if rebuilt.is_err() && !c.is_autocommit() {
                let _ = c.execute_batch("ROLLBACK");
            }
            rebuilt
        })?;
        Ok(registry)
    }

    fn connect(path: &Path) -> Result<Self> {
        let fail = |source| Error::Registry {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
        // In WAL mode NORMAL syncs only at checkpoints, so a power cut can undo the last commits:
        // a certificate whose files were then written, or a revocation a CRL then carried. FULL
        // syncs the log at every commit, which is what "committed before written" relies on.
        conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    fn sql<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        f(&self.conn).map_err(|source| Error::Registry {
            path: self.path.clone(),
            source,
        })
    }

    fn fail(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |source| Error::Registry {
            path: self.path.clone(),
            source,
        }
    }

    /// Opens a write-locked (IMMEDIATE) transaction: a concurrent `provision` waits for it, up to
    /// the busy timeout, instead of failing half-way. Returns the path for error messages.
    fn write_transaction(&mut self) -> Result<(rusqlite::Transaction<'_>, PathBuf)> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error(&path))?;
        Ok((tx, path))
    }

    /// The fleet name given at `init`.
    pub fn fleet(&self) -> Result<String> {
        self.sql(|c| c.query_row("SELECT value FROM meta WHERE key = 'fleet'", [], |r| r.get(0)))
    }

    /// Records newly issued certificates in one committed transaction, before any file of them is
    /// written.
    ///
    /// A device or service id that already has an active, unexpired certificate is refused, unless
    /// `rotate` is set: then the old certificates get the new one as their successor and both stay
    /// valid.
    pub fn record(&mut self, issued: &[Issued], rotate: bool, now: i64) -> Result<()> {
        let (tx, path) = self.write_transaction()?;
        let fail = sql_error(&path);
        {
            // Expired certificates are listed too: a rotation supersedes them as well, so the
            // chain of successors has no gap when a device renews after its certificate expired.
            let mut active = tx
                .prepare_cached("SELECT serial, not_after > ?3 FROM certificates WHERE role = ?1 AND id = ?2 AND status = 'active' AND role != 'broker'")
                .map_err(fail)?;
            let mut insert = tx
                .prepare_cached("INSERT INTO certificates (serial, id, role, fingerprint, not_before, not_after, status, issued_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7)")
                .map_err(fail)?;
            let mut succeed = tx
                .prepare_cached("UPDATE certificates SET successor = ?1 WHERE serial = ?2")
                .map_err(fail)?;
            for cert in issued {
                let existing: Vec<(String, bool)> = active
                    .query_map(params![cert.role, cert.id, now], |r| Ok((r.get(0)?, r.get(1)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(fail)?;
                if let (Some((serial, _)), false) = (existing.iter().find(|(_, unexpired)| *unexpired), rotate) {
                    return Err(Error::AlreadyActive {
                        role: cert.role.into(),
                        id: cert.id.clone(),
                        serial: serial.clone(),
                    });
                }
                let existing: Vec<&String> = if rotate {
                    existing.iter().map(|(serial, _)| serial).collect()
                } else {
                    Vec::new()
                };
                insert
                    .execute(params![
                        cert.serial,
                        cert.id,
                        cert.role,
                        cert.fingerprint,
                        cert.not_before,
                        cert.not_after,
                        now
                    ])
                    .map_err(fail)?;
                for old in &existing {
                    succeed.execute(params![cert.serial, old]).map_err(fail)?;
                }
            }
        }
        fault::point("issue-before-commit");
        tx.commit().map_err(fail)
    }

    /// The active, unexpired certificate serial of `role`/`id`, if any.
    pub fn active_serial(&self, role: &str, id: &str, now: i64) -> Result<Option<String>> {
        self.sql(|c| {
            c.query_row(
                "SELECT serial FROM certificates WHERE role = ?1 AND id = ?2 AND status = 'active' AND not_after > ?3",
                params![role, id, now],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Revokes what `target` selects and takes the next CRL number, in one committed
    /// transaction; [`Registry::publish_committed_crl`] then publishes it. Returns the serials
    /// revoked.
    pub fn revoke(&mut self, target: &RevokeTarget, reason: &str, now: i64) -> Result<Vec<String>> {
        let (tx, path) = self.write_transaction()?;
        let fail = sql_error(&path);
        let serials = match target {
            RevokeTarget::Id { id, kind } => {
                let mut stmt = tx
                    .prepare("SELECT serial, role FROM certificates WHERE id = ?1 AND role != 'broker' AND status = 'active' AND (?2 IS NULL OR role = ?2)")
                    .map_err(fail)?;
                let rows: Vec<(String, String)> = stmt
                    .query_map(params![id, kind.map(Role::as_str)], |r| Ok((r.get(0)?, r.get(1)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(fail)?;
                if rows.iter().any(|(_, role)| *role != rows[0].1) {
                    return Err(Error::AmbiguousId { id: id.clone() });
                }
                if rows.is_empty() {
                    let whose = kind.map_or(String::new(), |kind| format!("{kind} "));
                    return Err(Error::NotFound(format!(
                        "no active {whose}certificate for id {id:?} in the registry (if a revoke of it was interrupted, it is recorded: run `provision crl` to publish it)"
                    )));
                }
                rows.into_iter().map(|(serial, _)| serial).collect()
            }
            RevokeTarget::Serial(serial) => {
                let row: Option<(String, String)> = tx
                    .query_row(
                        "SELECT role, status FROM certificates WHERE serial = ?1",
                        [serial],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(fail)?;
                match row {
                    None => {
                        return Err(Error::NotFound(format!(
                            "no certificate with serial {serial} in the registry"
                        )))
                    }
                    Some((_, status)) if status == "revoked" => {
                        return Err(Error::NotFound(format!(
                            "certificate {serial} is already revoked (if that revoke was interrupted, run `provision crl` to publish it)"
                        )))
                    }
                    Some((role, _)) if role == "broker" => {
                        return Err(Error::BadArgument {
                            flag: "--serial",
                            reason: "that is a broker certificate: devices do not read the device CA's CRL for it; issue a new broker certificate and, if its key leaked, roll the broker CA".into(),
                        })
                    }
                    Some(_) => vec![serial.clone()],
                }
            }
            RevokeTarget::PredecessorsOf { id, serial } => {
                let mut stmt = tx
                    .prepare(
                        "SELECT serial FROM certificates WHERE role = 'device' AND id = ?1 AND status = 'active'
                         AND rowid < (SELECT rowid FROM certificates WHERE serial = ?2 AND role = 'device' AND id = ?1 AND status = 'active')",
                    )
                    .map_err(fail)?;
                let serials: Vec<String> = stmt
                    .query_map(params![id, serial], |r| r.get(0))
                    .and_then(|rows| rows.collect())
                    .map_err(fail)?;
                if serials.is_empty() {
                    // Nothing to revoke: no CRL number is taken, nothing is published.
                    return Ok(serials);
                }
                serials
            }
        };
        for serial in &serials {
            tx.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?1, reason = ?2 WHERE serial = ?3",
                params![now, reason, serial],
            )
            .map_err(fail)?;
        }
        take_next_crl_number(&tx).map_err(fail)?;
        fault::point("revoke-before-commit");
        tx.commit().map_err(fail)?;
        Ok(serials)
    }

    /// Takes the next CRL number, committed, for re-signing the unchanged revoked set.
    pub fn advance_crl_number(&mut self) -> Result<()> {
        let (tx, path) = self.write_transaction()?;
        let fail = sql_error(&path);
        take_next_crl_number(&tx).map_err(fail)?;
        tx.commit().map_err(fail)
    }

    /// Hands the committed CRL number and revoked set to `publish` (which signs and writes the
    /// CRL) while holding the write lock. Publishers therefore take turns, each writes the newest
    /// committed state, and an older CRL never replaces a newer one.
    pub fn publish_committed_crl(&mut self, publish: impl FnOnce(u64, &[RevokedEntry]) -> Result<()>) -> Result<()> {
        let (tx, path) = self.write_transaction()?;
        let fail = sql_error(&path);
        let number = crl_number(&tx).map_err(fail)?;
        let revoked = revoked_set(&tx).map_err(fail)?;
        publish(number, &revoked)
    }

    /// Lists the inventory, oldest issue first.
    pub fn list(&self, filter: &ListFilter, now: i64) -> Result<Vec<Record>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.id, c.role, c.serial, c.fingerprint, c.not_before, c.not_after,
                        CASE WHEN c.status = 'active' AND c.not_after <= ?1 THEN 'expired' ELSE c.status END,
                        c.issued_at, c.revoked_at, c.reason, c.successor,
                        EXISTS (SELECT 1 FROM certificates p WHERE p.successor = c.serial),
                        (SELECT r.code FROM renewal_refusals r WHERE r.id = c.id AND r.at >= c.issued_at)
                 FROM certificates c ORDER BY c.issued_at, c.rowid",
            )
            .map_err(self.fail())?;
        let rows = stmt
            .query_map([now], |r| {
                let mut record = Record {
                    id: r.get(0)?,
                    role: r.get(1)?,
                    serial: r.get(2)?,
                    fingerprint: r.get(3)?,
                    not_before: r.get(4)?,
                    not_after: r.get(5)?,
                    status: r.get(6)?,
                    issued_at: r.get(7)?,
                    revoked_at: r.get(8)?,
                    reason: r.get(9)?,
                    successor: r.get(10)?,
                    renewal: None,
                };
                let renewed: bool = r.get(11)?;
                let refusal: Option<String> = r.get(12)?;
                record.renewal = crate::renewal::RenewalState::of(&record, renewed, refusal.as_deref(), now);
                Ok(record)
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.fail())?;
        Ok(rows
            .into_iter()
            .filter(|r| filter.status.as_ref().is_none_or(|s| *s == r.status))
            .filter(|r| {
                filter
                    .expiring_before
                    .is_none_or(|t| r.status == "active" && r.not_after <= t)
            })
            .collect())
    }
}

impl Registry {
    /// The device's certificates that are not revoked (expired ones included), oldest issue
    /// first: what a renewal request is judged against.
    pub fn unrevoked_device_certificates(&self, id: &str) -> Result<Vec<(String, i64, i64)>> {
        self.sql(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT serial, not_before, not_after FROM certificates WHERE role = 'device' AND id = ?1 AND status = 'active' ORDER BY rowid",
            )?;
            let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    /// Whether the registry knows any device certificate of `id`, revoked or not.
    pub fn knows_device(&self, id: &str) -> Result<bool> {
        self.sql(|c| {
            c.prepare_cached("SELECT EXISTS (SELECT 1 FROM certificates WHERE role = 'device' AND id = ?1)")?
                .query_row([id], |r| r.get(0))
        })
    }

    /// Records that the issuer refused device `id` a certificate for `code` (a final refusal:
    /// `provision list` shows the device as `failed` until a certificate is issued to it).
    pub fn note_renewal_refusal(&self, id: &str, code: &str, now: i64) -> Result<()> {
        self.sql(|c| {
            c.prepare_cached(
                "INSERT INTO renewal_refusals (id, at, code) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at, code = excluded.code",
            )?
            .execute(params![id, now, code])
        })
        .map(drop)
    }
}

/// Wraps an SQLite error with the registry's path.
fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> Error + Copy + '_ {
    move |source| Error::Registry {
        path: path.to_owned(),
        source,
    }
}

/// The number of the newest CRL the registry has committed to.
fn crl_number(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    let current: String = tx.query_row("SELECT value FROM meta WHERE key = 'crl_number'", [], |r| r.get(0))?;
    // A damaged number must not restart the CRL numbering (relying parties reject a CRL whose
    // number went backwards): refuse to go on.
    current
        .parse::<u64>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Takes the next CRL number: every CRL published gets a number of its own.
fn take_next_crl_number(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let next = crl_number(tx)? + 1;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'crl_number'",
        [next.to_string()],
    )?;
    Ok(())
}

/// Every revoked certificate, as the CRL lists them.
fn revoked_set(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<RevokedEntry>> {
    let mut stmt = tx.prepare(
        "SELECT serial, revoked_at, reason FROM certificates WHERE status = 'revoked' ORDER BY revoked_at, serial",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(RevokedEntry {
            serial: r.get(0)?,
            revoked_at: r.get(1)?,
            reason: r.get(2)?,
        })
    })?;
    rows.collect()
}
