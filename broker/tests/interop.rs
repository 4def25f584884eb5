//! Third-party peers: Debian's mosquitto clients with fleet certificates exchange messages
//! through our broker over MQTT 3.1.1 and 5, and are refused without a certificate; rumqttc's
//! MQTT 5 client does the same.

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
    round_trip("mqttv311", &["-v"], &[], "devices/dev-1/telemetry from mosquitto_pub");
}

#[test]
fn mosquitto_clients_exchange_messages_over_mqtt5_with_properties() {
    round_trip(
        "mqttv5",
        &["-F", "%t %p %P"],
        &["-D", "publish", "user-property", "site", "north"],
        "devices/dev-1/telemetry from mosquitto_pub site:north",
    );
}

/// `mosquitto_sub` as a service and `mosquitto_pub` as device dev-1, both speaking `protocol`:
/// the subscriber prints (with `format`) exactly `expected`.
fn round_trip(protocol: &str, format: &[&str], publish_args: &[&str], expected: &str) {
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
        "-V",
        protocol,
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
    ]);
    sub.args(format);
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
        "-V",
        protocol,
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
    publish.args(publish_args);
    tls_args(&mut publish, &device, "device.crt", "device.key");
    let published = run(&mut publish);
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );

    let received: Vec<String> = lines.collect();
    assert!(received.iter().any(|l| l == expected), "{received:?}");
    assert!(sub.wait().unwrap().success());
    broker.wait_for("accept of mosquitto_pub", Duration::from_secs(5), |e| {
        e["event"] == "accept" && e["device_id"] == "dev-1"
    });
}

/// rumqttc's MQTT 5 client, as a device: a user property out and back through the broker.
#[tokio::test]
async fn an_mqtt5_rumqttc_device_round_trips_through_the_broker() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let fleet = TestFleet::new();
    let broker = BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), &[]);
    let files = e2e::ClientFiles::device(&fleet.device("dev-1"));
    let mut options = MqttOptions::new("dev-1", "localhost", broker.port());
    options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
        std::sync::Arc::new(e2e::tls_config(&files)),
    )));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client.subscribe("devices/dev-1/cmd/#", QoS::AtLeastOnce).await.unwrap();
    let properties = PublishProperties {
        user_properties: vec![("trace".into(), "42".into())],
        ..PublishProperties::default()
    };
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await.expect("the connection holds") {
                Event::Incoming(Packet::SubAck(_)) => client
                    .publish_with_properties(
                        "devices/dev-1/cmd/echo",
                        QoS::AtLeastOnce,
                        false,
                        "ping",
                        properties.clone(),
                    )
                    .await
                    .unwrap(),
                Event::Incoming(Packet::Publish(publish)) => return publish,
                _ => {}
            }
        }
    })
    .await
    .expect("its own command back");
    assert_eq!(&received.payload[..], b"ping");
    let user = received.properties.map(|p| p.user_properties).unwrap_or_default();
    assert_eq!(user, vec![("trace".to_string(), "42".to_string())]);
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
