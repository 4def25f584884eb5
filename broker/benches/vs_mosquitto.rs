//! Our broker next to its two yardsticks, on the same certificates and machine, in one run:
//! Mosquitto 2 (Debian's package, mTLS, identity as username, pattern ACL) and rumqttd 0.20 run
//! standalone with its own TLS listener (`cargo install rumqttd --version 0.20.0`).
//!
//! Run: `cargo bench -p broker --bench vs_mosquitto` (`BENCH_TARGETS=ours,mosquitto` to choose). Each broker is pinned to core 0, this load
//! generator to core 1 (a single-threaded runtime and a minimal hand-written MQTT client, so the
//! client is not the bottleneck). Prints medians of `BENCH_RUNS` (default 3) runs:
//! - full mTLS handshakes + CONNECT/CONNACK per second at concurrency 64 (no resumption);
//! - QoS 1 and QoS 0 end to end, 64-byte payloads, 8 device publishers, 1 service subscriber;
//! - broker RSS per idle mTLS session with `BENCH_IDLE_SESSIONS` (default 10000) held. What an
//!   idle session has done is `BENCH_IDLE`: `connect` (default: CONNECT/CONNACK, nothing else),
//!   `subscribe` (also subscribed to its own `devices/<id>/cmd`, as a device waiting for
//!   commands is; with us that opens its router link) or `handshake` (the mTLS handshake only).

use std::io::Write as _;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{tls_config, BrokerProcess, ClientFiles, TestFleet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

const HANDSHAKE_CONCURRENCY: usize = 64;
const PUBLISHERS: usize = 8;
const PAYLOAD: [u8; 64] = [b'x'; 64];

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Re-runs this benchmark pinned to core 1 (the brokers get core 0).
fn pin_self() {
    if std::env::var_os("BENCH_PINNED").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("BENCH_PINNED", "1")
        .status()
        .expect("taskset");
    std::process::exit(status.code().unwrap_or(1));
}

/// A broker under test.
struct Target {
    name: &'static str,
    port: u16,
    pid: u32,
    /// Client ids must match certificates (ours) or are free (the others).
    binds_client_id: bool,
    _process: Box<dyn std::any::Any>,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ours(fleet: &TestFleet) -> Target {
    let broker = BrokerProcess::start_pinned(
        Path::new(env!("CARGO_BIN_EXE_broker")),
        &fleet.broker_config(),
        &[
            ("RUST_LOG", "warn,broker::listener=info"),
            ("BROKER__LIMITS__MAX_CONNECTIONS", "20000"),
        ],
        Some("0"),
    );
    Target {
        name: "ours",
        port: broker.port(),
        pid: broker.pid(),
        binds_client_id: true,
        _process: Box::new(broker),
    }
}

fn mosquitto(fleet: &TestFleet) -> Target {
    let binary = e2e::require_tool("mosquitto", "mosquitto");
    let port = free_port();
    let dir = fleet.path().join("mosquitto");
    std::fs::create_dir_all(&dir).unwrap();
    let broker = fleet.broker_dir();
    std::fs::write(
        dir.join("acl"),
        "pattern readwrite devices/%u/#\nuser ingest\ntopic readwrite #\n",
    )
    .unwrap();
    let config = format!(
        "user root\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nuse_identity_as_username true\nset_tcp_nodelay true\nacl_file {acl}\nmax_queued_messages 0\npersistence false\nlog_dest none\n",
        ca = broker.join("device-ca.crt").display(),
        cert = broker.join("broker.crt").display(),
        key = broker.join("broker.key").display(),
        acl = dir.join("acl").display(),
    );
    std::fs::write(dir.join("mosquitto.conf"), config).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(binary)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    Target {
        name: "mosquitto",
        port,
        pid: child.id(),
        binds_client_id: false,
        _process: Box::new(KillOnDrop(child)),
    }
}

fn rumqttd(fleet: &TestFleet) -> Option<Target> {
    let binary = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/rumqttd"))
        .filter(|p| p.is_file())?;
    let port = free_port();
    let broker = fleet.broker_dir();
    let config = format!(
        "id = 0\n[router]\nid = 0\nmax_connections = 20010\nmax_outgoing_packet_count = 200\nmax_segment_size = 104857600\nmax_segment_count = 10\n\n[v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n[v4.1.tls]\ncapath = \"{ca}\"\ncertpath = \"{cert}\"\nkeypath = \"{key}\"\n[v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 20480\nmax_inflight_count = 500\ndynamic_filters = true\n",
        ca = broker.join("device-ca.crt").display(),
        cert = broker.join("broker.crt").display(),
        key = broker.join("broker.key").display(),
    );
    let path = fleet.path().join("rumqttd.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(binary)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(port);
    Some(Target {
        name: "rumqttd",
        port,
        pid: child.id(),
        binds_client_id: false,
        _process: Box::new(KillOnDrop(child)),
    })
}

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend(body);
    packet
}

fn publish_packet(topic: &str, qos: u8, pkid: u16, out: &mut Vec<u8>) {
    out.push(0x30 | (qos << 1));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + PAYLOAD.len();
    remaining_length(len, out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(&PAYLOAD);
}

/// Subscribes to one filter and waits for a SUBACK granting it.
async fn subscribe(tls: &mut TlsStream<TcpStream>, filter: &str, qos: u8) -> std::io::Result<()> {
    let mut packet = vec![0x82];
    remaining_length(2 + 2 + filter.len() + 1, &mut packet);
    packet.extend_from_slice(&[0x00, 0x01]);
    packet.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    packet.extend_from_slice(filter.as_bytes());
    packet.push(qos);
    tls.write_all(&packet).await?;
    tls.flush().await?;
    let mut suback = [0u8; 5];
    tls.read_exact(&mut suback).await?;
    if suback[0] != 0x90 || suback[4] == 0x80 {
        return Err(std::io::Error::other(format!("SUBACK {suback:02x?}")));
    }
    Ok(())
}

/// A completed mTLS handshake, no MQTT yet.
async fn handshake(port: u16, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    // The server completes its side when it reads our Finished: send it now.
    tls.flush().await?;
    Ok(tls)
}

/// A connected MQTT session over mTLS (CONNACK checked).
async fn open(port: u16, config: Arc<rustls::ClientConfig>, client_id: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tls = handshake(port, config).await?;
    tls.write_all(&connect_packet(client_id)).await?;
    tls.flush().await?;
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).await?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("CONNACK {connack:02x?}")));
    }
    Ok(tls)
}

fn client_config(files: &ClientFiles) -> Arc<rustls::ClientConfig> {
    let mut config = tls_config(files);
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Splits MQTT packets out of `buf`; calls `each(first_byte, body)`; keeps a partial tail.
fn for_each_packet(buf: &mut Vec<u8>, mut each: impl FnMut(u8, &[u8])) {
    let mut at = 0;
    loop {
        let (mut len, mut shift, mut i) = (0usize, 0, at + 1);
        let complete = loop {
            let Some(byte) = buf.get(i) else { break false };
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            i += 1;
            if byte & 0x80 == 0 {
                break true;
            }
        };
        if !complete || buf.len() < i + len {
            break;
        }
        each(buf[at], &buf[i..i + len]);
        at = i + len;
    }
    buf.drain(..at);
}

async fn handshakes_per_second(target: &Target, configs: &[(Arc<rustls::ClientConfig>, String)], seconds: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = configs
        .iter()
        .cloned()
        .map(|(config, id)| {
            let (done, port) = (done.clone(), target.port);
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if let Ok(mut tls) = open(port, config.clone(), &id).await {
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = tls.write_all(&[0xe0, 0x00]).await;
                        let _ = tls.flush().await;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// How long the subscriber waits for the next byte before counting the rest as lost. Long on
/// purpose: a delivery stall (see `max_gap`) must not be mistaken for loss.
const LOSS_CUTOFF: Duration = Duration::from_secs(15);

/// One throughput run: messages per second end to end, messages that never arrived, and the
/// longest pause in delivery.
struct Throughput {
    rate: f64,
    lost: usize,
    max_gap: Duration,
}

/// Messages per second end to end and messages lost.
async fn throughput(
    target: &Target,
    publishers: &[(Arc<rustls::ClientConfig>, String)],
    cert_ids: &[String],
    subscriber: &(Arc<rustls::ClientConfig>, String),
    qos: u8,
    per_publisher: usize,
) -> Throughput {
    let mut sub = open(target.port, subscriber.0.clone(), &subscriber.1)
        .await
        .expect("subscriber connects");
    let filter = "devices/+/telemetry";
    subscribe(&mut sub, filter, qos).await.expect("subscribed");

    let expected = per_publisher * publishers.len();
    let receiver = tokio::spawn(async move {
        let (mut received, mut buf, mut chunk, mut acks) = (0usize, Vec::new(), vec![0u8; 64 * 1024], Vec::new());
        let mut last = Instant::now();
        let mut max_gap = Duration::ZERO;
        while received < expected {
            let n = match tokio::time::timeout(LOSS_CUTOFF, sub.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            max_gap = max_gap.max(last.elapsed());
            buf.extend_from_slice(&chunk[..n]);
            for_each_packet(&mut buf, |first, body| {
                if first >> 4 == 3 {
                    received += 1;
                    if (first >> 1) & 3 == 1 {
                        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        acks.extend_from_slice(&[0x40, 0x02, body[2 + topic_len], body[3 + topic_len]]);
                    }
                }
            });
            if !acks.is_empty() {
                let _ = sub.write_all(&acks).await;
                let _ = sub.flush().await;
                acks.clear();
            }
            last = Instant::now();
        }
        (received, last, max_gap)
    });

    let started = Instant::now();
    let mut senders = Vec::new();
    for ((config, client_id), cert_id) in publishers.iter().cloned().zip(cert_ids.iter().cloned()) {
        let port = target.port;
        senders.push(tokio::spawn(async move {
            let tls = open(port, config, &client_id).await.expect("publisher connects");
            let topic = format!("devices/{cert_id}/telemetry");
            let (mut rd, mut wr) = tokio::io::split(tls);
            let window = Arc::new(Semaphore::new(if qos == 1 { 500 } else { Semaphore::MAX_PERMITS }));
            let acker = {
                let window = window.clone();
                tokio::spawn(async move {
                    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 16 * 1024]);
                    while let Ok(n) = rd.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let mut acked = 0;
                        for_each_packet(&mut buf, |first, _| acked += usize::from(first >> 4 == 4));
                        window.add_permits(acked);
                    }
                })
            };
            let mut out = Vec::with_capacity(64 * 128);
            let mut pkid: u16 = 0;
            for sent in 0..per_publisher {
                if qos == 1 {
                    // A broker that stops acknowledging ends the run (counted as lost), not the bench.
                    match tokio::time::timeout(Duration::from_secs(10), window.acquire()).await {
                        Ok(Ok(permit)) => permit.forget(),
                        _ => break,
                    }
                }
                pkid = pkid.checked_add(1).unwrap_or(1);
                publish_packet(&topic, qos, pkid, &mut out);
                if out.len() >= 64 * 100 || sent + 1 == per_publisher {
                    // Without the flush the last records can stay in rustls's buffer.
                    wr.write_all(&out).await.expect("publish");
                    wr.flush().await.expect("publish");
                    out.clear();
                }
            }
            (wr, acker)
        }));
    }
    let mut keep = Vec::new();
    for sender in senders {
        keep.push(sender.await.expect("publisher"));
    }
    let (received, last, max_gap) = receiver.await.expect("subscriber");
    for (_, acker) in keep {
        acker.abort();
    }
    let seconds = last.duration_since(started).as_secs_f64().max(1e-3);
    Throughput {
        rate: received as f64 / seconds,
        lost: expected - received,
        max_gap,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What each idle session has done before it is held (`BENCH_IDLE`).
#[derive(Clone, Copy)]
enum IdleMode {
    /// The mTLS handshake only.
    Handshake,
    /// CONNECT/CONNACK.
    Connect,
    /// CONNECT/CONNACK and a subscription to its own command topic.
    Subscribe,
}

impl IdleMode {
    fn from_env() -> Self {
        match std::env::var("BENCH_IDLE").as_deref() {
            Ok("handshake") => IdleMode::Handshake,
            Ok("subscribe") => IdleMode::Subscribe,
            Ok("connect") | Err(_) => IdleMode::Connect,
            Ok(other) => panic!("BENCH_IDLE: unknown mode {other:?} (connect, subscribe, handshake)"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            IdleMode::Handshake => "after the handshake only",
            IdleMode::Connect => "connected",
            IdleMode::Subscribe => "connected and subscribed to devices/<id>/cmd",
        }
    }

    /// Opens one session to this point.
    async fn open(
        self,
        port: u16,
        config: Arc<rustls::ClientConfig>,
        client_id: &str,
        cert_id: &str,
    ) -> Option<TlsStream<TcpStream>> {
        match self {
            IdleMode::Handshake => handshake(port, config).await.ok(),
            IdleMode::Connect => open(port, config, client_id).await.ok(),
            IdleMode::Subscribe => {
                let mut tls = open(port, config, client_id).await.ok()?;
                subscribe(&mut tls, &format!("devices/{cert_id}/cmd"), 1).await.ok()?;
                Some(tls)
            }
        }
    }
}

async fn rss_per_idle_session(
    target: &Target,
    sessions: &[(Arc<rustls::ClientConfig>, String)],
    cert_ids: &[String],
    mode: IdleMode,
) -> (f64, usize) {
    let before = rss_kib(target.pid);
    let gate = Arc::new(Semaphore::new(HANDSHAKE_CONCURRENCY));
    let tasks: Vec<_> = sessions
        .iter()
        .cloned()
        .zip(cert_ids.iter().cloned())
        .map(|((config, client_id), cert_id)| {
            let (gate, port) = (gate.clone(), target.port);
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                mode.open(port, config, &client_id, &cert_id).await
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in tasks {
        if let Ok(Some(tls)) = task.await {
            held.push(tls);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(target.pid);
    let per = (after.saturating_sub(before)) as f64 / held.len().max(1) as f64;
    (per, held.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Figures {
    name: &'static str,
    handshakes: f64,
    qos1: f64,
    qos1_lost: usize,
    qos1_max_gap: Duration,
    qos0: f64,
    qos0_lost: usize,
    rss: f64,
    idle_held: usize,
}

async fn measure(target: Target, fleet: &Fleet, runs: usize, per_publisher: usize) -> Figures {
    // Our broker requires client id = certificate id; the others get distinct client ids so two
    // brokers' sessions never meet. Topics always use the certificate id (Mosquitto's
    // `devices/%u/#` ACL takes %u from the certificate).
    let pick = |list: &Vec<(Arc<rustls::ClientConfig>, String)>| -> Vec<(Arc<rustls::ClientConfig>, String)> {
        list.iter()
            .map(|(c, id)| {
                (
                    c.clone(),
                    if target.binds_client_id {
                        id.clone()
                    } else {
                        format!("{}-{id}", target.name)
                    },
                )
            })
            .collect()
    };
    let cert_ids: Vec<String> = fleet.publishers.iter().map(|(_, id)| id.clone()).collect();
    let (handshake, publishers, idle) = (pick(&fleet.handshake), pick(&fleet.publishers), pick(&fleet.idle));
    let subscriber = (
        fleet.subscriber.0.clone(),
        if target.binds_client_id {
            fleet.subscriber.1.clone()
        } else {
            format!("{}-ingest", target.name)
        },
    );
    let mut hs = Vec::new();
    let (mut q1, mut q0) = (Vec::new(), Vec::new());
    let (mut q1_lost, mut q0_lost, mut q1_max_gap) = (0, 0, Duration::ZERO);
    for _ in 0..runs {
        hs.push(handshakes_per_second(&target, &handshake, 3).await);
        let qos1 = throughput(&target, &publishers, &cert_ids, &subscriber, 1, per_publisher).await;
        q1.push(qos1.rate);
        q1_lost = q1_lost.max(qos1.lost);
        q1_max_gap = q1_max_gap.max(qos1.max_gap);
        let qos0 = throughput(&target, &publishers, &cert_ids, &subscriber, 0, per_publisher).await;
        q0.push(qos0.rate);
        q0_lost = q0_lost.max(qos0.lost);
    }
    let idle_ids: Vec<String> = fleet.idle.iter().map(|(_, id)| id.clone()).collect();
    let (rss, idle_held) = rss_per_idle_session(&target, &idle, &idle_ids, IdleMode::from_env()).await;
    let figures = Figures {
        name: target.name,
        handshakes: median(hs),
        qos1: median(q1),
        qos1_lost: q1_lost,
        qos1_max_gap: q1_max_gap,
        qos0: median(q0),
        qos0_lost: q0_lost,
        rss,
        idle_held,
    };
    println!(
        "{:<10} handshakes/s {:>8.0}  qos1 msg/s {:>9.0} (lost {}, longest delivery gap {} ms)  qos0 msg/s {:>9.0} (lost {})  RSS/idle session {:>6.1} KiB ({} held)",
        figures.name,
        figures.handshakes,
        figures.qos1,
        figures.qos1_lost,
        figures.qos1_max_gap.as_millis(),
        figures.qos0,
        figures.qos0_lost,
        figures.rss,
        figures.idle_held
    );
    let _ = std::io::stdout().flush();
    figures
}

/// Client configurations, each with the id its certificate carries.
struct Fleet {
    handshake: Vec<(Arc<rustls::ClientConfig>, String)>,
    publishers: Vec<(Arc<rustls::ClientConfig>, String)>,
    subscriber: (Arc<rustls::ClientConfig>, String),
    idle: Vec<(Arc<rustls::ClientConfig>, String)>,
}

fn devices(fleet: &TestFleet, prefix: &str, count: usize) -> Vec<(Arc<rustls::ClientConfig>, String)> {
    let ids: Vec<String> = (1..=count).map(|n| format!("{prefix}{n:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    fleet
        .devices(&refs)
        .iter()
        .zip(ids)
        .map(|(bundle, id)| (client_config(&ClientFiles::device(bundle)), id))
        .collect()
}

fn main() {
    pin_self();
    let runs = env_number("BENCH_RUNS", 3).max(1);
    let per_publisher = env_number("BENCH_MESSAGES_PER_PUBLISHER", 25_000);
    let idle_sessions = env_number("BENCH_IDLE_SESSIONS", 10_000);
    let test_fleet = TestFleet::new();
    let fleet = Fleet {
        handshake: devices(&test_fleet, "hs-", HANDSHAKE_CONCURRENCY),
        publishers: devices(&test_fleet, "pub-", PUBLISHERS),
        subscriber: (
            client_config(&ClientFiles::service(&test_fleet.service("ingest"))),
            "ingest".into(),
        ),
        idle: devices(&test_fleet, "idle-", idle_sessions),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "brokers on core 0, load on core 1; medians of {runs} runs; {PUBLISHERS} publishers x {per_publisher} messages of {} B; idle sessions {}",
        PAYLOAD.len(),
        IdleMode::from_env().describe()
    );
    let targets = std::env::var("BENCH_TARGETS").unwrap_or_else(|_| "ours,mosquitto,rumqttd".into());
    let mut all = Vec::new();
    for name in targets.split(',') {
        let target = match name.trim() {
            "ours" => Some(ours(&test_fleet)),
            "mosquitto" => Some(mosquitto(&test_fleet)),
            "rumqttd" => rumqttd(&test_fleet).or_else(|| {
                println!("rumqttd: not installed (cargo install rumqttd --version 0.20.0), left out of this run");
                None
            }),
            other => panic!("BENCH_TARGETS: unknown broker {other:?} (ours, mosquitto, rumqttd)"),
        };
        if let Some(target) = target {
            all.push(runtime.block_on(measure(target, &fleet, runs, per_publisher)));
        }
    }
    let Some((ours, others)) = all.split_first() else {
        return;
    };
    for other in others {
        println!(
            "ours vs {:<10} handshakes x{:.2}  qos1 x{:.2}  qos0 x{:.2}  RSS/session x{:.2}",
            other.name,
            ours.handshakes / other.handshakes,
            ours.qos1 / other.qos1,
            ours.qos0 / other.qos0,
            ours.rss / other.rss.max(1e-9)
        );
    }
}
