//! MQTT 5 against the broker process, byte by byte (`e2e::raw5`): MQTT 3.1.1 and 5 clients side
//! by side, the reason codes a device can act on, each session and flow feature at the limit
//! that bounds it, and hostile MQTT 5 input refused without harm to anyone else.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::raw::{kind, packets, RawClient, RawPacket};
use e2e::raw5::{self, id, Parsed, Props};
use e2e::{tls_config, BrokerProcess, ClientFiles, TestFleet};

const WAIT: Duration = Duration::from_secs(5);

fn start(fleet: &TestFleet, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), env)
}

fn device(fleet: &TestFleet, id: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(tls_config(&ClientFiles::device(&fleet.device(id))))
}

fn service(fleet: &TestFleet, name: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(tls_config(&ClientFiles::service(&fleet.service(name))))
}

/// An MQTT 5 session: handshake, CONNECT with `props`, and the CONNACK (whatever its code).
async fn connect5(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
    client_id: &str,
    clean_start: bool,
    props: Props,
) -> (RawClient, raw5::ConnAck) {
    connect5_with(port, config, &raw5::connect(client_id, clean_start, 30, &props, None)).await
}

async fn connect5_with(port: u16, config: &Arc<rustls::ClientConfig>, connect: &[u8]) -> (RawClient, raw5::ConnAck) {
    let mut client = RawClient::handshake(port, config.clone()).await.expect("handshake");
    client.send(connect).await.expect("CONNECT");
    let connack = client.recv(WAIT).await.and_then(|p| p.connack()).expect("a CONNACK");
    (client, connack)
}

/// A subscription in place: SUBSCRIBE sent and its SUBACK's codes.
async fn subscribe(client: &mut RawClient, props: Props, filters: &[(&str, u8)]) -> Vec<u8> {
    client.send(&raw5::subscribe(1, &props, filters)).await.unwrap();
    client
        .recv_until(WAIT, |p| p.kind() == kind::SUBACK)
        .await
        .expect("SUBACK")
        .codes()
}

async fn next_publish(client: &mut RawClient, limit: Duration) -> Option<raw5::Publish> {
    client
        .recv_until(limit, |p| p.kind() == kind::PUBLISH)
        .await
        .and_then(|p| p.publish5())
}

/// The DISCONNECT the broker sends before it closes: its code and reason string.
async fn disconnect_of(client: &mut RawClient) -> (u8, String) {
    let packet: RawPacket = client
        .recv_until(WAIT, |p| p.kind() == 14)
        .await
        .expect("a DISCONNECT from the broker");
    let reason = packet.disconnect_props().string(id::REASON_STRING).unwrap_or_default();
    (packet.reason(), reason)
}

#[tokio::test]
async fn mqtt5_and_311_clients_exchange_messages_both_ways() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let backend = service(&fleet, "backend");
    let (mut sub5, ack) = connect5(port, &backend, "sub5", true, Props::new()).await;
    assert_eq!(ack.code, 0);
    assert_eq!(
        subscribe(&mut sub5, Props::new(), &[("devices/+/telemetry", 1)]).await,
        vec![1]
    );
    let mut sub311 = RawClient::connect(port, backend.clone(), &packets::connect("sub311", true, 30, None))
        .await
        .unwrap();
    sub311
        .send(&packets::subscribe(1, &[("devices/+/telemetry", 1)]))
        .await
        .unwrap();
    sub311.recv_until(WAIT, |p| p.kind() == kind::SUBACK).await.unwrap();

    // From an MQTT 5 device, with properties: carried to MQTT 5, dropped for 3.1.1.
    let (mut dev5, _) = connect5(port, &device(&fleet, "dev-5"), "dev-5", true, Props::new()).await;
    let props = Props::new()
        .byte(id::PAYLOAD_FORMAT_INDICATOR, 1)
        .bytes(id::CONTENT_TYPE, b"text/plain")
        .bytes(id::RESPONSE_TOPIC, b"devices/dev-5/replies")
        .bytes(id::CORRELATION_DATA, b"\x00\x01")
        .user("site", "north")
        .user("site", "south");
    dev5.send(&raw5::publish("devices/dev-5/telemetry", b"v5", 1, 7, false, &props))
        .await
        .unwrap();
    let ack = dev5.recv_until(WAIT, |p| p.kind() == kind::PUBACK).await.unwrap();
    assert_eq!((ack.pkid(), ack.reason()), (7, 0));
    let got = next_publish(&mut sub5, WAIT)
        .await
        .expect("the MQTT 5 subscriber gets it");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("devices/dev-5/telemetry", &b"v5"[..])
    );
    assert_eq!(got.props.number(id::PAYLOAD_FORMAT_INDICATOR), Some(1));
    assert_eq!(got.props.string(id::CONTENT_TYPE).as_deref(), Some("text/plain"));
    assert_eq!(
        got.props.string(id::RESPONSE_TOPIC).as_deref(),
        Some("devices/dev-5/replies")
    );
    assert_eq!(
        got.props.get(id::CORRELATION_DATA),
        Some(&raw5::Value::Bytes(vec![0, 1]))
    );
    assert_eq!(
        got.props.users(),
        vec![("site".into(), "north".into()), ("site".into(), "south".into())],
        "user properties in order, repeats kept"
    );
    let plain = sub311
        .recv_until(WAIT, |p| p.kind() == kind::PUBLISH)
        .await
        .and_then(|p| p.publish())
        .expect("the 3.1.1 subscriber gets it");
    assert_eq!(&plain.payload[..], b"v5", "no MQTT 5 properties in a 3.1.1 PUBLISH");

    // From a 3.1.1 device: an MQTT 5 subscriber gets it without properties.
    let mut dev311 = RawClient::connect(
        port,
        device(&fleet, "dev-3"),
        &packets::connect("dev-3", true, 30, None),
    )
    .await
    .unwrap();
    dev311
        .send(&packets::Publish::new("devices/dev-3/telemetry", b"v311", 1, 9).bytes())
        .await
        .unwrap();
    let got = next_publish(&mut sub5, WAIT).await.expect("3.1.1 to 5");
    assert_eq!((&got.payload[..], got.props.0.len()), (&b"v311"[..], 0));
}

#[tokio::test]
async fn a_device_is_told_why_it_was_refused_or_denied() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let dev1 = device(&fleet, "dev-1");

    // Another device's client id: 0x85, the reason naming the certificate's id.
    let (_, ack) = connect5(port, &dev1, "dev-2", true, Props::new()).await;
    assert_eq!(ack.code, 0x85);
    let reason = ack.props.string(id::REASON_STRING).unwrap();
    assert!(reason.contains("\"dev-1\""), "{reason}");
    broker.wait_for_reject("client_id_mismatch");

    // No client id: the certificate's id is assigned.
    let (mut client, ack) = connect5(port, &dev1, "", true, Props::new()).await;
    assert_eq!(ack.code, 0);
    assert_eq!(
        ack.props.string(id::ASSIGNED_CLIENT_IDENTIFIER).as_deref(),
        Some("dev-1")
    );

    // The ACL: PUBACK and PUBREC 0x87, SUBACK 0x87, each audited.
    client
        .send(&raw5::publish("devices/dev-2/cmd", b"x", 1, 3, false, &Props::new()))
        .await
        .unwrap();
    let ack = client.recv_until(WAIT, |p| p.kind() == kind::PUBACK).await.unwrap();
    assert_eq!((ack.pkid(), ack.reason()), (3, 0x87));
    client
        .send(&raw5::publish("devices/dev-2/cmd", b"x", 2, 4, false, &Props::new()))
        .await
        .unwrap();
    let rec = client.recv_until(WAIT, |p| p.kind() == kind::PUBREC).await.unwrap();
    assert_eq!((rec.pkid(), rec.reason()), (4, 0x87));
    let codes = subscribe(
        &mut client,
        Props::new(),
        &[("devices/dev-2/#", 1), ("devices/dev-1/#", 2)],
    )
    .await;
    assert_eq!(codes, vec![0x87, 2]);
    broker.wait_for_count("three ACL denials", WAIT, 3, |e| e["event"] == "acl_denied");

    // Enhanced authentication is refused: the certificate is the authentication.
    let props = Props::new().bytes(id::AUTHENTICATION_METHOD, b"SCRAM-SHA-1");
    let (_, ack) = connect5(port, &dev1, "dev-1", true, props).await;
    assert_eq!(ack.code, 0x8C);
    broker.wait_for_reject("enhanced_auth_refused");
}

#[tokio::test]
async fn the_broker_says_why_it_ends_a_session() {
    let fleet = TestFleet::new();
    let broker = start(
        &fleet,
        &[
            ("BROKER__LIMITS__MAX_PACKET_BYTES", "1024"),
            ("BROKER__LIMITS__MAX_INFLIGHT", "3"),
        ],
    );
    let port = broker.port();
    let dev1 = device(&fleet, "dev-1");

    // Taken over: 0x8E.
    let (mut first, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    let (mut second, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    assert_eq!(disconnect_of(&mut first).await, (0x8E, "taken_over".into()));

    // Oversized: 0x95.
    second
        .send(&raw5::publish(
            "devices/dev-1/t",
            &[0u8; 2000],
            0,
            0,
            false,
            &Props::new(),
        ))
        .await
        .unwrap();
    assert_eq!(disconnect_of(&mut second).await, (0x95, "protocol_error".into()));

    // More QoS 2 publishes awaiting PUBREL than the Receive Maximum it was given: 0x93.
    let (mut client, ack) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    assert_eq!(ack.props.number(id::RECEIVE_MAXIMUM), Some(3));
    for pkid in 1..=4 {
        client
            .send(&raw5::publish("devices/dev-1/t", b"x", 2, pkid, false, &Props::new()))
            .await
            .unwrap();
    }
    assert_eq!(disconnect_of(&mut client).await.0, 0x93);

    // Topic alias 0: 0x94.
    let (mut client, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    let alias0 = Props::new().two(id::TOPIC_ALIAS, 0);
    client
        .send(&raw5::publish("devices/dev-1/t", b"x", 0, 0, false, &alias0))
        .await
        .unwrap();
    assert_eq!(disconnect_of(&mut client).await.0, 0x94);

    // Keepalive expired: 0x8D.
    let connect = raw5::connect("dev-1", true, 1, &Props::new(), None);
    let (mut client, _) = connect5_with(port, &dev1, &connect).await;
    assert_eq!(disconnect_of(&mut client).await, (0x8D, "keepalive_timeout".into()));

    // Revoked while connected: 0x98.
    let (mut client, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    fleet.revoke("dev-1");
    assert_eq!(disconnect_of(&mut client).await, (0x98, "revoked".into()));
}

#[tokio::test]
async fn a_slow_subscriber_is_told_quota_exceeded() {
    let fleet = TestFleet::new();
    let broker = start(
        &fleet,
        &[
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "2"),
            ("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "300"),
        ],
    );
    let port = broker.port();
    let backend = service(&fleet, "backend");
    // Takes one message unacknowledged, and never acknowledges.
    let props = Props::new().two(id::RECEIVE_MAXIMUM, 1);
    let (mut slow, _) = connect5(port, &backend, "slow", true, props).await;
    subscribe(&mut slow, Props::new(), &[("devices/+/telemetry", 1)]).await;
    let (mut dev, _) = connect5(port, &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    for pkid in 1..=6 {
        dev.send(&raw5::publish(
            "devices/dev-1/telemetry",
            b"x",
            1,
            pkid,
            false,
            &Props::new(),
        ))
        .await
        .unwrap();
    }
    assert_eq!(disconnect_of(&mut slow).await, (0x97, "slow_subscriber".into()));
}

#[tokio::test]
async fn session_expiry_is_capped_ends_the_session_and_survives_a_restart() {
    let fleet = TestFleet::new();
    let env = [("BROKER__LIMITS__MAX_SESSION_EXPIRY_SECS", "2")];
    let mut broker = start(&fleet, &env);
    let backend = service(&fleet, "backend");
    let asked = Props::new().four(id::SESSION_EXPIRY_INTERVAL, u32::MAX);
    let (mut client, ack) = connect5(broker.port(), &backend, "keeper", true, asked.clone()).await;
    assert_eq!(
        ack.props.number(id::SESSION_EXPIRY_INTERVAL),
        Some(2),
        "capped, and said so"
    );
    subscribe(&mut client, Props::new(), &[("devices/+/telemetry", 1)]).await;
    client.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    let (mut client, ack) = connect5(broker.port(), &backend, "keeper", false, asked.clone()).await;
    assert!(ack.session_present, "within its expiry");
    client.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    let gone = Instant::now();
    broker.wait_for("the session's expiry", Duration::from_secs(10), |e| {
        e["event"] == "session_expired" && e["client_id"] == "service:backend:keeper"
    });
    assert!(gone.elapsed() >= Duration::from_millis(1500), "not before its interval");
    let (_, ack) = connect5(broker.port(), &backend, "keeper", false, asked).await;
    assert!(!ack.session_present, "expired");

    // A session with a long expiry, and a message queued for it, survive a restart (the store).
    broker.terminate();
    let mut broker = start(&fleet, &[]);
    let long = Props::new().four(id::SESSION_EXPIRY_INTERVAL, 3600);
    // Resumed to end with its connection (expiry 0): gone from the store as well.
    let (mut brief, _) = connect5(broker.port(), &backend, "brief", true, long.clone()).await;
    subscribe(&mut brief, Props::new(), &[("devices/+/telemetry", 1)]).await;
    brief.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    let (mut brief, ack) = connect5(broker.port(), &backend, "brief", false, Props::new()).await;
    assert!(ack.session_present);
    brief.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    assert!(brief.closed_within(WAIT).await);
    let (mut client, _) = connect5(broker.port(), &backend, "durable", true, long.clone()).await;
    subscribe(&mut client, Props::new(), &[("devices/+/telemetry", 1)]).await;
    client.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    let (mut dev, _) = connect5(broker.port(), &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    let props = Props::new().user("k", "v");
    dev.send(&raw5::publish(
        "devices/dev-1/telemetry",
        b"queued",
        1,
        1,
        false,
        &props,
    ))
    .await
    .unwrap();
    dev.recv_until(WAIT, |p| p.kind() == kind::PUBACK).await.unwrap();
    broker.kill();
    let broker = start(&fleet, &[]);
    let (_, ack) = connect5(broker.port(), &backend, "brief", false, long.clone()).await;
    assert!(!ack.session_present, "a session that ended is not restored");
    let (mut client, ack) = connect5(broker.port(), &backend, "durable", false, long).await;
    assert!(ack.session_present, "restored from the store");
    let got = next_publish(&mut client, WAIT).await.expect("the queued message");
    assert_eq!(&got.payload[..], b"queued");
    assert_eq!(got.props.users(), vec![("k".into(), "v".into())], "its properties too");
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_are_counted() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")]);
    let port = broker.port();
    let backend = service(&fleet, "backend");
    let keep = Props::new().four(id::SESSION_EXPIRY_INTERVAL, 60);
    let (mut client, _) = connect5(port, &backend, "late", true, keep.clone()).await;
    subscribe(&mut client, Props::new(), &[("devices/+/telemetry", 1)]).await;
    client.send(&raw5::disconnect(0, &Props::new())).await.unwrap();
    let (mut dev, _) = connect5(port, &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    for (pkid, (payload, expiry)) in [(&b"short"[..], 1u32), (&b"long"[..], 60)].into_iter().enumerate() {
        let props = Props::new().four(id::MESSAGE_EXPIRY_INTERVAL, expiry);
        dev.send(&raw5::publish(
            "devices/dev-1/telemetry",
            payload,
            1,
            pkid as u16 + 1,
            false,
            &props,
        ))
        .await
        .unwrap();
        dev.recv_until(WAIT, |p| p.kind() == kind::PUBACK).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await; // the short one's interval runs out
    let (mut client, _) = connect5(port, &backend, "late", false, keep).await;
    let got = next_publish(&mut client, WAIT).await.expect("the long-lived one");
    assert_eq!(&got.payload[..], b"long");
    let left = got.props.number(id::MESSAGE_EXPIRY_INTERVAL).unwrap();
    assert!((55..60).contains(&left), "what is left of its interval: {left}");
    assert!(next_publish(&mut client, Duration::from_millis(500)).await.is_none());
    assert_eq!(
        broker.metric("broker_messages_dropped_total{reason=\"message_expired\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn receive_maximum_and_maximum_packet_size_bound_what_the_broker_sends() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")]);
    let port = broker.port();
    let props = Props::new()
        .two(id::RECEIVE_MAXIMUM, 2)
        .four(id::MAXIMUM_PACKET_SIZE, 100);
    let (mut client, _) = connect5(port, &service(&fleet, "backend"), "small", true, props).await;
    subscribe(&mut client, Props::new(), &[("devices/+/telemetry", 1)]).await;
    let (mut dev, _) = connect5(port, &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    let messages: [&[u8]; 4] = [b"one", &[b'x'; 200], b"two", b"three"];
    for (pkid, payload) in messages.iter().enumerate() {
        dev.send(&raw5::publish(
            "devices/dev-1/telemetry",
            payload,
            1,
            pkid as u16 + 1,
            false,
            &Props::new(),
        ))
        .await
        .unwrap();
    }
    // Two in flight at most; the one larger than 100 bytes never comes, and holds nothing up.
    let first = next_publish(&mut client, WAIT).await.unwrap();
    let second = next_publish(&mut client, WAIT).await.unwrap();
    assert_eq!((&first.payload[..], &second.payload[..]), (&b"one"[..], &b"two"[..]));
    assert!(
        next_publish(&mut client, Duration::from_millis(500)).await.is_none(),
        "Receive Maximum 2"
    );
    client.send(&raw5::ack(0x40, first.pkid, 0)).await.unwrap();
    let third = next_publish(&mut client, WAIT).await.unwrap();
    assert_eq!(&third.payload[..], b"three");
    assert_eq!(
        broker.metric("broker_messages_dropped_total{reason=\"too_large_for_client\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn topic_aliases_work_both_ways_within_the_limit() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[("BROKER__LIMITS__MAX_TOPIC_ALIASES", "2")]);
    let port = broker.port();
    let props = Props::new().two(id::TOPIC_ALIAS_MAXIMUM, 5);
    let (mut sub, _) = connect5(port, &service(&fleet, "backend"), "aliased", true, props).await;
    subscribe(&mut sub, Props::new(), &[("devices/+/telemetry", 0)]).await;
    let (mut dev, ack) = connect5(port, &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    assert_eq!(ack.props.number(id::TOPIC_ALIAS_MAXIMUM), Some(2));
    let alias = Props::new().two(id::TOPIC_ALIAS, 2);
    dev.send(&raw5::publish("devices/dev-1/telemetry", b"a", 0, 0, false, &alias))
        .await
        .unwrap();
    dev.send(&raw5::publish("", b"b", 0, 0, false, &alias)).await.unwrap();
    // The subscriber allowed 5 aliases, the broker uses at most 2: set once, then used alone.
    let first = next_publish(&mut sub, WAIT).await.unwrap();
    let second = next_publish(&mut sub, WAIT).await.unwrap();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        ("devices/dev-1/telemetry", &b"a"[..])
    );
    assert_eq!((second.topic.as_str(), &second.payload[..]), ("", &b"b"[..]));
    let alias = first.props.number(id::TOPIC_ALIAS).unwrap();
    assert_eq!(second.props.number(id::TOPIC_ALIAS), Some(alias));
    // Beyond the broker's maximum: 0x94.
    let beyond = Props::new().two(id::TOPIC_ALIAS, 3);
    dev.send(&raw5::publish("devices/dev-1/telemetry", b"c", 0, 0, false, &beyond))
        .await
        .unwrap();
    assert_eq!(disconnect_of(&mut dev).await.0, 0x94);
}

#[tokio::test]
async fn a_delayed_will_waits_and_a_reconnect_cancels_it() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let (mut sub, _) = connect5(port, &service(&fleet, "backend"), "watcher", true, Props::new()).await;
    subscribe(&mut sub, Props::new(), &[("devices/+/status", 1)]).await;
    let dev = device(&fleet, "dev-1");
    let will = |delay| {
        raw5::connect(
            "dev-1",
            true,
            30,
            &Props::new().four(id::SESSION_EXPIRY_INTERVAL, 60),
            Some((
                "devices/dev-1/status",
                &b"gone"[..],
                1,
                false,
                // Its expiry counts from its publication, not from the connection's loss.
                Props::new()
                    .four(id::WILL_DELAY_INTERVAL, delay)
                    .four(id::MESSAGE_EXPIRY_INTERVAL, delay)
                    .user("why", "power"),
            )),
        )
    };
    let (client, _) = connect5_with(port, &dev, &will(1)).await;
    let lost = Instant::now();
    drop(client); // no DISCONNECT: the will is due, after its delay
    let got = next_publish(&mut sub, WAIT).await.expect("the will");
    assert!(lost.elapsed() >= Duration::from_millis(900), "not before its delay");
    assert_eq!(
        (&got.payload[..], got.props.users()),
        (&b"gone"[..], vec![("why".into(), "power".into())])
    );
    sub.send(&raw5::ack(0x40, got.pkid, 0)).await.unwrap();

    // Back within the delay, resuming the session: no will.
    let (client, _) = connect5_with(port, &dev, &will(2)).await;
    drop(client);
    let resume = raw5::connect(
        "dev-1",
        false,
        30,
        &Props::new().four(id::SESSION_EXPIRY_INTERVAL, 60),
        None,
    );
    let (back, ack) = connect5_with(port, &dev, &resume).await;
    assert!(ack.session_present);
    assert!(
        next_publish(&mut sub, Duration::from_secs(3)).await.is_none(),
        "the will was cancelled"
    );
    drop(back);

    // Taken over by a connection that resumes the session: the old connection's will never comes.
    let (first, _) = connect5_with(port, &dev, &will(2)).await;
    let (_second, ack) = connect5_with(port, &dev, &resume).await;
    assert!(ack.session_present);
    drop(first);
    assert!(
        next_publish(&mut sub, Duration::from_secs(4)).await.is_none(),
        "no will after a takeover that resumed the session"
    );
}

#[tokio::test]
async fn subscription_options_and_identifiers() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let backend = service(&fleet, "backend");
    let (mut me, _) = connect5(port, &backend, "me", true, Props::new()).await;
    // No Local on one filter, an identifier on each of two overlapping ones.
    subscribe(
        &mut me,
        Props::new().varint(id::SUBSCRIPTION_IDENTIFIER, 2),
        &[("jobs/+", 1 | 0x04)],
    )
    .await;
    subscribe(
        &mut me,
        Props::new().varint(id::SUBSCRIPTION_IDENTIFIER, 3),
        &[("jobs/#", 1)],
    )
    .await;
    me.send(&raw5::publish("jobs/a", b"mine", 1, 1, false, &Props::new()))
        .await
        .unwrap();
    let own = next_publish(&mut me, WAIT)
        .await
        .expect("through the filter without No Local");
    assert_eq!(own.props.numbers(id::SUBSCRIPTION_IDENTIFIER), vec![3]);
    let (mut other, _) = connect5(port, &backend, "other", true, Props::new()).await;
    other
        .send(&raw5::publish("jobs/a", b"theirs", 1, 1, true, &Props::new()))
        .await
        .unwrap();
    let theirs = next_publish(&mut me, WAIT)
        .await
        .expect("one delivery for both filters");
    let mut ids = theirs.props.numbers(id::SUBSCRIPTION_IDENTIFIER);
    ids.sort_unstable();
    assert_eq!(
        (&theirs.payload[..], ids, theirs.retain),
        (&b"theirs"[..], vec![2, 3], false)
    );
    assert!(
        next_publish(&mut me, Duration::from_millis(300)).await.is_none(),
        "once only"
    );

    // Retain As Published keeps the flag; Retain Handling 1 sends retained messages only to a
    // new subscription, 2 never.
    let (mut watcher, _) = connect5(port, &backend, "watcher", true, Props::new()).await;
    subscribe(&mut watcher, Props::new(), &[("jobs/a", 1 | 0x08)]).await;
    other
        .send(&raw5::publish("jobs/a", b"kept", 1, 2, true, &Props::new()))
        .await
        .unwrap();
    assert!(
        next_publish(&mut watcher, WAIT).await.unwrap().retain,
        "Retain As Published"
    );
    let (mut late, _) = connect5(port, &backend, "late", true, Props::new()).await;
    subscribe(&mut late, Props::new(), &[("jobs/a", 1 | (1 << 4))]).await;
    assert!(
        next_publish(&mut late, WAIT).await.unwrap().retain,
        "new subscription: retained sent"
    );
    subscribe(&mut late, Props::new(), &[("jobs/a", 1 | (1 << 4))]).await;
    assert!(
        next_publish(&mut late, Duration::from_millis(300)).await.is_none(),
        "existing: not again"
    );
    let (mut never, _) = connect5(port, &backend, "never", true, Props::new()).await;
    subscribe(&mut never, Props::new(), &[("jobs/a", 1 | (2 << 4))]).await;
    assert!(
        next_publish(&mut never, Duration::from_millis(300)).await.is_none(),
        "Retain Handling 2"
    );
}

#[tokio::test]
async fn shared_subscriptions_are_scoped_as_for_311() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let backend = service(&fleet, "backend");
    let (mut worker1, _) = connect5(port, &backend, "w1", true, Props::new()).await;
    let (mut worker2, _) = connect5(port, &backend, "w2", true, Props::new()).await;
    let (mut dev, _) = connect5(port, &device(&fleet, "dev-1"), "dev-1", true, Props::new()).await;
    for client in [&mut worker1, &mut worker2, &mut dev] {
        subscribe(client, Props::new(), &[("$share/g/devices/dev-1/cmd/#", 1)]).await;
    }
    let (mut sender, _) = connect5(port, &backend, "sender", true, Props::new()).await;
    sender
        .send(&raw5::publish(
            "devices/dev-1/cmd/reboot",
            b"now",
            1,
            1,
            false,
            &Props::new(),
        ))
        .await
        .unwrap();
    // The device is a group of its own; the two services split theirs.
    assert!(next_publish(&mut dev, WAIT).await.is_some(), "the device's own group");
    let first = next_publish(&mut worker1, Duration::from_millis(500)).await;
    let second = next_publish(&mut worker2, Duration::from_millis(500)).await;
    assert_eq!(usize::from(first.is_some()) + usize::from(second.is_some()), 1);
}

#[tokio::test]
async fn hostile_mqtt5_input_is_refused_and_harms_nobody_else() {
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let port = broker.port();
    let dev1 = device(&fleet, "dev-1");
    let (mut bystander, _) = connect5(port, &service(&fleet, "backend"), "bystander", true, Props::new()).await;
    subscribe(&mut bystander, Props::new(), &[("devices/+/telemetry", 0)]).await;
    let hostile: Vec<(&str, Vec<u8>, u8)> = vec![
        (
            "a repeated property",
            raw5::publish(
                "devices/dev-1/telemetry",
                b"x",
                0,
                0,
                false,
                &Props::new()
                    .four(id::MESSAGE_EXPIRY_INTERVAL, 1)
                    .four(id::MESSAGE_EXPIRY_INTERVAL, 2),
            ),
            0x82,
        ),
        (
            "a property the packet may not carry",
            raw5::publish(
                "devices/dev-1/telemetry",
                b"x",
                0,
                0,
                false,
                &Props::new().varint(id::SUBSCRIPTION_IDENTIFIER, 1),
            ),
            0x82,
        ),
        // PUBLISH, topic "t", property length 100 with two bytes left in the packet.
        (
            "a property longer than its packet",
            vec![0x30, 0x06, 0x00, 0x01, b't', 100, 0x01, 0x01],
            0x81,
        ),
        ("AUTH", vec![0xF0, 0x00], 0x82),
        ("CONNACK from a client", vec![0x20, 0x03, 0x00, 0x00, 0x00], 0x82),
        ("SUBACK from a client", vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00], 0x82),
        ("UNSUBACK from a client", vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x00], 0x82),
        (
            "an alias never set",
            raw5::publish("", b"x", 0, 0, false, &Props::new().two(id::TOPIC_ALIAS, 1)),
            0x82,
        ),
        (
            "Subscription Identifier 0",
            raw5::subscribe(
                1,
                &Props::new().varint(id::SUBSCRIPTION_IDENTIFIER, 0),
                &[("devices/dev-1/#", 0)],
            ),
            0x82,
        ),
    ];
    for (what, bytes, code) in hostile {
        let (mut client, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
        client.send(&bytes).await.unwrap();
        assert_eq!(disconnect_of(&mut client).await.0, code, "{what}");
        assert!(client.closed_within(WAIT).await, "{what}: closed");
    }
    // Everyone else goes on.
    let (mut dev, _) = connect5(port, &dev1, "dev-1", true, Props::new()).await;
    dev.send(&raw5::publish(
        "devices/dev-1/telemetry",
        b"fine",
        0,
        0,
        false,
        &Props::new(),
    ))
    .await
    .unwrap();
    assert_eq!(&next_publish(&mut bystander, WAIT).await.unwrap().payload[..], b"fine");
}
