//! Keys every TLS stack can read: for each key type `provision` offers, the CA keys, the
//! broker's key and a device's key (minted by `provision`, or generated on the device by
//! `device-agent keygen`) are read by OpenSSL (`openssl pkey`) and Python's `ssl`, and the
//! device's key carries a `mosquitto_pub` message through our broker.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use e2e::raw::{kind, packets, RawClient};
use e2e::{require_tool, run, run_ok, tls_config, workspace_bin, BrokerProcess, ClientFiles};

const KEY_TYPES: [&str; 4] = ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"];

fn provision(args: &[&str]) -> String {
    run_ok(Command::new(workspace_bin("provision")).args(args))
}

/// `openssl pkey` reads the key, or the test fails with what OpenSSL said.
fn openssl_reads(openssl: &Path, key: &Path) {
    let output = run(Command::new(openssl).args(["pkey", "-noout", "-in"]).arg(key));
    assert!(
        output.status.success(),
        "openssl pkey cannot read {}: {}",
        key.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Python's `ssl` loads the certificate with its key.
fn python_loads(python: &Path, cert: &Path, key: &Path) {
    let script = "import ssl, sys\nssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(sys.argv[1], sys.argv[2])";
    let output = run(Command::new(python).args(["-c", script]).arg(cert).arg(key));
    assert!(
        output.status.success(),
        "Python's ssl cannot load {} with {}: {}",
        cert.display(),
        key.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `mosquitto_pub` with the device's certificate and key publishes through the broker, and the
/// service receives it.
async fn mosquitto_round_trip(mosquitto_pub: &Path, broker: &BrokerProcess, service: &Path, device: &Path, id: &str) {
    let mut subscriber = RawClient::connect(
        broker.port(),
        Arc::new(tls_config(&ClientFiles::service(service))),
        &packets::connect("ingest", true, 30, None),
    )
    .await
    .expect("the service connects");
    subscriber
        .send(&packets::subscribe(1, &[("devices/+/telemetry", 1)]))
        .await
        .unwrap();
    subscriber
        .recv_until(Duration::from_secs(5), |p| p.kind() == kind::SUBACK)
        .await
        .expect("SUBACK");
    let topic = format!("devices/{id}/telemetry");
    let output = run(Command::new(mosquitto_pub)
        .args(["-h", "localhost", "-p", &broker.port().to_string(), "-i", id, "-q", "1"])
        .args(["-t", &topic, "-m", "signed with this key"])
        .arg("--cafile")
        .arg(device.join("broker-ca.crt"))
        .arg("--cert")
        .arg(device.join("device.crt"))
        .arg("--key")
        .arg(device.join("device.key")));
    assert!(
        output.status.success(),
        "mosquitto_pub with {}: {}",
        device.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let received = subscriber
        .recv_until(Duration::from_secs(5), |p| p.kind() == kind::PUBLISH)
        .await
        .and_then(|p| p.publish())
        .expect("the message arrives");
    assert_eq!(
        (received.topic.as_str(), received.payload.as_slice()),
        (topic.as_str(), &b"signed with this key"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_type_is_written_in_a_form_every_tls_stack_reads() {
    let openssl = require_tool("openssl", "openssl");
    let python = require_tool("python3", "python3");
    let mosquitto_pub = require_tool("mosquitto_pub", "mosquitto-clients");
    for key_type in KEY_TYPES {
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &str| dir.path().join(p);
        let pki = path("pki");
        let pki_arg = pki.to_str().unwrap();
        provision(&["init", "--pki", pki_arg, "--fleet", "keys", "--key-type", key_type]);
        provision(&[
            "broker",
            "--pki",
            pki_arg,
            "--out",
            path("broker").to_str().unwrap(),
            "--dns",
            "localhost",
        ]);
        let devices = path("devices");
        provision(&[
            "device",
            "--pki",
            pki_arg,
            "--id",
            "minted",
            "--key-type",
            key_type,
            "--broker-url",
            "mqtts://localhost:8883",
            "--out",
            devices.to_str().unwrap(),
        ]);
        provision(&[
            "service",
            "--pki",
            pki_arg,
            "--name",
            "ingest",
            "--out",
            path("services").to_str().unwrap(),
        ]);
        for key in [
            pki.join("device-ca.key"),
            pki.join("broker-ca.key"),
            path("broker/broker.key"),
        ] {
            openssl_reads(&openssl, &key);
        }
        python_loads(&python, &path("broker/broker.crt"), &path("broker/broker.key"));

        // The same key type generated on the device, its CSR signed by the PKI.
        let agent_types = ["ecdsa-p256", "ecdsa-p384", "ed25519"];
        let generated = devices.join("generated");
        if agent_types.contains(&key_type) {
            run_ok(
                Command::new(workspace_bin("device-agent"))
                    .args(["keygen", "--id", "generated", "--key-type", key_type, "--out"])
                    .arg(&generated),
            );
            provision(&[
                "sign-csr",
                "--pki",
                pki_arg,
                "--csr",
                generated.join("device.csr").to_str().unwrap(),
                "--out",
                generated.join("device.crt").to_str().unwrap(),
            ]);
            std::fs::copy(pki.join("broker-ca.crt"), generated.join("broker-ca.crt")).unwrap();
        }

        let broker = BrokerProcess::start(&workspace_bin("broker"), &path("broker/broker.toml"), &[]);
        let mut bundles = vec![(devices.join("minted"), "minted")];
        if agent_types.contains(&key_type) {
            bundles.push((generated.clone(), "generated"));
        }
        for (bundle, id) in bundles {
            openssl_reads(&openssl, &bundle.join("device.key"));
            python_loads(&python, &bundle.join("device.crt"), &bundle.join("device.key"));
            mosquitto_round_trip(&mosquitto_pub, &broker, &path("services/ingest"), &bundle, id).await;
        }
        println!("{key_type}: CA, broker and device keys read by openssl and Python; mosquitto_pub round trip");
    }
}
