//! Revocation that cannot fail open, across real processes: a CRL is believed only if its CA
//! signed it; a CA rollover following the README keeps both CAs' revocations; a client CA
//! without a CRL is refused unless exempted; the CRL reaches an unprivileged broker whatever the
//! operator's umask, and the broker notices a permission change alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use e2e::raw::{kind, packets, RawClient};
use e2e::{run_ok, tls_config, workspace_bin, BrokerProcess, ClientFiles, TestFleet};

const WAIT: Duration = Duration::from_secs(10);

fn provision(args: &[&str]) -> String {
    run_ok(Command::new(workspace_bin("provision")).args(args))
}

fn start(config: &Path) -> BrokerProcess {
    BrokerProcess::start(&workspace_bin("broker"), config, &[])
}

async fn connect(broker: &BrokerProcess, bundle: &Path, id: &str) -> std::io::Result<RawClient> {
    RawClient::connect(
        broker.port(),
        Arc::new(tls_config(&ClientFiles::device(bundle))),
        &packets::connect(id, true, 60, None),
    )
    .await
}

/// Whether the session still answers (PINGREQ → PINGRESP).
async fn alive(client: &mut RawClient) -> bool {
    client.send(&packets::PINGREQ).await.is_ok()
        && client.recv_until(WAIT, |p| p.kind() == kind::PINGRESP).await.is_some()
}

/// Rewrites `broker.toml`'s `key = ...` line (or adds it at the top).
fn set_config(config: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let line = format!("{key} = {value}");
    let mut found = false;
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                found = true;
                line.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !found {
        lines.insert(0, line);
    }
    std::fs::write(config, lines.join("\n") + "\n").unwrap();
}

fn quoted(paths: &[&Path]) -> String {
    let items: Vec<String> = paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// A CRL with the device CA's exact name that revokes `serial`, signed by some other key.
fn forged_crl(fleet: &TestFleet, serial: &fleet_identity::Serial) -> String {
    let ca_pem = std::fs::read_to_string(fleet.pki_dir().join("device-ca.crt")).unwrap();
    let impostor = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, impostor).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(30),
        crl_number: rcgen::SerialNumber::from(999_999u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial.to_be_bytes()),
            revocation_time: now,
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(&issuer).unwrap().pem().unwrap()
}

fn serial_of(bundle: &Path) -> fleet_identity::Serial {
    let der = &fleet_identity::pem::load_certs(&bundle.join("device.crt")).unwrap()[0];
    fleet_identity::CertificateSummary::from_der(der).unwrap().serial
}

/// Replaces `path` the way the README says a CRL must be delivered: a temporary file, renamed.
fn deliver(path: &Path, contents: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_not_signed_by_its_ca_is_refused_at_start_and_at_every_reload() {
    let fleet = TestFleet::new();
    let (a1, a2) = (fleet.device("a1"), fleet.device("a2"));
    let config = fleet.broker_config();
    let crl = fleet.crl();
    let genuine = std::fs::read_to_string(&crl).unwrap();
    let forged = forged_crl(&fleet, &serial_of(&a1));

    // At start: the broker refuses to run on it, naming the file and why.
    deliver(&crl, &forged);
    let output = Command::new(workspace_bin("broker"))
        .arg("--config")
        .arg(&config)
        .env("BROKER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started on a forged CRL: {stderr}");
    assert!(
        stderr.contains(&crl.display().to_string()) && stderr.contains("not signed by the client CA"),
        "{stderr}"
    );

    // At reload: refused, the genuine CRL stays in force, nobody is kicked, handshakes go on.
    deliver(&crl, &genuine);
    let broker = start(&config);
    let mut session = connect(&broker, &a1, "a1").await.expect("a1 connects");
    deliver(&crl, &forged);
    let failed = broker.wait_for("the forged CRL refused", WAIT, |e| e["event"] == "reload_failed");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("not signed by the client CA")),
        "{failed}"
    );
    assert!(alive(&mut session).await, "a1 was kicked on a forged CRL's word");
    assert!(connect(&broker, &a2, "a2").await.is_ok(), "handshakes stopped");
    assert!(
        connect(&broker, &a1, "a1").await.is_ok(),
        "the forged CRL's revocation was believed"
    );
    assert!(!broker.events().iter().any(|e| e["event"] == "revoked_kick"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_the_device_ca_as_the_readme_says_keeps_both_cas_revocations() {
    let fleet = TestFleet::new();
    let old_pki = fleet.pki_dir();
    let new_pki = fleet.path().join("pki-2027");
    let devices = fleet.path().join("devices-2027");
    let (a1, a2) = (fleet.device("a1"), fleet.device("a2"));
    provision(&["init", "--pki", new_pki.to_str().unwrap(), "--fleet", "test-2027"]);
    for id in ["b1", "b2"] {
        provision(&[
            "device",
            "--pki",
            new_pki.to_str().unwrap(),
            "--id",
            id,
            "--broker-url",
            "mqtts://localhost:8883",
            "--out",
            devices.to_str().unwrap(),
        ]);
    }
    let (b1, b2) = (devices.join("b1"), devices.join("b2"));
    // The broker's certificate still comes from the old broker CA (that CA rolls separately).
    for bundle in [&b1, &b2] {
        std::fs::copy(old_pki.join("broker-ca.crt"), bundle.join("broker-ca.crt")).unwrap();
    }

    // The README's steps: the new CA appended to the client_ca bundle, the new PKI's crl.pem
    // added to the broker's `crl` list, then a restart.
    let config = fleet.broker_config();
    let bundle = fleet.broker_dir().join("device-ca.crt");
    let both =
        std::fs::read_to_string(&bundle).unwrap() + &std::fs::read_to_string(new_pki.join("device-ca.crt")).unwrap();
    std::fs::write(&bundle, both).unwrap();
    let (old_crl, new_crl) = (old_pki.join("crl.pem"), new_pki.join("crl.pem"));
    set_config(&config, "crl", &quoted(&[&old_crl, &new_crl]));
    let broker = start(&config);
    for (bundle, id) in [(&a1, "a1"), (&b1, "b1")] {
        assert!(connect(&broker, bundle, id).await.is_ok(), "{id} connects");
    }

    // Each PKI revokes its own device; neither revocation undoes the other.
    let steps = [
        ["revoke", "--pki", old_pki.to_str().unwrap(), "--id", "a1"],
        ["revoke", "--pki", new_pki.to_str().unwrap(), "--id", "b1"],
        ["crl", "--pki", old_pki.to_str().unwrap(), "--next-update-days", "7"],
    ];
    for (done, step) in steps.iter().enumerate() {
        provision(step);
        broker.wait_for_count(
            &format!("the reload after `provision {}`", step.join(" ")),
            WAIT,
            done + 1,
            |e| e["event"] == "reload",
        );
    }
    for (bundle, id) in [(&a1, "a1"), (&b1, "b1")] {
        assert!(connect(&broker, bundle, id).await.is_err(), "{id} was let back in");
        broker.wait_for(&format!("{id} refused as revoked"), WAIT, |e| {
            e["event"] == "reject" && e["reason"] == "revoked" && e["device_id"] == id
        });
    }
    for (bundle, id) in [(&a2, "a2"), (&b2, "b2")] {
        assert!(connect(&broker, bundle, id).await.is_ok(), "{id} connects");
    }
    drop(broker);

    // A client CA without a CRL: said at start, its devices refused (crl_missing)...
    set_config(&config, "crl", &quoted(&[&old_crl]));
    let broker = start(&config);
    let missing = broker.wait_for("the uncovered CA reported", WAIT, |e| e["event"] == "crl_missing");
    assert!(
        missing["ca"].as_str().is_some_and(|ca| ca.contains("test-2027")),
        "{missing}"
    );
    assert!(
        connect(&broker, &b2, "b2").await.is_err(),
        "a CA without a CRL was accepted unchecked"
    );
    broker.wait_for("b2 refused for the missing CRL", WAIT, |e| {
        e["event"] == "reject" && e["reason"] == "crl_missing" && e["device_id"] == "b2"
    });
    assert!(
        connect(&broker, &a2, "a2").await.is_ok(),
        "a covered CA's device was refused"
    );
    // ... unless the operator exempts that CA, which is said at start too.
    let fingerprint = missing["ca_sha256"].as_str().unwrap().to_owned();
    drop(broker);
    set_config(&config, "crl_exempt_cas", &format!("[{fingerprint:?}]"));
    let broker = start(&config);
    broker.wait_for("the exemption reported", WAIT, |e| e["event"] == "crl_exempt");
    assert!(
        connect(&broker, &b2, "b2").await.is_ok(),
        "the exempt CA's device was refused"
    );
    drop(broker);

    // No CRL at all: revocation is off, and the broker says so.
    let text = std::fs::read_to_string(&config).unwrap();
    let without: Vec<&str> = text.lines().filter(|l| !l.starts_with("crl")).collect();
    std::fs::write(&config, without.join("\n") + "\n").unwrap();
    let broker = start(&config);
    broker.wait_for("revocation off reported", WAIT, |e| e["event"] == "revocation_off");
}

/// The user the broker runs as in the next test: unprivileged, as on a gateway.
const NOBODY: (u32, u32) = (65534, 65534);

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), (uid, gid));
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crl_reaches_an_unprivileged_broker_whatever_the_umask() {
    let fleet = TestFleet::new();
    let device = fleet.device("d1");
    // The broker's own bundle belongs to its user; the PKI stays the operator's (root's), and
    // only its public files are readable by others.
    chown_tree(&fleet.broker_dir(), NOBODY);
    for dir in [fleet.path().to_owned(), fleet.pki_dir()] {
        set_mode(&dir, 0o755);
    }
    let crl: PathBuf = fleet.crl();
    let broker = BrokerProcess::start_as(
        &workspace_bin("broker"),
        &fleet.broker_config(),
        &[],
        NOBODY.0,
        NOBODY.1,
    );
    let mut session = connect(&broker, &device, "d1").await.expect("d1 connects");

    // The operator revokes under umask 077: the new crl.pem must still be readable (0644).
    let revoke = format!(
        "umask 077 && exec {} revoke --pki {} --id d1",
        workspace_bin("provision").display(),
        fleet.pki_dir().display()
    );
    let status = Command::new("sh").args(["-c", &revoke]).status().unwrap();
    assert!(status.success());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&crl).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "crl.pem written {:o}", mode & 0o777);
    broker.wait_for("d1 kicked on the new CRL", WAIT, |e| e["event"] == "revoked_kick");
    assert!(!alive(&mut session).await);

    // A CRL the broker cannot read: refused with the OS's reason, retried until it can be read;
    // a permission change alone is noticed.
    set_mode(&crl, 0o600);
    let failed = broker.wait_for("the unreadable CRL reported", WAIT, |e| e["event"] == "reload_failed");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("Permission denied")),
        "{failed}"
    );
    set_mode(&crl, 0o644);
    broker.wait_for_count("the CRL read again", WAIT, 2, |e| e["event"] == "reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_listed_twice_is_one_ca_and_a_partial_crl_is_refused() {
    let fleet = TestFleet::new();
    let device = fleet.device("d1");
    // The same CA appended twice (a rollover step done twice): still covered by its one CRL.
    let bundle = fleet.broker_dir().join("device-ca.crt");
    let ca = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(&bundle, format!("{ca}{ca}")).unwrap();
    let broker = start(&fleet.broker_config());
    assert!(
        connect(&broker, &device, "d1").await.is_ok(),
        "refused for a CA listed twice"
    );
    assert!(!broker.events().iter().any(|e| e["event"] == "crl_missing"));

    // A CRL with an issuing distribution point covers only part of what the CA issued: the
    // handshake verifier would let a certificate outside that part through unchecked.
    let pki = fleet.pki();
    let now = time::OffsetDateTime::now_utc();
    let partial = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(30),
        crl_number: rcgen::SerialNumber::from(999_999u64),
        issuing_distribution_point: Some(rcgen::CrlIssuingDistributionPoint {
            distribution_point: rcgen::CrlDistributionPoint {
                uris: vec!["http://crl.example/part-1.crl".into()],
            },
            scope: Some(rcgen::CrlScope::UserCertsOnly),
        }),
        revoked_certs: Vec::new(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    deliver(
        &fleet.crl(),
        &partial.signed_by(&pki.device_ca.issuer).unwrap().pem().unwrap(),
    );
    let failed = broker.wait_for("the partial CRL refused", WAIT, |e| e["event"] == "reload_failed");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("issuing distribution point")),
        "{failed}"
    );
}
