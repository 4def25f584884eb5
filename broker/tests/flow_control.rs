//! Flow control and bounds under the load that would break them, against the real binary:
//! publishers that do not wait, subscribers that do not read, floods, and the broker's memory
//! while it all happens.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::raw::{kind, packets, split_packets, RawClient};
use e2e::{tls_config, BrokerProcess, ClientFiles, TestFleet};
use packets::Publish;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(5);

fn start(fleet: &TestFleet, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_broker")), &fleet.broker_config(), env)
}

fn config(files: &ClientFiles) -> Arc<rustls::ClientConfig> {
    Arc::new(tls_config(files))
}

async fn connect(broker: &BrokerProcess, files: &ClientFiles, client_id: &str, clean: bool) -> RawClient {
    RawClient::connect(
        broker.port(),
        config(files),
        &packets::connect(client_id, clean, 60, None),
    )
    .await
    .expect("connects")
}

async fn subscribe(client: &mut RawClient, filter: &str, qos: u8) {
    client.send(&packets::subscribe(1, &[(filter, qos)])).await.unwrap();
    let suback = client
        .recv_until(WAIT, |p| p.kind() == kind::SUBACK)
        .await
        .expect("SUBACK");
    assert_ne!(suback.body[2], 0x80, "subscription to {filter} refused");
}

/// A payload of `size` bytes that names its publisher and sequence number.
fn payload(publisher: u32, seq: u32, size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(8)];
    p[..4].copy_from_slice(&publisher.to_be_bytes());
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Reads everything a subscriber is sent, acknowledging QoS 1, and counts distinct messages
/// (by publisher and sequence number) until `expected` arrived or nothing came for `quiet`.
async fn receive_all(mut client: RawClient, expected: usize, quiet: Duration, delivered: Arc<AtomicUsize>) -> usize {
    let (mut buf, mut chunk, mut acks) = (Vec::new(), vec![0u8; 64 * 1024], Vec::new());
    let mut seen = HashSet::new();
    while seen.len() < expected {
        let n = match tokio::time::timeout(quiet, client.tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        split_packets(&mut buf, |first, body| {
            if first >> 4 != kind::PUBLISH {
                return;
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let qos1 = (first >> 1) & 3 == 1;
            let at = 2 + topic_len + if qos1 { 2 } else { 0 };
            if qos1 {
                acks.extend_from_slice(&packets::puback(u16::from_be_bytes([body[at - 2], body[at - 1]])));
            }
            seen.insert(body[at..at + 8].to_vec());
        });
        delivered.store(seen.len(), Ordering::Relaxed);
        if !acks.is_empty() {
            client.send(&acks).await.unwrap();
            acks.clear();
        }
    }
    seen.len()
}

/// A device publishing `count` QoS 1 messages of `size` bytes without waiting for delivery
/// (`window` = None: open loop) or with at most `window` unacknowledged. Returns the PUBACKs.
async fn publish_many(
    client: RawClient,
    publisher: u32,
    id: String,
    count: u32,
    size: usize,
    window: Option<usize>,
) -> u32 {
    let topic = format!("devices/{id}/telemetry");
    let (mut rd, mut wr) = tokio::io::split(client.tls);
    let window = Arc::new(tokio::sync::Semaphore::new(
        window.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let acker = {
        let window = window.clone();
        tokio::spawn(async move {
            let (mut buf, mut chunk, mut acked) = (Vec::new(), vec![0u8; 16 * 1024], 0u32);
            while acked < count {
                match rd.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
                let mut now = 0;
                split_packets(&mut buf, |first, _| now += u32::from(first >> 4 == kind::PUBACK));
                acked += now;
                window.add_permits(now as usize);
            }
            acked
        })
    };
    let mut out = Vec::new();
    for seq in 0..count {
        if window.available_permits() == 0 && !out.is_empty() {
            // About to wait for PUBACKs: what they are for must be on the wire first.
            wr.write_all(&out).await.unwrap();
            wr.flush().await.unwrap();
            out.clear();
        }
        window.acquire().await.unwrap().forget();
        let pkid = (seq % 65_000) as u16 + 1;
        Publish::new(&topic, &payload(publisher, seq, size), 1, pkid).write(&mut out);
        if out.len() >= 16 * 1024 || seq + 1 == count {
            wr.write_all(&out).await.unwrap();
            wr.flush().await.unwrap();
            out.clear();
        }
    }
    let acked = tokio::time::timeout(Duration::from_secs(120), acker)
        .await
        .expect("acks")
        .unwrap();
    drop(wr);
    acked
}

/// Eight devices publish to one service; returns (messages delivered, PUBACKs, the broker's
/// RSS samples in KiB taken while it ran: the first after every connection was open).
async fn eight_to_one(
    broker: &BrokerProcess,
    fleet: &TestFleet,
    per_device: u32,
    size: usize,
    window: Option<usize>,
) -> (usize, u32, Vec<u64>) {
    let ids: Vec<String> = (1..=8).map(|n| format!("pub-{n}")).collect();
    let bundles = fleet.devices(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let mut subscriber = connect(broker, &svc, "ingest", true).await;
    subscribe(&mut subscriber, "devices/+/telemetry", 1).await;
    let mut publishers = Vec::new();
    for (bundle, id) in bundles.iter().zip(&ids) {
        publishers.push((
            connect(broker, &ClientFiles::device(bundle), id, true).await,
            id.clone(),
        ));
    }
    let mut samples = vec![broker.rss_kib()];
    let expected = 8 * per_device as usize;
    let delivered = Arc::new(AtomicUsize::new(0));
    let receiver = tokio::spawn(receive_all(
        subscriber,
        expected,
        Duration::from_secs(20),
        delivered.clone(),
    ));
    let senders: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(n, (client, id))| tokio::spawn(publish_many(client, n as u32, id, per_device, size, window)))
        .collect();
    while !receiver.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push(broker.rss_kib());
    }
    let received = receiver.await.unwrap();
    let mut acked = 0;
    for sender in senders {
        acked += sender.await.unwrap();
    }
    (received, acked, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_of_qos1_publishers_loses_nothing_at_the_default_limits() {
    const PER_DEVICE: u32 = 25_000;
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")]);
    let (received, acked, _) = eight_to_one(&broker, &fleet, PER_DEVICE, 64, None).await;
    assert_eq!(received, 8 * PER_DEVICE as usize, "every message delivered");
    assert_eq!(acked, 8 * PER_DEVICE, "every message acknowledged");
    let peak_mib = broker.peak_rss_kib() / 1024;
    assert!(peak_mib < 256, "broker peak RSS {peak_mib} MiB");
    assert!(
        broker.metric("broker_publisher_waits_total").unwrap() > 0.0,
        "the run must have needed flow control to prove anything"
    );
    assert_eq!(
        broker.metric("broker_messages_dropped_total{reason=\"qos0_dropped\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_follows_what_is_queued_not_what_has_passed() {
    const PER_DEVICE: u32 = 25_000;
    let fleet = TestFleet::new();
    let broker = start(&fleet, &[]);
    let (received, _, samples) = eight_to_one(&broker, &fleet, PER_DEVICE, 256, Some(100)).await;
    assert_eq!(received, 8 * PER_DEVICE as usize);
    let (start, peak, end) = (samples[0], *samples.iter().max().unwrap(), *samples.last().unwrap());
    // 200,000 messages of 256 B passed: 51 MB. What stays is what is queued at most.
    assert!(
        peak - start < 32 * 1024,
        "RSS grew from {start} KiB to {peak} KiB: {samples:?}"
    );
    assert!(
        end - start < 32 * 1024,
        "RSS at the end {end} KiB, at the start {start} KiB"
    );
}

#[tokio::test]
async fn a_subscriber_that_stays_full_is_disconnected_as_slow_and_its_session_queues_offline_with_counted_overflow() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(
        &fleet,
        &[
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "20"),
            ("BROKER__LIMITS__MAX_INFLIGHT", "5"),
            ("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "300"),
            ("BROKER__METRICS__LISTEN", "127.0.0.1:0"),
        ],
    );
    let mut stuck = connect(&broker, &svc, "ingest", false).await;
    subscribe(&mut stuck, "devices/+/telemetry", 1).await;
    // From here on the service reads nothing.
    let dev_files = ClientFiles::device(&fleet.device("dev-1"));
    let dev = connect(&broker, &dev_files, "dev-1", true).await;
    let started = Instant::now();
    let acked = publish_many(dev, 0, "dev-1".into(), 100, 64, Some(1)).await;
    assert_eq!(acked, 100, "the device is slowed, then served again: nothing refused");
    let slow = broker.wait_for("slow_subscriber", WAIT, |e| e["event"] == "slow_subscriber");
    assert_eq!(slow["client_id"], "service:ingest:ingest", "{slow}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the timeout first"
    );
    broker.wait_for("disconnect as slow subscriber", WAIT, |e| {
        e["event"] == "disconnect" && e["reason"] == "slow_subscriber"
    });
    let overflow = broker.wait_for("queue_overflow", WAIT, |e| e["event"] == "queue_overflow");
    assert_eq!(overflow["client_id"], "service:ingest:ingest");
    assert!(overflow["count"].as_u64().unwrap() > 0, "{overflow}");
    let dropped = broker
        .metric("broker_session_overflow_dropped_total{client_id=\"service:ingest:ingest\"}")
        .expect("a per-session overflow metric");
    // 100 sent; the session holds 5 inflight and 20 queued.
    assert_eq!(dropped, 75.0);
    drop(stuck);

    let mut back = connect(&broker, &svc, "ingest", false).await;
    let (mut got, mut last) = (0, 0u32);
    while let Some(p) = back
        .recv_until(Duration::from_millis(800), |p| p.kind() == kind::PUBLISH)
        .await
    {
        let publish = p.publish().unwrap();
        back.send(&packets::puback(publish.pkid)).await.unwrap();
        last = last.max(u32::from_be_bytes(publish.payload[4..8].try_into().unwrap()));
        got += 1;
    }
    assert_eq!((got, last), (25, 99), "the oldest went, the newest stayed");
}

#[tokio::test]
async fn qos0_to_a_subscriber_that_stays_full_is_dropped_and_counted_without_disconnecting_it() {
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("ingest"));
    let broker = start(
        &fleet,
        &[
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "10"),
            ("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "200"),
            ("BROKER__METRICS__LISTEN", "127.0.0.1:0"),
        ],
    );
    let mut stuck = connect(&broker, &svc, "ingest", true).await;
    subscribe(&mut stuck, "devices/+/telemetry", 0).await;
    let mut dev = connect(&broker, &ClientFiles::device(&fleet.device("dev-1")), "dev-1", true).await;
    // 40 MB at QoS 0: far more than the socket buffers between the broker and the service hold.
    let big = vec![b'x'; 8 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut batch = Vec::new();
    for _ in 0..64 {
        Publish::new("devices/dev-1/telemetry", &big, 0, 0).write(&mut batch);
    }
    while broker.metric("broker_messages_dropped_total{reason=\"qos0_dropped\"}") == Some(0.0) {
        assert!(Instant::now() < deadline, "no QoS 0 drop counted");
        dev.send(&batch).await.unwrap();
        // A PINGREQ round trip: the broker has read everything before it.
        dev.send(&packets::PINGREQ).await.unwrap();
        dev.recv_until(WAIT, |p| p.kind() == kind::PINGRESP)
            .await
            .expect("PINGRESP");
    }
    let drop = broker.wait_for("qos0_dropped", WAIT, |e| e["event"] == "qos0_dropped");
    assert_eq!(drop["client_id"], "service:ingest:ingest", "{drop}");
    assert!(drop["count"].as_u64().unwrap() > 0);
    assert!(
        !broker.events().iter().any(|e| e["event"] == "slow_subscriber"),
        "QoS 0 alone never disconnects a subscriber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_can_stall_the_broker() {
    const RETAINED: usize = 10_000;
    const FLOOD: u32 = 50_000;
    let fleet = TestFleet::new();
    let loader = ClientFiles::service(&fleet.service("loader"));
    let broker = start(&fleet, &[("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "3000")]);

    // 10,000 retained messages.
    let mut load = connect(&broker, &loader, "loader", true).await;
    let mut batch = Vec::new();
    for n in 0..RETAINED {
        let topic = format!("retained/{}/{n}", n % 100);
        Publish {
            retain: true,
            ..Publish::new(&topic, b"kept", 0, 0)
        }
        .write(&mut batch);
    }
    Publish::new("retained/done", b"", 1, 1).write(&mut batch);
    load.send(&batch).await.unwrap();
    load.recv_until(Duration::from_secs(30), |p| p.kind() == kind::PUBACK)
        .await
        .expect("loaded");
    let before = broker.rss_kib();

    // A greedy client: as many filters as a session may have, each matching every retained
    // message, and it never reads.
    let mut greedy = connect(&broker, &loader, "greedy", true).await;
    let filters: Vec<String> = (0..100)
        .map(|n| {
            if n % 2 == 0 {
                "retained/#".into()
            } else {
                format!("retained/{n}/+")
            }
        })
        .collect();
    let filters: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 1)).collect();
    greedy.send(&packets::subscribe(1, &filters)).await.unwrap();

    // A device that never reads, sent 50,000 messages while it floods PINGREQs.
    let sink_files = ClientFiles::device(&fleet.device("sink"));
    let mut sink = connect(&broker, &sink_files, "sink", true).await;
    sink.send(&packets::subscribe(1, &[("devices/sink/cmd/#", 1)]))
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        let pings = packets::PINGREQ.repeat(4096);
        for _ in 0..200 {
            if sink.send(&pings).await.is_err() {
                break;
            }
        }
        sink
    });
    let flooder = connect(&broker, &loader, "flooder", true).await;
    let sender = tokio::spawn(async move {
        let (_rd, mut wr) = tokio::io::split(flooder.tls);
        let mut out = Vec::new();
        for seq in 0..FLOOD {
            Publish::new("devices/sink/cmd/x", &payload(0, seq, 64), 1, (seq % 60_000) as u16 + 1).write(&mut out);
            if out.len() > 16 * 1024 {
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
    });

    // Meanwhile a fresh device gets in and round-trips a QoS 1 message, in under a second, again
    // and again.
    let fresh_files = ClientFiles::device(&fleet.device("fresh"));
    let fresh_config = config(&fresh_files);
    let until = Instant::now() + Duration::from_secs(5);
    let mut rounds = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let mut fresh = RawClient::connect(
            broker.port(),
            fresh_config.clone(),
            &packets::connect("fresh", true, 30, None),
        )
        .await
        .expect("a fresh device connects");
        fresh
            .send(&packets::subscribe(1, &[("devices/fresh/echo", 1)]))
            .await
            .unwrap();
        fresh
            .recv_until(WAIT, |p| p.kind() == kind::SUBACK)
            .await
            .expect("SUBACK");
        fresh
            .send(&Publish::new("devices/fresh/echo", b"ping", 1, 2).bytes())
            .await
            .unwrap();
        fresh
            .recv_until(WAIT, |p| p.kind() == kind::PUBLISH)
            .await
            .expect("its own message back");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "round {rounds}: handshake, CONNECT and a QoS 1 round trip took {took:?}"
        );
        rounds += 1;
    }
    let grown_mib = broker.rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "broker RSS grew {grown_mib} MiB");
    assert!(rounds >= 5, "only {rounds} rounds");
    // The sink is found slow and let go; its flood ends with it.
    broker.wait_for("the sink disconnected as slow", Duration::from_secs(10), |e| {
        e["event"] == "disconnect" && e["reason"] == "slow_subscriber" && e["client_id"] == "sink"
    });
    let _ = flood.await;
    sender.abort();
    drop(greedy);
}

/// Publishes `count` QoS 1 messages on `to`, at most `window` unacknowledged (as client
/// libraries keep them), while it reads what arrives on the same connection and acknowledges it
/// at once; returns (PUBACKs received, messages received).
async fn publish_and_receive(client: RawClient, to: String, count: usize, window: usize) -> (usize, usize) {
    let (mut rd, mut wr) = tokio::io::split(client.tls);
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let reader = {
        let permits = permits.clone();
        tokio::spawn(async move {
            let (mut buf, mut chunk, mut acked, mut received) = (Vec::new(), vec![0u8; 16 * 1024], 0, 0);
            while acked < count || received < count {
                match tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
                let (mut acks, mut now_acked) = (Vec::new(), 0);
                split_packets(&mut buf, |first, body| match first >> 4 {
                    kind::PUBACK => now_acked += 1,
                    kind::PUBLISH => {
                        received += 1;
                        let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
                        acks.extend_from_slice(&packets::puback(u16::from_be_bytes([body[at], body[at + 1]])));
                    }
                    _ => {}
                });
                acked += now_acked;
                permits.add_permits(now_acked);
                if !acks.is_empty() && acks_tx.send(acks).is_err() {
                    break;
                }
            }
            (acked, received)
        })
    };
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        loop {
            let mut out = Vec::new();
            tokio::select! {
                Some(acks) = acks_rx.recv() => out = acks,
                Ok(permit) = permits.acquire(), if sent < count => {
                    permit.forget();
                    sent += 1;
                    Publish::new(&to, b"ping-pong", 1, (sent % 60_000) as u16 + 1).write(&mut out);
                }
                else => return,
            }
            while let Ok(acks) = acks_rx.try_recv() {
                out.extend_from_slice(&acks);
            }
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    let result = reader.await.unwrap();
    writer.abort();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_publishing_to_each_other_through_full_queues_never_wedge() {
    const EACH: usize = 5_000;
    let fleet = TestFleet::new();
    let svc = ClientFiles::service(&fleet.service("peer"));
    let broker = start(
        &fleet,
        &[
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "10"),
            ("BROKER__LIMITS__MAX_INFLIGHT", "5"),
            ("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "3000"),
        ],
    );
    let mut a = connect(&broker, &svc, "a", true).await;
    subscribe(&mut a, "to/a", 1).await;
    let mut b = connect(&broker, &svc, "b", true).await;
    subscribe(&mut b, "to/b", 1).await;
    // 100 unacknowledged: rumqttc's default.
    let a = tokio::spawn(publish_and_receive(a, "to/b".into(), EACH, 100));
    let b = tokio::spawn(publish_and_receive(b, "to/a".into(), EACH, 100));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a, (EACH, EACH), "a: (PUBACKs, messages)");
    assert_eq!(b, (EACH, EACH), "b: (PUBACKs, messages)");
    assert!(
        !broker.events().iter().any(|e| e["event"] == "slow_subscriber"),
        "neither was found slow"
    );
}
