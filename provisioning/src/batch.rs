//! Issuing device identities, one or ten thousand at a time.
//!
//! Keys are generated and certificates signed on every core; each bundle is written into a
//! staging folder inside the output directory, the registry records the whole batch in one
//! transaction, and only then are the bundles moved into place. A failure anywhere leaves neither
//! registry rows nor bundles behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use fleet_identity::{BrokerUrl, DeviceId, Identity, Role};
use indicatif::{ProgressBar, ProgressStyle};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::issue::{mint_client, move_into_place, write_bundle};
use crate::key_type::KeyType;
use crate::output::{create_private_dir, ensure_writable, write_new, Overwrite, PUBLIC_MODE};
use crate::pki::{CertificateAuthority, Pki};
use crate::registry::Issued;

/// Name of the manifest `batch` writes into its output directory.
pub const MANIFEST: &str = "manifest.csv";

/// How to issue a set of devices.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// Written into each `agent.toml`.
    pub broker_url: BrokerUrl,
    /// Certificate validity.
    pub validity_days: u32,
    /// Device key type.
    pub key_type: KeyType,
    /// Worker threads.
    pub jobs: usize,
    /// Whether existing bundles may be replaced.
    pub overwrite: Overwrite,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// Issues a certificate for each id and writes `OUT/<id>/` bundles. Returns what was recorded,
/// in the order of `ids`.
pub fn issue_devices(pki: &mut Pki, ids: &[DeviceId], out: &Path, options: &IssueOptions) -> Result<Vec<Issued>> {
    if options.validity_days == 0 {
        return Err(Error::BadArgument {
            flag: "--validity-days",
            reason: "must be at least 1".into(),
        });
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for id in ids {
        ensure_writable(&out.join(id.as_str()), options.overwrite)?;
        if let Some(serial) = pki.registry.active_serial(Role::Device.as_str(), id.as_str(), now)? {
            return Err(Error::AlreadyActive {
                role: "device".into(),
                id: id.to_string(),
                serial,
            });
        }
    }
    create_private_dir(out)?;
    let staging = out.join(format!(".staging-{}", std::process::id()));
    create_private_dir(&staging)?;
    let result = mint_and_record(pki, ids, out, &staging, options, now);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn mint_and_record(
    pki: &mut Pki,
    ids: &[DeviceId],
    out: &Path,
    staging: &Path,
    options: &IssueOptions,
    now: i64,
) -> Result<Vec<Issued>> {
    let issued = mint_in_parallel(&Signers::of(pki), ids, staging, options)?;
    pki.registry.record(&issued, false, now, || {
        ids.iter()
            .try_for_each(|id| move_into_place(&staging.join(id.as_str()), &out.join(id.as_str()), options.overwrite))
    })?;
    Ok(issued)
}

/// The parts of a PKI that signing threads share (the registry stays on the calling thread).
struct Signers<'a> {
    fleet: &'a str,
    device_ca: &'a CertificateAuthority,
    broker_ca: &'a CertificateAuthority,
}

impl<'a> Signers<'a> {
    fn of(pki: &'a Pki) -> Self {
        Self {
            fleet: &pki.fleet,
            device_ca: &pki.device_ca,
            broker_ca: &pki.broker_ca,
        }
    }
}

fn mint_in_parallel(
    pki: &Signers<'_>,
    ids: &[DeviceId],
    staging: &Path,
    options: &IssueOptions,
) -> Result<Vec<Issued>> {
    let progress = progress_bar(ids.len(), options.progress);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let jobs = options.jobs.clamp(1, ids.len().max(1));
    let chunk = ids.len().div_ceil(jobs).max(1);
    let chunks: Vec<Vec<Issued>> = std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let (progress, failed, first_error) = (&progress, &failed, &first_error);
                scope.spawn(move || {
                    let mut done = Vec::with_capacity(part.len());
                    for id in part {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        match mint_one(pki, id, staging, options) {
                            Ok(issued) => done.push(issued),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            }
                        }
                        progress.inc(1);
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    progress.finish_and_clear();
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(chunks.into_iter().flatten().collect())
}

fn mint_one(pki: &Signers<'_>, id: &DeviceId, staging: &Path, options: &IssueOptions) -> Result<Issued> {
    let identity = Identity {
        role: Role::Device,
        id: id.clone(),
    };
    let minted = mint_client(
        pki.device_ca,
        pki.fleet,
        identity,
        options.key_type,
        options.validity_days,
    )?;
    write_bundle(
        &staging.join(id.as_str()),
        &minted,
        pki.broker_ca,
        Some(&options.broker_url),
    )?;
    Ok(minted.issued)
}

fn progress_bar(len: usize, wanted: bool) -> ProgressBar {
    if !wanted {
        return ProgressBar::hidden();
    }
    // indicatif draws only when stderr is a terminal: a pipe or a log file gets nothing.
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} devices  {per_sec}  eta {eta}") {
        bar.set_style(style);
    }
    bar
}

/// `count` ids `<prefix><n>`, numbered from 1 and zero-padded to a common width.
pub fn numbered_ids(prefix: &str, count: usize) -> Result<Vec<DeviceId>> {
    if count == 0 {
        return Err(Error::BadArgument {
            flag: "--count",
            reason: "must be at least 1".into(),
        });
    }
    let width = count.to_string().len().max(5);
    (1..=count)
        .map(|n| {
            let value = format!("{prefix}{n:0width$}");
            DeviceId::parse(&value).map_err(|source| Error::InvalidId {
                value,
                origin: format!("--prefix {prefix:?}"),
                source,
            })
        })
        .collect()
}

/// Reads the `id` column of a CSV manifest. Every id must be valid and appear once.
pub fn manifest_ids(path: &Path) -> Result<Vec<DeviceId>> {
    let bad = |reason: String| Error::Manifest {
        path: path.to_owned(),
        reason,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
    let column = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .position(|h| h.trim() == "id")
        .ok_or_else(|| bad("has no `id` column in its header line".into()))?;
    let mut seen = std::collections::HashMap::new();
    let mut ids = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let line = index + 2;
        let record = record.map_err(|e| bad(format!("line {line}: {e}")))?;
        let value = record.get(column).unwrap_or("").trim().to_owned();
        let id = DeviceId::parse(&value).map_err(|source| Error::InvalidId {
            value: value.clone(),
            origin: format!("{} line {line}", path.display()),
            source,
        })?;
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(bad(format!(
                "line {line}: id {value:?} already appears on line {first}"
            )));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(bad("lists no devices".into()));
    }
    Ok(ids)
}

/// Writes `OUT/manifest.csv`: id, serial, sha256 fingerprint, not_after (RFC 3339).
pub fn write_manifest(out: &Path, issued: &[Issued], overwrite: Overwrite) -> Result<PathBuf> {
    let path = out.join(MANIFEST);
    let mut text = String::from("id,serial,sha256,not_after\n");
    for cert in issued {
        let not_after = OffsetDateTime::from_unix_timestamp(cert.not_after)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        text.push_str(&format!(
            "{},{},{},{}\n",
            cert.id, cert.serial, cert.fingerprint, not_after
        ));
    }
    write_new(&path, text.as_bytes(), PUBLIC_MODE, overwrite)?;
    Ok(path)
}
