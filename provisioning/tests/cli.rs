//! The `provision` CLI, run as a process: files, fields, chains, CRLs, concurrency and every
//! refusal the operator can meet.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use e2e::{require_tool, run, run_err, run_ok};
use fleet_identity::{pem, tls, CertificateSummary, Identity, Role};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use support::{key_matches, provision, Fleet};
use x509_parser::prelude::*;

mod support;

fn openssl() -> Command {
    Command::new(require_tool("openssl", "openssl"))
}

/// The PKI's CRL as `openssl crl -text` prints it.
fn crl_text(fleet: &Fleet) -> String {
    run_ok(
        openssl()
            .args(["crl", "-noout", "-text", "-in"])
            .arg(fleet.pki().join("crl.pem")),
    )
}

fn der(path: &Path) -> Vec<u8> {
    pem::load_certs(path).unwrap().remove(0).to_vec()
}

/// Issues the service or gateway (`kind`) `name` into `<kind>s/`.
fn named(fleet: &Fleet, kind: &str, name: &str) {
    let out = fleet.path(&format!("{kind}s"));
    run_ok(fleet.cmd(kind).args(["--name", name, "--out"]).arg(&out));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_the_contract_files_with_private_keys_0600() {
    let fleet = Fleet::new();
    for file in ["device-ca.crt", "broker-ca.crt", "crl.pem", "registry.db"] {
        assert!(fleet.pki().join(file).is_file(), "{file}");
    }
    assert_eq!(mode(&fleet.pki().join("device-ca.key")), 0o600);
    assert_eq!(mode(&fleet.pki().join("broker-ca.key")), 0o600);
    for ca in ["device-ca.crt", "broker-ca.crt"] {
        let der = der(&fleet.pki().join(ca));
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0), "{ca}: {bc:?}");
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign(), "{ca}");
        assert_eq!(cert.subject(), cert.issuer(), "{ca} is self-signed");
    }
    let verified = run(openssl()
        .args(["crl", "-noout", "-in"])
        .arg(fleet.pki().join("crl.pem"))
        .arg("-CAfile")
        .arg(fleet.pki().join("device-ca.crt")));
    assert!(verified.status.success() && String::from_utf8_lossy(&verified.stderr).contains("verify OK"));
    assert!(crl_text(&fleet).contains("No Revoked Certificates"));
}

#[test]
fn init_refuses_a_directory_that_already_holds_a_pki() {
    let fleet = Fleet::new();
    let before = fs::read(fleet.pki().join("device-ca.key")).unwrap();
    let err = run_err(provision().arg("init").arg("--pki").arg(fleet.pki()));
    assert!(
        err.contains("already holds a PKI") && err.contains("refusing to overwrite"),
        "{err}"
    );
    assert_eq!(fs::read(fleet.pki().join("device-ca.key")).unwrap(), before);
}

#[test]
fn init_supports_every_key_type() {
    for key_type in ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"] {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            provision()
                .args(["init", "--key-type", key_type, "--pki"])
                .arg(dir.path().join("pki")),
        );
        run_ok(
            provision()
                .args(["device", "--id", "d", "--key-type", key_type, "--pki"])
                .arg(dir.path().join("pki"))
                .arg("--out")
                .arg(dir.path().join("out")),
        );
        run_ok(
            openssl()
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.path().join("pki/device-ca.crt"))
                .arg(dir.path().join("out/d/device.crt")),
        );
    }
}

#[test]
fn device_certificate_carries_exactly_the_specified_fields() {
    let fleet = Fleet::new();
    let bundle = fleet.device("sensor-1");
    for file in ["device.crt", "device.key", "broker-ca.crt", "agent.toml"] {
        assert!(bundle.join(file).is_file(), "{file}");
    }
    assert_eq!(mode(&bundle.join("device.key")), 0o600);
    let der = der(&bundle.join("device.crt"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
        "sensor-1"
    );
    assert_eq!(
        cert.subject().iter_organization().next().unwrap().as_str().unwrap(),
        "acme"
    );
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, vec![GeneralName::URI("urn:device:sensor-1")]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let serial = cert.raw_serial();
    assert!(
        serial.len() == 16 && serial[0] & 0x80 == 0,
        "random positive 128-bit serial: {serial:02x?}"
    );
    let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 3 * 365, "default validity is three years");
    assert_eq!(Identity::from_der(&der).unwrap().role, Role::Device);
    let agent = fs::read_to_string(bundle.join("agent.toml")).unwrap();
    assert!(
        agent.contains("broker_url = \"mqtts://localhost:8883\"") && agent.contains("cert = \"device.crt\""),
        "{agent}"
    );
}

#[test]
fn service_and_broker_certificates_have_their_roles() {
    let fleet = Fleet::new();
    named(&fleet, "service", "ingest");
    let service = der(&fleet.path("services/ingest/service.crt"));
    assert_eq!(Identity::from_der(&service).unwrap().role, Role::Service);
    assert!(fleet.path("services/ingest/broker-ca.crt").is_file());
    assert_eq!(mode(&fleet.path("services/ingest/service.key")), 0o600);

    run_ok(
        fleet
            .cmd("broker")
            .args(["--dns", "gw.local", "--ip", "127.0.0.1", "--out"])
            .arg(fleet.path("broker")),
    );
    for file in ["broker.crt", "broker.key", "device-ca.crt", "broker.toml"] {
        assert!(fleet.path("broker").join(file).is_file(), "{file}");
    }
    let der = der(&fleet.path("broker/broker.crt"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(san.general_names.contains(&GeneralName::DNSName("gw.local")));
    assert!(san.general_names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    let config = fs::read_to_string(fleet.path("broker/broker.toml")).unwrap();
    let crl = fleet.pki().join("crl.pem").canonicalize().unwrap();
    assert!(config.contains(&format!("crl = \"{}\"", crl.display())), "{config}");
}

#[test]
fn a_gateway_certificate_carries_the_gateway_role_and_is_revocable_by_kind() {
    let fleet = Fleet::new();
    named(&fleet, "gateway", "site-a");
    let der = der(&fleet.path("gateways/site-a/gateway.crt"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, vec![GeneralName::URI("urn:gateway:site-a")]);
    assert_eq!(Identity::from_der(&der).unwrap().role, Role::Gateway);
    assert_eq!(mode(&fleet.path("gateways/site-a/gateway.key")), 0o600);
    let second = run_err(
        fleet
            .cmd("gateway")
            .args(["--name", "site-a", "--force", "--out"])
            .arg(fleet.path("gateways")),
    );
    assert!(second.contains("active"), "{second}");
    run_ok(fleet.cmd("revoke").args(["--id", "site-a", "--kind", "gateway"]));
    let listed = run_ok(fleet.cmd("list").arg("--json"));
    assert!(listed.contains("\"gateway\"") && listed.contains("revoked"), "{listed}");
}

#[test]
fn the_same_crl_is_published_to_every_gateway_folder() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.path("gw-a"), fleet.path("gw-b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fleet.device("sensor-1");
    run_ok(
        fleet
            .cmd("revoke")
            .args(["--id", "sensor-1", "--publish-to"])
            .arg(&a)
            .arg("--publish-to")
            .arg(&b),
    );
    let crl = fs::read(fleet.pki().join("crl.pem")).unwrap();
    assert_eq!(fs::read(a.join("crl.pem")).unwrap(), crl);
    assert_eq!(fs::read(b.join("crl.pem")).unwrap(), crl);
    assert_eq!(mode(&a.join("crl.pem")), 0o644);
    run_ok(fleet.cmd("crl").arg("--publish-to").arg(&a));
    let resigned = fs::read(fleet.pki().join("crl.pem")).unwrap();
    assert_ne!(resigned, crl);
    assert_eq!(fs::read(a.join("crl.pem")).unwrap(), resigned);
    let missing = run_err(fleet.cmd("crl").arg("--publish-to").arg(fleet.path("nowhere")));
    assert!(missing.contains("nowhere"), "{missing}");
}

#[test]
fn a_registry_from_before_gateways_takes_gateways_and_keeps_its_rows() {
    let fleet = Fleet::new();
    named(&fleet, "service", "ingest");
    // The certificates table as registries were made before gateways existed.
    let registry = fleet.path("pki/registry.db");
    let conn = rusqlite::Connection::open(&registry).unwrap();
    let sql: String = conn
        .query_row("SELECT sql FROM sqlite_master WHERE name = 'certificates'", [], |r| {
            r.get(0)
        })
        .unwrap();
    conn.execute_batch(&format!(
        "ALTER TABLE certificates RENAME TO old; DROP INDEX certificates_by_id; {}; INSERT INTO certificates SELECT * FROM old; DROP TABLE old;",
        sql.replace(", 'gateway'", "")
    ))
    .unwrap();
    drop(conn);
    named(&fleet, "gateway", "site-b");
    let listed = run_ok(&mut fleet.cmd("list"));
    assert!(listed.contains("ingest") && listed.contains("site-b"), "{listed}");
}

#[test]
fn chains_verify_with_openssl_and_webpki() {
    let fleet = Fleet::new();
    let bundle = fleet.device("dev-1");
    run_ok(
        fleet
            .cmd("broker")
            .args(["--dns", "localhost", "--out"])
            .arg(fleet.path("broker")),
    );
    run_ok(
        openssl()
            .arg("verify")
            .arg("-CAfile")
            .arg(fleet.pki().join("device-ca.crt"))
            .arg(bundle.join("device.crt")),
    );
    run_ok(
        openssl()
            .arg("verify")
            .arg("-CAfile")
            .arg(bundle.join("broker-ca.crt"))
            .arg(fleet.path("broker/broker.crt")),
    );
    // The broker CA must not vouch for devices: the two chains are separate.
    run_err(
        openssl()
            .arg("verify")
            .arg("-CAfile")
            .arg(fleet.pki().join("broker-ca.crt"))
            .arg(bundle.join("device.crt")),
    );

    let provider = tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider());
    let device_ca = pem::load_certs(&fleet.pki().join("device-ca.crt")).unwrap();
    let crls = pem::load_crls(&fleet.pki().join("crl.pem")).unwrap();
    let clients = tls::client_verifier(provider.clone(), &device_ca, crls).unwrap();
    let device = pem::load_certs(&bundle.join("device.crt")).unwrap().remove(0);
    clients
        .verify_client_cert(&device, &[], UnixTime::now())
        .expect("webpki accepts the device");

    let broker_ca = pem::load_certs(&bundle.join("broker-ca.crt")).unwrap();
    let servers = tls::server_verifier(provider, &broker_ca).unwrap();
    let broker = pem::load_certs(&fleet.path("broker/broker.crt")).unwrap().remove(0);
    let name = ServerName::try_from("localhost").unwrap();
    servers
        .verify_server_cert(&broker, &[], &name, &[], UnixTime::now())
        .expect("webpki accepts the broker");
}

#[test]
fn revoke_lists_the_serial_in_a_crl_openssl_accepts() {
    let fleet = Fleet::new();
    let bundle = fleet.device("dev-1");
    fleet.device("dev-2");
    let serial = CertificateSummary::from_der(&der(&bundle.join("device.crt")))
        .unwrap()
        .serial;
    run_ok(
        fleet
            .cmd("revoke")
            .args(["--id", "dev-1", "--reason", "key-compromise"]),
    );
    let text = crl_text(&fleet);
    assert!(
        text.to_lowercase().contains(&format!("serial number: {serial}")),
        "{text}"
    );
    assert!(text.contains("Key Compromise"), "{text}");
    let verified = run(openssl()
        .args(["crl", "-noout", "-in"])
        .arg(fleet.pki().join("crl.pem"))
        .arg("-CAfile")
        .arg(fleet.pki().join("device-ca.crt")));
    assert!(verified.status.success() && String::from_utf8_lossy(&verified.stderr).contains("verify OK"));
    let check = run(openssl()
        .args(["verify", "-crl_check", "-CRLfile"])
        .arg(fleet.pki().join("crl.pem"))
        .arg("-CAfile")
        .arg(fleet.pki().join("device-ca.crt"))
        .arg(bundle.join("device.crt")));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        !check.status.success() && said.contains("certificate revoked"),
        "{said}"
    );

    let rows: serde_json::Value =
        serde_json::from_str(&run_ok(fleet.cmd("list").args(["--status", "revoked", "--json"]))).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["id"], "dev-1");
    assert_eq!(rows[0]["reason"], "key-compromise");

    // `crl` re-signs the same set under the next number.
    run_ok(fleet.cmd("crl").args(["--next-update-days", "7"]));
    let text = crl_text(&fleet);
    assert!(text.to_lowercase().contains(serial.as_str()), "{text}");
    assert!(
        text.contains("CRL Number: \n                3\n"),
        "numbers go 1 (init), 2 (revoke), 3 (crl): {text}"
    );
}

#[test]
fn revoke_by_id_asks_which_one_when_a_device_and_a_service_share_the_id() {
    let fleet = Fleet::new();
    fleet.device("pump-1");
    run_ok(
        fleet
            .cmd("service")
            .args(["--name", "pump-1", "--out"])
            .arg(fleet.path("services")),
    );
    let crl = fs::read(fleet.pki().join("crl.pem")).unwrap();
    let err = run_err(fleet.cmd("revoke").args(["--id", "pump-1"]));
    assert!(
        err.contains("both an active device and an active service")
            && err.contains("--kind device")
            && err.contains("--kind service"),
        "{err}"
    );
    assert_eq!(fs::read(fleet.pki().join("crl.pem")).unwrap(), crl, "nothing published");
    let revoked = |fleet: &Fleet| -> Vec<String> {
        let rows: serde_json::Value =
            serde_json::from_str(&run_ok(fleet.cmd("list").args(["--status", "revoked", "--json"]))).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|row| row["role"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(revoked(&fleet).is_empty(), "nothing revoked");

    run_ok(fleet.cmd("revoke").args(["--id", "pump-1", "--kind", "service"]));
    assert_eq!(revoked(&fleet), ["service"]);
    let err = run_err(fleet.cmd("revoke").args(["--id", "pump-1", "--kind", "service"]));
    assert!(err.contains("no active service certificate for id \"pump-1\""), "{err}");
    // Only the device holds the id now: --id alone is no longer ambiguous.
    run_ok(fleet.cmd("revoke").args(["--id", "pump-1"]));
    assert_eq!(revoked(&fleet), ["device", "service"]);
    let err = run_err(fleet.cmd("revoke").args(["--serial", "ab", "--kind", "device"]));
    assert!(
        err.contains("--kind") && err.contains("--serial"),
        "--kind goes with --id only: {err}"
    );
}

#[test]
fn a_revocation_whose_crl_cannot_be_written_stands_and_provision_crl_publishes_it() {
    let fleet = Fleet::new();
    let bundle = fleet.device("dev-1");
    let serial = CertificateSummary::from_der(&der(&bundle.join("device.crt")))
        .unwrap()
        .serial;
    // A directory where crl.pem should be: the CRL cannot be renamed into place.
    let crl = fleet.pki().join("crl.pem");
    let published = fs::read(&crl).unwrap();
    fs::remove_file(&crl).unwrap();
    fs::create_dir(&crl).unwrap();
    fs::write(crl.join("in-the-way"), "x").unwrap();
    let err = run_err(fleet.cmd("revoke").args(["--id", "dev-1"]));
    assert!(
        err.contains(&format!("revoked {serial} in the registry"))
            && err.contains("revocation stands")
            && err.contains("provision crl --pki"),
        "{err}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&run_ok(fleet.cmd("list").args(["--status", "revoked", "--json"]))).unwrap();
    assert_eq!(rows[0]["serial"], serial.as_str(), "the registry keeps the revocation");

    fs::remove_dir_all(&crl).unwrap();
    fs::write(&crl, published).unwrap();
    run_ok(&mut fleet.cmd("crl"));
    let text = crl_text(&fleet);
    assert!(
        text.to_lowercase().contains(&format!("serial number: {serial}")),
        "{text}"
    );
}

#[test]
fn a_failed_broker_force_leaves_the_old_bundle_intact_and_a_forced_one_replaces_it_whole() {
    let fleet = Fleet::new();
    let out = fleet.path("broker");
    let broker = || fleet.broker_cmd(&out);
    run_ok(&mut broker());
    let bundle = || ["broker.crt", "broker.key", "device-ca.crt"].map(|file| fs::read(out.join(file)).unwrap());
    let old = bundle();
    // A directory where broker.toml should go: the old code had replaced the certificate and the
    // key by the time it failed on it.
    fs::remove_file(out.join("broker.toml")).unwrap();
    fs::create_dir(out.join("broker.toml")).unwrap();
    let err = run_err(broker().arg("--force"));
    assert!(err.contains("broker.toml") && err.contains("is a directory"), "{err}");
    assert!(bundle() == old, "the old bundle is intact");
    let rows: serde_json::Value = serde_json::from_str(&run_ok(fleet.cmd("list").arg("--json"))).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "nothing new recorded");

    // The broker's store lives beside the bundle: replacing the bundle leaves it alone.
    fs::remove_dir(out.join("broker.toml")).unwrap();
    fs::create_dir(out.join("store")).unwrap();
    fs::write(out.join("store/broker.sqlite"), "sessions").unwrap();
    run_ok(broker().arg("--force"));
    let new = bundle();
    assert!(new[0] != old[0] && new[1] != old[1] && new[2] == old[2]);
    assert!(key_matches(&out.join("broker.crt"), &out.join("broker.key")));
    assert!(out.join("broker.toml").is_file());
    assert_eq!(fs::read_to_string(out.join("store/broker.sqlite")).unwrap(), "sessions");
    let mut left: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["broker.crt", "broker.key", "broker.toml", "device-ca.crt", "store"],
        "no staging folder left"
    );
}

#[test]
fn sign_csr_certifies_the_devices_own_key_and_rotate_records_the_successor() {
    let fleet = Fleet::new();
    let key = fleet.path("own.key");
    let csr = fleet.path("own.csr");
    e2e::openssl_csr(
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "dev-7",
        &key,
        &csr,
    );
    let out = fleet.path("dev-7.crt");
    run_ok(fleet.cmd("sign-csr").arg("--csr").arg(&csr).arg("--out").arg(&out));
    assert_eq!(Identity::from_der(&der(&out)).unwrap().id.as_str(), "dev-7");
    let cert_pub = run_ok(openssl().args(["x509", "-noout", "-pubkey", "-in"]).arg(&out));
    let own_pub = run_ok(openssl().args(["pkey", "-pubout", "-in"]).arg(&key));
    assert_eq!(cert_pub, own_pub, "the certificate carries the CSR's public key");

    let again = fleet.path("dev-7b.crt");
    let err = run_err(fleet.cmd("sign-csr").arg("--csr").arg(&csr).arg("--out").arg(&again));
    assert!(
        err.contains("already has an active certificate") && err.contains("--rotate"),
        "{err}"
    );
    assert!(!again.exists());
    run_ok(
        fleet
            .cmd("sign-csr")
            .arg("--csr")
            .arg(&csr)
            .arg("--out")
            .arg(&again)
            .arg("--rotate"),
    );
    let rows: serde_json::Value =
        serde_json::from_str(&run_ok(fleet.cmd("list").args(["--json", "--status", "active"]))).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "both stay valid");
    assert_eq!(rows[0]["successor"], rows[1]["serial"]);
}

#[test]
fn concurrent_batches_on_one_pki_lose_no_row_and_duplicate_no_serial() {
    let fleet = Fleet::new();
    let spawn = |prefix: &str| {
        fleet
            .cmd("batch")
            .args(["--count", "300", "--prefix", prefix, "--jobs", "2", "--out"])
            .arg(fleet.path(prefix))
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a-"), spawn("b-"));
    for child in [a, b] {
        assert!(child.wait_with_output().unwrap().status.success());
    }
    let rows: serde_json::Value = serde_json::from_str(&run_ok(fleet.cmd("list").arg("--json"))).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 600);
    let serials: std::collections::HashSet<_> = rows.iter().map(|r| r["serial"].as_str().unwrap()).collect();
    assert_eq!(serials.len(), 600);
    let manifest = fs::read_to_string(fleet.path("a-/manifest.csv")).unwrap();
    assert_eq!(manifest.lines().next(), Some("id,serial,sha256,not_after"));
    assert_eq!(manifest.lines().count(), 301);
    assert!(fleet.path("b-/b-00300/device.key").is_file());
}

#[test]
fn batch_reads_a_manifest_and_refuses_duplicate_ids() {
    let fleet = Fleet::new();
    let manifest = fleet.path("ids.csv");
    fs::write(&manifest, "site,id\nnorth,pump-1\nsouth,pump-2\n").unwrap();
    run_ok(
        fleet
            .cmd("batch")
            .arg("--manifest")
            .arg(&manifest)
            .arg("--out")
            .arg(fleet.path("out")),
    );
    assert!(fleet.path("out/pump-2/agent.toml").is_file());

    fs::write(&manifest, "id\npump-3\npump-4\npump-3\n").unwrap();
    let err = run_err(
        fleet
            .cmd("batch")
            .arg("--manifest")
            .arg(&manifest)
            .arg("--out")
            .arg(fleet.path("dup")),
    );
    assert!(
        err.contains("line 4") && err.contains("already appears on line 2"),
        "{err}"
    );
    assert!(!fleet.path("dup/pump-3").exists(), "nothing half-written");
}

#[test]
fn invalid_ids_are_refused_naming_the_rule() {
    let fleet = Fleet::new();
    let long = "x".repeat(65);
    for (id, rule) in [
        ("dev/1", "'/'"),
        ("a+b", "'+'"),
        ("#", "'#'"),
        ("", "empty"),
        (long.as_str(), "at most 64"),
        ("é", "'é'"),
        (".hidden", "may not start with"),
    ] {
        let err = run_err(
            fleet
                .cmd("device")
                .args(["--id", id, "--out"])
                .arg(fleet.path("devices")),
        );
        assert!(err.contains(rule) && err.contains("invalid id"), "{id:?}: {err}");
    }
    assert!(!fleet.path("devices").exists());
}

#[test]
fn missing_or_foreign_pki_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_err(
        provision()
            .args(["device", "--id", "d", "--out"])
            .arg(dir.path().join("o"))
            .arg("--pki")
            .arg(dir.path().join("nope")),
    );
    assert!(err.contains("not a PKI directory"), "{err}");
    fs::write(dir.path().join("device-ca.crt"), "x").unwrap();
    let err = run_err(
        provision()
            .args(["device", "--id", "d", "--out"])
            .arg(dir.path().join("o"))
            .arg("--pki")
            .arg(dir.path()),
    );
    assert!(
        err.contains("device-ca.key is missing") && err.contains("provision init"),
        "{err}"
    );
}

#[test]
fn a_corrupt_ca_key_is_refused_naming_the_file() {
    let fleet = Fleet::new();
    let key = fleet.pki().join("device-ca.key");
    fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let err = run_err(
        fleet
            .cmd("device")
            .args(["--id", "d1", "--out"])
            .arg(fleet.path("devices")),
    );
    assert!(
        err.contains("device-ca.key") && err.contains("not a usable private key"),
        "{err}"
    );

    // A valid key that belongs to the other CA is just as unusable.
    fs::copy(fleet.pki().join("broker-ca.key"), &key).unwrap();
    let err = run_err(
        fleet
            .cmd("device")
            .args(["--id", "d1", "--out"])
            .arg(fleet.path("devices")),
    );
    assert!(err.contains("does not match the certificate"), "{err}");
}

#[test]
fn existing_outputs_are_refused_unless_forced() {
    let fleet = Fleet::new();
    fleet.device("dev-1");
    run_ok(fleet.cmd("revoke").args(["--id", "dev-1"]));
    let err = run_err(
        fleet
            .cmd("device")
            .args(["--id", "dev-1", "--out"])
            .arg(fleet.path("devices")),
    );
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    run_ok(
        fleet
            .cmd("device")
            .args(["--id", "dev-1", "--force", "--out"])
            .arg(fleet.path("devices")),
    );

    let err = run_err(
        fleet
            .cmd("device")
            .args(["--id", "dev-1", "--force", "--out"])
            .arg(fleet.path("devices")),
    );
    assert!(err.contains("already has an active certificate"), "{err}");
}

#[test]
fn bad_csrs_are_refused() {
    let fleet = Fleet::new();
    let make = |cn: &str, name: &str| {
        let csr = fleet.path(name);
        run_ok(
            openssl()
                .args([
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                ])
                .arg(fleet.path("k.pem"))
                .args(["-outform", "DER", "-out"])
                .arg(&csr),
        );
        csr
    };
    let bad_cn = make("dev\\+1", "cn.csr");
    let err = run_err(
        fleet
            .cmd("sign-csr")
            .arg("--csr")
            .arg(&bad_cn)
            .arg("--out")
            .arg(fleet.path("x.crt")),
    );
    assert!(err.contains("invalid id \"dev+1\"") && err.contains("CN of"), "{err}");

    let tampered = make("dev-1", "sig.csr");
    let mut bytes = fs::read(&tampered).unwrap();
    // Change the subject's CN inside the signed part: dev-1 becomes dev-2.
    let at = bytes.windows(5).position(|w| w == b"dev-1").unwrap();
    bytes[at + 4] = b'2';
    fs::write(&tampered, &bytes).unwrap();
    let err = run_err(
        fleet
            .cmd("sign-csr")
            .arg("--csr")
            .arg(&tampered)
            .arg("--out")
            .arg(fleet.path("x.crt")),
    );
    assert!(
        err.contains("sig.csr") && err.contains("signature does not verify"),
        "{err}"
    );
    assert!(!fleet.path("x.crt").exists());
}

#[test]
fn help_says_what_each_command_does_and_writes() {
    let top = run_ok(provision().arg("--help"));
    for sub in [
        "init", "broker", "device", "batch", "service", "sign-csr", "revoke", "crl", "list",
    ] {
        assert!(top.contains(sub), "{sub} missing from --help");
        let help = run_ok(provision().args([sub, "--help"]));
        assert!(help.contains("--pki"), "{sub} --help: {help}");
    }
    assert!(run_ok(provision().args(["device", "--help"])).contains("agent.toml"));
    assert!(run_ok(provision().args(["batch", "--help"])).contains("manifest.csv"));
    assert!(run_ok(provision().args(["init", "--help"])).contains("registry.db"));
}
