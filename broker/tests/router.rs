//! The broker's router through the real binary: MQTT 3.1.1 delivery semantics, bounds and flow
//! control, each shown on the wire with a raw client (flags, packet ids, what arrives and what
//! does not) and in the audit log.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::raw::{kind, packets, RawClient, RawPacket, ReceivedPublish};
use e2e::{tls_config, BrokerProcess, ClientFiles, TestFleet};
use packets::Publish;

const WAIT: Duration = Duration::from_secs(5);

fn start(fleet: &TestFleet, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), env)
}

fn config(files: &ClientFiles) -> Arc<rustls::ClientConfig> {
    Arc::new(tls_config(files))
}

/// A device `id`'s connection (clean session unless `clean` says otherwise).
async fn device(broker: &BrokerProcess, fleet: &TestFleet, id: &str, clean: bool) -> RawClient {
    let files = ClientFiles::device(&fleet.device(id));
    RawClient::connect(broker.port(), config(&files), &packets::connect(id, clean, 30, None))
        .await
        .expect("device connects")
}

/// A service connection with client id `client_id`.
async fn service(broker: &BrokerProcess, files: &ClientFiles, client_id: &str, clean: bool) -> RawClient {
    RawClient::connect(
        broker.port(),
        config(files),
        &packets::connect(client_id, clean, 30, None),
    )
    .await
    .expect("service connects")
}

/// Subscribes and returns the SUBACK's return codes.
async fn subscribe(client: &mut RawClient, filters: &[(&str, u8)]) -> Vec<u8> {
    client.send(&packets::subscribe(1, filters)).await.unwrap();
    let suback = client
        .recv_until(WAIT, |p| p.kind() == kind::SUBACK)
        .await
        .expect("SUBACK");
    suback.body[2..].to_vec()
}

async fn next_publish(client: &mut RawClient, limit: Duration) -> Option<ReceivedPublish> {
    client
        .recv_until(limit, |p| p.kind() == kind::PUBLISH)
        .await
        .as_ref()
        .and_then(RawPacket::publish)
}

/// Publishes at QoS 1 and waits for the PUBACK.
async fn publish_acked(client: &mut RawClient, topic: &str, payload: &[u8], pkid: u16, retain: bool) {
    let publish = Publish {
        retain,
        ..Publish::new(topic, payload, 1, pkid)
    };
    client.send(&publish.bytes()).await.unwrap();
    client
        .recv_until(WAIT, |p| p.kind() == kind::PUBACK && p.pkid() == pkid)
        .await
        .expect("PUBACK");
}

#[tokio::test]
async fn qos2_is_delivered_exactly_once_in_both_directions() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let mut subscriber = service(&broker, &svc, "ingest", true).await;
    assert_eq!(subscribe(&mut subscriber, &[("devices/+/telemetry", 2)]).await, [2]);
    let mut dev = device(&broker, &fleet, "dev-1", true).await;

    let publish = Publish::new("devices/dev-1/telemetry", b"once", 2, 7);
    dev.send(&publish.bytes()).await.unwrap();
    let rec = dev.recv(WAIT).await.expect("PUBREC");
    assert_eq!((rec.kind(), rec.pkid()), (kind::PUBREC, 7));
    // The client did not see the PUBREC and resends: acknowledged again, not delivered again.
    dev.send(&Publish { dup: true, ..publish }.bytes()).await.unwrap();
    let rec = dev.recv(WAIT).await.expect("second PUBREC");
    assert_eq!((rec.kind(), rec.pkid()), (kind::PUBREC, 7));
    dev.send(&packets::pubrel(7)).await.unwrap();
    let comp = dev.recv(WAIT).await.expect("PUBCOMP");
    assert_eq!((comp.kind(), comp.pkid()), (kind::PUBCOMP, 7));

    let got = next_publish(&mut subscriber, WAIT).await.expect("the message");
    assert_eq!((got.payload.as_slice(), got.qos), (&b"once"[..], 2));
    subscriber.send(&packets::pubrec(got.pkid)).await.unwrap();
    let rel = subscriber.recv(WAIT).await.expect("PUBREL");
    assert_eq!((rel.kind(), rel.pkid()), (kind::PUBREL, got.pkid));
    subscriber.send(&packets::pubcomp(got.pkid)).await.unwrap();
    assert!(
        next_publish(&mut subscriber, Duration::from_millis(500))
            .await
            .is_none(),
        "exactly once"
    );
}

#[tokio::test]
async fn qos2_messages_never_released_are_bounded_per_session() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_INFLIGHT", "4")]);
    let mut dev = device(&broker, &fleet, "dev-1", true).await;
    for pkid in 1..=4 {
        dev.send(&Publish::new("devices/dev-1/t", b"x", 2, pkid).bytes())
            .await
            .unwrap();
        assert_eq!(dev.recv(WAIT).await.expect("PUBREC").kind(), kind::PUBREC);
    }
    dev.send(&Publish::new("devices/dev-1/t", b"x", 2, 5).bytes())
        .await
        .unwrap();
    assert!(
        dev.closed_within(WAIT).await,
        "the fifth unreleased QoS 2 closes the session"
    );
    let reject = broker.wait_for_reject("protocol_error");
    assert!(
        reject["detail"].as_str().unwrap().contains("awaiting PUBREL"),
        "{reject}"
    );
}

#[tokio::test]
async fn delivery_is_at_the_lower_qos_and_overlapping_subscriptions_give_one_copy() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let mut subscriber = service(&broker, &svc, "ingest", true).await;
    assert_eq!(
        subscribe(
            &mut subscriber,
            &[
                ("devices/dev-1/#", 1),
                ("devices/+/telemetry", 2),
                ("devices/dev-1/low", 0)
            ]
        )
        .await,
        [1, 2, 0]
    );
    let mut dev = device(&broker, &fleet, "dev-1", true).await;
    let sends = [
        ("telemetry", 0u8),
        ("telemetry", 1),
        ("telemetry", 2),
        ("low", 2),
        ("other", 2),
    ];
    for (n, (suffix, qos)) in sends.iter().enumerate() {
        let topic = format!("devices/dev-1/{suffix}");
        dev.send(&Publish::new(&topic, n.to_string().as_bytes(), *qos, n as u16 + 1).bytes())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while let Some(p) = next_publish(&mut subscriber, Duration::from_millis(800)).await {
        if p.qos == 2 {
            subscriber.send(&packets::pubrec(p.pkid)).await.unwrap();
        } else if p.qos == 1 {
            subscriber.send(&packets::puback(p.pkid)).await.unwrap();
        }
        got.push((String::from_utf8(p.payload).unwrap(), p.qos));
    }
    // One copy each: telemetry at min(published, 2); "low" matches QoS 1 and 0 filters: QoS 1;
    // "other" only devices/dev-1/# at QoS 1. Never upgraded.
    let expected: Vec<(String, u8)> = [("0", 0), ("1", 1), ("2", 2), ("3", 1), ("4", 1)]
        .iter()
        .map(|(p, q)| (p.to_string(), *q))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn every_unsubscribe_gets_one_unsuback_even_for_filters_never_subscribed() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let mut subscriber = service(&broker, &svc, "ingest", true).await;
    subscribe(&mut subscriber, &[("a/b", 1)]).await;
    subscriber
        .send(&packets::unsubscribe(9, &["a/b", "never/subscribed"]))
        .await
        .unwrap();
    subscriber.send(&packets::unsubscribe(10, &["never"])).await.unwrap();
    for pkid in [9, 10] {
        let ack = subscriber.recv(WAIT).await.expect("UNSUBACK");
        assert_eq!((ack.kind(), ack.pkid()), (kind::UNSUBACK, pkid));
    }
    let mut publisher = service(&broker, &svc, "publisher", true).await;
    publish_acked(&mut publisher, "a/b", b"gone", 1, false).await;
    assert!(next_publish(&mut subscriber, Duration::from_millis(500))
        .await
        .is_none());
}

#[tokio::test]
async fn retained_messages_are_bounded_deleted_by_an_empty_payload_and_delivered_within_the_acl() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ops"));
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_RETAINED_MESSAGES", "2")]);
    let mut ops = service(&broker, &svc, "ops", true).await;
    for (n, device) in ["dev-1", "dev-2", "dev-3"].iter().enumerate() {
        let topic = format!("devices/{device}/cmd/config");
        publish_acked(&mut ops, &topic, b"v1", n as u16 + 1, true).await;
    }
    let refused = broker.wait_for("retain_refused", WAIT, |e| e["event"] == "retain_refused");
    assert_eq!(refused["topic"], "devices/dev-3/cmd/config", "{refused}");

    // dev-1 gets its own retained command, flagged, and nothing of dev-2's.
    let dev1_files = ClientFiles::device(&fleet.device("dev-1"));
    let dev1_connect = packets::connect("dev-1", true, 30, None);
    let mut dev1 = RawClient::connect(broker.port(), config(&dev1_files), &dev1_connect)
        .await
        .unwrap();
    assert_eq!(
        subscribe(&mut dev1, &[("devices/dev-1/cmd/#", 1), ("devices/+/cmd/#", 1)]).await,
        [1, 0x80]
    );
    let retained = next_publish(&mut dev1, WAIT).await.expect("retained command");
    assert_eq!(retained.topic, "devices/dev-1/cmd/config");
    assert!(retained.retain && retained.payload == b"v1");
    assert!(next_publish(&mut dev1, Duration::from_millis(300)).await.is_none());

    // A live delivery of a retained publish is not flagged; an empty payload deletes it.
    publish_acked(&mut ops, "devices/dev-1/cmd/config", b"", 10, true).await;
    let live = next_publish(&mut dev1, WAIT).await.expect("the empty retained publish");
    assert!(!live.retain && live.payload.is_empty());
    let mut late = RawClient::connect(broker.port(), config(&dev1_files), &dev1_connect)
        .await
        .unwrap();
    subscribe(&mut late, &[("devices/dev-1/cmd/#", 1)]).await;
    assert!(
        next_publish(&mut late, Duration::from_millis(500)).await.is_none(),
        "deleted"
    );
}

#[tokio::test]
async fn wills_are_delivered_at_every_qos_and_a_retained_will_stays() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let mut watcher = service(&broker, &svc, "watcher", true).await;
    subscribe(&mut watcher, &[("devices/+/status", 2)]).await;
    for (n, qos) in [0u8, 1, 2].iter().enumerate() {
        let id = format!("dev-{n}");
        let files = ClientFiles::device(&fleet.device(&id));
        let topic = format!("devices/{id}/status");
        let will = (topic.as_str(), &b"gone"[..], *qos, n == 2);
        let dev = RawClient::connect(
            broker.port(),
            config(&files),
            &packets::connect(&id, true, 30, Some(will)),
        )
        .await
        .unwrap();
        // An abrupt end: the connection closed without DISCONNECT.
        drop(dev);
        let got = next_publish(&mut watcher, WAIT).await.expect("the will");
        assert_eq!((got.topic.as_str(), got.qos), (topic.as_str(), *qos));
        match got.qos {
            1 => watcher.send(&packets::puback(got.pkid)).await.unwrap(),
            2 => {
                watcher.send(&packets::pubrec(got.pkid)).await.unwrap();
                watcher.recv(WAIT).await.expect("PUBREL");
                watcher.send(&packets::pubcomp(got.pkid)).await.unwrap();
            }
            _ => {}
        }
    }
    let mut late = service(&broker, &svc, "late", true).await;
    subscribe(&mut late, &[("devices/+/status", 1)]).await;
    let retained = next_publish(&mut late, WAIT).await.expect("the retained will");
    assert!(retained.retain && retained.topic == "devices/dev-2/status");
}

#[tokio::test]
async fn unacknowledged_deliveries_are_resent_with_dup_after_a_persistent_session_reconnects() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[]);
    let mut first = service(&broker, &svc, "ingest", false).await;
    subscribe(&mut first, &[("devices/+/telemetry", 2)]).await;
    let mut dev = device(&broker, &fleet, "dev-1", true).await;
    publish_acked(&mut dev, "devices/dev-1/telemetry", b"q1", 1, false).await;
    dev.send(&Publish::new("devices/dev-1/telemetry", b"q2", 2, 2).bytes())
        .await
        .unwrap();
    let sent: Vec<ReceivedPublish> = vec![
        next_publish(&mut first, WAIT).await.unwrap(),
        next_publish(&mut first, WAIT).await.unwrap(),
    ];
    assert!(sent.iter().all(|p| !p.dup));
    first.send(&packets::DISCONNECT).await.unwrap();
    drop(first);

    let mut again = RawClient::handshake(broker.port(), config(&svc)).await.unwrap();
    again.send(&packets::connect("ingest", false, 30, None)).await.unwrap();
    let connack = again.recv(WAIT).await.unwrap();
    assert_eq!(connack.body, [0x01, 0x00], "session present");
    for original in &sent {
        let resent = next_publish(&mut again, WAIT).await.expect("a redelivery");
        assert_eq!(
            (resent.pkid, resent.payload.as_slice(), resent.dup),
            (original.pkid, original.payload.as_slice(), true)
        );
    }
}

#[tokio::test]
async fn a_service_without_a_client_id_cannot_ask_for_a_persistent_session_but_a_device_can() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let dev = ClientFiles::device(&fleet.device("dev-1"));
    let broker = start(&fleet, &[]);
    let mut anonymous = RawClient::handshake(broker.port(), config(&svc)).await.unwrap();
    anonymous.send(&packets::connect("", false, 30, None)).await.unwrap();
    let connack = anonymous.recv(WAIT).await.expect("CONNACK");
    assert_eq!(connack.body, [0x00, 0x02], "identifier rejected");
    broker.wait_for_reject("client_id_required");
    RawClient::connect(broker.port(), config(&svc), &packets::connect("", true, 30, None))
        .await
        .expect("a clean session gets an id of its own");
    RawClient::connect(broker.port(), config(&dev), &packets::connect("", false, 30, None))
        .await
        .expect("a device's id comes from its certificate");
}

#[tokio::test]
async fn shared_subscriptions_never_cross_from_a_device_into_a_services_group() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("workers"));
    let broker = start(&fleet, &[]);
    let mut worker = service(&broker, &svc, "worker-1", true).await;
    assert_eq!(
        subscribe(&mut worker, &[("$share/g/devices/dev-1/telemetry", 1)]).await,
        [1]
    );
    let mut dev = device(&broker, &fleet, "dev-1", true).await;
    // Allowed (its own namespace), same group name and filter: a group of its own.
    assert_eq!(
        subscribe(&mut dev, &[("$share/g/devices/dev-1/telemetry", 1)]).await,
        [1]
    );
    let mut other = device(&broker, &fleet, "dev-2", true).await;
    assert_eq!(
        subscribe(&mut other, &[("$share/g/devices/dev-1/telemetry", 1)]).await,
        [0x80]
    );
    for pkid in 1..=10 {
        publish_acked(&mut dev, "devices/dev-1/telemetry", b"t", pkid, false).await;
    }
    let mut to_worker = 0;
    while let Some(p) = next_publish(&mut worker, Duration::from_millis(500)).await {
        worker.send(&packets::puback(p.pkid)).await.unwrap();
        to_worker += 1;
    }
    assert_eq!(to_worker, 10, "the device took nothing from the service's group");
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused_with_0x80_and_audited() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_SUBSCRIPTIONS", "2")]);
    let mut client = service(&broker, &svc, "ingest", true).await;
    assert_eq!(
        subscribe(&mut client, &[("a", 0), ("b", 1), ("c", 1), ("a", 1)]).await,
        [0, 1, 0x80, 1]
    );
    let refused = broker.wait_for("subscription_refused", WAIT, |e| e["event"] == "subscription_refused");
    assert_eq!(refused["filter"], "c", "{refused}");
}
