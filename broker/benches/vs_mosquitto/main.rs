//! Our broker next to its yardsticks, on the same certificates and machine, in one run:
//! Mosquitto 2 (Debian's package, mTLS, identity as username, pattern ACL) and, when
//! `~/.cargo/bin/rumqttd` exists, rumqttd 0.20 standalone with its own TLS listener
//! (`cargo install rumqttd --version 0.20.0`).
//!
//! Run: `cargo bench -p broker --bench vs_mosquitto`. Every broker runs on the CPUs
//! `BENCH_BROKER_CPUS` (a `taskset` list, default `0`); this load generator re-executes itself on
//! `BENCH_LOAD_CPUS` (default `1`) with `BENCH_LOAD_THREADS` runtime threads (default 1) and the
//! minimal client of `e2e::raw`, so that the client is not the bottleneck. Each phase starts
//! every broker afresh, so that no figure depends on what an earlier phase left in its heap:
//! - handshakes and throughput, medians of `BENCH_RUNS` (default 3) runs: full mTLS handshakes
//!   with CONNECT/CONNACK per second at concurrency 64, no resumption; QoS 1 and QoS 0 end to
//!   end, 8 device publishers x `BENCH_MESSAGES_PER_PUBLISHER` (25,000) messages of 64 B to 1
//!   service on `devices/+/telemetry`, at most 500 QoS 1 messages unacknowledged per publisher,
//!   with the broker's CPU time per delivered message;
//! - idle memory: the broker's RSS per session with `BENCH_IDLE_SESSIONS` (10,000) held after
//!   CONNECT/CONNACK only, then after each also subscribed to its own `devices/<id>/cmd`, as a
//!   device waiting for commands is (`BENCH_IDLE=handshake`: the mTLS handshake only instead);
//! - sustained memory: `BENCH_SUSTAINED_MESSAGES` (10,000,000; 0 skips the phase) QoS 1
//!   messages of 256 B through the same closed loop, the broker's RSS after every million (a
//!   broker whose RSS passes `BENCH_RSS_CAP_MIB`, 4096, is stopped there and says so);
//! - open loop: 8 publishers x `BENCH_OPEN_LOOP_MESSAGES` (25,000; 0 skips) QoS 1 messages of
//!   64 B written without waiting for any PUBACK: delivered, lost and the broker's peak RSS;
//! - durability ([`durable`]), ours and Mosquitto with persistence on: QoS 1 to an online
//!   persistent subscriber, and the restart with `BENCH_DURABLE_QUEUED` (1,000,000; 0 skips)
//!   messages queued for an offline one: time until it accepts again and store size per message.
//!
//! `BENCH_TARGETS` (default `ours,mosquitto,mosquitto-default,rumqttd`) chooses the brokers.
//! Mosquitto runs with `max_queued_messages 0` (unlimited, so that it loses nothing);
//! `mosquitto-default` is Mosquitto at its default queue limit (1000 messages) and takes part in
//! the open loop only, to show what that limit drops. Our broker inherits `BROKER__*` overrides
//! from the environment (e.g. `BROKER__LIMITS__MAX_INFLIGHT=500`); the header lists them.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use e2e::raw::{kind, packets, split_packets, RawClient, RawPacket};
use e2e::raw5::{self, Parsed as _};
use e2e::{proc_status_kib, tls_config, BrokerProcess, ClientFiles, TestFleet};
use packets::Publish;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

mod durable;

/// Sessions opened (or subscribed) at once, in the handshake and idle memory phases.
const CONCURRENCY: usize = 64;
/// How long the handshake phase runs each time.
const HANDSHAKE_TIME: Duration = Duration::from_secs(3);
const PUBLISHERS: usize = 8;
/// The payload of the throughput and open-loop phases.
const SMALL_PAYLOAD: usize = 64;
/// The payload of the sustained memory phase.
const SUSTAINED_PAYLOAD: usize = 256;
/// QoS 1 messages a closed-loop publisher may have unacknowledged.
const WINDOW: usize = 500;
/// How long a closed-loop publisher waits for its window to open before it gives up (its
/// unsent messages then count as lost): a broker that stops acknowledging ends the run, not the
/// bench.
const WINDOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of PUBLISH packets a publisher gathers before it writes them.
const WRITE_BATCH: usize = 64 * 100;
/// How long the subscriber waits for the next byte before counting the rest as lost. Long on
/// purpose: a delivery stall (see `Delivery::max_gap`) must not be mistaken for loss.
const LOSS_CUTOFF: Duration = Duration::from_secs(15);
/// A sustained run stops once the broker's RSS passes this (`BENCH_RSS_CAP_MIB`): a broker that
/// acknowledges on receipt and queues without bound (Mosquitto with `max_queued_messages 0`)
/// would otherwise take the machine's memory.
const RSS_CAP_MIB: usize = 4096;
/// How often (messages delivered) a sustained run checks the RSS cap.
const RSS_CAP_EVERY: usize = 100_000;
/// How long publishers may still wait for PUBACKs once delivery has ended.
const ACK_GRACE: Duration = Duration::from_secs(1);
/// How long idle sessions are left before the broker's RSS is read, for it to settle.
const SETTLE: Duration = Duration::from_secs(2);
/// The sustained memory phase reads the broker's RSS after every this many messages delivered.
const RSS_EVERY: usize = 1_000_000;
const KEEPALIVE_SECONDS: u16 = 60;
/// The Mosquitto that takes part in the open loop only.
const MOSQUITTO_DEFAULT: &str = "mosquitto-default";
/// The brokers `BENCH_TARGETS` may name.
const TARGETS: [&str; 4] = ["ours", "mosquitto", MOSQUITTO_DEFAULT, "rumqttd"];

/// Clock ticks per second, the unit of the CPU times in `/proc/<pid>/stat`.
static CLOCK_TICKS: LazyLock<f64> = LazyLock::new(|| {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
});

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_text(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

/// Re-runs this benchmark on the load generator's CPUs, so that it never competes with a broker.
fn pin_self(cpus: &str) {
    if std::env::var_os("BENCH_PINNED").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = Command::new("taskset")
        .args(["-c", cpus])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("BENCH_PINNED", "1")
        .status()
        .expect("taskset");
    std::process::exit(status.code().unwrap_or(1));
}

/// A running broker under test; stopped when dropped.
struct Target {
    port: u16,
    pid: u32,
    /// Ours requires the client id to be the certificate's id; the others are given ids of their
    /// own (`<broker>-<certificate id>`).
    client_id_prefix: Option<&'static str>,
    /// The process's owner, which kills it when dropped.
    _process: Box<dyn std::any::Any>,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts broker `name` (one of [`TARGETS`]) on `cpus`.
fn start(name: &'static str, fleet: &TestFleet, cpus: &str) -> Target {
    match name {
        "ours" => ours(fleet, cpus),
        "mosquitto" => mosquitto(name, fleet, cpus, true, None),
        MOSQUITTO_DEFAULT => mosquitto(name, fleet, cpus, false, None),
        "rumqttd" => rumqttd(fleet, cpus),
        other => unreachable!("{other} is not in TARGETS"),
    }
}

fn ours(fleet: &TestFleet, cpus: &str) -> Target {
    // A store of its own per start, so that no phase inherits an earlier one's sessions.
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let store = fleet
        .path()
        .join(format!("store-{}", STARTS.fetch_add(1, Ordering::Relaxed)));
    ours_with(
        fleet,
        cpus,
        &[("BROKER__PERSISTENCE__DIR", store.to_str().expect("a UTF-8 path"))],
    )
}

/// Our broker with `env` added to the benchmark's own overrides.
fn ours_with(fleet: &TestFleet, cpus: &str, env: &[(&str, &str)]) -> Target {
    let mut all = vec![
        ("RUST_LOG", "warn,broker::listener=info,broker::store=info"),
        ("BROKER__LIMITS__MAX_CONNECTIONS", "20000"),
    ];
    all.extend_from_slice(env);
    let broker = BrokerProcess::start_pinned(
        Path::new(env!("CARGO_BIN_EXE_broker")),
        &fleet.broker_config(),
        &all,
        Some(cpus),
    );
    Target {
        port: broker.port(),
        pid: broker.pid(),
        client_id_prefix: None,
        _process: Box::new(broker),
    }
}

/// Mosquitto on the fleet's broker certificate; `unlimited_queue` lifts its default limit of
/// 1000 messages queued per session; `persistence` turns its persistence on, saving in that
/// directory (at its default autosave interval, and at exit) and listening on that port.
fn mosquitto(
    name: &'static str,
    fleet: &TestFleet,
    cpus: &str,
    unlimited_queue: bool,
    persistence: Option<(&Path, u16)>,
) -> Target {
    let binary = e2e::require_tool("mosquitto", "mosquitto");
    let port = persistence.map_or_else(free_port, |(_, port)| port);
    let dir = fleet.path().join(name);
    std::fs::create_dir_all(&dir).expect("mosquitto's directory");
    std::fs::write(
        dir.join("acl"),
        "pattern readwrite devices/%u/#\nuser ingest\ntopic readwrite #\n",
    )
    .expect("mosquitto's ACL");
    let broker = fleet.broker_dir();
    let config = format!(
        "user root\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nuse_identity_as_username true\nset_tcp_nodelay true\nacl_file {acl}\n{queue}{persistence}log_dest none\n",
        ca = broker.join("device-ca.crt").display(),
        cert = broker.join("broker.crt").display(),
        key = broker.join("broker.key").display(),
        acl = dir.join("acl").display(),
        queue = if unlimited_queue { "max_queued_messages 0\n" } else { "" },
        persistence = match persistence {
            Some((dir, _)) => format!("persistence true\npersistence_location {}/\n", dir.display()),
            None => "persistence false\n".into(),
        },
    );
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, config).expect("mosquitto's configuration");
    external(name, &binary, &path, port, cpus)
}

/// Where `cargo install rumqttd` put it, if it did.
fn rumqttd_binary() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/rumqttd"))
        .filter(|path| path.is_file())
}

fn rumqttd(fleet: &TestFleet, cpus: &str) -> Target {
    let binary = rumqttd_binary().expect("rumqttd is installed (checked with BENCH_TARGETS)");
    let port = free_port();
    let broker = fleet.broker_dir();
    let config = format!(
        "id = 0\n[router]\nid = 0\nmax_connections = 20010\nmax_outgoing_packet_count = 200\nmax_segment_size = 104857600\nmax_segment_count = 10\n\n[v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n[v4.1.tls]\ncapath = \"{ca}\"\ncertpath = \"{cert}\"\nkeypath = \"{key}\"\n[v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 20480\nmax_inflight_count = 500\ndynamic_filters = true\n",
        ca = broker.join("device-ca.crt").display(),
        cert = broker.join("broker.crt").display(),
        key = broker.join("broker.key").display(),
    );
    let path = fleet.path().join("rumqttd.toml");
    std::fs::write(&path, config).expect("rumqttd's configuration");
    external("rumqttd", &binary, &path, port, cpus)
}

/// Starts a third-party broker (`binary -c config`) on `cpus` and waits until it listens on `port`.
fn external(name: &'static str, binary: &Path, config: &Path, port: u16, cpus: &str) -> Target {
    let child = Command::new("taskset")
        .args(["-c", cpus])
        .arg(binary)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} does not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Target {
        port,
        pid: child.id(),
        client_id_prefix: Some(name),
        _process: Box::new(KillOnDrop(child)),
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A certificate to present, as a client configuration without TLS resumption (every handshake
/// is a full one).
#[derive(Clone)]
struct Credential {
    config: Arc<rustls::ClientConfig>,
    /// The id the certificate carries. Topics use it: Mosquitto's `devices/%u/#` ACL takes `%u`
    /// from the certificate, whatever the client id.
    cert_id: String,
}

impl Credential {
    fn new(files: &ClientFiles, cert_id: String) -> Self {
        let mut config = tls_config(files);
        config.resumption = rustls::client::Resumption::disabled();
        Self {
            config: Arc::new(config),
            cert_id,
        }
    }
}

/// The certificates every broker is measured with.
struct Fleet {
    handshake: Vec<Credential>,
    publishers: Vec<Credential>,
    service: Credential,
    idle: Vec<Credential>,
}

impl Fleet {
    fn new(fleet: &TestFleet, idle_sessions: usize) -> Self {
        Self {
            handshake: devices(fleet, "hs-", CONCURRENCY),
            publishers: devices(fleet, "pub-", PUBLISHERS),
            service: Credential::new(&ClientFiles::service(&fleet.service("ingest")), "ingest".into()),
            idle: devices(fleet, "idle-", idle_sessions),
        }
    }
}

fn devices(fleet: &TestFleet, prefix: &str, count: usize) -> Vec<Credential> {
    let ids: Vec<String> = (1..=count).map(|n| format!("{prefix}{n:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    fleet
        .devices(&refs)
        .iter()
        .zip(ids)
        .map(|(bundle, id)| Credential::new(&ClientFiles::device(bundle), id))
        .collect()
}

/// The MQTT version a load speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    V311,
    V5,
}

/// One client of one broker: where to connect, what to present, what to say.
#[derive(Clone)]
struct Session {
    port: u16,
    config: Arc<rustls::ClientConfig>,
    connect: Vec<u8>,
    cert_id: String,
}

impl Session {
    /// Handshake, CONNECT, CONNACK 0.
    async fn open(&self) -> io::Result<RawClient> {
        RawClient::connect(self.port, self.config.clone(), &self.connect).await
    }
}

impl Target {
    /// The client of `credential`; with `clean = false` its session outlives the connection.
    fn session_with(&self, credential: &Credential, clean: bool) -> Session {
        self.session_in(credential, clean, Protocol::V311)
    }

    /// [`Target::session_with`] speaking `protocol` (an MQTT 5 session that outlives the
    /// connection asks for a day).
    fn session_in(&self, credential: &Credential, clean: bool, protocol: Protocol) -> Session {
        let client_id = match self.client_id_prefix {
            None => credential.cert_id.clone(),
            Some(prefix) => format!("{prefix}-{}", credential.cert_id),
        };
        let connect = match protocol {
            Protocol::V311 => packets::connect(&client_id, clean, KEEPALIVE_SECONDS, None),
            Protocol::V5 => {
                let expiry = if clean { 0 } else { 86_400 };
                let props = raw5::Props::new().four(raw5::id::SESSION_EXPIRY_INTERVAL, expiry);
                raw5::connect(&client_id, clean, KEEPALIVE_SECONDS, &props, None)
            }
        };
        Session {
            port: self.port,
            config: credential.config.clone(),
            connect,
            cert_id: credential.cert_id.clone(),
        }
    }

    fn sessions(&self, credentials: &[Credential]) -> Vec<Session> {
        self.sessions_in(credentials, Protocol::V311)
    }

    fn sessions_in(&self, credentials: &[Credential], protocol: Protocol) -> Vec<Session> {
        credentials.iter().map(|c| self.session_in(c, true, protocol)).collect()
    }
}

/// Subscribes to `filter` and waits for a SUBACK that grants it.
async fn subscribe(client: &mut RawClient, filter: &str, qos: u8) -> io::Result<()> {
    subscribe_in(client, filter, qos, Protocol::V311).await
}

/// [`subscribe`] speaking `protocol`.
async fn subscribe_in(client: &mut RawClient, filter: &str, qos: u8, protocol: Protocol) -> io::Result<()> {
    let subscribe = match protocol {
        Protocol::V311 => packets::subscribe(1, &[(filter, qos)]),
        Protocol::V5 => raw5::subscribe(1, &raw5::Props::new(), &[(filter, qos)]),
    };
    client.send(&subscribe).await?;
    match client
        .recv_until(Duration::from_secs(10), |p| p.kind() == kind::SUBACK)
        .await
    {
        Some(suback) if granted(&suback, protocol) => Ok(()),
        other => Err(io::Error::other(format!("no SUBACK granting {filter}: {other:?}"))),
    }
}

/// Whether a SUBACK for one filter granted it (MQTT 5 puts its properties before the codes).
fn granted(suback: &RawPacket, protocol: Protocol) -> bool {
    let code = match protocol {
        Protocol::V311 => suback.body.get(2).copied(),
        Protocol::V5 => suback.codes().first().copied(),
    };
    code.is_some_and(|code| code < 0x80)
}

/// The packet id of a QoS 1 PUBLISH, from its first byte and body as [`split_packets`] gives them.
fn qos1_pkid(first: u8, body: &[u8]) -> Option<u16> {
    if (first >> 1) & 3 != 1 {
        return None;
    }
    let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
    Some(u16::from_be_bytes([body[at], body[at + 1]]))
}

/// Writes and flushes what `out` holds (rustls would otherwise keep the last records), then
/// empties it.
async fn write_out(wr: &mut (impl AsyncWrite + Unpin), out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    wr.write_all(out).await?;
    wr.flush().await?;
    out.clear();
    Ok(())
}

/// CPU time the process has used, user + system, in seconds (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from its closing parenthesis, after
    // which field 3 comes first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |field: usize| fields.get(field - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(14) + ticks(15)) as f64 / *CLOCK_TICKS
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// The highest RSS of a process while a phase runs, read every 10 ms on a thread of its own
/// (the load generator's runtime is too busy then to keep that rhythm).
struct PeakRss {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(10));
                }
                peak
            })
        };
        Self { stop, sampler }
    }

    /// The peak, KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().expect("the RSS sampler")
    }
}

/// Runs `step` on every item, [`CONCURRENCY`] at a time; keeps what it returned.
async fn at_concurrency<T, R, F, Fut>(items: Vec<T>, step: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<R>> + Send + 'static,
{
    let (gate, step) = (Arc::new(Semaphore::new(CONCURRENCY)), Arc::new(step));
    let tasks: Vec<_> = items
        .into_iter()
        .map(|item| {
            let (gate, step) = (gate.clone(), step.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                step(item).await
            })
        })
        .collect();
    let mut done = Vec::new();
    for task in tasks {
        if let Ok(Some(result)) = task.await {
            done.push(result);
        }
    }
    done
}

/// Full handshakes + CONNECT/CONNACK per second, one worker per session looping for
/// [`HANDSHAKE_TIME`].
async fn handshakes_per_second(sessions: Vec<Session>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + HANDSHAKE_TIME;
    let workers: Vec<_> = sessions
        .into_iter()
        .map(|session| {
            let done = done.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if let Ok(mut client) = session.open().await {
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = client.send(&packets::DISCONNECT).await;
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

/// What the publishers send, and how.
#[derive(Clone, Copy)]
struct Load {
    qos: u8,
    payload: usize,
    per_publisher: usize,
    /// QoS 1 messages a publisher may have unacknowledged; `None`: no limit (open loop).
    window: Option<usize>,
    /// Read the broker's RSS after every this many messages delivered.
    rss_every: Option<usize>,
    /// The service subscribes with a persistent session (what the store keeps).
    persistent_subscriber: bool,
    /// What every client speaks.
    protocol: Protocol,
}

impl Load {
    /// Publishers that keep at most [`WINDOW`] QoS 1 messages unacknowledged.
    fn closed_loop(qos: u8, payload: usize, per_publisher: usize) -> Self {
        Self {
            qos,
            payload,
            per_publisher,
            window: (qos == 1).then_some(WINDOW),
            rss_every: None,
            persistent_subscriber: false,
            protocol: Protocol::V311,
        }
    }
}

/// What one load delivered, and what it cost the broker.
struct Delivery {
    delivered: usize,
    lost: usize,
    /// PUBACKs the publishers received.
    acked: usize,
    /// Messages per second end to end.
    rate: f64,
    /// The longest pause in delivery.
    max_gap: Duration,
    /// The broker's CPU time (user + system) per delivered message, microseconds. The kernel
    /// counts it in clock ticks (10 ms at 100 per second): a run needs a few hundred ms of the
    /// broker's CPU for two significant digits.
    cpu_us: f64,
    /// The broker's RSS in KiB by messages delivered: once every connection was open (at 0),
    /// after every `Load::rss_every` and at the end.
    rss_kib: Vec<(usize, u64)>,
    /// Stopped early because the broker's RSS passed the cap (not a loss).
    over_cap: bool,
}

/// Devices publish on `devices/<id>/telemetry` to the service, subscribed to
/// `devices/+/telemetry`; the clock and the broker's CPU time start once every connection is
/// open.
async fn deliver(target: &Target, fleet: &Fleet, load: Load) -> Delivery {
    let mut subscriber = target
        .session_in(&fleet.service, !load.persistent_subscriber, load.protocol)
        .open()
        .await
        .expect("the service connects");
    subscribe_in(&mut subscriber, "devices/+/telemetry", load.qos, load.protocol)
        .await
        .expect("the service subscribes");
    let mut publishers = Vec::new();
    for session in target.sessions_in(&fleet.publishers, load.protocol) {
        let topic = format!("devices/{}/telemetry", session.cert_id);
        publishers.push((session.open().await.expect("a device connects"), topic));
    }
    let (pid, expected) = (target.pid, load.per_publisher * publishers.len());
    let rss_at_open = rss_kib(pid);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let receiver = tokio::spawn(receive(subscriber, expected, load.rss_every, pid, started));
    let acked = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = publishers
        .into_iter()
        .map(|(client, topic)| tokio::spawn(publish(client, topic, load, acked.clone())))
        .collect();
    let received = receiver.await.expect("the subscriber");
    let cpu = cpu_seconds(pid) - cpu_before;
    // Delivery is over (or counted lost): a publisher still waiting for PUBACKs after the grace
    // is stopped; the others keep their connections until the end of the run.
    let grace = tokio::time::Instant::now() + ACK_GRACE;
    let mut connections = Vec::new();
    for mut sender in senders {
        match tokio::time::timeout_at(grace, &mut sender).await {
            Ok(Ok(halves)) => connections.push(halves),
            _ => sender.abort(),
        }
    }
    let mut rss = vec![(0, rss_at_open)];
    rss.extend(received.rss_kib);
    Delivery {
        over_cap: received.over_cap,
        delivered: received.delivered,
        lost: if received.over_cap {
            0
        } else {
            expected - received.delivered
        },
        acked: acked.load(Ordering::Relaxed),
        rate: received.delivered as f64 / received.last.duration_since(started).as_secs_f64().max(1e-3),
        max_gap: received.max_gap,
        cpu_us: cpu * 1e6 / received.delivered.max(1) as f64,
        rss_kib: rss,
    }
}

/// What the subscriber saw.
struct Received {
    delivered: usize,
    /// When the last bytes came.
    last: Instant,
    max_gap: Duration,
    /// The broker's RSS in KiB after every `rss_every` messages and at the end.
    rss_kib: Vec<(usize, u64)>,
    /// Stopped early: the broker's RSS passed the cap.
    over_cap: bool,
}

/// Reads and acknowledges PUBLISHes until `expected` arrived or nothing came for [`LOSS_CUTOFF`]
/// (or, when sampling RSS, the broker's RSS passed the cap).
async fn receive(
    mut client: RawClient,
    expected: usize,
    rss_every: Option<usize>,
    pid: u32,
    started: Instant,
) -> Received {
    // Reading the stream directly, after what the client had already read past its last packet.
    let (mut buf, mut chunk, mut acks) = (client.take_buffered(), vec![0u8; 64 * 1024], Vec::new());
    let (mut delivered, mut last, mut max_gap, mut rss) = (0, started, Duration::ZERO, Vec::new());
    let cap_kib = env_number("BENCH_RSS_CAP_MIB", RSS_CAP_MIB) as u64 * 1024;
    let (mut next_cap_check, mut over_cap) = (RSS_CAP_EVERY, false);
    while delivered < expected {
        let n = match tokio::time::timeout(LOSS_CUTOFF, client.tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        max_gap = max_gap.max(last.elapsed());
        buf.extend_from_slice(&chunk[..n]);
        split_packets(&mut buf, |first, body| {
            if first >> 4 == kind::PUBLISH {
                delivered += 1;
                if let Some(pkid) = qos1_pkid(first, body) {
                    acks.extend_from_slice(&packets::puback(pkid));
                }
            }
        });
        if let Some(every) = rss_every {
            while delivered >= (rss.len() + 1) * every {
                rss.push(((rss.len() + 1) * every, rss_kib(pid)));
            }
            if delivered >= next_cap_check {
                next_cap_check += RSS_CAP_EVERY;
                if rss_kib(pid) > cap_kib {
                    over_cap = true;
                    break;
                }
            }
        }
        if write_out(&mut client.tls, &mut acks).await.is_err() {
            break;
        }
        last = Instant::now();
    }
    if rss_every.is_some() && rss.last().is_none_or(|&(at, _)| at != delivered) {
        rss.push((delivered, rss_kib(pid)));
    }
    Received {
        delivered,
        last,
        max_gap,
        rss_kib: rss,
        over_cap,
    }
}

type Halves = (ReadHalf<TlsStream<TcpStream>>, WriteHalf<TlsStream<TcpStream>>);

/// Publishes `load.per_publisher` messages on `topic`, within the load's window if it has one,
/// while counting PUBACKs into `acked`. Returns once every message was written and every QoS 1
/// one acknowledged; the connection is handed back to stay open until the run ends.
async fn publish(client: RawClient, topic: String, load: Load, acked: Arc<AtomicUsize>) -> Halves {
    let (mut rd, mut wr) = tokio::io::split(client.tls);
    let window = load.window.map(Semaphore::new);
    let expected_acks = if load.qos == 0 { 0 } else { load.per_publisher };
    let count_acks = async {
        let (mut buf, mut chunk, mut mine) = (Vec::new(), vec![0u8; 16 * 1024], 0);
        while mine < expected_acks {
            match rd.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
            let mut now = 0;
            split_packets(&mut buf, |first, _| now += usize::from(first >> 4 == kind::PUBACK));
            mine += now;
            acked.fetch_add(now, Ordering::Relaxed);
            if let Some(window) = &window {
                window.add_permits(now);
            }
        }
        rd
    };
    let write_all = async {
        let payload = vec![b'x'; load.payload];
        let (mut out, mut pkid) = (Vec::with_capacity(2 * WRITE_BATCH), 0u16);
        for sent in 0..load.per_publisher {
            if let Some(window) = &window {
                if window.try_acquire().map(|permit| permit.forget()).is_err() {
                    // About to wait for PUBACKs: what they are for must be on the wire first.
                    if write_out(&mut wr, &mut out).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(WINDOW_TIMEOUT, window.acquire()).await {
                        Ok(Ok(permit)) => permit.forget(),
                        _ => break,
                    }
                }
            }
            pkid = pkid.checked_add(1).unwrap_or(1);
            match load.protocol {
                Protocol::V311 => Publish::new(&topic, &payload, load.qos, pkid).write(&mut out),
                Protocol::V5 => raw5::write_publish(&mut out, &topic, &payload, load.qos, pkid),
            }
            if (out.len() >= WRITE_BATCH || sent + 1 == load.per_publisher)
                && write_out(&mut wr, &mut out).await.is_err()
            {
                break;
            }
        }
        wr
    };
    tokio::join!(count_acks, write_all)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One QoS's figures over the runs.
struct Flow {
    /// Median messages per second.
    rate: f64,
    /// Median broker CPU time per delivered message, microseconds.
    cpu_us: f64,
    /// The worst run's.
    lost: usize,
    /// The worst run's.
    max_gap: Duration,
}

impl Flow {
    fn of(runs: Vec<Delivery>) -> Self {
        Self {
            rate: median(runs.iter().map(|r| r.rate).collect()),
            cpu_us: median(runs.iter().map(|r| r.cpu_us).collect()),
            lost: runs.iter().map(|r| r.lost).max().unwrap_or(0),
            max_gap: runs.iter().map(|r| r.max_gap).max().unwrap_or_default(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{:>9} msg/s {:>5.2} us/msg (lost {}, max gap {} ms)",
            grouped(self.rate.round() as usize),
            self.cpu_us,
            grouped(self.lost),
            self.max_gap.as_millis()
        )
    }
}

/// The handshake and throughput phase, for one broker.
struct Throughput {
    handshakes: f64,
    qos1: Flow,
    qos0: Flow,
    /// The same handshakes and QoS 1 load in MQTT 5, interleaved with the 3.1.1 runs (ours only).
    mqtt5: Option<(f64, Flow)>,
}

async fn handshakes_and_throughput(
    target: &Target,
    fleet: &Fleet,
    runs: usize,
    per_publisher: usize,
    with_mqtt5: bool,
) -> Throughput {
    let (mut handshakes, mut qos1, mut qos0) = (Vec::new(), Vec::new(), Vec::new());
    let (mut handshakes5, mut qos1_5) = (Vec::new(), Vec::new());
    let qos1_load = Load::closed_loop(1, SMALL_PAYLOAD, per_publisher);
    for _ in 0..runs {
        handshakes.push(handshakes_per_second(target.sessions(&fleet.handshake)).await);
        qos1.push(deliver(target, fleet, qos1_load).await);
        qos0.push(deliver(target, fleet, Load::closed_loop(0, SMALL_PAYLOAD, per_publisher)).await);
        if with_mqtt5 {
            handshakes5.push(handshakes_per_second(target.sessions_in(&fleet.handshake, Protocol::V5)).await);
            let load = Load {
                protocol: Protocol::V5,
                ..qos1_load
            };
            qos1_5.push(deliver(target, fleet, load).await);
        }
    }
    Throughput {
        handshakes: median(handshakes),
        qos1: Flow::of(qos1),
        qos0: Flow::of(qos0),
        mqtt5: with_mqtt5.then(|| (median(handshakes5), Flow::of(qos1_5))),
    }
}

/// The broker's RSS per idle session, KiB, from before the first was opened.
struct Idle {
    held: usize,
    /// After CONNECT/CONNACK (after the handshake only with `BENCH_IDLE=handshake`).
    connected: f64,
    /// Sessions subscribed to their command topic, and the RSS per session then (not measured
    /// with `BENCH_IDLE=handshake`).
    subscribed: Option<(usize, f64)>,
}

async fn idle_memory(target: &Target, fleet: &Fleet, handshake_only: bool) -> Idle {
    let pid = target.pid;
    let before = rss_kib(pid);
    let per_session = |count: usize| rss_kib(pid).saturating_sub(before) as f64 / count.max(1) as f64;
    let held = at_concurrency(target.sessions(&fleet.idle), move |session| async move {
        let client = if handshake_only {
            RawClient::handshake(session.port, session.config).await
        } else {
            session.open().await
        };
        Some((client.ok()?, session.cert_id))
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let (count, connected) = (held.len(), per_session(held.len()));
    if handshake_only {
        return Idle {
            held: count,
            connected,
            subscribed: None,
        };
    }
    let subscribed = at_concurrency(held, |(mut client, cert_id)| async move {
        let filter = format!("devices/{cert_id}/cmd");
        subscribe(&mut client, &filter, 1).await.ok()?;
        Some(client)
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    Idle {
        held: count,
        connected,
        subscribed: Some((subscribed.len(), per_session(subscribed.len()))),
    }
}

/// Everything measured for one broker, for the closing ratios.
struct Report {
    name: &'static str,
    throughput: Option<Throughput>,
    idle: Option<Idle>,
    sustained: Option<Delivery>,
    /// The delivery and the broker's peak RSS (KiB).
    open_loop: Option<(Delivery, u64)>,
    /// With persistence on.
    durable: Option<durable::Durable>,
}

/// The brokers of every phase but the open loop.
fn closed_loop_brokers(reports: &mut [Report]) -> impl Iterator<Item = &mut Report> {
    reports.iter_mut().filter(|r| r.name != MOSQUITTO_DEFAULT)
}

/// What every phase shares.
struct Bench {
    test_fleet: TestFleet,
    fleet: Fleet,
    runtime: tokio::runtime::Runtime,
    broker_cpus: String,
}

impl Bench {
    /// Starts broker `name` afresh, so that `phase` does not inherit what an earlier one left in
    /// its heap, and runs `phase` against it.
    fn measure<T>(&self, name: &'static str, phase: impl AsyncFnOnce(&Target, &Fleet) -> T) -> T {
        let target = start(name, &self.test_fleet, &self.broker_cpus);
        self.runtime.block_on(phase(&target, &self.fleet))
    }
}

/// `n` with thousands separators, as BENCHMARKS.md writes figures.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The brokers `BENCH_TARGETS` names, in its order, without rumqttd when it is not installed.
fn targets() -> Vec<&'static str> {
    let mut chosen = Vec::new();
    for name in env_text("BENCH_TARGETS", &TARGETS.join(",")).split(',') {
        let Some(&name) = TARGETS.iter().find(|t| **t == name.trim()) else {
            panic!("BENCH_TARGETS: unknown broker {name:?} ({})", TARGETS.join(", "));
        };
        if name == "rumqttd" && rumqttd_binary().is_none() {
            println!("rumqttd: not installed (cargo install rumqttd --version 0.20.0), left out of this run");
            continue;
        }
        chosen.push(name);
    }
    chosen
}

fn print_header(broker_cpus: &str, load_cpus: &str, load_threads: usize) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim()))
        .unwrap_or("unknown");
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    println!(
        "CPU: {model}, {cpus} CPUs; brokers on CPUs {broker_cpus}, load generator on CPUs {load_cpus} with {load_threads} runtime thread(s)"
    );
    let overrides: Vec<String> = std::env::vars()
        .filter(|(key, _)| key.starts_with("BROKER__"))
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if !overrides.is_empty() {
        println!("our broker's overrides: {}", overrides.join(" "));
    }
}

/// The sustained memory phase's samples, one row per million delivered, one column per broker.
fn print_sustained(reports: &[Report]) {
    let measured: Vec<(&str, &Delivery)> = reports
        .iter()
        .filter_map(|r| Some((r.name, r.sustained.as_ref()?)))
        .collect();
    let rows: BTreeSet<usize> = measured
        .iter()
        .flat_map(|(_, d)| d.rss_kib.iter().map(|&(at, _)| at))
        .collect();
    let names: Vec<String> = measured.iter().map(|(name, _)| format!("{name:>12}")).collect();
    println!("  {:>12} {}   (RSS, MiB)", "delivered", names.join(" "));
    for row in rows {
        let cells: Vec<String> = measured
            .iter()
            .map(|(_, d)| match d.rss_kib.iter().find(|&&(at, _)| at == row) {
                Some(&(_, kib)) => format!("{:>12.1}", mib(kib)),
                None => format!("{:>12}", "-"),
            })
            .collect();
        let label = if row == 0 { "connected".into() } else { grouped(row) };
        println!("  {label:>12} {}", cells.join(" "));
    }
    for (name, delivery) in measured {
        let (first, last) = (delivery.rss_kib[0].1, delivery.rss_kib[delivery.rss_kib.len() - 1].1);
        if delivery.over_cap {
            println!(
                "{name:<18} STOPPED after {} messages: RSS {:.1} MiB passed the cap (BENCH_RSS_CAP_MIB)",
                grouped(delivery.delivered),
                mib(last)
            );
        }
        println!(
            "{name:<18} RSS grew by {:.1} MiB over {} messages ({:.1} -> {:.1} MiB; {} msg/s, {:.2} us/msg, lost {})",
            mib(last) - mib(first),
            grouped(delivery.delivered),
            mib(first),
            mib(last),
            grouped(delivery.rate.round() as usize),
            delivery.cpu_us,
            grouped(delivery.lost)
        );
    }
}

/// "ours vs X" lines, from the figures both brokers have: speed as ours/theirs, CPU per message
/// as theirs/ours (how many times less CPU ours needs), memory as ours/theirs.
fn print_ratios(reports: &[Report], idle_label: &str) {
    let Some(ours) = reports.iter().find(|r| r.name == "ours") else {
        return;
    };
    for other in reports.iter().filter(|r| r.name != "ours") {
        let mut lines = Vec::new();
        if let (Some(a), Some(b)) = (&ours.throughput, &other.throughput) {
            lines.push(format!(
                "speed (ours/theirs): handshakes x{:.2}, qos1 x{:.2}, qos0 x{:.2}",
                a.handshakes / b.handshakes,
                a.qos1.rate / b.qos1.rate,
                a.qos0.rate / b.qos0.rate,
            ));
            lines.push(format!(
                "CPU per message (theirs/ours, times less): qos1 x{:.2}, qos0 x{:.2}",
                b.qos1.cpu_us / a.qos1.cpu_us,
                b.qos0.cpu_us / a.qos0.cpu_us,
            ));
        }
        let mut memory = Vec::new();
        if let (Some(a), Some(b)) = (&ours.idle, &other.idle) {
            memory.push(format!("{idle_label} x{:.2}", a.connected / b.connected));
            if let (Some((_, a)), Some((_, b))) = (a.subscribed, b.subscribed) {
                memory.push(format!("subscribed x{:.2}", a / b));
            }
        }
        if let (Some((_, a)), Some((_, b))) = (&ours.open_loop, &other.open_loop) {
            memory.push(format!("open-loop peak RSS x{:.2}", *a as f64 / *b as f64));
        }
        if !memory.is_empty() {
            lines.push(format!("memory (ours/theirs): {}", memory.join(", ")));
        }
        if let (Some(a), Some(b)) = (&ours.durable, &other.durable) {
            lines.push(durable::ratios(a, b));
        }
        for line in lines {
            println!("ours vs {:<18} {line}", other.name);
        }
    }
}

fn main() {
    let (broker_cpus, load_cpus) = (env_text("BENCH_BROKER_CPUS", "0"), env_text("BENCH_LOAD_CPUS", "1"));
    pin_self(&load_cpus);
    let runs = env_number("BENCH_RUNS", 3).max(1);
    let per_publisher = env_number("BENCH_MESSAGES_PER_PUBLISHER", 25_000);
    let idle_sessions = env_number("BENCH_IDLE_SESSIONS", 10_000);
    let sustained_per_publisher = env_number("BENCH_SUSTAINED_MESSAGES", 10_000_000).div_ceil(PUBLISHERS);
    let open_loop_per_publisher = env_number("BENCH_OPEN_LOOP_MESSAGES", 25_000);
    let load_threads = env_number("BENCH_LOAD_THREADS", 1).max(1);
    let handshake_only = match std::env::var("BENCH_IDLE").as_deref() {
        Err(_) => false,
        Ok("handshake") => true,
        Ok(other) => panic!("BENCH_IDLE: unknown mode {other:?} (`handshake`, or unset for CONNECT and SUBSCRIBE)"),
    };
    let idle_label = if handshake_only {
        "handshake-only"
    } else {
        "connect-only"
    };
    print_header(&broker_cpus, &load_cpus, load_threads);
    let names = targets();
    println!("brokers: {}", names.join(", "));
    let mut runtime = match load_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let test_fleet = TestFleet::new();
    let bench = Bench {
        fleet: Fleet::new(&test_fleet, idle_sessions),
        test_fleet,
        runtime: runtime.enable_all().build().expect("runtime"),
        broker_cpus,
    };
    let mut reports: Vec<Report> = names
        .iter()
        .map(|&name| Report {
            name,
            throughput: None,
            idle: None,
            sustained: None,
            open_loop: None,
            durable: None,
        })
        .collect();

    println!(
        "\nhandshakes: full mTLS + CONNECT/CONNACK, concurrency {CONCURRENCY}; throughput: {PUBLISHERS} devices x {} messages of {SMALL_PAYLOAD} B -> 1 service, QoS 1 window {WINDOW}; broker CPU per delivered message; medians over {runs} run(s)",
        grouped(per_publisher)
    );
    for report in closed_loop_brokers(&mut reports) {
        let figures = bench.measure(report.name, async |target, fleet| {
            handshakes_and_throughput(target, fleet, runs, per_publisher, report.name == "ours").await
        });
        println!(
            "{:<18} handshakes/s {:>6} | qos1 {} | qos0 {}",
            report.name,
            grouped(figures.handshakes.round() as usize),
            figures.qos1.describe(),
            figures.qos0.describe()
        );
        if let Some((handshakes, qos1)) = &figures.mqtt5 {
            println!(
                "{:<18} handshakes/s {:>6} | qos1 {} | MQTT 5/3.1.1: handshakes x{:.2}, qos1 msg/s x{:.2}, us/msg x{:.2}",
                "ours (MQTT 5)",
                grouped(handshakes.round() as usize),
                qos1.describe(),
                handshakes / figures.handshakes,
                qos1.rate / figures.qos1.rate,
                qos1.cpu_us / figures.qos1.cpu_us,
            );
        }
        report.throughput = Some(figures);
    }

    if idle_sessions > 0 {
        println!(
            "\nidle memory: broker RSS growth per session, {} sessions opened {CONCURRENCY} at a time, read {} s after",
            grouped(idle_sessions),
            SETTLE.as_secs()
        );
        for report in closed_loop_brokers(&mut reports) {
            let idle = bench.measure(report.name, async |target, fleet| {
                idle_memory(target, fleet, handshake_only).await
            });
            let subscribed = match idle.subscribed {
                Some((count, kib)) => format!(" | subscribed {kib:>5.1} KiB/session ({} subscribed)", grouped(count)),
                None => String::new(),
            };
            println!(
                "{:<18} {idle_label} {:>5.1} KiB/session ({} held){subscribed}",
                report.name,
                idle.connected,
                grouped(idle.held)
            );
            report.idle = Some(idle);
        }
    }

    if sustained_per_publisher > 0 {
        println!(
            "\nsustained memory: {PUBLISHERS} devices x {} QoS 1 messages of {SUSTAINED_PAYLOAD} B -> 1 service, window {WINDOW}; broker RSS every {} delivered",
            grouped(sustained_per_publisher),
            grouped(RSS_EVERY)
        );
        for report in closed_loop_brokers(&mut reports) {
            let load = Load {
                rss_every: Some(RSS_EVERY),
                ..Load::closed_loop(1, SUSTAINED_PAYLOAD, sustained_per_publisher)
            };
            report.sustained =
                Some(bench.measure(report.name, async |target, fleet| deliver(target, fleet, load).await));
        }
        print_sustained(&reports);
    }

    if open_loop_per_publisher > 0 {
        println!(
            "\nopen loop: {PUBLISHERS} devices x {} QoS 1 messages of {SMALL_PAYLOAD} B -> 1 service, written without waiting for PUBACKs; broker RSS read every 10 ms",
            grouped(open_loop_per_publisher)
        );
        for report in &mut reports {
            let load = Load {
                window: None,
                ..Load::closed_loop(1, SMALL_PAYLOAD, open_loop_per_publisher)
            };
            let (delivery, peak) = bench.measure(report.name, async |target, fleet| {
                let peak = PeakRss::start(target.pid);
                let delivery = deliver(target, fleet, load).await;
                (delivery, peak.stop())
            });
            println!(
                "{:<18} delivered {:>9}  lost {:>7}  acked {:>9}  peak RSS {:>6.1} MiB",
                report.name,
                grouped(delivery.delivered),
                grouped(delivery.lost),
                grouped(delivery.acked),
                mib(peak)
            );
            report.open_loop = Some((delivery, peak));
        }
    }

    durable::run(&bench, &mut reports, runs, per_publisher);

    println!();
    print_ratios(&reports, idle_label);
}
