//! Certificate renewal across real processes: the broker, the issuer (`provision serve`) and
//! device agents with certificates valid for half a minute, renewing through several cycles
//! while they publish; the issuer's refusals, each for its reason; the issuer down; `kill -9` of
//! the agent at every step of the swap; and the protocol driven by `openssl` and `mosquitto_*`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use device_agent::config::Agent;
use device_agent::queue::Queue;
use device_agent::session::{Mode, Outbound, Outcome, Runner};
use device_agent::trust::{load_credentials, FlooredClock};
use e2e::{require_tool, run_ok, workspace_bin, BrokerProcess, ClientFiles, EventLog, IssuerProcess};
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// A PKI, a broker and an issuer on a free port.
struct Site {
    dir: tempfile::TempDir,
    port: u16,
    broker: BrokerProcess,
}

impl Site {
    fn new(broker_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let pki = dir.path().join("pki");
        run_ok(
            Command::new(workspace_bin("provision"))
                .args(["init", "--fleet", "renew", "--pki"])
                .arg(&pki),
        );
        let site_dir = dir.path().to_owned();
        let provision = |args: &[&str]| {
            run_ok(
                Command::new(workspace_bin("provision"))
                    .args(args)
                    .arg("--pki")
                    .arg(&pki),
            );
        };
        provision(&[
            "broker",
            "--dns",
            "localhost",
            "--out",
            site_dir.join("broker").to_str().unwrap(),
        ]);
        for service in ["issuer", "ingest"] {
            provision(&[
                "service",
                "--name",
                service,
                "--out",
                site_dir.join("services").to_str().unwrap(),
            ]);
        }
        let listen = format!("127.0.0.1:{port}");
        let mut env = vec![("BROKER__LISTEN", listen.as_str())];
        env.extend_from_slice(broker_env);
        let broker = BrokerProcess::start(&workspace_bin("broker"), &site_dir.join("broker/broker.toml"), &env);
        Self { dir, port, broker }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn pki(&self) -> PathBuf {
        self.path().join("pki")
    }

    fn provision(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(workspace_bin("provision"))
                .args(args)
                .arg("--pki")
                .arg(self.pki()),
        )
    }

    /// Devices `<prefix>00001...` with certificates valid for `validity`; their bundles.
    fn devices(&self, prefix: &str, count: usize, validity: &str) -> Vec<PathBuf> {
        let out = self.path().join("devices");
        self.provision(&[
            "batch",
            "--count",
            &count.to_string(),
            "--prefix",
            prefix,
            "--validity",
            validity,
            "--broker-url",
            &format!("mqtts://localhost:{}", self.port),
            "--out",
            out.to_str().unwrap(),
        ]);
        (1..=count).map(|n| out.join(format!("{prefix}{n:05}"))).collect()
    }

    fn issuer(&self, extra: &[&str]) -> IssuerProcess {
        let mut args = vec!["--validity", "30s", "--min-interval-s", "2"];
        args.extend_from_slice(extra);
        IssuerProcess::start(
            &workspace_bin("provision"),
            &self.pki(),
            self.port,
            &self.path().join("services/issuer"),
            &args,
        )
    }

    fn service(&self, name: &str) -> ClientFiles {
        ClientFiles::service(&self.path().join("services").join(name))
    }

    /// The registry's records of device `id`, oldest first.
    fn certificates_of(&self, id: &str) -> Vec<Value> {
        let all: Value = serde_json::from_str(&self.provision(&["list", "--json"])).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["id"] == id && r["role"] == "device")
            .cloned()
            .collect()
    }
}

/// Renewal settings for tests: quick retries, a short reply timeout.
const AGENT_RENEWAL: &str = "\n[renewal]\nreply_timeout_s = 5\nretry_min_s = 2\nretry_max_s = 6\n";

fn agent_config(bundle: &Path) -> PathBuf {
    let path = bundle.join("agent.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    if !text.contains("[renewal]") {
        text = text.replace(
            "key = \"device.key\"\n",
            "key = \"device.key\"\nbackoff_min_ms = 200\nbackoff_max_ms = 2000\nheartbeat_s = 0\n",
        );
        text.push_str(AGENT_RENEWAL);
        std::fs::write(&path, text).unwrap();
    }
    path
}

/// One in-process agent.
struct RunningAgent {
    input: mpsc::Sender<Outbound>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Outcome>,
}

fn start_agent(bundle: &Path) -> RunningAgent {
    let agent = Agent::load(&agent_config(bundle)).expect("agent.toml");
    let clock = Arc::new(FlooredClock::system());
    let credentials = load_credentials(&agent, clock.clone()).unwrap();
    let queue = Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages).unwrap();
    let (input, input_rx) = mpsc::channel(64);
    let (commands, _) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(Runner::new(agent, &credentials, clock, queue, commands, Mode::Run).run(
        input_rx,
        async move {
            let _ = stop_rx.await;
        },
    ));
    RunningAgent { input, stop, task }
}

/// A service that reports every (device, payload) on `devices/+/telemetry`, and when it has
/// subscribed.
async fn telemetry(port: u16, files: ClientFiles) -> mpsc::UnboundedReceiver<(String, String)> {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (client, mut eventloop) = e2e::connect(port, &files, "ingest").await.expect("service connects");
    client.subscribe("devices/+/telemetry", QoS::AtLeastOnce).await.unwrap();
    e2e::wait_for_incoming(&mut eventloop, Duration::from_secs(10), "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await;
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let device = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
                    let _ = seen_tx.send((device, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    seen
}

fn decisions(log: &EventLog, decision: &str) -> Vec<Value> {
    log.events()
        .into_iter()
        .filter(|e| e["event"] == "renewal" && e["decision"] == decision)
        .collect()
}

/// Checks the registry's chain for `id`: every certificate but the last revoked as superseded
/// with the next one as its successor; the last active. Returns how many there are.
fn check_chain(site: &Site, id: &str) -> usize {
    let certs = site.certificates_of(id);
    let (last, older) = certs.split_last().expect("certificates");
    for (cert, next) in older.iter().zip(&certs[1..]) {
        assert_eq!(
            (cert["status"].as_str(), cert["reason"].as_str(), &cert["successor"]),
            (Some("revoked"), Some("superseded"), &next["serial"]),
            "{id}: {cert} then {next}"
        );
    }
    assert_eq!(last["status"], "active", "{id}: {last}");
    assert_eq!(last["successor"], Value::Null, "{id}: {last}");
    certs.len()
}

const FLEET: usize = 50;
const CYCLES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_renew_through_several_cycles_while_publishing_and_nothing_is_lost() {
    let site = Site::new(&[]);
    let issuer = site.issuer(&[]);
    let bundles = site.devices("fleet-", FLEET, "30s");
    let mut seen = telemetry(site.port, site.service("ingest")).await;
    let agents: Vec<(String, RunningAgent)> = bundles
        .iter()
        .map(|b| (b.file_name().unwrap().to_string_lossy().into_owned(), start_agent(b)))
        .collect();

    // Telemetry every half second while the fleet renews, until every device has renewed
    // CYCLES times (each time confirmed, so its old certificate revoked).
    let mut expected = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    let mut round = 0;
    loop {
        round += 1;
        for (id, agent) in &agents {
            let payload = format!("round-{round}");
            agent
                .input
                .send(("telemetry".into(), payload.clone().into_bytes()))
                .await
                .unwrap();
            expected.insert((id.clone(), payload));
        }
        let mut confirmed: HashMap<String, usize> = HashMap::new();
        for event in decisions(&issuer.log, "superseded") {
            *confirmed
                .entry(event["device_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        if agents
            .iter()
            .all(|(id, _)| confirmed.get(id).copied().unwrap_or(0) >= CYCLES)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every device renewed {CYCLES} times: {confirmed:?}; issuer log: {:?}",
            issuer.log.events()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Nothing lost, none stranded: every message arrives, and every device is connected.
    let mut received = HashSet::new();
    let arrived = tokio::time::timeout(Duration::from_secs(60), async {
        while !expected.is_subset(&received) {
            received.insert(seen.recv().await.expect("the service runs"));
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "{} of {} messages never arrived",
        expected.difference(&received).count(),
        expected.len()
    );
    for (id, agent) in agents {
        let _ = agent.stop.send(());
        assert!(matches!(agent.task.await.unwrap(), Outcome::Stopped), "{id}");
        assert!(check_chain(&site, &id) > CYCLES, "{id}");
    }
    assert!(
        decisions(&issuer.log, "refused").is_empty(),
        "{:?}",
        decisions(&issuer.log, "refused")
    );
    // The CRL the broker reloads carries every superseded serial: an old key no longer works.
    let openssl = require_tool("openssl", "openssl");
    let crl = run_ok(
        Command::new(openssl)
            .args(["crl", "-noout", "-text", "-in"])
            .arg(site.pki().join("crl.pem")),
    );
    let crl = crl.to_lowercase();
    let records: Value = serde_json::from_str(&site.provision(&["list", "--json", "--status", "revoked"])).unwrap();
    let revoked = records.as_array().unwrap();
    assert!(revoked.len() >= FLEET * CYCLES);
    for record in revoked {
        assert!(
            crl.contains(record["serial"].as_str().unwrap()),
            "{record} not in the CRL"
        );
    }
    site.broker
        .wait_for("a CRL reload", Duration::from_secs(5), |e| e["event"] == "reload");
}
