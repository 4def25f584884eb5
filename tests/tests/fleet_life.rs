//! A fleet's life across real processes: `provision` creates the PKI, a broker bundle and 200
//! devices; the broker runs from the `broker.toml` that `provision broker` wrote; 200 agents
//! (the agent crate's own `Runner`, in this process to keep CI fast) publish telemetry that one
//! service receives in full; a revoked device is cut off within 2 s while 199 keep flowing; a
//! device re-keys itself (`device-agent keygen` + `provision sign-csr --rotate`); the broker
//! restarts and every agent comes back, delivering what it queued on disk meanwhile.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{free_port, run_ok, workspace_bin, BrokerProcess, ClientFiles, RunningAgent};
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;

const DEVICES: usize = 200;

fn provision(pki: &Path) -> impl Fn(&[&str]) -> String + '_ {
    move |args: &[&str]| {
        run_ok(
            Command::new(workspace_bin("provision"))
                .arg(args[0])
                .arg("--pki")
                .arg(pki)
                .args(&args[1..]),
        )
    }
}

/// One in-process agent: reconnects slowly enough that the service is back and subscribed
/// before any device returns after the broker restart (asserted below from the broker's log),
/// fast enough for CI.
fn start_agent(bundle: &Path) -> RunningAgent {
    e2e::start_agent(e2e::bundle_agent(bundle, |agent| {
        agent.config.backoff_min_ms = 1_500;
        agent.config.backoff_max_ms = 3_000;
    }))
}

/// The service: subscribes (again after every reconnect) and reports every (device, payload).
fn start_service(
    port: u16,
    files: ClientFiles,
) -> (mpsc::UnboundedReceiver<(String, String)>, mpsc::UnboundedReceiver<()>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (client, mut eventloop) = e2e::connect(port, &files, "ingest").await.expect("service connects");
        client.subscribe("devices/+/telemetry", QoS::AtLeastOnce).await.unwrap();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("devices/+/telemetry", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let device = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
                    let _ = seen_tx.send((device, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (seen, subscribed)
}

async fn publish_round(
    agents: &[(String, RunningAgent)],
    round: &str,
    expected: &mut HashSet<(String, String)>,
    skip: &[&str],
) {
    for (id, agent) in agents {
        let payload = round.to_owned();
        agent
            .input
            .send(("telemetry".into(), payload.clone().into_bytes()))
            .await
            .unwrap();
        if !skip.contains(&id.as_str()) {
            expected.insert((id.clone(), payload));
        }
    }
}

async fn wait_all(
    seen: &mut mpsc::UnboundedReceiver<(String, String)>,
    received: &mut HashSet<(String, String)>,
    expected: &HashSet<(String, String)>,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(received) {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(item)) => {
                received.insert(item);
            }
            _ => {
                let missing: Vec<_> = expected.difference(received).take(5).collect();
                panic!(
                    "{what}: {} of {} messages never arrived, e.g. {missing:?}",
                    expected.difference(received).count(),
                    expected.len()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_lives_revokes_rekeys_and_survives_a_broker_restart() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let port = free_port();
    let url = format!("mqtts://localhost:{port}");
    run_ok(
        Command::new(workspace_bin("provision"))
            .args(["init", "--fleet", "life", "--pki"])
            .arg(&pki),
    );
    let provision = provision(&pki);
    provision(&[
        "broker",
        "--dns",
        "localhost",
        "--out",
        dir.path().join("broker").to_str().unwrap(),
    ]);
    provision(&[
        "batch",
        "--count",
        &DEVICES.to_string(),
        "--prefix",
        "dev-",
        "--broker-url",
        &url,
        "--out",
        dir.path().join("devices").to_str().unwrap(),
    ]);
    provision(&[
        "service",
        "--name",
        "ingest",
        "--out",
        dir.path().join("services").to_str().unwrap(),
    ]);
    let listen = format!("127.0.0.1:{port}");
    let broker_bin = workspace_bin("broker");
    let config = dir.path().join("broker/broker.toml");
    let mut broker = BrokerProcess::start(&broker_bin, &config, &[("BROKER__LISTEN", &listen)]);

    let (mut seen, mut subscribed) = start_service(port, ClientFiles::service(&dir.path().join("services/ingest")));
    subscribed.recv().await.expect("service subscribed");
    let bundle = |id: &str| -> PathBuf { dir.path().join("devices").join(id) };
    let ids: Vec<String> = (1..=DEVICES).map(|n| format!("dev-{n:05}")).collect();
    let mut agents: Vec<(String, RunningAgent)> = ids.iter().map(|id| (id.clone(), start_agent(&bundle(id)))).collect();
    broker.wait_for_count("every device accepted", Duration::from_secs(60), DEVICES, |e| {
        e["event"] == "accept" && e["role"] == "device"
    });

    // Everyone's telemetry arrives in full.
    let mut expected = HashSet::new();
    let mut received = HashSet::new();
    publish_round(&agents, "round-1", &mut expected, &[]).await;
    wait_all(&mut seen, &mut received, &expected, "round 1").await;

    // Revoke dev-00001: its live session closes within 2 s and its reconnects are refused.
    let revoked_at = Instant::now();
    provision(&["revoke", "--id", "dev-00001", "--reason", "key-compromise"]);
    broker.wait_for("revoked_kick", Duration::from_secs(2), |e| {
        e["event"] == "revoked_kick" && e["device_id"] == "dev-00001"
    });
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "kicked after {:?}",
        revoked_at.elapsed()
    );
    broker.wait_for("dev-00001 refused on reconnect", Duration::from_secs(10), |e| {
        e["event"] == "reject" && e["reason"] == "revoked" && e["device_id"] == "dev-00001"
    });
    publish_round(&agents, "round-2", &mut expected, &["dev-00001"]).await;
    wait_all(
        &mut seen,
        &mut received,
        &expected,
        "round 2 (199 devices after a revocation)",
    )
    .await;
    assert!(
        !received.contains(&("dev-00001".to_owned(), "round-2".to_owned())),
        "a revoked device's message got through"
    );

    // dev-00002 re-keys on its own: a new key and CSR on the device, signed with --rotate.
    let rekey = dir.path().join("rekey");
    run_ok(
        Command::new(workspace_bin("device-agent"))
            .args(["keygen", "--id", "dev-00002", "--out"])
            .arg(&rekey),
    );
    provision(&[
        "sign-csr",
        "--csr",
        rekey.join("device.csr").to_str().unwrap(),
        "--out",
        rekey.join("device.crt").to_str().unwrap(),
        "--rotate",
    ]);
    let index = agents.iter().position(|(id, _)| id == "dev-00002").unwrap();
    let (_, old) = agents.remove(index);
    let _ = old.stop.send(());
    old.task.await.unwrap();
    std::fs::copy(rekey.join("device.crt"), bundle("dev-00002").join("device.crt")).unwrap();
    std::fs::copy(rekey.join("device.key"), bundle("dev-00002").join("device.key")).unwrap();
    let new_serial = fleet_identity::CertificateSummary::from_der(
        &fleet_identity::pem::load_certs(&rekey.join("device.crt")).unwrap()[0],
    )
    .unwrap()
    .serial;
    agents.push(("dev-00002".into(), start_agent(&bundle("dev-00002"))));
    broker.wait_for(
        "dev-00002 back with its new certificate",
        Duration::from_secs(10),
        |e| e["event"] == "accept" && e["serial"] == new_serial.as_str(),
    );

    // The broker restarts; messages accepted meanwhile wait in the agents' queues on disk.
    assert!(broker.terminate().success());
    publish_round(&agents, "round-3", &mut expected, &["dev-00001"]).await;
    let restarted = Instant::now();
    let broker = BrokerProcess::start(&broker_bin, &config, &[("BROKER__LISTEN", &listen)]);
    subscribed.recv().await.expect("the service subscribed again");
    let events = broker.events();
    let service_back = events
        .iter()
        .position(|e| e["event"] == "accept" && e["role"] == "service")
        .expect("service accepted");
    assert!(
        !events[..service_back]
            .iter()
            .any(|e| e["event"] == "accept" && e["role"] == "device"),
        "a device came back before the service subscribed"
    );
    wait_all(
        &mut seen,
        &mut received,
        &expected,
        "round 3 (queued across the broker restart)",
    )
    .await;
    let back = broker
        .events()
        .iter()
        .filter(|e| e["event"] == "accept" && e["role"] == "device")
        .count();
    assert!(back >= DEVICES - 1, "{back} devices back after the restart");
    assert!(
        restarted.elapsed() < Duration::from_secs(30),
        "back within the backoff window"
    );

    for (_, agent) in agents {
        let _ = agent.stop.send(());
    }
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "the fleet's life took {:?}",
        started.elapsed()
    );
}
