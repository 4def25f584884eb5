//! `fleet-demo`: mutual authentication for a small fleet, end to end, in one command.
//!
//! Mints (or reuses) a PKI under `certs/demo/` with the real `provision` code, starts the real
//! broker on 127.0.0.1, runs real device agents and a service, then lets impostors try their
//! luck, and prints what was accepted and refused, with the broker's own reason words.

mod audit_capture;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use audit_capture::{AuditCapture, Decision};
use clap::Parser;
use device_agent::config::Agent;
use device_agent::queue::Queue;
use device_agent::session::{Mode, Outbound, Runner};
use fleet_identity::{pem, tls, DeviceId, Role};
use provisioning::batch::{issue_devices, IssueOptions};
use provisioning::broker_bundle::{issue_broker, BrokerRequest};
use provisioning::issue::issue_named;
use provisioning::key_type::KeyType;
use provisioning::output::Overwrite;
use provisioning::pki::{InitOptions, Pki};
use provisioning::registry::RevokeTarget;
use provisioning::revocation::Reason;
use provisioning::validity::Validity;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::layer::SubscriberExt;

/// Devices that run the agent; the last one is revoked while connected.
const SENSORS: [&str; 4] = ["sensor-1", "sensor-2", "sensor-3", "sensor-4"];
/// A genuine device certificate used to misbehave.
const ROGUE: &str = "sensor-9";

/// Run a fleet: PKI, broker, agents, a service, and impostors refused.
#[derive(Parser)]
#[command(name = "fleet-demo")]
struct Cli {
    /// Leave the broker running afterwards and print a mosquitto_sub command to watch it.
    #[arg(long)]
    keep_running: bool,
    /// Port for the broker (default: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

/// `certs/demo/` in the workspace, or `FLEET_DEMO_DIR` (tests use a temporary directory).
fn demo_dir() -> PathBuf {
    std::env::var_os("FLEET_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
            workspace.join("certs").join("demo")
        })
}

/// Creates the demo PKI on first use; each run re-issues the device it will revoke.
fn prepare_pki(dir: &Path) -> Result<()> {
    let pki_dir = dir.join("pki");
    if !pki_dir.join("registry.db").exists() {
        println!("minting a demo PKI in {}", dir.display());
        Pki::init(
            &pki_dir,
            &InitOptions {
                fleet: "demo".into(),
                key_type: KeyType::EcdsaP256,
                ca_validity_days: 3650,
            },
        )?;
        let mut pki = Pki::open(&pki_dir)?;
        let request = BrokerRequest {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
            validity_days: 730,
            overwrite: Overwrite::Refuse,
        };
        issue_broker(&mut pki, &dir.join("broker"), &request)?;
        let ids: Vec<DeviceId> = SENSORS[..3]
            .iter()
            .chain([&ROGUE])
            .map(|id| id.parse())
            .collect::<Result<_, _>>()?;
        issue_devices(&mut pki, &ids, &dir.join("devices"), &issue_options(Overwrite::Refuse))?;
        issue_named(
            &mut pki,
            Role::Service,
            &"dashboard".parse()?,
            &dir.join("services"),
            Validity::days(365),
            Overwrite::Refuse,
        )?;
    } else {
        println!("reusing the demo PKI in {}", dir.display());
    }
    let mut pki = Pki::open(&pki_dir)?;
    let doomed: DeviceId = SENSORS[3].parse()?;
    issue_devices(
        &mut pki,
        &[doomed],
        &dir.join("devices"),
        &issue_options(Overwrite::Replace),
    )?;
    Ok(())
}

fn issue_options(overwrite: Overwrite) -> IssueOptions {
    IssueOptions {
        broker_url: "mqtts://localhost:8883".parse().expect("a valid URL"),
        validity: Validity::days(365),
        key_type: KeyType::EcdsaP256,
        jobs: 2,
        overwrite,
        progress: false,
    }
}

/// Revokes the device `id` and rewrites the CRL, as `provision revoke` does.
fn revoke(dir: &Path, id: &str) -> Result<()> {
    let target = RevokeTarget::Id {
        id: id.into(),
        kind: Some(Role::Device),
    };
    Pki::open(&dir.join("pki"))?.revoke_and_publish(&target, Reason::KeyCompromise, 30)?;
    Ok(())
}

/// An MQTT client presenting `cert`/`key` and trusting the demo broker CA.
fn client(dir: &Path, port: u16, cert: &Path, key: &Path, client_id: &str) -> Result<(AsyncClient, EventLoop)> {
    let provider = tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider());
    let roots = pem::load_certs(&dir.join("pki/broker-ca.crt"))?;
    let verifier = Arc::new(tls::PinnedBrokerVerifier::new(
        provider.clone(),
        &roots,
        None,
        Vec::new(),
    )?);
    let config = tls::client_config(
        provider,
        Arc::new(rustls::time_provider::DefaultTimeProvider),
        verifier,
        pem::load_certs(cert)?,
        pem::load_key(key)?,
    )?;
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
    Ok(AsyncClient::new(options, 64))
}

/// Polls until CONNACK; false if the broker refused or closed.
async fn connected(eventloop: &mut EventLoop) -> bool {
    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    attempt.await.unwrap_or(false)
}

/// Starts the agent for `id` (the agent's own code) with `reading` already in its queue,
/// answering every command with a reply; the returned sender stops it.
///
/// The reading is queued before the agent starts, as if taken while offline, rather than handed
/// to it once running: a message arriving while the agent is still connecting cancels its
/// half-done TLS handshake (its `select!` drops the MQTT client's pending poll) and it connects
/// again, which the broker audits as a `tls_error` from a peer with no certificate, a refusal
/// the demo would show but never announce.
fn start_agent(dir: &Path, id: &str, port: u16, queues: &Path, reading: &Outbound) -> Result<oneshot::Sender<()>> {
    let bundle = dir.join("devices").join(id);
    let mut agent = Agent::load(&bundle.join("agent.toml"))?;
    agent.broker.port = port;
    agent.config.queue_dir = queues.join(id);
    agent.config.backoff_max_ms = 5_000;
    let clock = Arc::new(device_agent::trust::FlooredClock::system());
    let credentials = device_agent::trust::load_credentials(&agent, clock.clone())?;
    let mut queue = Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages)?;
    queue.push(&reading.0, &reading.1)?;
    let (input, input_rx) = mpsc::channel(64);
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<device_agent::session::Command>();
    let (stop, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Some((topic, payload)) = commands.recv().await {
            let reply = format!(
                "done: {} {}",
                topic.rsplit('/').next().unwrap_or(""),
                String::from_utf8_lossy(&payload)
            );
            let _ = input.send(("reply".into(), reply.into_bytes())).await;
        }
    });
    tokio::spawn(
        Runner::new(agent, &credentials, clock, queue, commands_tx, Mode::Run).run(input_rx, async move {
            let _ = stop_rx.await;
        }),
    );
    Ok(stop)
}

fn describe(decision: &Decision) -> Option<(String, &'static str, String)> {
    let who = if decision.device_id.is_empty() || decision.device_id == "-" {
        "(no certificate)".to_owned()
    } else {
        decision.device_id.clone()
    };
    match decision.event.as_str() {
        "accept" => Some((who, "accepted", "-".into())),
        "reject" => Some((who, "REFUSED", decision.reason.clone())),
        "acl_denied" => Some((
            who,
            "DENIED",
            format!("acl_denied: {} {}", decision.action, decision.topic),
        )),
        "revoked_kick" => Some((
            who,
            "KICKED",
            "revoked_kick (certificate revoked while connected)".into(),
        )),
        _ => None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let capture = AuditCapture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))?;
    let dir = demo_dir();
    prepare_pki(&dir)?;

    let mut config = broker::BrokerConfig::load(&dir.join("broker/broker.toml"))?;
    config.listen = vec![SocketAddr::from(([127, 0, 0, 1], cli.port))];
    // A fresh store each run: retained messages or persistent sessions that an earlier run (or a
    // client during --keep-running) left in certs/demo/broker/store would show up in this run.
    let store = tempfile::tempdir()?;
    if let Some(persistence) = &mut config.persistence {
        persistence.dir = store.path().to_owned();
    }
    let broker = broker::Broker::bind(&config).await?;
    let port = broker
        .local_addrs()
        .first()
        .context("the broker bound no address")?
        .port();
    let (stop_broker, broker_stopped) = oneshot::channel::<()>();
    let broker_task = tokio::spawn(broker.run(async move {
        let _ = broker_stopped.await;
    }));
    println!("broker listening on 127.0.0.1:{port} (mutual TLS only)\n");

    // The service that reads telemetry and commands devices.
    let services = dir.join("services/dashboard");
    let (dashboard, mut dashboard_loop) = client(
        &dir,
        port,
        &services.join("service.crt"),
        &services.join("service.key"),
        "dashboard",
    )?;
    if !connected(&mut dashboard_loop).await {
        bail!("the dashboard service could not connect");
    }
    dashboard.subscribe("devices/+/telemetry", QoS::AtLeastOnce).await?;
    dashboard.subscribe("devices/+/reply", QoS::AtLeastOnce).await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, String)>();
    let commander = dashboard.clone();
    tokio::spawn(async move {
        while let Ok(event) = dashboard_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let device = p.topic.split('/').nth(1).unwrap_or("").to_owned();
                if p.topic.ends_with("/telemetry") {
                    let _ = commander
                        .publish(
                            format!("devices/{device}/cmd/calibrate"),
                            QoS::AtLeastOnce,
                            false,
                            "offset=0.1",
                        )
                        .await;
                }
                let _ = seen_tx.send((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned()));
            }
        }
    });

    // The devices, each running the agent's own code.
    let queues = tempfile::tempdir()?;
    let mut agents = Vec::new();
    for (n, id) in SENSORS.iter().enumerate() {
        let reading = ("telemetry".into(), format!("temperature={}.5", 20 + n).into_bytes());
        agents.push(start_agent(&dir, id, port, queues.path(), &reading)?);
    }
    let mut telemetry = 0;
    let mut replies = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (telemetry < SENSORS.len() || replies < SENSORS.len()) && tokio::time::Instant::now() < deadline {
        let Ok(Some((topic, payload))) = tokio::time::timeout_at(deadline, seen.recv()).await else {
            break;
        };
        if topic.ends_with("/telemetry") {
            telemetry += 1;
        } else {
            replies += 1;
        }
        println!("  dashboard <- {topic}: {payload}");
    }
    println!("\n{telemetry} telemetry messages in, {replies} commands answered\n");

    // Impostors.
    let rogue = dir.join("devices").join(ROGUE);
    println!("an impostor with a self-signed certificate claiming to be sensor-1 ...");
    let fake_key = rcgen::KeyPair::generate()?;
    let mut fake = rcgen::CertificateParams::new(Vec::<String>::new())?;
    fake.distinguished_name.push(rcgen::DnType::CommonName, "sensor-1");
    fake.subject_alt_names = vec![rcgen::SanType::URI("urn:device:sensor-1".try_into()?)];
    fake.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let fake_dir = tempfile::tempdir()?;
    std::fs::write(fake_dir.path().join("fake.crt"), fake.self_signed(&fake_key)?.pem())?;
    std::fs::write(fake_dir.path().join("fake.key"), fake_key.serialize_pem())?;
    let (_impostor, mut impostor_loop) = client(
        &dir,
        port,
        &fake_dir.path().join("fake.crt"),
        &fake_dir.path().join("fake.key"),
        "sensor-1",
    )?;
    let _ = connected(&mut impostor_loop).await;
    capture
        .wait_for(Duration::from_secs(3), |d| d.reason == "unknown_issuer")
        .await;

    println!("{ROGUE} (a genuine device) claiming sensor-1's client id ...");
    let (_spoof, mut spoof_loop) = client(
        &dir,
        port,
        &rogue.join("device.crt"),
        &rogue.join("device.key"),
        "sensor-1",
    )?;
    let _ = connected(&mut spoof_loop).await;
    capture
        .wait_for(Duration::from_secs(3), |d| d.reason == "client_id_mismatch")
        .await;

    println!("{ROGUE} writing to sensor-1's command topic and reading everyone's telemetry ...");
    let (nosy, mut nosy_loop) = client(&dir, port, &rogue.join("device.crt"), &rogue.join("device.key"), ROGUE)?;
    if connected(&mut nosy_loop).await {
        nosy.publish("devices/sensor-1/cmd/unlock", QoS::AtLeastOnce, false, "now")
            .await?;
        nosy.subscribe("devices/+/telemetry", QoS::AtLeastOnce).await?;
        tokio::spawn(async move { while nosy_loop.poll().await.is_ok() {} });
    }
    capture
        .wait_for(Duration::from_secs(3), |d| {
            d.event == "acl_denied" && d.action == "subscribe"
        })
        .await;

    println!("revoking {} while it is connected (provision revoke) ...", SENSORS[3]);
    let revoked_at = Instant::now();
    revoke(&dir, SENSORS[3])?;
    let kicked = capture
        .wait_for(Duration::from_secs(3), |d| d.event == "revoked_kick")
        .await;
    if kicked {
        println!(
            "  its session was closed {} ms after the CRL was written",
            revoked_at.elapsed().as_millis()
        );
    }

    println!("\n{:<18} {:<9} REASON (the broker's audit words)", "WHO", "OUTCOME");
    for (who, outcome, reason) in capture.decisions().iter().filter_map(describe) {
        println!("{who:<18} {outcome:<9} {reason}");
    }
    let refused = capture.decisions().iter().filter(|d| d.event != "accept").count();
    println!(
        "\n{} sessions accepted, {refused} refusals; finished in {:.1} s",
        capture.decisions().iter().filter(|d| d.event == "accept").count(),
        started.elapsed().as_secs_f64()
    );

    if cli.keep_running {
        let device = dir.join("devices/sensor-1").canonicalize()?;
        println!(
            "\nthe broker keeps running on 127.0.0.1:{port}; watch sensor-1's topics with:\n  mosquitto_sub -h localhost -p {port} --cafile {d}/broker-ca.crt --cert {d}/device.crt --key {d}/device.key -i sensor-1 -t 'devices/sensor-1/#' -v\n(the demo's own agents have stopped, so sensor-1's client id is free; Ctrl-C ends the broker)",
            d = device.display()
        );
        for stop in agents.drain(..) {
            let _ = stop.send(());
        }
        tokio::signal::ctrl_c().await?;
    }
    for stop in agents {
        let _ = stop.send(());
    }
    let _ = stop_broker.send(());
    let _ = tokio::time::timeout(Duration::from_secs(6), broker_task).await;
    if telemetry < SENSORS.len() || replies < SENSORS.len() || !kicked {
        bail!("the demo did not complete: {telemetry} telemetry, {replies} replies, revocation kick: {kicked}");
    }
    Ok(())
}
