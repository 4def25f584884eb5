//! Durability, ours and Mosquitto side by side with persistence on. Ours runs with
//! `persistence.sync = "always"`: a QoS 1 publish that reaches a persistent session is
//! acknowledged only once it is fsynced. Mosquitto runs with `persistence true` and its defaults:
//! it acknowledges from memory and writes its database every `autosave_interval` (1800 s) and at
//! exit, so its figures are for a promise that a crash breaks.
//!
//! - online: the closed loop of the throughput phase to a persistent subscriber (the backend
//!   service with `clean_session = false`), medians of `BENCH_RUNS`;
//! - restart: `BENCH_DURABLE_QUEUED` (1,000,000) messages of 64 B acknowledged to devices while
//!   the subscriber is offline; then ours is killed with SIGKILL, Mosquitto stopped with SIGTERM
//!   (killed, it would lose them all); the store's size on disk per queued message; the time
//!   from starting the broker again until the subscriber's CONNECT is answered; and how many of
//!   the queued messages it then receives.

use super::*;

/// Durability figures of one broker.
pub(crate) struct Durable {
    online: Flow,
    restart: Option<Restart>,
}

struct Restart {
    acked: usize,
    /// Acknowledged messages per second while the subscriber was offline.
    queue_rate: f64,
    /// Bytes of the store on disk (ours: the directory; Mosquitto: its database file).
    store_bytes: u64,
    /// The broker's RSS with the queue held, KiB (both keep what is queued in memory too).
    rss_kib: u64,
    /// From starting the broker until the subscriber's CONNACK.
    back_after: Duration,
    /// Messages the subscriber received after the restart.
    recovered: usize,
}

/// The brokers of this phase: ours and Mosquitto, when the run has them.
fn durable_brokers(reports: &mut [Report]) -> impl Iterator<Item = &mut Report> {
    reports.iter_mut().filter(|r| r.name == "ours" || r.name == "mosquitto")
}

/// Starts `name` with persistence in `dir`, listening on `port`, able to queue `queue` messages
/// for one offline session.
fn start_durable(name: &'static str, bench: &Bench, dir: &Path, port: u16, queue: usize) -> Target {
    let fleet = &bench.test_fleet;
    if name == "mosquitto" {
        std::fs::create_dir_all(dir).expect("Mosquitto's persistence directory");
        return mosquitto(name, fleet, &bench.broker_cpus, true, Some((dir, port)));
    }
    let (listen, messages, bytes) = (
        format!("127.0.0.1:{port}"),
        (queue + 1000).to_string(),
        (queue * 200 + (1 << 20)).to_string(),
    );
    ours_with(
        fleet,
        &bench.broker_cpus,
        &[
            ("BROKER__PERSISTENCE__DIR", dir.to_str().expect("a UTF-8 path")),
            ("BROKER__PERSISTENCE__SYNC", "always"),
            ("BROKER__LISTEN", &listen),
            ("BROKER__LIMITS__MAX_QUEUED_MESSAGES", &messages),
            ("BROKER__LIMITS__MAX_QUEUED_BYTES", &bytes),
        ],
    )
}

/// A directory of its own for each start.
fn fresh_dir(bench: &Bench, name: &str) -> PathBuf {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    bench
        .test_fleet
        .path()
        .join(format!("durable-{name}-{}", STARTS.fetch_add(1, Ordering::Relaxed)))
}

pub(crate) fn run(bench: &Bench, reports: &mut [Report], runs: usize, per_publisher: usize) {
    let queued = env_number("BENCH_DURABLE_QUEUED", 1_000_000);
    println!(
        "\ndurability: ours sync = \"always\" (PUBACK after fsync); Mosquitto persistence true (PUBACK from memory, saved every 1800 s and at exit)\nonline: {PUBLISHERS} devices x {} QoS 1 messages of {SMALL_PAYLOAD} B -> 1 persistent service, window {WINDOW}; medians over {runs} run(s)",
        grouped(per_publisher)
    );
    for report in durable_brokers(reports) {
        let mut flows = Vec::new();
        for _ in 0..runs {
            let dir = fresh_dir(bench, report.name);
            let target = start_durable(report.name, bench, &dir, free_port(), 0);
            let load = Load {
                persistent_subscriber: true,
                ..Load::closed_loop(1, SMALL_PAYLOAD, per_publisher)
            };
            flows.push(bench.runtime.block_on(deliver(&target, &bench.fleet, load)));
        }
        let online = Flow::of(flows);
        println!("{:<18} online persistent qos1 {}", report.name, online.describe());
        report.durable = Some(Durable { online, restart: None });
    }
    if queued == 0 {
        return;
    }
    println!(
        "restart: {} QoS 1 messages of {SMALL_PAYLOAD} B queued for the offline service, then ours SIGKILL / Mosquitto SIGTERM, and started again",
        grouped(queued)
    );
    for report in durable_brokers(reports) {
        let restart = restart_with_queue(bench, report.name, queued);
        println!(
            "{:<18} queued {} at {} msg/s; RSS {:.1} MiB; store {:.1} MiB ({:.0} B/message); back after {:.2} s; {} delivered after the restart",
            report.name,
            grouped(restart.acked),
            grouped(restart.queue_rate.round() as usize),
            mib(restart.rss_kib),
            restart.store_bytes as f64 / (1024.0 * 1024.0),
            restart.store_bytes as f64 / restart.acked.max(1) as f64,
            restart.back_after.as_secs_f64(),
            grouped(restart.recovered)
        );
        if let Some(durable) = &mut report.durable {
            durable.restart = Some(restart);
        }
    }
}

fn restart_with_queue(bench: &Bench, name: &'static str, queued: usize) -> Restart {
    let (dir, port) = (fresh_dir(bench, name), free_port());
    let fleet = &bench.fleet;
    let target = start_durable(name, bench, &dir, port, queued);
    let (acked, queue_rate) = bench.runtime.block_on(async {
        let mut service = target
            .session_with(&fleet.service, false)
            .open()
            .await
            .expect("the service connects");
        subscribe(&mut service, "devices/+/telemetry", 1)
            .await
            .expect("the service subscribes");
        service.send(&packets::DISCONNECT).await.expect("DISCONNECT");
        drop(service);
        let acked = Arc::new(AtomicUsize::new(0));
        let load = Load::closed_loop(1, SMALL_PAYLOAD, queued.div_ceil(PUBLISHERS));
        let started = Instant::now();
        let mut senders = Vec::new();
        for session in target.sessions(&fleet.publishers) {
            let client = session.open().await.expect("a device connects");
            let topic = format!("devices/{}/telemetry", session.cert_id);
            senders.push(tokio::spawn(publish(client, topic, load, acked.clone())));
        }
        for sender in senders {
            let _ = sender.await;
        }
        let acked = acked.load(Ordering::Relaxed);
        (acked, acked as f64 / started.elapsed().as_secs_f64())
    });
    let rss_kib = rss_kib(target.pid);
    if name == "mosquitto" {
        stop_gracefully(target.pid);
    }
    drop(target);
    let store_bytes = disk_usage(&dir);
    let started = Instant::now();
    let target = start_durable(name, bench, &dir, port, queued);
    let (back_after, recovered) = bench.runtime.block_on(async {
        let session = target.session_with(&fleet.service, false);
        let client = loop {
            match session.open().await {
                Ok(client) => break client,
                // Listening but not yet answering: ask again.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let back_after = started.elapsed();
        let received = receive(client, acked, None, target.pid, Instant::now()).await;
        (back_after, received.delivered)
    });
    Restart {
        acked,
        queue_rate,
        store_bytes,
        rss_kib,
        back_after,
        recovered,
    }
}

/// SIGTERM, then waits (up to a minute) until the process has exited.
fn stop_gracefully(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting to be reaped: it has exited.
        match stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
        {
            None | Some("Z") => return,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("process {pid} did not exit within a minute of SIGTERM");
}

/// Bytes of the files under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The "ours vs Mosquitto" line of this phase.
pub(crate) fn ratios(ours: &Durable, theirs: &Durable) -> String {
    let mut line = format!(
        "durable (ours/theirs): online qos1 x{:.2}, CPU per message x{:.2} less",
        ours.online.rate / theirs.online.rate,
        theirs.online.cpu_us / ours.online.cpu_us
    );
    if let (Some(a), Some(b)) = (&ours.restart, &theirs.restart) {
        line.push_str(&format!(
            ", restart time x{:.2}, store per message x{:.2}",
            a.back_after.as_secs_f64() / b.back_after.as_secs_f64(),
            (a.store_bytes as f64 / a.acked.max(1) as f64) / (b.store_bytes as f64 / b.acked.max(1) as f64)
        ));
    }
    line
}
