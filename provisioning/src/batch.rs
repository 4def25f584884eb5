//! Issuing device identities, one or ten thousand at a time.
//!
//! Keys are generated and certificates signed in memory on every core; the registry records the
//! whole batch in one transaction; only then are the bundles written, into a staging folder
//! inside the output directory, and moved into place together. A failure before the commit leaves
//! nothing behind; one after it leaves recorded certificates without files, and says so.

use std::path::{Path, PathBuf};

use fleet_identity::{BrokerUrl, DeviceId, Identity, Role};
use indicatif::{ProgressBar, ProgressStyle};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::issue::{mint_client, write_bundles, Minted};
use crate::key_type::KeyType;
use crate::output::{ensure_writable, write_new, Overwrite, PUBLIC_MODE};
use crate::parallel;
use crate::pki::Pki;
use crate::registry::Issued;
use crate::staging::Staging;
use crate::validity::Validity;

/// Name of the manifest `batch` writes into its output directory.
pub const MANIFEST: &str = "manifest.csv";

/// How to issue a set of devices.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// Written into each `agent.toml`.
    pub broker_url: BrokerUrl,
    /// Certificate validity.
    pub validity: Validity,
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
    // Made first, so an output directory that cannot be written is refused before anything is
    // minted or recorded.
    let staging = Staging::new(out)?;
    let progress = progress_bar(ids.len(), options.progress);
    let (device_ca, fleet) = (&pki.device_ca, pki.fleet.as_str());
    let minted: Vec<Minted> = parallel::try_map(ids, options.jobs, |id| {
        let identity = Identity {
            role: Role::Device,
            id: id.clone(),
        };
        let minted = mint_client(device_ca, fleet, identity, options.key_type, options.validity);
        progress.inc(1);
        minted
    })?;
    progress.finish_and_clear();
    let issued: Vec<Issued> = minted.iter().map(|minted| minted.issued.clone()).collect();
    pki.record_then_write(&issued, false, |pki| {
        write_bundles(
            staging,
            &minted,
            &pki.broker_ca,
            Some(&options.broker_url),
            options.overwrite,
            options.jobs,
        )
    })?;
    Ok(issued)
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
