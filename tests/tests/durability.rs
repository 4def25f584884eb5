//! Nothing acknowledged is lost: the broker's durable store across real processes. `kill -9`
//! at random moments under 200,000 QoS 1 publishes, a damaged store file, a full disk, and the
//! store's size bound.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::raw::{kind, packets, RawClient};
use e2e::{tls_config, workspace_bin, BrokerProcess, ClientFiles, TestFleet};
use packets::Publish;
use tokio::sync::watch;

/// Unacknowledged publishes a device keeps in flight.
const WINDOW: usize = 100;
const SERVICE_CLIENT: &str = "backend-1";
const WAIT: Duration = Duration::from_secs(10);

fn start(config: &Path, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(&workspace_bin("broker"), config, env)
}

/// The same, off the async runtime's workers (it blocks until the broker listens).
async fn restart(config: PathBuf, env: Vec<(String, String)>) -> BrokerProcess {
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start(&config, &env)
    })
    .await
    .unwrap()
}

fn config(files: &ClientFiles) -> Arc<rustls::ClientConfig> {
    Arc::new(tls_config(files))
}

/// A 64-byte payload carrying its sequence number.
fn payload(seq: u32) -> Vec<u8> {
    let mut p = vec![b'.'; 64];
    p[..4].copy_from_slice(&seq.to_be_bytes());
    p
}

/// The service's persistent session: subscribes to every device's telemetry, then goes away.
async fn create_service_session(port: u16, service: &ClientFiles) {
    let mut client = persistent_subscriber(port, config(service), SERVICE_CLIENT, "devices/+/telemetry", 1).await;
    client.send(&packets::DISCONNECT).await.unwrap();
    assert!(client.closed_within(WAIT).await);
}

/// A persistent session (`clean_session = false`) as `client_id`, subscribed to `filter` at
/// `qos` (granted as asked).
async fn persistent_subscriber(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
    filter: &str,
    qos: u8,
) -> RawClient {
    let mut client = RawClient::connect(port, tls, &packets::connect(client_id, false, 60, None))
        .await
        .expect("the subscriber connects");
    client.send(&packets::subscribe(1, &[(filter, qos)])).await.unwrap();
    let suback = client
        .recv_until(WAIT, |p| p.kind() == kind::SUBACK)
        .await
        .expect("SUBACK");
    assert_eq!(suback.body[2], qos, "subscription to {filter} granted at QoS {qos}");
    client
}

/// What the service's session holds: it reconnects (persistent, without subscribing again) and
/// reads until `until(distinct messages so far)` or nothing more comes for `quiet`,
/// acknowledging everything. Returns each (device, payload) received, duplicates included, and
/// whether the broker said the session was present.
async fn drain_service(
    port: u16,
    service: &ClientFiles,
    quiet: Duration,
    until: impl Fn(usize) -> bool,
) -> (Vec<(String, Vec<u8>)>, bool) {
    let mut client = RawClient::handshake(port, config(service)).await.expect("handshake");
    client
        .send(&packets::connect(SERVICE_CLIENT, false, 60, None))
        .await
        .unwrap();
    let connack = client.recv(WAIT).await.expect("CONNACK");
    assert_eq!(
        (connack.kind(), connack.body[1]),
        (kind::CONNACK, 0),
        "the service is accepted"
    );
    let present = connack.body[0] & 1 == 1;
    let mut received = Vec::new();
    let mut distinct = HashSet::new();
    while !until(distinct.len()) {
        let Some(packet) = client.recv(quiet).await else { break };
        let Some(publish) = packet.publish() else { continue };
        if publish.qos == 1 {
            client.send(&packets::puback(publish.pkid)).await.unwrap();
        }
        let device = publish.topic.split('/').nth(1).unwrap_or_default().to_owned();
        distinct.insert((device.clone(), publish.payload.clone()));
        received.push((device, publish.payload));
    }
    (received, present)
}

/// A device publishing `count` QoS 1 messages the way a real device must: at most [`WINDOW`]
/// unacknowledged; after a lost connection it reconnects and resends each one not yet
/// acknowledged. Every PUBACK is recorded in `acked`. Returns how many connections it made.
async fn device(
    port: u16,
    files: ClientFiles,
    id: String,
    count: u32,
    acked: Arc<Mutex<HashSet<(String, u32)>>>,
    progress: watch::Sender<usize>,
) -> u32 {
    let tls = config(&files);
    let topic = format!("devices/{id}/telemetry");
    let (mut next, mut unacked, mut connections, mut pkids) = (0u32, BTreeSet::new(), 0u32, 0u32);
    while next < count || !unacked.is_empty() {
        let Ok(mut client) = RawClient::connect(port, tls.clone(), &packets::connect(&id, true, 30, None)).await else {
            // The broker is down: a device retries until it is back.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        connections += 1;
        let mut resend: VecDeque<u32> = unacked.iter().copied().collect();
        let mut inflight: HashMap<u16, u32> = HashMap::new();
        loop {
            let mut out = Vec::new();
            while inflight.len() < WINDOW {
                let seq = match resend.pop_front() {
                    Some(seq) => seq,
                    None if next < count => {
                        next += 1;
                        unacked.insert(next - 1);
                        next - 1
                    }
                    None => break,
                };
                pkids += 1;
                let pkid = (pkids % 65_000) as u16 + 1;
                inflight.insert(pkid, seq);
                Publish::new(&topic, &payload(seq), 1, pkid).write(&mut out);
            }
            if inflight.is_empty() {
                break;
            }
            if !out.is_empty() && client.send(&out).await.is_err() {
                break;
            }
            match client.recv(Duration::from_secs(30)).await {
                Some(packet) if packet.kind() == kind::PUBACK => {
                    if let Some(seq) = inflight.remove(&packet.pkid()) {
                        unacked.remove(&seq);
                        let mut acked = acked.lock().unwrap();
                        acked.insert((id.clone(), seq));
                        progress.send_replace(acked.len());
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    connections
}

/// `device-agent run` as a real process for the device bundle `bundle`, pointed at `port`.
fn start_agent(bundle: &Path, port: u16) -> Child {
    let config = bundle.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("mqtts://localhost:8883", &format!("mqtts://localhost:{port}"));
    std::fs::write(
        &config,
        format!("{text}backoff_min_ms = 50\nbackoff_max_ms = 500\nheartbeat_s = 0\n"),
    )
    .unwrap();
    Command::new(workspace_bin("device-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("device-agent starts")
}

/// A tiny deterministic generator: the seed is printed, so a failing run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_that_was_acknowledged() {
    const PER_DEVICE: u32 = 50_000;
    const KILLS: usize = 3;
    const AGENT_LINES: usize = 400;
    let ids = ["d0", "d1", "d2", "d3"];
    let fleet = TestFleet::new();
    let bundles = fleet.devices(&["d0", "d1", "d2", "d3", "agent-1"]);
    let service = ClientFiles::service(&fleet.service("backend"));
    let config = fleet.broker_config();
    // The offline service's queue must hold the whole run (the default bound is 1000).
    let room = [
        ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "300000"),
        ("BROKER__LIMITS__MAX_QUEUED_BYTES", "100000000"),
    ];
    let mut broker = start(&config, &room);
    let port = broker.port();
    let mut env: Vec<(String, String)> = room.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.push(("BROKER__LISTEN".to_owned(), format!("127.0.0.1:{port}")));
    let listen = env;
    create_service_session(port, &service).await;

    // A retained status, acknowledged before anything else happens.
    let mut status = RawClient::connect(port, config_of(&bundles[0]), &packets::connect("d0", true, 30, None))
        .await
        .unwrap();
    status
        .send(
            &Publish {
                retain: true,
                ..Publish::new("devices/d0/status", b"online", 1, 1)
            }
            .bytes(),
        )
        .await
        .unwrap();
    status
        .recv_until(WAIT, |p| p.kind() == kind::PUBACK)
        .await
        .expect("PUBACK for the retained status");
    drop(status);

    let mut agent = start_agent(&bundles[4], port);
    let mut agent_input = agent.stdin.take().unwrap();
    let mut agent_lines = 0;
    let per_kill = AGENT_LINES / (KILLS + 1);
    let mut feed_agent = |n: usize| {
        for _ in 0..n {
            writeln!(agent_input, "telemetry agent-{agent_lines}").unwrap();
            agent_lines += 1;
        }
        agent_input.flush().unwrap();
    };

    let acked = Arc::new(Mutex::new(HashSet::new()));
    let (progress, mut watched) = watch::channel(0usize);
    let publishers: Vec<_> = ids
        .iter()
        .zip(&bundles)
        .map(|(id, bundle)| {
            tokio::spawn(device(
                port,
                ClientFiles::device(bundle),
                id.to_string(),
                PER_DEVICE,
                acked.clone(),
                progress.clone(),
            ))
        })
        .collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill points from seed {seed}");
    let mut random = Lcg(seed);
    let total = PER_DEVICE as u64 * ids.len() as u64;
    let mut points: Vec<usize> = (0..KILLS)
        .map(|_| (total / 10 + random.next(total * 8 / 10)) as usize)
        .collect();
    points.sort_unstable();
    let started = Instant::now();
    for point in points {
        feed_agent(per_kill);
        tokio::time::timeout(Duration::from_secs(240), watched.wait_for(|n| *n >= point))
            .await
            .expect("publishing stalled")
            .unwrap();
        broker.kill();
        println!("killed at {} acknowledged", acked.lock().unwrap().len());
        broker = restart(config.clone(), listen.clone()).await;
    }
    feed_agent(AGENT_LINES - per_kill * KILLS);
    let mut connections = 0;
    for publisher in publishers {
        connections += tokio::time::timeout(Duration::from_secs(240), publisher)
            .await
            .expect("publishers finish")
            .unwrap();
    }
    let elapsed = started.elapsed();
    let acked: HashSet<(String, u32)> = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, total, "every publish was acknowledged in the end");
    assert!(
        connections >= (ids.len() * (KILLS + 1)) as u32,
        "every device saw every kill"
    );

    // Once more at the end, then the service comes back for what its session holds.
    broker.kill();
    let broker = restart(config.clone(), listen.clone()).await;
    let expected = total as usize + AGENT_LINES;
    let (received, present) = drain_service(port, &service, Duration::from_secs(30), |n| n >= expected).await;
    let mut distinct = HashSet::new();
    let mut agent_seen = HashSet::new();
    for (device, payload) in &received {
        if device == "agent-1" {
            agent_seen.insert(payload.clone());
        } else {
            let seq = u32::from_be_bytes(payload[..4].try_into().unwrap());
            distinct.insert((device.clone(), seq));
        }
    }
    let missing: Vec<_> = acked.difference(&distinct).take(5).collect();
    println!(
        "{total} publishes in {elapsed:.1?} across {KILLS} kills + 1 at the end; {} deliveries, {} duplicates; agent {}/{AGENT_LINES}",
        received.len(),
        received.len() - distinct.len() - agent_seen.len(),
        agent_seen.len()
    );
    assert!(present, "the service's session survived (CONNACK session present)");
    assert!(missing.is_empty(), "acknowledged but lost, e.g. {missing:?}");
    assert_eq!(agent_seen.len(), AGENT_LINES, "device-agent's messages all arrived");

    // The retained status is back too.
    let mut reader = RawClient::connect(port, config_of(&bundles[0]), &packets::connect("d0", true, 30, None))
        .await
        .unwrap();
    reader
        .send(&packets::subscribe(1, &[("devices/d0/status", 1)]))
        .await
        .unwrap();
    let retained = reader
        .recv_until(WAIT, |p| p.kind() == kind::PUBLISH)
        .await
        .and_then(|p| p.publish())
        .expect("the retained status after the restarts");
    assert_eq!((retained.payload.as_slice(), retained.retain), (&b"online"[..], true));
    let _ = agent.kill();
    let _ = agent.wait();
    drop(broker);
}

/// The next PUBLISH `client` receives (within [`WAIT`]).
async fn next_publish(client: &mut RawClient) -> e2e::raw::ReceivedPublish {
    client
        .recv_until(WAIT, |p| p.kind() == kind::PUBLISH)
        .await
        .and_then(|p| p.publish())
        .expect("a PUBLISH")
}

/// Sends again, with DUP, a QoS 2 PUBLISH not yet released (what a reconnected client does).
async fn resend_qos2(client: &mut RawClient, topic: &str, payload: &[u8], pkid: u16) {
    let publish = Publish {
        dup: true,
        ..Publish::new(topic, payload, 2, pkid)
    };
    client.send(&publish.bytes()).await.unwrap();
}

fn config_of(bundle: &Path) -> Arc<rustls::ClientConfig> {
    config(&ClientFiles::device(bundle))
}

/// Publishes `count` QoS 1 messages from device `id` one at a time; returns how many PUBACKs came.
async fn publish_each(port: u16, bundle: &Path, id: &str, count: u32, ack_within: Duration) -> (RawClient, u32) {
    let mut client = RawClient::connect(port, config_of(bundle), &packets::connect(id, true, 60, None))
        .await
        .unwrap();
    let topic = format!("devices/{id}/telemetry");
    let mut out = Vec::new();
    for seq in 0..count {
        Publish::new(&topic, &payload(seq), 1, seq as u16 + 1).write(&mut out);
    }
    client.send(&out).await.unwrap();
    let mut acks = 0;
    while acks < count {
        match client.recv_until(ack_within, |p| p.kind() == kind::PUBACK).await {
            Some(_) => acks += 1,
            None => break,
        }
    }
    (client, acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_corrupt_store_is_set_aside_and_the_broker_starts() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 2] = [
        ("truncated", |file| {
            let len = std::fs::metadata(file).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(file)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("overwritten", |file| {
            let mut bytes = std::fs::read(file).unwrap();
            let len = bytes.len();
            for (i, b) in bytes[len / 3..len * 2 / 3].iter_mut().enumerate() {
                *b = (i * 7 + 13) as u8;
            }
            std::fs::write(file, bytes).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let fleet = TestFleet::new();
        let bundle = fleet.device("d0");
        let service = ClientFiles::service(&fleet.service("backend"));
        let config = fleet.broker_config();
        let mut broker = start(&config, &[]);
        create_service_session(broker.port(), &service).await;
        // Enough queued rows that the file spans many pages.
        let (_client, acks) = publish_each(broker.port(), &bundle, "d0", 2000, WAIT).await;
        assert_eq!(acks, 2000);
        assert!(broker.terminate().success());
        let store = fleet.broker_dir().join("store/broker.sqlite");
        damage(&store);

        let broker = start(&config, &[]);
        let damaged = broker.wait_for("the damage reported", WAIT, |e| {
            e["event"] == "store_damaged" && e.get("table").is_some()
        });
        println!("{what}: {damaged}");
        assert!(
            damaged["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: the log says why"
        );
        let kept = std::fs::read_dir(fleet.broker_dir().join("store"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|name| name.starts_with("broker.sqlite.damaged-"));
        assert!(kept, "{what}: the damaged file is kept for inspection");
        broker.wait_for("the store opened", WAIT, |e| e["event"] == "store_opened");
        // The broker works: what is published now reaches the service's session (recreated
        // if the damage took it).
        create_service_session(broker.port(), &service).await;
        let (_client, acks) = publish_each(broker.port(), &bundle, "d0", 10, WAIT).await;
        assert_eq!(acks, 10, "{what}: publishing works on the fresh store");
        let (received, _) = drain_service(broker.port(), &service, Duration::from_secs(2), |_| false).await;
        let fresh = received
            .iter()
            .filter(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()) < 10)
            .count();
        assert!(fresh >= 10, "{what}: the new messages arrived ({fresh})");
    }
}

/// A small tmpfs, unmounted when dropped: a disk that can really be full.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test fills a disk for real: it mounts a {size} tmpfs at {}, which needs root (or CAP_SYS_ADMIN)",
            at.display()
        );
        Self(at)
    }

    /// Fills it to the last byte with `filler`.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        for chunk in [64 * 1024, 1024, 1] {
            let block = vec![0u8; chunk];
            while file.write_all(&block).is_ok() {}
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acknowledgements_until_space_returns() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("d0");
    let service = ClientFiles::service(&fleet.service("backend"));
    let disk = SmallDisk::mount(fleet.path().join("small-disk"), "4m");
    let store_dir = disk.0.join("store");
    let broker = start(
        &fleet.broker_config(),
        &[("BROKER__PERSISTENCE__DIR", store_dir.to_str().unwrap())],
    );
    create_service_session(broker.port(), &service).await;
    let filler = disk.fill();

    // The publishes cannot be written: none is acknowledged, and the log says why.
    let (mut client, acks) = publish_each(broker.port(), &bundle, "d0", 50, Duration::from_secs(2)).await;
    assert_eq!(acks, 0, "acknowledged although the store could not write them");
    let failed = broker.wait_for("the write failure", WAIT, |e| e["event"] == "store_write_failed");
    println!("{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()));

    // Space returns: the broker recovers by itself and the acknowledgements come.
    std::fs::remove_file(filler).unwrap();
    let mut acks = 0;
    while acks < 50 {
        client
            .recv_until(WAIT, |p| p.kind() == kind::PUBACK)
            .await
            .expect("PUBACKs once there is space again");
        acks += 1;
    }
    broker.wait_for("recovery", WAIT, |e| e["event"] == "store_recovered");
    let (received, _) = drain_service(broker.port(), &service, Duration::from_secs(2), |n| n >= 50).await;
    let seqs: HashSet<u32> = received
        .iter()
        .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect();
    assert_eq!(seqs.len(), 50, "every message the disk was full for arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_size_bound_drops_the_oldest_counted_and_audited() {
    const MAX_BYTES: usize = 20_000;
    let fleet = TestFleet::new();
    let bundle = fleet.device("d0");
    let service = ClientFiles::service(&fleet.service("backend"));
    let config = fleet.broker_config();
    let env = [
        ("BROKER__PERSISTENCE__MAX_BYTES", "20000"),
        ("BROKER__METRICS__LISTEN", "127.0.0.1:0"),
    ];
    let mut broker = start(&config, &env);
    create_service_session(broker.port(), &service).await;
    let (_client, acks) = publish_each(broker.port(), &bundle, "d0", 1000, WAIT).await;
    assert_eq!(acks, 1000);
    let size = "devices/d0/telemetry".len() + 64;
    let kept = MAX_BYTES / size;
    let queued = broker.metric("broker_store_queued_bytes").unwrap() as usize;
    assert!(queued <= MAX_BYTES, "{queued} bytes queued on disk, bound {MAX_BYTES}");
    let dropped = broker
        .metric("broker_messages_dropped_total{reason=\"queue_overflow\"}")
        .unwrap() as usize;
    assert_eq!(dropped, 1000 - kept, "every message beyond the bound is counted");
    broker.wait_for("the overflow audited", WAIT, |e| {
        e["event"] == "queue_overflow" && e["client_id"].as_str().is_some_and(|c| c.contains(SERVICE_CLIENT))
    });

    // What is kept is the newest, and it survives kill -9.
    broker.kill();
    let port = broker.port().to_string();
    let broker = start(&config, &[("BROKER__LISTEN", &format!("127.0.0.1:{port}"))]);
    let (received, _) = drain_service(broker.port(), &service, Duration::from_secs(2), |n| n >= kept).await;
    let seqs: Vec<u32> = received
        .iter()
        .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect();
    let newest: Vec<u32> = ((1000 - kept as u32)..1000).collect();
    assert_eq!(seqs, newest, "the newest {kept} messages, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_state_survives_kill_9_in_both_directions() {
    let fleet = TestFleet::new();
    let device = config_of(&fleet.device("d0"));
    let service = config(&ClientFiles::service(&fleet.service("backend")));
    let config = fleet.broker_config();
    let mut broker = start(&config, &[]);
    let port = broker.port();
    let listen = format!("127.0.0.1:{port}");
    let restart = |broker: &mut BrokerProcess| {
        broker.kill();
        *broker = start(&config, &[("BROKER__LISTEN", &listen)]);
    };
    let persistent = |id: &str| packets::connect(id, false, 60, None);

    let mut subscriber = persistent_subscriber(port, service.clone(), "q2", "devices/+/q2", 2).await;
    subscriber.send(&packets::DISCONNECT).await.unwrap();

    // Inbound: PUBREC came (so the message is on disk), PUBREL not yet sent, broker killed.
    let mut publisher = RawClient::connect(port, device.clone(), &persistent("d0"))
        .await
        .unwrap();
    publisher
        .send(&Publish::new("devices/d0/q2", b"m1", 2, 9).bytes())
        .await
        .unwrap();
    let pubrec = publisher.recv_until(WAIT, |p| p.kind() == kind::PUBREC).await.unwrap();
    assert_eq!(pubrec.pkid(), 9);
    restart(&mut broker);
    // The resend is recognised (PUBREC again, not routed twice); PUBREL completes it.
    let mut publisher = RawClient::connect(port, device.clone(), &persistent("d0"))
        .await
        .unwrap();
    resend_qos2(&mut publisher, "devices/d0/q2", b"m1", 9).await;
    let pubrec = publisher.recv_until(WAIT, |p| p.kind() == kind::PUBREC).await.unwrap();
    assert_eq!(pubrec.pkid(), 9);
    publisher.send(&packets::pubrel(9)).await.unwrap();
    let pubcomp = publisher.recv_until(WAIT, |p| p.kind() == kind::PUBCOMP).await.unwrap();
    assert_eq!(pubcomp.pkid(), 9);

    // Outbound: the subscriber receives it and does not answer; the broker is killed at once.
    // The PUBLISH went out only once its packet id was on disk, so nothing needs to settle.
    let mut subscriber = RawClient::connect(port, service.clone(), &persistent("q2"))
        .await
        .unwrap();
    let first = next_publish(&mut subscriber).await;
    assert_eq!((first.payload.as_slice(), first.qos), (&b"m1"[..], 2));
    restart(&mut broker);
    // Resent with DUP under the same packet id, so the subscriber can tell it is the same.
    let mut subscriber = RawClient::connect(port, service.clone(), &persistent("q2"))
        .await
        .unwrap();
    let again = next_publish(&mut subscriber).await;
    assert_eq!(
        (again.payload.as_slice(), again.pkid, again.dup),
        (&b"m1"[..], first.pkid, true)
    );
    subscriber.send(&packets::pubrec(again.pkid)).await.unwrap();
    let pubrel = subscriber.recv_until(WAIT, |p| p.kind() == kind::PUBREL).await.unwrap();
    assert_eq!(pubrel.pkid(), first.pkid);
    restart(&mut broker);
    // The PUBREL went out only once the release was on disk: only the PUBREL is owed now,
    // never the message again.
    let mut subscriber = RawClient::connect(port, service.clone(), &persistent("q2"))
        .await
        .unwrap();
    let owed = subscriber.recv(WAIT).await.expect("the PUBREL again");
    assert_eq!((owed.kind(), owed.pkid()), (kind::PUBREL, first.pkid));
    subscriber.send(&packets::pubcomp(first.pkid)).await.unwrap();
    let later = subscriber
        .recv_until(Duration::from_millis(500), |p| p.kind() == kind::PUBLISH)
        .await;
    assert!(later.is_none(), "delivered again after PUBCOMP: {later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_resend_is_acknowledged_only_once_its_first_routing_is_done() {
    let fleet = TestFleet::new();
    let device = config_of(&fleet.device("d0"));
    let service = config(&ClientFiles::service(&fleet.service("backend")));
    // One message in flight and one queued fill the service's session; its publishers then wait
    // (for longer than this test runs) instead of finding it slow.
    let broker = start(
        &fleet.broker_config(),
        &[
            ("BROKER__LIMITS__MAX_INFLIGHT", "1"),
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", "1"),
            ("BROKER__LIMITS__SLOW_SUBSCRIBER_TIMEOUT_MS", "60000"),
        ],
    );
    let port = broker.port();
    let persistent = |id: &str| packets::connect(id, false, 60, None);
    let mut subscriber = persistent_subscriber(port, service.clone(), "s1", "devices/+/q", 1).await;

    let mut publisher = RawClient::connect(port, device.clone(), &persistent("d0"))
        .await
        .unwrap();
    for pkid in [1, 2] {
        publisher
            .send(&Publish::new("devices/d0/q", b"fill", 1, pkid).bytes())
            .await
            .unwrap();
        publisher
            .recv_until(WAIT, |p| p.kind() == kind::PUBACK)
            .await
            .expect("PUBACK");
    }
    let first = next_publish(&mut subscriber).await;
    // The QoS 2 message waits for room; the publisher's connection drops meanwhile.
    publisher
        .send(&Publish::new("devices/d0/q", b"m", 2, 7).bytes())
        .await
        .unwrap();
    assert!(
        publisher
            .recv_until(Duration::from_millis(300), |p| p.kind() == kind::PUBREC)
            .await
            .is_none(),
        "PUBREC before the message was queued"
    );
    drop(publisher);
    // Back on a new connection, the resend must not be acknowledged while the first routing
    // still waits: a crash then would lose a message the device was told was received.
    let mut publisher = RawClient::connect(port, device.clone(), &persistent("d0"))
        .await
        .unwrap();
    resend_qos2(&mut publisher, "devices/d0/q", b"m", 7).await;
    assert!(
        publisher
            .recv_until(Duration::from_millis(500), |p| p.kind() == kind::PUBREC)
            .await
            .is_none(),
        "the resend was acknowledged before its first routing completed"
    );
    // Room at the subscriber: the first routing completes, and the PUBREC comes.
    subscriber.send(&packets::puback(first.pkid)).await.unwrap();
    let pubrec = publisher
        .recv_until(WAIT, |p| p.kind() == kind::PUBREC)
        .await
        .expect("PUBREC");
    assert_eq!(pubrec.pkid(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_1_delivery_in_flight_at_a_kill_is_resent_with_dup_under_its_packet_id() {
    let fleet = TestFleet::new();
    let device = config_of(&fleet.device("d0"));
    let service = config(&ClientFiles::service(&fleet.service("backend")));
    let config = fleet.broker_config();
    let mut broker = start(&config, &[]);
    let port = broker.port();
    let persistent = |id: &str| packets::connect(id, false, 60, None);
    let mut subscriber = persistent_subscriber(port, service.clone(), "s1", "devices/+/q1", 1).await;
    let mut publisher = RawClient::connect(port, device.clone(), &packets::connect("d0", true, 60, None))
        .await
        .unwrap();
    publisher
        .send(&Publish::new("devices/d0/q1", b"once", 1, 1).bytes())
        .await
        .unwrap();
    publisher
        .recv_until(WAIT, |p| p.kind() == kind::PUBACK)
        .await
        .expect("PUBACK");
    let first = next_publish(&mut subscriber).await;
    // A retained QoS 1 publish's PUBACK waits for the store, which by then has everything
    // recorded before it: the delivery's packet id too.
    let sync = Publish {
        retain: true,
        ..Publish::new("devices/d0/sync", b"s", 1, 2)
    };
    publisher.send(&sync.bytes()).await.unwrap();
    publisher
        .recv_until(WAIT, |p| p.kind() == kind::PUBACK && p.pkid() == 2)
        .await
        .expect("PUBACK");
    broker.kill();
    let listen = format!("127.0.0.1:{port}");
    let _broker = start(&config, &[("BROKER__LISTEN", &listen)]);
    let mut subscriber = RawClient::connect(port, service, &persistent("s1")).await.unwrap();
    let again = next_publish(&mut subscriber).await;
    assert_eq!(
        (again.payload.as_slice(), again.pkid, again.dup),
        (&b"once"[..], first.pkid, true),
        "resent as the same message"
    );
}
