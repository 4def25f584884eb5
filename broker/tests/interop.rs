//! Third-party peers: Debian's mosquitto clients with fleet certificates exchange messages
//! through our broker, and are refused without a certificate.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{require_tool, run, BrokerProcess, TestFleet};

fn tls_args(command: &mut Command, dir: &Path, cert: &str, key: &str) {
    command
        .arg("--cafile")
        .arg(dir.join("broker-ca.crt"))
        .arg("--cert")
        .arg(dir.join(cert))
        .arg("--key")
        .arg(dir.join(key));
}

#[test]
fn mosquitto_clients_with_fleet_certificates_exchange_messages() {
    let sub_bin = require_tool("mosquitto_sub", "mosquitto-clients");
    let pub_bin = require_tool("mosquitto_pub", "mosquitto-clients");
    let fleet = TestFleet::new();
    let device = fleet.device("dev-1");
    let service = fleet.service("ingest");
    let broker = BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), &[]);
    let port = broker.port().to_string();

    // Line-buffered, so the SUBACK line arrives when it happens, not when the pipe buffer fills.
    let mut sub = Command::new(require_tool("stdbuf", "coreutils"));
    sub.arg("-oL").arg(&sub_bin).args([
        "-d",
        "-h",
        "localhost",
        "-p",
        &port,
        "-i",
        "ingest",
        "-t",
        "devices/+/telemetry",
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        "20",
        "-v",
    ]);
    tls_args(&mut sub, &service, "service.crt", "service.key");
    let mut sub = sub.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines().map_while(Result::ok);
    // `-d` prints the SUBACK: the subscription is in place before anything is published.
    assert!(
        lines.by_ref().any(|line| line.contains("received SUBACK")),
        "mosquitto_sub never subscribed"
    );

    let mut publish = Command::new(&pub_bin);
    publish.args([
        "-h",
        "localhost",
        "-p",
        &port,
        "-i",
        "dev-1",
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "from mosquitto_pub",
        "-q",
        "1",
    ]);
    tls_args(&mut publish, &device, "device.crt", "device.key");
    let published = run(&mut publish);
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let received: Vec<String> = lines.collect();
    assert!(
        received
            .iter()
            .any(|l| l == "devices/dev-1/telemetry from mosquitto_pub"),
        "{received:?}"
    );
    assert!(sub.wait().unwrap().success());
    broker.wait_for("accept of mosquitto_pub", Duration::from_secs(5), |e| {
        e["event"] == "accept" && e["device_id"] == "dev-1"
    });
}

#[test]
fn mosquitto_pub_without_a_certificate_is_refused() {
    let pub_bin = require_tool("mosquitto_pub", "mosquitto-clients");
    let fleet = TestFleet::new();
    let device = fleet.device("dev-1");
    let broker = BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), &[]);
    let port = broker.port().to_string();
    let output = run(Command::new(&pub_bin)
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "-t",
            "devices/dev-1/x",
            "-m",
            "x",
            "--cafile",
        ])
        .arg(device.join("broker-ca.crt")));
    assert!(!output.status.success());
    broker.wait_for_reject("no_client_cert");

    // And with a device certificate but another device's client id: CONNACK 5.
    let mut spoof = Command::new(&pub_bin);
    spoof.args([
        "-h",
        "localhost",
        "-p",
        &port,
        "-i",
        "dev-2",
        "-t",
        "devices/dev-2/x",
        "-m",
        "x",
    ]);
    tls_args(&mut spoof, &device, "device.crt", "device.key");
    let output = run(&mut spoof);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not authorised"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    broker.wait_for_reject("client_id_mismatch");
}
