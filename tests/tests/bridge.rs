//! The bridge across real processes: gateway brokers bridged to a 3-node NATS server cluster
//! (JetStream, MQTT over mutual TLS, gateway certificates mapped to users) and to Mosquitto,
//! device agents and device clients on the gateways, a backend client on the upstream.
//!
//! Every scenario counts what a device was acknowledged for and asserts the backend received
//! each of those messages, and each device's messages in the order sent (a resend after a
//! failure may repeat one; it never reorders).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::{
    bundle_agent, connect_with, start_agent, workspace_bin, BrokerProcess, ClientFiles, MosquittoUpstream, NatsCluster,
    NatsUser, TestFleet, UpstreamPki,
};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::{mpsc, watch};

const LIMIT: Duration = Duration::from_secs(60);

/// Messages as the backend sees them: (topic, payload).
type Seen = HashSet<(String, String)>;

/// The `[bridge]` lines of a gateway bridged to `upstreams` (tried in this order).
fn bridge_lines(upstreams: &[String], upstream_ca: &Path) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "upstreams = [{}]\nupstream_ca = \"{}\"\nup = [\"devices/+/telemetry\"]\ndown = [\"devices/+/cmd/#\"]\nretry_ms = 100\nkeepalive_s = 5\nconnect_timeout_ms = 3000\n",
        urls.join(", "),
        upstream_ca.display()
    )
}

fn start_gateway(config: &Path) -> BrokerProcess {
    BrokerProcess::start(
        &workspace_bin("broker"),
        config,
        &[("BROKER__METRICS__LISTEN", "127.0.0.1:0")],
    )
}

/// Waits for the gateway's uplink to be connected and subscribed (its `bridge_connected`, the
/// `count`-th one).
fn wait_bridged(gateway: &BrokerProcess, count: usize) {
    gateway.wait_for_count("the bridge connected", LIMIT, count, |e| {
        e["event"] == "bridge_connected"
    });
}

/// Waits until the gateway's outbox holds at least `count` messages: the intake moves what the
/// devices were acknowledged into it as it comes, not at once.
fn wait_outbox_holds(gateway: &BrokerProcess, count: u32) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let outbox = gateway
            .metric("broker_bridge_outbox_messages ")
            .expect("the outbox gauge");
        if outbox >= f64::from(count) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox holds {outbox}, not the outage's {count} messages"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The backend's files: a fleet service certificate, trusting the upstream's CA.
fn backend_files(fleet: &TestFleet, upstream: &UpstreamPki) -> ClientFiles {
    let bundle = fleet.service("backend");
    ClientFiles {
        cert: bundle.join("service.crt"),
        key: bundle.join("service.key"),
        ca: upstream.ca.clone(),
    }
}

/// A backend client on the upstream at `port`, subscribed to `filter` (again after every
/// reconnect), that reports every (topic, payload) it receives. With `persistent`, its session
/// outlives a restart of the upstream.
async fn backend(
    port: u16,
    files: &ClientFiles,
    filter: &str,
    persistent: bool,
) -> mpsc::UnboundedReceiver<(String, String)> {
    // The MQTT listener answers once JetStream has its streams: until then, try again.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let (client, mut eventloop) = loop {
        match connect_with(port, files, "backend", |o| {
            o.set_clean_session(!persistent);
        })
        .await
        {
            Ok(connected) => break connected,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the backend cannot connect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
    wait_for_suback(&mut eventloop).await;
    let (seen, received) = mpsc::unbounded_channel();
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    if seen.send((p.topic, payload)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // rumqttc reconnects on the next poll; the upstream may be down for a while.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    received
}

async fn wait_for_suback(eventloop: &mut EventLoop) {
    e2e::wait_for_incoming(eventloop, LIMIT, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
}

/// Receives until every expected (topic, payload) arrived; checks each topic's payloads (numbers)
/// first arrived in increasing order. Panics naming what is missing.
async fn expect_all(received: &mut mpsc::UnboundedReceiver<(String, String)>, expected: &Seen) {
    expect_every(received, expected, Order::Kept).await;
}

/// Whether a scenario can expect the upstream to keep each device's order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// It does: the messages first arrive in the order sent.
    Kept,
    /// The upstream itself may reorder when one of its nodes dies (seen once with NATS: one
    /// early message reached the backend only after the last, about 30 s later, as a
    /// redelivery after JetStream's ack wait would): only that all of them arrive.
    UpToTheUpstream,
}

async fn expect_every(received: &mut mpsc::UnboundedReceiver<(String, String)>, expected: &Seen, order: Order) {
    let mut got: Seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !expected.is_subset(&got) {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some((topic, payload))) => {
                let n: u64 = payload
                    .parse()
                    .unwrap_or_else(|_| panic!("payload {payload:?} on {topic}"));
                if got.insert((topic.clone(), payload)) {
                    let before = last.insert(topic.clone(), n);
                    assert!(
                        order == Order::UpToTheUpstream || before.is_none_or(|b| b < n),
                        "{topic}: {n} arrived after {before:?}: out of order"
                    );
                }
            }
            _ => {
                let missing: Vec<_> = expected.difference(&got).collect();
                panic!(
                    "{} of {} messages never reached the backend, e.g. {:?}",
                    missing.len(),
                    expected.len(),
                    &missing[..missing.len().min(5)]
                );
            }
        }
    }
}

/// A device client on a gateway, publishing numbered QoS 1 telemetry one at a time.
struct Device {
    id: String,
    files: ClientFiles,
    connection: Option<(AsyncClient, EventLoop)>,
}

impl Device {
    fn new(bundle: &Path, id: &str) -> Self {
        Self {
            id: id.to_owned(),
            files: ClientFiles::device(bundle),
            connection: None,
        }
    }

    fn topic(&self) -> String {
        format!("devices/{}/telemetry", self.id)
    }

    /// The topic the backend sees this device's telemetry on.
    fn upstream_topic(&self, gateway: &str) -> String {
        format!("sites/{gateway}/{}", self.topic())
    }

    /// Publishes `n` to the gateway at `port` and waits for its PUBACK; false if the connection
    /// failed first (the message was not acknowledged).
    async fn publish(&mut self, port: u16, n: u64) -> bool {
        if self.connection.is_none() {
            let Ok(connected) = connect_with(port, &self.files, &self.id, |_| {}).await else {
                return false;
            };
            self.connection = Some(connected);
        }
        let topic = self.topic();
        let Some((client, eventloop)) = &mut self.connection else {
            return false;
        };
        if client
            .publish(topic, QoS::AtLeastOnce, false, n.to_string())
            .await
            .is_err()
        {
            self.connection = None;
            return false;
        }
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if acked != Ok(true) {
            self.connection = None;
            return false;
        }
        true
    }

    /// Publishes `range` to the gateway at `port`, each acknowledged; adds them to `expected`.
    async fn publish_all(
        &mut self,
        port: u16,
        gateway: &str,
        range: std::ops::RangeInclusive<u64>,
        expected: &mut Seen,
    ) {
        let (progress, _) = watch::channel(0);
        let refused = self
            .publish_while_acknowledged(port, gateway, range, expected, &progress)
            .await;
        assert_eq!(refused, None, "{} could not publish", self.id);
    }

    /// Publishes `range` until one is not acknowledged (returned), adding the acknowledged ones
    /// to `expected` and telling `progress` how many.
    async fn publish_while_acknowledged(
        &mut self,
        port: u16,
        gateway: &str,
        range: std::ops::RangeInclusive<u64>,
        expected: &mut Seen,
        progress: &watch::Sender<u64>,
    ) -> Option<u64> {
        for n in range {
            if !self.publish(port, n).await {
                return Some(n);
            }
            expected.insert((self.upstream_topic(gateway), n.to_string()));
            progress.send_modify(|acked| *acked += 1);
        }
        None
    }

    /// [`Device::publish_while_acknowledged`] in a task of its own, so that the test can break
    /// something mid-run; `progress` counts what was acknowledged.
    fn publish_in_background(
        mut self,
        port: u16,
        gateway: &'static str,
        range: std::ops::RangeInclusive<u64>,
        progress: watch::Sender<u64>,
    ) -> tokio::task::JoinHandle<(Self, Seen, Option<u64>)> {
        tokio::spawn(async move {
            let mut acknowledged = HashSet::new();
            let refused = self
                .publish_while_acknowledged(port, gateway, range, &mut acknowledged, &progress)
                .await;
            (self, acknowledged, refused)
        })
    }
}

/// Waits until `progress` says at least `count` messages were acknowledged.
async fn acknowledged(progress: &mut watch::Receiver<u64>, count: u64) {
    tokio::time::timeout(LIMIT, progress.wait_for(|acked| *acked >= count))
        .await
        .expect("the device publishes")
        .expect("the publisher runs");
}

fn users(gateways: &[&str]) -> Vec<NatsUser> {
    let mut users: Vec<NatsUser> = gateways
        .iter()
        .map(|gw| NatsUser {
            uri: format!("urn:gateway:{gw}"),
            topics: Some(format!("sites/{gw}/")),
        })
        .collect();
    users.push(NatsUser {
        uri: "urn:service:backend".into(),
        topics: None,
    });
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_reach_the_cluster_and_commands_reach_the_right_device() {
    let fleet = TestFleet::new();
    let upstream = UpstreamPki::new(&fleet.path().join("upstream"));
    let sites = ["site-a", "site-b", "site-c"];
    let cluster = NatsCluster::start(
        &fleet.path().join("nats"),
        3,
        &upstream,
        &fleet.pki_dir().join("device-ca.crt"),
        &users(&sites),
    );
    let files = backend_files(&fleet, &upstream);
    let mut received = backend(cluster.mqtt_port(0), &files, "sites/+/devices/+/telemetry", false).await;
    // Each gateway prefers another node.
    let mut gateways = Vec::new();
    for (n, site) in sites.iter().enumerate() {
        let order: Vec<String> = (0..3).map(|k| cluster.url((n + k) % 3)).collect();
        let gateway = start_gateway(&fleet.gateway_config(site, &bridge_lines(&order, &upstream.ca)));
        wait_bridged(&gateway, 1);
        gateways.push(gateway);
    }
    let mut agents = Vec::new();
    for (gateway, site) in gateways.iter().zip(sites) {
        let port = gateway.port();
        for k in 1..=2 {
            let id = format!("{site}-dev{k}");
            let bundle = fleet.devices(&[&id]).remove(0);
            let agent = start_agent(bundle_agent(&bundle, |agent| {
                agent.broker.port = port;
                agent.config.backoff_min_ms = 200;
                agent.config.backoff_max_ms = 1000;
            }));
            agents.push((site, id, agent));
        }
    }
    let mut expected = HashSet::new();
    for n in 1..=20u64 {
        for (site, id, agent) in &agents {
            agent
                .input
                .send(("telemetry".into(), n.to_string().into_bytes()))
                .await
                .unwrap();
            expected.insert((format!("sites/{site}/devices/{id}/telemetry"), n.to_string()));
        }
    }
    expect_all(&mut received, &expected).await;

    // A command for one device on the middle site reaches it, and no one else.
    let (client, mut eventloop) = connect_with(cluster.mqtt_port(2), &files, "commander", |_| {})
        .await
        .expect("the commander connects");
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let (_, target, agent) = &mut agents[3];
    let topic = format!("sites/site-b/devices/{target}/cmd/reboot");
    // The agent subscribes to its commands a moment after it connects: until it has, a command
    // finds no subscriber, so it is sent again until one arrives.
    let command = tokio::time::timeout(LIMIT, async {
        loop {
            client.publish(&topic, QoS::AtLeastOnce, false, "now").await.unwrap();
            if let Ok(Some(command)) = tokio::time::timeout(Duration::from_secs(1), agent.commands.recv()).await {
                return command;
            }
        }
    })
    .await
    .expect("the command reaches the device");
    assert_eq!(command, (format!("devices/{target}/cmd/reboot"), b"now".to_vec()));
    for (site, id, agent) in &mut agents {
        if id != "site-b-dev2" {
            assert!(
                agent.commands.try_recv().is_err(),
                "{site}/{id} got another device's command"
            );
        }
    }
    let metrics = gateways[1].metrics();
    assert!(metrics.contains("broker_bridge_downstream_total "), "{metrics}");
}

/// A site bridged to a fresh 3-node NATS cluster, with a backend subscribed to its telemetry
/// on node `backend_node` (a persistent session if `persistent`).
struct ClusterSite {
    cluster: NatsCluster,
    received: mpsc::UnboundedReceiver<(String, String)>,
    /// The gateway's broker.toml, bridged to every node in order.
    config: PathBuf,
}

impl ClusterSite {
    async fn start(fleet: &TestFleet, site: &str, backend_node: usize, persistent: bool) -> Self {
        let upstream = UpstreamPki::new(&fleet.path().join("upstream"));
        let cluster = NatsCluster::start(
            &fleet.path().join("nats"),
            3,
            &upstream,
            &fleet.pki_dir().join("device-ca.crt"),
            &users(&[site]),
        );
        let filter = format!("sites/{site}/devices/+/telemetry");
        let received = backend(
            cluster.mqtt_port(backend_node),
            &backend_files(fleet, &upstream),
            &filter,
            persistent,
        )
        .await;
        let urls: Vec<String> = (0..3).map(|n| cluster.url(n)).collect();
        let config = fleet.gateway_config(site, &bridge_lines(&urls, &upstream.ca));
        Self {
            cluster,
            received,
            config,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_fails_over_when_its_cluster_node_dies_and_loses_nothing() {
    let fleet = TestFleet::new();
    let ClusterSite {
        mut cluster,
        mut received,
        config,
    } = ClusterSite::start(&fleet, "site-f", 2, false).await;
    let gateway = start_gateway(&config);
    wait_bridged(&gateway, 1);
    let bundle = fleet.devices(&["f1"]).remove(0);
    let (progress, mut acked) = watch::channel(0);
    let publishing = Device::new(&bundle, "f1").publish_in_background(gateway.port(), "site-f", 1..=600, progress);
    // Killed while the device publishes and the bridge forwards.
    acknowledged(&mut acked, 200).await;
    cluster.kill(0);
    let (_, expected, refused) = publishing.await.expect("the publisher");
    assert_eq!(refused, None, "the gateway acknowledged every message");
    gateway.wait_for("failover to another node", LIMIT, |e| {
        e["event"] == "bridge_failover" && e["from"] == cluster.url(0).as_str()
    });
    // The bridge sends in order (the other scenarios show it), but the node that died may have
    // held the backend's own consumer.
    expect_every(&mut received, &expected, Order::UpToTheUpstream).await;
    let disconnect = gateway.wait_for("the disconnect", LIMIT, |e| e["event"] == "bridge_disconnected");
    assert!(disconnect["reason"].is_string(), "{disconnect}");
}

/// A site bridged to Mosquitto, with a persistent backend subscribed to its telemetry there.
struct MosquittoSite {
    mosquitto: MosquittoUpstream,
    received: mpsc::UnboundedReceiver<(String, String)>,
    /// The gateway's broker.toml.
    config: PathBuf,
    /// The gateway, bridged.
    gateway: BrokerProcess,
}

impl MosquittoSite {
    /// The site `site`, its `[bridge]` with `extra` lines.
    async fn start(fleet: &TestFleet, site: &str, extra: &str) -> Self {
        let upstream = UpstreamPki::new(&fleet.path().join("upstream"));
        let prefix = format!("sites/{site}/");
        let mosquitto = MosquittoUpstream::start(
            &fleet.path().join("mosquitto"),
            &upstream,
            &fleet.pki_dir().join("device-ca.crt"),
            &[(site, Some(&prefix)), ("backend", None)],
        );
        let filter = format!("{prefix}devices/+/telemetry");
        let received = backend(mosquitto.port, &backend_files(fleet, &upstream), &filter, true).await;
        let bridge = bridge_lines(&[mosquitto.url()], &upstream.ca) + extra;
        let config = fleet.gateway_config(site, &bridge);
        let gateway = start_gateway(&config);
        wait_bridged(&gateway, 1);
        Self {
            mosquitto,
            received,
            config,
            gateway,
        }
    }

    /// Stops the upstream and waits until the bridge knows.
    fn cut_uplink(&mut self) {
        self.mosquitto.stop();
        self.gateway
            .wait_for("the uplink lost", LIMIT, |e| e["event"] == "bridge_disconnected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_from_an_outage_drains_in_order_when_the_upstream_returns() {
    let fleet = TestFleet::new();
    let mut site = MosquittoSite::start(&fleet, "site-m", "").await;
    let port = site.gateway.port();
    let bundles = fleet.devices(&["m1", "m2"]);
    let mut devices = [Device::new(&bundles[0], "m1"), Device::new(&bundles[1], "m2")];
    let mut expected = HashSet::new();
    for device in &mut devices {
        device.publish_all(port, "site-m", 1..=50, &mut expected).await;
    }
    site.cut_uplink();
    for device in &mut devices {
        device.publish_all(port, "site-m", 51..=300, &mut expected).await;
    }
    wait_outbox_holds(&site.gateway, 500);
    assert_eq!(
        site.gateway.metric("broker_bridge_uplink_up{upstream=\"\"} "),
        Some(0.0)
    );
    site.mosquitto.restart();
    wait_bridged(&site.gateway, 2);
    expect_all(&mut site.received, &expected).await;
    // Removed as the PUBACKs come: empty soon after the last message arrived.
    let deadline = std::time::Instant::now() + LIMIT;
    while site.gateway.metric("broker_bridge_outbox_messages ") != Some(0.0) {
        assert!(std::time::Instant::now() < deadline, "the outbox never emptied");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_over_its_bounds_drops_its_oldest_counted_and_audited() {
    let fleet = TestFleet::new();
    let mut site = MosquittoSite::start(&fleet, "site-o", "outbox_max_messages = 50\n").await;
    site.cut_uplink();
    let bundle = fleet.devices(&["o1"]).remove(0);
    let mut device = Device::new(&bundle, "o1");
    let mut published = HashSet::new();
    device
        .publish_all(site.gateway.port(), "site-o", 1..=80, &mut published)
        .await;
    let gateway = &site.gateway;
    let dropped = gateway.wait_for("the overflow audited", LIMIT, |e| e["event"] == "outbox_overflow");
    assert!(dropped["count"].as_u64() >= Some(1), "{dropped}");
    for series in [
        "broker_bridge_dropped_total{reason=\"outbox_overflow\"} ",
        "broker_messages_dropped_total{reason=\"outbox_overflow\"} ",
    ] {
        assert_eq!(gateway.metric(series), Some(30.0), "{series}");
    }
    assert_eq!(gateway.metric("broker_bridge_outbox_messages "), Some(50.0));
    site.mosquitto.restart();
    // The newest 50 arrive, in order; the oldest 30 were the ones dropped.
    let newest: Seen = (31..=80)
        .map(|n| (device.upstream_topic("site-o"), n.to_string()))
        .collect();
    expect_all(&mut site.received, &newest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_loses_nothing_it_acknowledged() {
    let fleet = TestFleet::new();
    let mut site = MosquittoSite::start(&fleet, "site-k", "").await;
    let bundle = fleet.devices(&["k1"]).remove(0);
    // Killed mid-run: while the device publishes and the bridge forwards.
    let (progress, mut acked) = watch::channel(0);
    let publishing = Device::new(&bundle, "k1").publish_in_background(site.gateway.port(), "site-k", 1..=400, progress);
    acknowledged(&mut acked, 150).await;
    site.gateway.kill();
    let (mut device, mut expected, refused) = publishing.await.expect("the publisher");
    // (Should the device have been faster than the kill, there is nothing left to send.)
    let next = refused.unwrap_or(401);
    site.gateway = start_gateway(&site.config);
    wait_bridged(&site.gateway, 1);
    // What was not acknowledged is the device's to send again, as a device does.
    device.connection = None;
    device
        .publish_all(site.gateway.port(), "site-k", next..=400, &mut expected)
        .await;
    // Killed with a backlog: the upstream is away, so everything since is only in the outbox.
    site.cut_uplink();
    device
        .publish_all(site.gateway.port(), "site-k", 401..=500, &mut expected)
        .await;
    site.gateway.kill();
    site.gateway = start_gateway(&site.config);
    let started = site
        .gateway
        .wait_for("the bridge restarted", LIMIT, |e| e["event"] == "bridge_started");
    assert!(
        started["outbox"].as_u64() >= Some(100),
        "the outbox came back with {started}"
    );
    site.mosquitto.restart();
    wait_bridged(&site.gateway, 1);
    device.connection = None;
    device
        .publish_all(site.gateway.port(), "site-k", 501..=600, &mut expected)
        .await;
    expect_all(&mut site.received, &expected).await;
    site.gateway.terminate();
}

/// (c) against the cluster itself: every node of it away while two devices keep publishing,
/// then back; the backlog drains to the backend's persistent session on the cluster, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_from_a_whole_cluster_outage_drains_in_order_when_it_returns() {
    let fleet = TestFleet::new();
    let ClusterSite {
        mut cluster,
        mut received,
        config,
    } = ClusterSite::start(&fleet, "site-c", 1, true).await;
    let gateway = start_gateway(&config);
    wait_bridged(&gateway, 1);
    let bundles = fleet.devices(&["c1", "c2"]);
    let mut devices = [Device::new(&bundles[0], "c1"), Device::new(&bundles[1], "c2")];
    let mut expected = HashSet::new();
    for device in &mut devices {
        device
            .publish_all(gateway.port(), "site-c", 1..=50, &mut expected)
            .await;
    }
    cluster.kill_all();
    gateway.wait_for("the uplink lost", LIMIT, |e| e["event"] == "bridge_disconnected");
    for device in &mut devices {
        device
            .publish_all(gateway.port(), "site-c", 51..=200, &mut expected)
            .await;
    }
    wait_outbox_holds(&gateway, 300);
    cluster.restart_all();
    wait_bridged(&gateway, 2);
    expect_all(&mut received, &expected).await;
}

/// (d) against the cluster itself: the gateway killed while a device publishes and the bridge
/// forwards to NATS, restarted on its store; everything the device was told was received reaches
/// the backend on the cluster, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_bridged_to_the_cluster_loses_nothing_it_acknowledged() {
    let fleet = TestFleet::new();
    let ClusterSite {
        cluster: _cluster,
        mut received,
        config,
    } = ClusterSite::start(&fleet, "site-n", 1, false).await;
    let mut gateway = start_gateway(&config);
    wait_bridged(&gateway, 1);
    let bundle = fleet.devices(&["n1"]).remove(0);
    let (progress, mut acked) = watch::channel(0);
    let publishing = Device::new(&bundle, "n1").publish_in_background(gateway.port(), "site-n", 1..=300, progress);
    acknowledged(&mut acked, 100).await;
    gateway.kill();
    let (mut device, mut expected, refused) = publishing.await.expect("the publisher");
    let next = refused.unwrap_or(301);
    gateway = start_gateway(&config);
    wait_bridged(&gateway, 1);
    // What was not acknowledged is the device's to send again, as a device does.
    device.connection = None;
    device
        .publish_all(gateway.port(), "site-n", next..=300, &mut expected)
        .await;
    expect_all(&mut received, &expected).await;
    gateway.terminate();
}

#[test]
fn check_config_validates_the_bridge_and_probes_its_upstream() {
    let fleet = TestFleet::new();
    let upstream = UpstreamPki::new(&fleet.path().join("upstream"));
    let mosquitto = MosquittoUpstream::start(
        &fleet.path().join("mosquitto"),
        &upstream,
        &fleet.pki_dir().join("device-ca.crt"),
        &[("site-p", Some("sites/site-p/"))],
    );
    let config = fleet.gateway_config("site-p", &bridge_lines(&[mosquitto.url()], &upstream.ca));
    let check = |extra: &[&str]| {
        std::process::Command::new(workspace_bin("broker"))
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .args(extra)
            .output()
            .expect("broker check-config runs")
    };
    let probed = check(&["--probe-bridge"]);
    let stdout = String::from_utf8_lossy(&probed.stdout);
    assert!(
        probed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&probed.stderr)
    );
    assert!(stdout.contains("bridge: gateway site-p"), "{stdout}");
    assert!(stdout.contains("TLS handshake OK, certificate accepted"), "{stdout}");

    // An upstream that does not trust the fleet's device CA refuses the gateway's certificate.
    let stranger = UpstreamPki::new(&fleet.path().join("stranger"));
    let refusing = MosquittoUpstream::start(&fleet.path().join("refusing"), &upstream, &stranger.ca, &[]);
    let wrong = fleet.broker_dir().join("broker-site-p.toml");
    let text = std::fs::read_to_string(&wrong)
        .unwrap()
        .replace(&mosquitto.url(), &refusing.url());
    std::fs::write(&wrong, text).unwrap();
    let refused = check(&["--probe-bridge"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("FAILED (tls_error)"));

    // A bad topic rule is named.
    let text = std::fs::read_to_string(&wrong)
        .unwrap()
        .replace("devices/+/cmd/#", "cmd/#");
    std::fs::write(&wrong, text).unwrap();
    let invalid = check(&[]);
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(!invalid.status.success());
    assert!(stderr.contains("bridge.down"), "{stderr}");
}

#[test]
fn a_gateway_certificate_is_refused_as_a_client_of_the_gateway() {
    let fleet = TestFleet::new();
    let broker = BrokerProcess::start(&workspace_bin("broker"), &fleet.broker_config(), &[]);
    let bundle = fleet.gateway("site-x");
    let files = ClientFiles {
        cert: bundle.join("gateway.crt"),
        key: bundle.join("gateway.key"),
        ca: bundle.join("broker-ca.crt"),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refused = runtime.block_on(connect_with(broker.port(), &files, "site-x", |_| {}));
    assert!(refused.is_err());
    broker.wait_for_reject("gateway_identity");
}
