//! The broker binary against real TLS clients on 127.0.0.1 (port 0, one broker per test): every
//! refusal is shown to happen for its stated reason, read from the broker's audit log.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{connect, connect_with, next_publish, tls_config, wait_for_incoming, BrokerProcess, ClientFiles, TestFleet};
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn start(fleet: &TestFleet, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), env)
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A TLS connection with a raw byte stream, presenting `files` (or no certificate).
async fn raw_tls(
    port: u16,
    files: &ClientFiles,
    present_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = if present_cert {
        tls_config(files)
    } else {
        let provider = fleet_identity::tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider());
        let roots = fleet_identity::tls::root_store(&fleet_identity::pem::load_certs(&files.ca).unwrap()).unwrap();
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Writes `bytes` and flushes them out of rustls's buffer.
async fn send_raw(stream: &mut (impl AsyncWriteExt + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads until the peer closes (or 5 s): what the broker sent.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all)).await;
    all
}

/// A minimal MQTT 3.1.1 CONNECT for `client_id`, clean session, keepalive 30 s.
fn connect_packet(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x1e];
    if level == 5 {
        body.push(0x00); // properties length
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

async fn assert_refused(
    broker: &BrokerProcess,
    files: &ClientFiles,
    client_id: &str,
    reason: &str,
) -> serde_json::Value {
    let result = connect(broker.port(), files, client_id).await;
    assert!(result.is_err(), "{reason}: the connection must fail");
    broker.wait_for_reject(reason)
}

#[tokio::test]
async fn qos1_round_trip_between_a_device_and_a_service() {
    let fleet = TestFleet::new();
    let device = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let (svc, mut svc_loop) = connect(broker.port(), &service, "ingest").await.unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/+/telemetry").await;
    let (dev, mut dev_loop) = connect(broker.port(), &device, "dev-1").await.unwrap();
    subscribe_acked(&dev, &mut dev_loop, "devices/dev-1/cmd/#").await;

    dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    tokio::spawn(async move { while dev_loop.poll().await.is_ok() {} });
    let telemetry = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("telemetry reaches the service");
    assert_eq!(
        (telemetry.topic.as_str(), &telemetry.payload[..], telemetry.qos),
        ("devices/dev-1/telemetry", &b"21.5"[..], QoS::AtLeastOnce)
    );

    let accept = broker.wait_for("accept of dev-1", Duration::from_secs(5), |e| {
        e["event"] == "accept" && e["device_id"] == "dev-1"
    });
    assert_eq!(accept["role"], "device");
    assert_eq!(accept["tls_version"], "TLSv1_3");
    assert_eq!(accept["sha256"].as_str().unwrap().len(), 64);
    drop(svc);
}

/// Subscribes at QoS 1 and waits for the SUBACK.
async fn subscribe_acked(client: &rumqttc::AsyncClient, eventloop: &mut rumqttc::EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    wait_for_suback(eventloop).await;
}

/// Sends DISCONNECT and waits until the broker has closed the connection.
async fn disconnect_cleanly(client: rumqttc::AsyncClient, mut eventloop: rumqttc::EventLoop) {
    client.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await
    .unwrap();
}

async fn wait_for_suback(eventloop: &mut rumqttc::EventLoop) -> Vec<SubscribeReasonCode> {
    match wait_for_incoming(eventloop, Duration::from_secs(5), "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await
    {
        Packet::SubAck(ack) => ack.return_codes,
        _ => unreachable!("the predicate matched a SUBACK"),
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    if let Ok(mut stream) = raw_tls(broker.port(), &files, false).await {
        let _ = send_raw(&mut stream, &connect_packet(4, "dev-1")).await;
        assert!(
            read_until_closed(&mut stream).await.is_empty(),
            "no CONNACK without a certificate"
        );
    }
    broker.wait_for_reject("no_client_cert");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_as_unknown_issuer() {
    let fleet = TestFleet::new();
    let other = TestFleet::new();
    let foreign = other.device("dev-1");
    let files = ClientFiles {
        ca: fleet.pki_dir().join("broker-ca.crt"),
        ..ClientFiles::device(&foreign)
    };
    let broker = start(&fleet, &[]);
    let reject = assert_refused(&broker, &files, "dev-1", "unknown_issuer").await;
    assert_eq!(reject["device_id"], "dev-1", "the presented certificate is named");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_as_expired() {
    let fleet = TestFleet::new();
    let bundle = fleet.custom_device("old-1", |p| {
        p.not_before = now() - time::Duration::days(10);
        p.not_after = now() - time::Duration::days(1);
    });
    let broker = start(&fleet, &[]);
    assert_refused(&broker, &ClientFiles::device(&bundle), "old-1", "expired").await;
}

#[tokio::test]
async fn a_certificate_not_yet_valid_is_refused_as_not_yet_valid() {
    let fleet = TestFleet::new();
    let bundle = fleet.custom_device("early-1", |p| {
        p.not_before = now() + time::Duration::days(1);
        p.not_after = now() + time::Duration::days(10);
    });
    let broker = start(&fleet, &[]);
    assert_refused(&broker, &ClientFiles::device(&bundle), "early-1", "not_yet_valid").await;
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_as_revoked() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    fleet.revoke("dev-1");
    let broker = start(&fleet, &[]);
    let reject = assert_refused(&broker, &files, "dev-1", "revoked").await;
    assert_eq!(reject["device_id"], "dev-1");
    assert_eq!(reject["serial"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn a_server_certificate_is_refused_as_wrong_purpose() {
    let fleet = TestFleet::new();
    let bundle = fleet.custom_device("srv-1", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]
    });
    let broker = start(&fleet, &[]);
    assert_refused(&broker, &ClientFiles::device(&bundle), "srv-1", "wrong_purpose").await;
}

#[tokio::test]
async fn a_ca_certificate_used_as_a_leaf_is_refused() {
    let fleet = TestFleet::new();
    let files = ClientFiles {
        cert: fleet.pki_dir().join("device-ca.crt"),
        key: fleet.pki_dir().join("device-ca.key"),
        ca: fleet.pki_dir().join("broker-ca.crt"),
    };
    let broker = start(&fleet, &[]);
    assert_refused(&broker, &files, "x", "ca_cert_as_leaf").await;
}

#[tokio::test]
async fn a_certificate_with_two_identities_is_refused_as_bad_identity() {
    let fleet = TestFleet::new();
    let bundle = fleet.custom_device("twin-1", |p| {
        p.subject_alt_names
            .push(rcgen::SanType::URI("urn:service:twin-1".try_into().unwrap()));
    });
    let broker = start(&fleet, &[]);
    assert_refused(&broker, &ClientFiles::device(&bundle), "twin-1", "bad_identity").await;
}

#[tokio::test]
async fn a_device_claiming_another_client_id_gets_not_authorized() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    fleet.device("dev-2");
    let broker = start(&fleet, &[]);
    let refused = connect(broker.port(), &files, "dev-2").await.err().expect("refused");
    assert!(
        matches!(
            refused,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{refused:?}"
    );
    let reject = broker.wait_for_reject("client_id_mismatch");
    assert!(reject["detail"]
        .as_str()
        .unwrap()
        .contains("\"dev-2\" does not match certificate identity \"dev-1\""));
}

#[tokio::test]
async fn an_empty_client_id_is_given_the_device_id() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let (svc, mut svc_loop) = connect(broker.port(), &service, "").await.unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/dev-1/#").await;
    let (dev, mut dev_loop) = connect(broker.port(), &files, "").await.unwrap();
    dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    tokio::spawn(async move { while dev_loop.poll().await.is_ok() {} });
    assert!(next_publish(&mut svc_loop, Duration::from_secs(5)).await.is_some());
}

#[tokio::test]
async fn a_device_is_confined_to_its_own_topics() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    fleet.device("dev-2");
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let (svc, mut svc_loop) = connect(broker.port(), &service, "ingest").await.unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/#").await;

    let (dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    let filters = ["devices/dev-1/cmd/#", "devices/+/telemetry", "#", "$SYS/#"]
        .map(|f| SubscribeFilter::new(f.into(), QoS::AtLeastOnce));
    dev.subscribe_many(filters).await.unwrap();
    let codes = wait_for_suback(&mut dev_loop).await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    );

    // A denied QoS 1 publish is still acknowledged, but nobody receives it.
    dev.publish("devices/dev-2/cmd/open", QoS::AtLeastOnce, false, "spoof")
        .await
        .unwrap();
    wait_for_incoming(&mut dev_loop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
    dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, "real")
        .await
        .unwrap();
    tokio::spawn(async move { while dev_loop.poll().await.is_ok() {} });
    let first = next_publish(&mut svc_loop, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        ("devices/dev-1/telemetry", &b"real"[..]),
        "the spoofed message never arrived"
    );

    let denied = broker.wait_for("acl_denied publish", Duration::from_secs(5), |e| {
        e["event"] == "acl_denied" && e["action"] == "publish"
    });
    assert_eq!(
        (denied["device_id"].as_str(), denied["topic"].as_str()),
        (Some("dev-1"), Some("devices/dev-2/cmd/open"))
    );
    broker.wait_for("acl_denied subscribe", Duration::from_secs(5), |e| {
        e["event"] == "acl_denied" && e["topic"] == "devices/+/telemetry"
    });
    drop(svc);
}

#[tokio::test]
async fn a_denied_publish_disconnects_when_configured() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__ACL__ON_DENIED_PUBLISH", "disconnect")]);
    let (dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    dev.publish("elsewhere", QoS::AtMostOnce, false, "x").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async { while dev_loop.poll().await.is_ok() {} }).await;
    assert!(closed.is_ok(), "the broker closed the connection");
    broker.wait_for("acl_denied", Duration::from_secs(5), |e| e["event"] == "acl_denied");
}

#[tokio::test]
async fn a_will_outside_the_namespace_is_refused_and_an_allowed_will_fires_on_abnormal_close() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let refused = connect_with(broker.port(), &files, "dev-1", |o| {
        o.set_last_will(LastWill::new("devices/dev-2/status", "gone", QoS::AtLeastOnce, false));
    })
    .await;
    assert!(matches!(
        refused,
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized))
    ));
    broker.wait_for_reject("will_denied");

    let (svc, mut svc_loop) = connect(broker.port(), &service, "ingest").await.unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/dev-1/status").await;
    let (dev, dev_loop) = connect_with(broker.port(), &files, "dev-1", |o| {
        o.set_last_will(LastWill::new(
            "devices/dev-1/status",
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
    })
    .await
    .unwrap();
    drop((dev, dev_loop)); // the socket closes without DISCONNECT
    let will = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("the will is published");
    assert_eq!(&will.payload[..], b"offline");
}

#[tokio::test]
async fn revoked_device_is_disconnected_without_broker_restart() {
    let fleet = TestFleet::new();
    let bundles = fleet.devices(&["dev-1", "dev-2"]);
    let broker = start(&fleet, &[]);
    let (_victim, mut victim_loop) = connect(broker.port(), &ClientFiles::device(&bundles[0]), "dev-1")
        .await
        .unwrap();
    let (_other, mut other_loop) = connect(broker.port(), &ClientFiles::device(&bundles[1]), "dev-2")
        .await
        .unwrap();
    let revoked_at = Instant::now();
    fleet.revoke("dev-1");
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while victim_loop.poll().await.is_ok() {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "dev-1's live session closed within 2 s of the CRL being written"
    );
    let kick = broker.wait_for("revoked_kick", Duration::from_secs(1), |e| e["event"] == "revoked_kick");
    assert_eq!(kick["device_id"], "dev-1");
    assert!(revoked_at.elapsed() < Duration::from_secs(3));
    // dev-2 is untouched and dev-1 cannot come back.
    assert!(tokio::time::timeout(Duration::from_millis(300), other_loop.poll())
        .await
        .map_or(true, |r| r.is_ok()));
    assert_refused(&broker, &ClientFiles::device(&bundles[0]), "dev-1", "revoked").await;
}

#[tokio::test]
async fn a_broken_crl_keeps_the_previous_configuration() {
    let fleet = TestFleet::new();
    let bundles = fleet.devices(&["dev-1", "dev-2"]);
    fleet.revoke("dev-1");
    let broker = start(&fleet, &[]);
    fs::write(
        fleet.crl(),
        "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let failed = broker.wait_for("reload_failed", Duration::from_secs(5), |e| {
        e["event"] == "reload_failed"
    });
    assert!(failed["error"].as_str().unwrap().contains("crl.pem"), "{failed}");
    connect(broker.port(), &ClientFiles::device(&bundles[1]), "dev-2")
        .await
        .expect("valid devices still get in");
    assert_refused(&broker, &ClientFiles::device(&bundles[0]), "dev-1", "revoked").await;
}

#[tokio::test]
async fn a_stale_crl_is_still_enforced_and_reported() {
    let fleet = TestFleet::new();
    let bundles = fleet.devices(&["dev-1", "dev-2"]);
    let serial = fleet_identity::CertificateSummary::from_der(
        &fleet_identity::pem::load_certs(&bundles[0].join("device.crt")).unwrap()[0],
    )
    .unwrap()
    .serial;
    let pki = fleet.pki();
    let stale = rcgen::CertificateRevocationListParams {
        this_update: now() - time::Duration::days(10),
        next_update: now() - time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(7u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial.to_be_bytes()),
            revocation_time: now() - time::Duration::days(5),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&pki.device_ca.issuer)
    .unwrap();
    fs::write(fleet.crl(), stale.pem().unwrap()).unwrap();
    let broker = start(&fleet, &[]);
    broker.wait_for("crl_stale", Duration::from_secs(5), |e| e["event"] == "crl_stale");
    connect(broker.port(), &ClientFiles::device(&bundles[1]), "dev-2")
        .await
        .expect("a stale CRL locks nobody out");
    assert_refused(&broker, &ClientFiles::device(&bundles[0]), "dev-1", "revoked").await;
}

#[tokio::test]
async fn an_idle_socket_does_not_delay_a_valid_device_and_times_out() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__LIMITS__HANDSHAKE_TIMEOUT_MS", "1500")]);
    let _idle = TcpStream::connect(("127.0.0.1", broker.port())).await.unwrap();
    let started = Instant::now();
    connect(broker.port(), &files, "dev-1")
        .await
        .expect("the device connects while a socket idles");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "not delayed by the idle socket: {:?}",
        started.elapsed()
    );
    broker.wait_for_reject("handshake_timeout");
}

#[tokio::test]
async fn a_silent_client_after_the_handshake_times_out_waiting_for_connect() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__LIMITS__CONNECT_TIMEOUT_MS", "300")]);
    let mut stream = raw_tls(broker.port(), &files, true).await.unwrap();
    assert!(read_until_closed(&mut stream).await.is_empty());
    let reject = broker.wait_for_reject("connect_timeout");
    assert_eq!(reject["device_id"], "dev-1");
}

#[tokio::test]
async fn garbage_and_oversized_input_close_only_that_connection() {
    let fleet = TestFleet::new();
    let bundles = fleet.devices(&["dev-1", "attacker"]);
    let (files, attacker) = (ClientFiles::device(&bundles[0]), ClientFiles::device(&bundles[1]));
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_PACKET_BYTES", "1024")]);
    let (dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();

    // Garbage instead of a ClientHello.
    let mut tcp = TcpStream::connect(("127.0.0.1", broker.port())).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    read_until_closed(&mut tcp).await;
    broker.wait_for_reject("tls_error");

    // Garbage after a good handshake, then an oversized PUBLISH after a good CONNECT.
    let mut stream = raw_tls(broker.port(), &attacker, true).await.unwrap();
    send_raw(&mut stream, &[0xF0, 0x00, 0xde, 0xad]).await.unwrap();
    read_until_closed(&mut stream).await;
    let mut stream = raw_tls(broker.port(), &attacker, true).await.unwrap();
    send_raw(&mut stream, &connect_packet(4, "")).await.unwrap();
    send_raw(&mut stream, &[0x30, 0x80, 0x80, 0x04]).await.unwrap(); // remaining length 65536
    read_until_closed(&mut stream).await;
    let rejects = broker
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "protocol_error")
        .count();
    assert!(rejects >= 1, "protocol errors logged");
    broker.wait_for("oversized packet rejected", Duration::from_secs(5), |e| {
        e["reason"] == "protocol_error" && e["detail"].as_str().is_some_and(|d| d.contains("max_packet_bytes"))
    });

    // The first device never noticed.
    dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    wait_for_incoming(&mut dev_loop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
}

#[tokio::test]
async fn a_connect_for_an_unknown_mqtt_version_is_refused_with_connack_1() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    let mut stream = raw_tls(broker.port(), &files, true).await.unwrap();
    send_raw(&mut stream, &connect_packet(6, "dev-1")).await.unwrap();
    assert_eq!(read_until_closed(&mut stream).await, vec![0x20, 0x02, 0x00, 0x01]);
    broker.wait_for_reject("unsupported_protocol_version");
}

#[tokio::test]
async fn a_second_connect_is_a_protocol_error() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    let mut stream = raw_tls(broker.port(), &files, true).await.unwrap();
    send_raw(&mut stream, &connect_packet(4, "dev-1")).await.unwrap();
    send_raw(&mut stream, &connect_packet(4, "dev-1")).await.unwrap();
    let received = read_until_closed(&mut stream).await;
    assert_eq!(&received[..4], &[0x20, 0x02, 0x00, 0x00], "first CONNECT accepted");
    let reject = broker.wait_for_reject("protocol_error");
    assert!(reject["detail"].as_str().unwrap().contains("second CONNECT"));
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_CONNECTIONS", "1")]);
    let _first = connect(broker.port(), &files, "dev-1").await.unwrap();
    assert!(connect(broker.port(), &files, "dev-1").await.is_err());
    broker.wait_for_reject("too_many_connections");
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")]);
    let metrics = broker.wait_for("metrics address", Duration::from_secs(5), |e| e["event"] == "metrics");
    let (_dev, _loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    let mut http = TcpStream::connect(metrics["addr"].as_str().unwrap()).await.unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let body = String::from_utf8(read_until_closed(&mut http).await).unwrap();
    for line in [
        "broker_handshakes_total{outcome=\"accepted\",reason=\"\"} 1",
        "broker_sessions{role=\"device\"} 1",
        "broker_server_cert_expiry_seconds",
        "broker_crl_age_seconds",
    ] {
        assert!(body.contains(line), "{line} missing from:\n{body}");
    }
}

#[tokio::test]
async fn sigterm_closes_sessions_and_exits_zero() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let mut broker = start(&fleet, &[]);
    let (_dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    let started = Instant::now();
    let status = broker.terminate();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let closed = tokio::time::timeout(Duration::from_secs(2), async { while dev_loop.poll().await.is_ok() {} }).await;
    assert!(closed.is_ok());
}

#[test]
fn check_config_summarises_the_files_and_names_a_broken_one() {
    let fleet = TestFleet::new();
    let ok = e2e::run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
            .arg("check-config")
            .arg("--config")
            .arg(fleet.broker_config()),
    );
    for expected in [
        "OK",
        "names localhost, 127.0.0.1",
        "CN=test device CA",
        "0 revoked, number 1",
    ] {
        assert!(ok.contains(expected), "{expected} missing from:\n{ok}");
    }
    fs::write(fleet.broker_dir().join("broker.key"), "not a key").unwrap();
    let err = e2e::run_err(
        std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
            .arg("check-config")
            .arg("--config")
            .arg(fleet.broker_config()),
    );
    assert!(
        err.contains("broker.key") && err.contains("no PRIVATE KEY block"),
        "{err}"
    );
}

#[tokio::test]
async fn retained_messages_reach_late_subscribers() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let (dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    dev.publish("devices/dev-1/config", QoS::AtLeastOnce, true, "v2")
        .await
        .unwrap();
    wait_for_incoming(&mut dev_loop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
    let (svc, mut svc_loop) = connect(broker.port(), &service, "ingest").await.unwrap();
    svc.subscribe("devices/dev-1/config", QoS::AtLeastOnce).await.unwrap();
    let retained = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("retained message");
    assert!(retained.retain && &retained.payload[..] == b"v2");
}

#[tokio::test]
async fn a_persistent_session_receives_what_was_published_while_it_was_away() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let persistent = |o: &mut rumqttc::MqttOptions| {
        o.set_clean_session(false);
    };
    let (svc, mut svc_loop) = connect_with(broker.port(), &service, "ingest", persistent)
        .await
        .unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/dev-1/telemetry").await;
    disconnect_cleanly(svc, svc_loop).await;
    broker.wait_for("service disconnect", Duration::from_secs(5), |e| {
        e["event"] == "disconnect" && e["device_id"] == "ingest"
    });

    let (dev, mut dev_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    wait_for_incoming(&mut dev_loop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
    let (_svc, mut svc_loop) = connect_with(broker.port(), &service, "ingest", persistent)
        .await
        .unwrap();
    let queued = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("queued message delivered");
    assert_eq!(&queued.payload[..], b"while away");
}

#[tokio::test]
async fn a_device_ca_rollover_accepts_both_fleets_and_honours_both_crls() {
    let old = TestFleet::new();
    let new = TestFleet::new();
    let old_device = old.device("dev-old");
    let bundles = new.devices(&["dev-new", "dev-gone"]);
    new.revoke("dev-gone");
    // The broker trusts both device CAs and reads both CRLs from one file each.
    let bundle_path = old.broker_dir().join("device-ca.crt");
    let both = format!(
        "{}{}",
        fs::read_to_string(&bundle_path).unwrap(),
        fs::read_to_string(new.pki_dir().join("device-ca.crt")).unwrap()
    );
    fs::write(&bundle_path, both).unwrap();
    let crls = format!(
        "{}{}",
        fs::read_to_string(old.crl()).unwrap(),
        fs::read_to_string(new.crl()).unwrap()
    );
    fs::write(old.crl(), crls).unwrap();
    let broker = start(&old, &[]);
    let with_old_broker_ca = |bundle: &Path| ClientFiles {
        ca: old.pki_dir().join("broker-ca.crt"),
        ..ClientFiles::device(bundle)
    };
    connect(broker.port(), &ClientFiles::device(&old_device), "dev-old")
        .await
        .expect("old fleet accepted");
    connect(broker.port(), &with_old_broker_ca(&bundles[0]), "dev-new")
        .await
        .expect("new fleet accepted");
    assert_refused(&broker, &with_old_broker_ca(&bundles[1]), "dev-gone", "revoked").await;
}

#[tokio::test]
async fn a_new_server_certificate_is_picked_up_without_restart_and_sighup_forces_a_reload() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    let before = fs::read(fleet.broker_dir().join("broker.crt")).unwrap();
    let request = provisioning::broker_bundle::BrokerRequest {
        dns: vec!["localhost".into()],
        ips: vec![],
        validity_days: 10,
        overwrite: provisioning::output::Overwrite::Replace,
    };
    provisioning::broker_bundle::issue_broker(&mut fleet.pki(), &fleet.broker_dir(), &request).unwrap();
    assert_ne!(before, fs::read(fleet.broker_dir().join("broker.crt")).unwrap());
    let reload = broker.wait_for("reload of the server certificate", Duration::from_secs(5), |e| {
        e["event"] == "reload" && e["changed"].as_str().is_some_and(|c| c.contains("server_cert"))
    });
    assert!(reload["changed"].as_str().unwrap().contains("server_key"), "{reload}");
    // New handshakes get the new certificate (10 days of validity left, not 30).
    let mut stream = raw_tls(broker.port(), &files, true).await.unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let days = fleet_identity::CertificateSummary::from_der(&presented).unwrap();
    assert!((days.not_after - days.not_before) / 86_400 <= 10);
    send_raw(&mut stream, &connect_packet(4, "dev-1")).await.unwrap();

    broker.hangup();
    broker.wait_for("reload on SIGHUP", Duration::from_secs(5), |e| {
        e["event"] == "reload" && e["changed"].as_str().is_some_and(|c| c.contains("SIGHUP"))
    });
}

#[tokio::test]
async fn the_broker_listens_on_ipv6() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[("BROKER__LISTEN", "[::1]:0")]);
    assert!(broker.addr.is_ipv6(), "{}", broker.addr);
    let tcp = TcpStream::connect(broker.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&files)))
        .connect(name, tcp)
        .await
        .unwrap();
    send_raw(&mut stream, &connect_packet(4, "dev-1")).await.unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let accept = broker.wait_for("accept over IPv6", Duration::from_secs(5), |e| e["event"] == "accept");
    assert!(accept["peer"].as_str().unwrap().starts_with("[::1]"), "{accept}");
}

#[tokio::test]
async fn a_silent_client_with_a_truncated_packet_is_dropped_after_its_keepalive() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    let mut stream = raw_tls(broker.port(), &files, true).await.unwrap();
    let mut connect = connect_packet(4, "dev-1");
    // Keepalive (bytes 10 and 11: after the 2-byte fixed header, name, level and flags): 1 s.
    connect[10] = 0;
    connect[11] = 1;
    send_raw(&mut stream, &connect).await.unwrap();
    send_raw(&mut stream, &[0x30, 0x20, 0x00]).await.unwrap(); // the start of a PUBLISH, never finished
    let started = Instant::now();
    let received = read_until_closed(&mut stream).await;
    assert_eq!(&received[..4], &[0x20, 0x02, 0x00, 0x00]);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        started.elapsed()
    );
    let end = broker.wait_for("keepalive disconnect", Duration::from_secs(5), |e| {
        e["event"] == "disconnect"
    });
    assert!(end["cause"].as_str().unwrap().contains("keepalive"), "{end}");
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over_the_first() {
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ops"));
    let broker = start(&fleet, &[]);
    // The first connection has a router link (it subscribed); the second has none yet.
    let (first, mut first_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    subscribe_acked(&first, &mut first_loop, "devices/dev-1/cmd").await;
    let (second, mut second_loop) = connect(broker.port(), &files, "dev-1").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if first_loop.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the first connection must be closed");
    broker.wait_for("takeover logged", Duration::from_secs(5), |e| {
        e["event"] == "disconnect" && e["cause"].as_str().is_some_and(|c| c.contains("took over"))
    });

    subscribe_acked(&second, &mut second_loop, "devices/dev-1/cmd").await;
    let (ops, mut ops_loop) = connect(broker.port(), &service, "ops").await.unwrap();
    ops.publish("devices/dev-1/cmd", QoS::AtLeastOnce, false, "reboot")
        .await
        .unwrap();
    tokio::spawn(async move { while ops_loop.poll().await.is_ok() {} });
    let command = next_publish(&mut second_loop, Duration::from_secs(5))
        .await
        .expect("the command reaches the connection that took over");
    assert_eq!(&command.payload[..], b"reboot");
}

#[tokio::test]
async fn a_clean_session_discards_what_an_earlier_persistent_session_stored() {
    let fleet = TestFleet::new();
    let device = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let persistent = |o: &mut rumqttc::MqttOptions| {
        o.set_clean_session(false);
    };
    let (svc, mut svc_loop) = connect_with(broker.port(), &service, "ingest", persistent)
        .await
        .unwrap();
    subscribe_acked(&svc, &mut svc_loop, "devices/dev-1/telemetry").await;
    disconnect_cleanly(svc, svc_loop).await;

    let (dev, mut dev_loop) = connect(broker.port(), &device, "dev-1").await.unwrap();
    let publish_telemetry = |text: &'static str| {
        let dev = dev.clone();
        async move {
            dev.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, text)
                .await
        }
    };
    publish_telemetry("stored").await.unwrap();
    wait_for_incoming(&mut dev_loop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;

    // A clean CONNECT ends the stored session: nothing queued is delivered, now or later.
    let (svc, svc_loop) = connect(broker.port(), &service, "ingest").await.unwrap();
    disconnect_cleanly(svc, svc_loop).await;
    let (svc, mut svc_loop) = connect_with(broker.port(), &service, "ingest", persistent)
        .await
        .unwrap();
    svc.subscribe("devices/dev-1/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::spawn(async move { while dev_loop.poll().await.is_ok() {} });
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match svc_loop.poll().await.unwrap() {
                rumqttc::Event::Incoming(Packet::SubAck(_)) => publish_telemetry("marker").await.unwrap(),
                rumqttc::Event::Incoming(Packet::Publish(p)) => {
                    received.push(String::from_utf8_lossy(&p.payload).into_owned());
                    if p.payload == "marker" {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the marker arrives");
    assert_eq!(received, ["marker"], "the stored message must have been discarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_under_one_client_id_leaves_only_the_newest_session() {
    const RACERS: usize = 20;
    let fleet = TestFleet::new();
    let files = ClientFiles::device(&fleet.device("dev-1"));
    let service = ClientFiles::service(&fleet.service("ops"));
    let broker = start(&fleet, &[]);
    let port = broker.port();
    // Connections race for the same client id; each publishes at once (opening its router link
    // while the others are being taken over) and keeps its event loop running.
    let racers: Vec<_> = (0..RACERS)
        .map(|n| {
            let files = files.clone();
            tokio::spawn(async move {
                let (client, mut eventloop) = connect(port, &files, "dev-1").await.unwrap();
                client
                    .publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, n.to_string())
                    .await
                    .unwrap();
                while eventloop.poll().await.is_ok() {}
            })
        })
        .collect();
    broker.wait_for_count("racers accepted", Duration::from_secs(10), RACERS, |e| {
        e["event"] == "accept"
    });

    let (last, mut last_loop) = connect(port, &files, "dev-1").await.unwrap();
    broker.wait_for_count("every racer taken over", Duration::from_secs(5), RACERS, |e| {
        e["event"] == "disconnect" && e["cause"].as_str().is_some_and(|c| c.contains("took over"))
    });
    for racer in racers {
        tokio::time::timeout(Duration::from_secs(5), racer)
            .await
            .expect("a taken-over connection is closed")
            .unwrap();
    }
    subscribe_acked(&last, &mut last_loop, "devices/dev-1/cmd").await;
    let (ops, mut ops_loop) = connect(port, &service, "ops").await.unwrap();
    ops.publish("devices/dev-1/cmd", QoS::AtLeastOnce, false, "ping")
        .await
        .unwrap();
    tokio::spawn(async move { while ops_loop.poll().await.is_ok() {} });
    let command = next_publish(&mut last_loop, Duration::from_secs(5))
        .await
        .expect("the newest connection gets the command");
    assert_eq!(&command.payload[..], b"ping");
}
