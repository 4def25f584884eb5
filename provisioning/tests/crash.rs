#![cfg(debug_assertions)]
//! `provision` stopped dead at each step of issuing and revoking. A debug build aborts where
//! `PROVISION_FAULT` says, as a power cut or `kill -9` would stop it there. Whatever it leaves
//! behind: every certificate on disk (staging folders included) is in the registry, a replaced
//! broker bundle never pairs a new certificate with the old key, and the next `provision crl`
//! lists every revocation that the registry or any earlier CRL knew of.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::run_ok;
use fleet_identity::{pem, CertificateSummary};
use provisioning::fault::FAULT_VARIABLE;
use support::{key_matches, Fleet};
use x509_parser::prelude::{CertificateRevocationList, FromDer};

mod support;

const SIGABRT: i32 = 6;

/// Runs `command` with the fault `point` armed; `Err` says what happened if it did not crash.
fn crash_at(command: &mut Command, point: &str) -> Result<(), String> {
    let out = command.env(FAULT_VARIABLE, point).output().unwrap();
    if out.status.signal() == Some(SIGABRT) {
        return Ok(());
    }
    Err(format!(
        "never reached the point ({}: {})",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// The registry as `provision list --json` reports it: serial to status.
fn registry(fleet: &Fleet) -> BTreeMap<String, String> {
    let rows: serde_json::Value = serde_json::from_str(&run_ok(fleet.cmd("list").arg("--json"))).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["serial"].as_str().unwrap().into(),
                row["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Every leaf certificate file anywhere under `dir`, hidden staging folders included, with its
/// serial.
fn certificates_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for path in entries.map(|entry| entry.unwrap().path()) {
        if path.is_dir() {
            found.extend(certificates_under(&path));
        } else if path.extension().is_some_and(|e| e == "crt") {
            // Bundles are written on several threads: the crash can cut one short. A file that
            // does not parse holds no certificate anyone could use.
            let Ok(certs) = pem::load_certs(&path) else {
                continue;
            };
            for der in certs {
                let summary = CertificateSummary::from_der(&der).unwrap();
                if !summary.is_ca {
                    found.push((path.clone(), summary.serial.to_string()));
                }
            }
        }
    }
    found
}

/// The serials `crl.pem` lists.
fn crl_serials(fleet: &Fleet) -> BTreeSet<String> {
    let crls = pem::load_crls(&fleet.pki().join("crl.pem")).unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&crls[0]).unwrap();
    crl.iter_revoked_certificates()
        .map(|revoked| fleet_identity::Serial::from_be_bytes(revoked.raw_serial()).to_string())
        .collect()
}

/// Writes a CSR for `dev-7` (its key stays in memory) and returns its path.
fn device_csr(fleet: &Fleet) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "dev-7");
    let path = fleet.path("dev-7.csr");
    fs::write(&path, params.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
    path
}

/// The points every issuing command passes: minted in memory, recorded, then written.
const ISSUE_POINTS: [&str; 3] = ["issue-minted", "issue-before-commit", "issue-recorded"];
/// The points of writing bundles: a certificate written before its key, all of them staged,
/// then moved into place one by one.
const WRITE_POINTS: [&str; 3] = ["bundle-cert-written", "outputs-staged", "output-placed"];

#[test]
fn a_crash_while_issuing_never_leaves_a_certificate_on_disk_the_registry_does_not_know() {
    type Run = fn(&Fleet) -> Command;
    let bundles: Vec<&str> = ISSUE_POINTS.iter().chain(&WRITE_POINTS).copied().collect();
    let commands: [(&str, &[&str], Run); 5] = [
        ("batch", &bundles, |fleet| {
            let mut command = fleet.cmd("batch");
            command
                .args(["--count", "3", "--prefix", "d-", "--jobs", "2", "--out"])
                .arg(fleet.path("out"));
            command
        }),
        ("device", &bundles, |fleet| {
            let mut command = fleet.cmd("device");
            command.args(["--id", "d-1", "--out"]).arg(fleet.path("out"));
            command
        }),
        ("service", &bundles, |fleet| {
            let mut command = fleet.cmd("service");
            command.args(["--name", "ingest", "--out"]).arg(fleet.path("out"));
            command
        }),
        ("sign-csr", &ISSUE_POINTS, |fleet| {
            fs::create_dir_all(fleet.path("out")).unwrap();
            let mut command = fleet.cmd("sign-csr");
            command
                .arg("--csr")
                .arg(device_csr(fleet))
                .arg("--out")
                .arg(fleet.path("out/dev-7.crt"));
            command
        }),
        ("broker", &bundles, |fleet| {
            let mut command = fleet.cmd("broker");
            command.args(["--dns", "gw.local", "--out"]).arg(fleet.path("out"));
            command
        }),
    ];
    let mut violations = Vec::new();
    for (name, points, command) in commands {
        for point in points {
            let fleet = Fleet::new();
            if let Err(e) = crash_at(&mut command(&fleet), point) {
                violations.push(format!("{name} at {point}: {e}"));
                continue;
            }
            let registry = registry(&fleet);
            for (file, serial) in certificates_under(&fleet.path("out")) {
                if !registry.contains_key(&serial) {
                    violations.push(format!(
                        "{name} at {point}: {} holds serial {serial}, which the registry does not know",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
}

#[test]
fn a_crash_while_revoking_never_loses_a_revocation() {
    let crl_points = ["crl-before-write", "crl-after-write"];
    let revoke_points = ["revoke-before-commit", "revoke-after-commit"];
    let runs: [(&str, Vec<&str>); 2] = [
        ("revoke", revoke_points.iter().chain(&crl_points).copied().collect()),
        ("crl", crl_points.to_vec()),
    ];
    let mut violations = Vec::new();
    for (name, points) in runs {
        for point in points {
            let fleet = Fleet::new();
            fleet.device("dev-1");
            fleet.device("dev-2");
            run_ok(fleet.cmd("revoke").args(["--id", "dev-1"]));
            let mut carried = crl_serials(&fleet);
            let mut command = fleet.cmd(name);
            if name == "revoke" {
                command.args(["--id", "dev-2"]);
            }
            if let Err(e) = crash_at(&mut command, point) {
                violations.push(format!("{name} at {point}: {e}"));
                continue;
            }
            carried.extend(crl_serials(&fleet));
            run_ok(&mut fleet.cmd("crl"));
            let published = crl_serials(&fleet);
            let revoked = registry(&fleet)
                .into_iter()
                .filter(|(_, status)| status == "revoked")
                .map(|(serial, _)| serial);
            for serial in revoked.chain(carried) {
                if !published.contains(&serial) {
                    violations.push(format!(
                        "{name} at {point}: serial {serial} was revoked, but the next `provision crl` dropped it"
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
}

#[test]
fn a_crash_while_forcing_a_new_broker_bundle_never_pairs_the_new_certificate_with_the_old_key() {
    let mut violations = Vec::new();
    let points = ISSUE_POINTS.iter().chain(&WRITE_POINTS).chain(&["outputs-set-aside"]);
    for point in points {
        let fleet = Fleet::new();
        let out = fleet.path("broker");
        let broker = || fleet.broker_cmd(&out);
        run_ok(&mut broker());
        let bundle = || ["broker.crt", "broker.key"].map(|file| fs::read(out.join(file)).ok());
        let old = bundle();
        if let Err(e) = crash_at(broker().arg("--force"), point) {
            violations.push(format!("broker --force at {point}: {e}"));
            continue;
        }
        let (cert, key) = (out.join("broker.crt"), out.join("broker.key"));
        if cert.exists() && key.exists() && !key_matches(&cert, &key) {
            violations.push(format!(
                "broker --force at {point}: broker.crt and broker.key do not belong together"
            ));
        }
        let before_swap = ISSUE_POINTS.contains(point) || ["bundle-cert-written", "outputs-staged"].contains(point);
        if before_swap && bundle() != old {
            violations.push(format!(
                "broker --force at {point}: the old bundle was changed before the new one was complete"
            ));
        }
    }
    assert!(violations.is_empty(), "\n{}", violations.join("\n"));
}
