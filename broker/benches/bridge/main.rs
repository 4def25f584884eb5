//! The bridge's uplink against a real cluster: QoS 1 messages per second that one gateway's
//! bridge forwards to a 3-node NATS server cluster (JetStream, MQTT over mutual TLS), beside a
//! plain rumqttc client publishing to the same node of the same cluster in the same run, and
//! how fast a backlog left by an outage drains once the node is back.
//!
//! Run: `cargo bench -p broker --bench bridge` (needs `nats-server`). Knobs: `BENCH_RUNS` (3),
//! `BENCH_MESSAGES` (50,000 per run, 64 B each), `BENCH_BACKLOG` (1,000,000; 0 skips the
//! drain). Figures are medians of the runs; nothing is pinned (the machine has 2 shared vCPUs,
//! and the cluster, the gateway and this load generator share them).
//!
//! - rumqttc: one client (rumqttc's default window of 100 unacknowledged) publishes
//!   `BENCH_MESSAGES` QoS 1 messages to node 1 as fast as PUBACKs let it; time from the first
//!   publish to the last PUBACK.
//! - bridge: four devices publish `BENCH_MESSAGES` in all to the gateway (our broker, release
//!   build, with `[persistence]`), whose bridge (`max_inflight = 100`, rumqttc's window) forwards
//!   them to node 1; time from the first message forwarded to the last
//!   (`broker_bridge_forwarded_total`), so what is measured is the uplink, not the intake.
//! - drain: node 1 is killed, `BENCH_BACKLOG` messages are published to the gateway (all
//!   acknowledged: they are in the outbox on disk), node 1 is started again; time from the
//!   bridge's reconnection to an empty outbox.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{connect_with, BrokerProcess, ClientFiles, NatsCluster, NatsUser, TestFleet, UpstreamPki};
use rumqttc::{Event, Packet, QoS};

const PAYLOAD: [u8; 64] = [b'x'; 64];
const DEVICES: usize = 4;
const SITE: &str = "bench";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runs = knob("BENCH_RUNS", 3);
    let messages = knob("BENCH_MESSAGES", 50_000);
    let backlog = knob("BENCH_BACKLOG", 1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let fleet = TestFleet::new();
    let upstream = UpstreamPki::new(&fleet.path().join("upstream"));
    let users = [NatsUser {
        uri: format!("urn:gateway:{SITE}"),
        topics: Some(format!("sites/{SITE}/")),
    }];
    let mut cluster = NatsCluster::start(
        &fleet.path().join("nats"),
        3,
        &upstream,
        &fleet.pki_dir().join("device-ca.crt"),
        &users,
    );
    let bridge = format!(
        "upstreams = [\"{}\"]\nupstream_ca = \"{}\"\nup = [\"devices/+/telemetry\"]\nmax_inflight = 100\noutbox_max_messages = {}\nretry_ms = 100\n",
        cluster.url(0),
        upstream.ca.display(),
        backlog.max(messages) * 2,
    );
    let config = fleet.gateway_config(SITE, &bridge);
    let gateway = BrokerProcess::start(
        Path::new(env!("CARGO_BIN_EXE_broker")),
        &config,
        &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")],
    );
    gateway.wait_for("the bridge connected", Duration::from_secs(60), |e| {
        e["event"] == "bridge_connected"
    });
    let gateway_bundle = fleet.path().join("gateways").join(SITE);
    let baseline_files = ClientFiles {
        cert: gateway_bundle.join("gateway.crt"),
        key: gateway_bundle.join("gateway.key"),
        ca: upstream.ca.clone(),
    };
    let ids: Vec<String> = (1..=DEVICES).map(|n| format!("bench-{n}")).collect();
    let bundles = fleet.devices(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "bridge bench: {runs} runs x {messages} QoS 1 messages of 64 B, 3-node NATS cluster ({}), CPU {cpu}, {} vCPUs",
        std::process::Command::new("nats-server")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    let mut plain = Vec::new();
    let mut bridged = Vec::new();
    let mut forwarded = 0.0;
    for run in 1..=runs {
        let rate = runtime.block_on(plain_rumqttc(cluster.mqtt_port(0), &baseline_files, messages, run));
        println!("run {run}: rumqttc {rate:.0} msg/s");
        plain.push(rate);
        let rate = runtime.block_on(through_bridge(&gateway, &bundles, &ids, messages, &mut forwarded));
        println!("run {run}: bridge {rate:.0} msg/s");
        bridged.push(rate);
    }
    let (plain, bridged) = (median(plain), median(bridged));
    println!(
        "median: rumqttc {plain:.0} msg/s, bridge {bridged:.0} msg/s: the bridge at {:.0}% (target at least 80%)",
        100.0 * bridged / plain
    );

    if backlog > 0 {
        cluster.kill(0);
        gateway.wait_for("the uplink lost", Duration::from_secs(30), |e| {
            e["event"] == "bridge_disconnected"
        });
        let filled = Instant::now();
        runtime.block_on(publish_from_devices(gateway.port(), &bundles, &ids, backlog));
        let depth = gateway.metric("broker_bridge_outbox_messages ").unwrap_or(0.0);
        println!(
            "backlog: {backlog} messages acknowledged to devices in {:.1} s with the uplink down; outbox {depth:.0}",
            filled.elapsed().as_secs_f64()
        );
        let connects_before = connects(&gateway);
        cluster.restart(0);
        gateway.wait_for_count(
            "the bridge reconnected",
            Duration::from_secs(120),
            connects_before + 1,
            |e| e["event"] == "bridge_connected",
        );
        let started = Instant::now();
        let mut last_report = Instant::now();
        while gateway.metric("broker_bridge_outbox_messages ").unwrap_or(1.0) > 0.0 {
            if last_report.elapsed() > Duration::from_secs(10) {
                last_report = Instant::now();
                println!(
                    "  draining: {:.0} left after {:.0} s",
                    gateway.metric("broker_bridge_outbox_messages ").unwrap_or(0.0),
                    started.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = started.elapsed().as_secs_f64();
        println!("drain: {depth:.0} messages in {took:.1} s = {:.0} msg/s", depth / took);
    }
}

/// How many `bridge_connected` events the gateway logged so far.
fn connects(gateway: &BrokerProcess) -> usize {
    gateway
        .events()
        .iter()
        .filter(|e| e["event"] == "bridge_connected")
        .count()
}

/// One rumqttc client publishing `messages` QoS 1 to the cluster node: messages per second.
async fn plain_rumqttc(port: u16, files: &ClientFiles, messages: usize, run: usize) -> f64 {
    let (client, mut eventloop) = connect_with(port, files, &format!("baseline-{run}"), |_| {})
        .await
        .expect("the baseline client connects");
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..messages {
            client
                .publish(
                    format!("sites/{SITE}/baseline/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    PAYLOAD.to_vec(),
                )
                .await
                .expect("queued");
        }
        client
    });
    let mut acked = 0;
    while acked < messages {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("the baseline connection holds") {
            acked += 1;
        }
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let _ = publisher.await;
    rate
}

/// `messages` in all from the devices through the gateway's bridge: forwarded per second.
async fn through_bridge(
    gateway: &BrokerProcess,
    bundles: &[std::path::PathBuf],
    ids: &[String],
    messages: usize,
    forwarded: &mut f64,
) -> f64 {
    let before = *forwarded;
    let target = before + messages as f64;
    let publishing = publish_from_devices(gateway.port(), bundles, ids, messages);
    let watching = async {
        let metric = || gateway.metric("broker_bridge_forwarded_total ").unwrap_or(0.0);
        let mut first = None;
        loop {
            let now = metric();
            if first.is_none() && now > before {
                first = Some((Instant::now(), now));
            }
            if now >= target {
                let (at, from) = first.unwrap_or((Instant::now(), before));
                return (now, (now - from) / at.elapsed().as_secs_f64().max(1e-3));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let ((now, rate), ()) = tokio::join!(watching, publishing);
    *forwarded = now;
    rate
}

/// Each device publishes its share of `messages` QoS 1 to the gateway, all acknowledged.
async fn publish_from_devices(port: u16, bundles: &[std::path::PathBuf], ids: &[String], messages: usize) {
    let share = messages / ids.len();
    let mut tasks = Vec::new();
    for (bundle, id) in bundles.iter().zip(ids) {
        let (client, mut eventloop) = connect_with(port, &ClientFiles::device(bundle), id, |_| {})
            .await
            .expect("a device connects");
        let topic = format!("devices/{id}/telemetry");
        tasks.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                for _ in 0..share {
                    client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, PAYLOAD.to_vec())
                        .await
                        .expect("queued");
                }
                client
            });
            let mut acked = 0;
            while acked < share {
                if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("the device connection holds")
                {
                    acked += 1;
                }
            }
            let _ = publisher.await;
        }));
    }
    for task in tasks {
        task.await.expect("a device task");
    }
}
