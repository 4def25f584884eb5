//! Certificate renewal across real processes: the broker, the issuer (`provision serve`) and
//! device agents with certificates valid for half a minute, renewing through several cycles
//! while they publish; the issuer's refusals, each for its reason; the issuer down; `kill -9` of
//! the agent at every step of the swap; and the protocol driven by `openssl` and `mosquitto_*`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use device_agent::session::Outcome;
use e2e::{require_tool, run_ok, workspace_bin, BrokerProcess, ClientFiles, EventLog, IssuerProcess, RunningAgent};
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

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

    /// The issuer, signing 30 s certificates, a request every `min_interval_s` per device.
    fn issuer(&self, min_interval_s: &str, extra: &[&str]) -> IssuerProcess {
        let mut args = vec!["--validity", "30s", "--min-interval-s", min_interval_s];
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

fn start_agent(bundle: &Path) -> RunningAgent {
    agent_config(bundle);
    e2e::start_agent(e2e::bundle_agent(bundle, |_| {}))
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
    let issuer = site.issuer("2", &[]);
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

/// A CSR (PEM) for `cn` with a fresh P-256 key, as any MQTT client could make it.
fn csr(cn: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// `csr(cn)` with one byte of its subject changed after signing.
fn tampered_csr(cn: &str) -> String {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr(cn).as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let at = bytes.windows(cn.len()).position(|w| w == cn.as_bytes()).unwrap();
    bytes[at] ^= 0x01;
    let body = base64::engine::general_purpose::STANDARD.encode(&bytes);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

/// An RSA CSR for `cn`, made by `openssl req`.
fn rsa_csr(dir: &Path, cn: &str) -> String {
    let (key, csr) = (dir.join(format!("{cn}.rsa.key")), dir.join(format!("{cn}.rsa.csr")));
    e2e::openssl_csr(&["-newkey", "rsa:2048"], cn, &key, &csr);
    std::fs::read_to_string(csr).unwrap()
}

/// Publishes a request for `id` with `csr` from the connected `client` and returns the error
/// code of the reply on `id`'s reply topic (which `client` must be subscribed to).
async fn refusal(client: &rumqttc::AsyncClient, eventloop: &mut rumqttc::EventLoop, id: &str, csr: &str) -> String {
    let request_id = format!("req-{}", csr.len());
    let request = serde_json::json!({ "request_id": request_id, "csr": csr });
    client
        .publish(
            format!("devices/{id}/renew/request"),
            QoS::AtLeastOnce,
            false,
            request.to_string(),
        )
        .await
        .unwrap();
    loop {
        let publish = e2e::next_publish(eventloop, Duration::from_secs(15))
            .await
            .expect("a reply");
        let reply: Value = serde_json::from_slice(&publish.payload).unwrap();
        if reply["request_id"] == request_id.as_str() {
            assert_eq!(reply["certificate"], Value::Null, "{reply}");
            return reply["error"]["code"].as_str().unwrap().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_refused_each_for_its_stated_reason() {
    let site = Site::new(&[]);
    let issuer = site.issuer("0", &[]);
    let bundles = site.devices("ask-", 2, "30s");
    let (me, other) = ("ask-00001", "ask-00002");
    let device = ClientFiles::device(&bundles[0]);
    let (client, mut eventloop) = e2e::connect(site.port, &device, me).await.unwrap();
    client
        .subscribe(format!("devices/{me}/renew/reply"), QoS::AtLeastOnce)
        .await
        .unwrap();

    // Publishing on another device's request topic: the broker's ACL drops it, the issuer
    // never hears of it. (The next reply to this device comes after the broker handled it.)
    let stolen = serde_json::json!({ "request_id": "x", "csr": csr(other) }).to_string();
    client
        .publish(
            format!("devices/{other}/renew/request"),
            QoS::AtLeastOnce,
            false,
            stolen,
        )
        .await
        .unwrap();
    assert_eq!(refusal(&client, &mut eventloop, me, &csr(other)).await, "id_mismatch");
    site.broker.wait_for("the denied publish", Duration::from_secs(5), |e| {
        e["event"] == "acl_denied" && e["device_id"] == me && e["topic"] == format!("devices/{other}/renew/request")
    });
    assert!(issuer.log.events().iter().all(|e| e["device_id"] != other));

    assert_eq!(
        refusal(&client, &mut eventloop, me, &tampered_csr(me)).await,
        "bad_signature"
    );
    assert_eq!(
        refusal(&client, &mut eventloop, me, &rsa_csr(site.path(), me)).await,
        "key_type_not_allowed"
    );
    assert_eq!(refusal(&client, &mut eventloop, me, "not a csr").await, "bad_request");

    // A revoked device's request (here published by a service: services may use every topic)
    // is refused by the registry check, as is one for a device the registry never heard of.
    site.provision(&["revoke", "--id", other]);
    let (service, mut service_loop) = e2e::connect(site.port, &site.service("ingest"), "ops").await.unwrap();
    for id in [other, "never-issued"] {
        service
            .subscribe(format!("devices/{id}/renew/reply"), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    assert_eq!(
        refusal(&service, &mut service_loop, other, &csr(other)).await,
        "revoked"
    );
    assert_eq!(
        refusal(&service, &mut service_loop, "never-issued", &csr("never-issued")).await,
        "unknown_device"
    );

    // Every decision is one audit line; no certificate was issued.
    let refused: Vec<String> = decisions(&issuer.log, "refused")
        .iter()
        .map(|e| e["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        refused,
        [
            "id_mismatch",
            "bad_signature",
            "key_type_not_allowed",
            "bad_request",
            "revoked",
            "unknown_device"
        ]
    );
    assert!(decisions(&issuer.log, "issued").is_empty());
    let listed = site.certificates_of(me);
    assert_eq!(listed[0]["renewal"], "failed", "{listed:?}");
}

/// `device-agent run` as a process, its stderr collected.
struct AgentProcess {
    child: std::process::Child,
    log: EventLog,
}

impl AgentProcess {
    /// `device-agent <command> --config ...` (`run` or `renew`), aborting at `fault` if given.
    fn start(command: &str, bundle: &Path, fault: Option<&str>) -> Self {
        let mut agent = Command::new(workspace_bin("device-agent"));
        agent
            .arg(command)
            .arg("--config")
            .arg(agent_config(bundle))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(point) = fault {
            agent.env("DEVICE_AGENT_FAULT", point);
        }
        let mut child = agent.spawn().unwrap();
        let log = EventLog::read(child.stderr.take().unwrap());
        Self { child, log }
    }

    fn wait_for_line(&self, what: &str, needle: &str) {
        self.log.wait_for(what, Duration::from_secs(60), |e| {
            e["raw"].as_str().is_some_and(|line| line.contains(needle))
        });
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_agent_killed_at_every_step_of_the_swap_connects_again_and_finishes_the_renewal() {
    let site = Site::new(&[]);
    let issuer = site.issuer("0", &["--force"]);
    let points = [
        "renew-key-written",
        "renew-cert-written",
        "renew-commit-half",
        "renew-committed",
    ];
    let bundles = site.devices("kill-", points.len(), "1d");
    for (bundle, point) in bundles.iter().zip(points) {
        let id = bundle.file_name().unwrap().to_str().unwrap().to_owned();
        let mut crashed = AgentProcess::start("renew", bundle, Some(point));
        let status = crashed.child.wait().unwrap();
        assert!(!status.success(), "{point}: the agent should have aborted: {status}");
        // Restarted, it connects with whichever pair the crash left.
        let again = AgentProcess::start("run", bundle, None);
        again.wait_for_line(&format!("{point}: a connection after the restart"), "connected to");
        if point != "renew-key-written" {
            // The certificate had arrived: the swap completes, the superseded one is revoked.
            issuer.log.wait_for(
                &format!("{point}: the old certificate of {id} superseded"),
                Duration::from_secs(30),
                |e| e["decision"] == "superseded" && e["device_id"] == id.as_str(),
            );
            assert_eq!(check_chain(&site, &id), 2, "{point}");
        }
        assert!(
            !bundle.join("device.next.key").exists() && !bundle.join("device.next.crt").exists(),
            "{point}"
        );
    }
    // Not killed, `renew` exits 0 once the broker accepted the new certificate.
    let output = e2e::run(
        Command::new(workspace_bin("device-agent"))
            .arg("renew")
            .arg("--config")
            .arg(agent_config(&bundles[0])),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("renewed"));
    assert_eq!(check_chain(&site, "kill-00001"), 2);
    assert!(!bundles[0].join("device.unconfirmed").exists());
}

#[test]
fn a_renewed_certificate_the_broker_refuses_is_rolled_back_to_the_old_one() {
    let site = Site::new(&[]);
    let bundle = site.devices("back-", 1, "1d").remove(0);
    // A pending pair the broker will refuse: a key and certificate of no CA it trusts.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "back-00001");
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(bundle.join("device.next.crt"), cert.pem()).unwrap();
    std::fs::write(bundle.join("device.next.key"), key.serialize_pem()).unwrap();
    let agent = AgentProcess::start("run", &bundle, None);
    agent.wait_for_line("the rollback", "renewal_rolled_back");
    agent.wait_for_line("a connection with the old certificate", "connected to");
    let current = site.certificates_of("back-00001").remove(0);
    site.broker
        .wait_for("the old certificate accepted", Duration::from_secs(10), |e| {
            e["event"] == "accept" && e["serial"] == current["serial"]
        });
    assert!(!bundle.join("device.next.crt").exists() && !bundle.join("device.next.key").exists());
}

#[test]
fn with_the_issuer_down_agents_retry_with_backoff_and_keep_publishing() {
    let site = Site::new(&[]);
    let bundle = site.devices("wait-", 1, "15s").remove(0);
    let renew = || {
        e2e::run(
            Command::new(workspace_bin("device-agent"))
                .arg("renew")
                .arg("--config")
                .arg(agent_config(&bundle)),
        )
    };
    // `renew` gives up after the reply timeout and says why.
    let unanswered = renew();
    assert_eq!(
        unanswered.status.code(),
        Some(50),
        "{}",
        String::from_utf8_lossy(&unanswered.stderr)
    );
    assert!(String::from_utf8_lossy(&unanswered.stderr).contains("provision serve"));
    let mut agent = AgentProcess::start("run", &bundle, None);
    agent.wait_for_line("a renewal that times out", "no reply from the issuer");
    // Still working with the current certificate: a message goes through.
    use std::io::Write as _;
    let stdin = agent.child.stdin.as_mut().unwrap();
    writeln!(stdin, "telemetry still-here").unwrap();
    let queue = bundle.join("queue");
    let drained = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_dir(&queue).map(|d| d.count() == 0).unwrap_or(false)
    });
    assert!(drained, "the message was acknowledged while the issuer was down");
    // One process at a time swaps the certificate.
    let locked = renew();
    assert!(
        String::from_utf8_lossy(&locked.stderr).contains("another device-agent"),
        "{locked:?}"
    );
    let issuer = site.issuer("0", &[]);
    issuer
        .log
        .wait_for("the renewal once the issuer is back", Duration::from_secs(30), |e| {
            e["decision"] == "superseded" && e["device_id"] == "wait-00001"
        });
    let failures: Vec<_> = agent
        .log
        .events()
        .into_iter()
        .filter_map(|e| {
            e["raw"]
                .as_str()
                .filter(|l| l.contains("renewal_failed"))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        !failures.is_empty() && failures.iter().all(|l| l.contains("retry_in_s")),
        "{failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_certificate_expired_within_the_grace_renews_and_comes_back() {
    let site = Site::new(&[("BROKER__RENEWAL_GRACE_DAYS", "1")]);
    let issuer = site.issuer("0", &[]);
    let bundle = site.devices("late-", 1, "3s").remove(0);
    let id = "late-00001";
    let not_after = site.certificates_of(id)[0]["not_after"].as_i64().unwrap();
    // The device slept through its expiry.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    tokio::time::sleep(Duration::from_secs((not_after - now + 1).max(0) as u64)).await;

    // Admitted, but to its renewal topics only.
    let (client, mut eventloop) = e2e::connect(site.port, &ClientFiles::device(&bundle), id)
        .await
        .unwrap();
    site.broker
        .wait_for("the grace admission", Duration::from_secs(5), |e| {
            e["event"] == "expired_grace" && e["device_id"] == id
        });
    client
        .publish(format!("devices/{id}/telemetry"), QoS::AtLeastOnce, false, "late")
        .await
        .unwrap();
    e2e::wait_for_incoming(&mut eventloop, Duration::from_secs(5), "PUBACK", |p| {
        matches!(p, Packet::PubAck(_))
    })
    .await;
    site.broker
        .wait_for("the denied telemetry", Duration::from_secs(5), |e| {
            e["event"] == "acl_denied" && e["topic"] == format!("devices/{id}/telemetry")
        });
    drop((client, eventloop));

    // The agent renews through the grace and comes back with a valid certificate.
    let agent = AgentProcess::start("run", &bundle, None);
    issuer.log.wait_for("the renewal", Duration::from_secs(30), |e| {
        e["decision"] == "superseded" && e["device_id"] == id
    });
    agent.wait_for_line("the agent renewed", "now using the renewed certificate");
    let renewed = site.certificates_of(id).pop().unwrap();
    site.broker.wait_for(
        "an ordinary admission with the new certificate",
        Duration::from_secs(10),
        |e| e["event"] == "accept" && e["serial"] == renewed["serial"],
    );
}

#[test]
fn the_protocol_works_with_plain_mqtt_tools_openssl_and_mosquitto() {
    let (openssl, mosquitto_pub, mosquitto_sub) = (
        require_tool("openssl", "openssl"),
        require_tool("mosquitto_pub", "mosquitto-clients"),
        require_tool("mosquitto_sub", "mosquitto-clients"),
    );
    let site = Site::new(&[]);
    let issuer = site.issuer("0", &["--force"]);
    let bundle = site.devices("tool-", 1, "1d").remove(0);
    let id = "tool-00001";
    let port = site.port.to_string();
    let mqtt = |program: &Path, cert: &Path, key: &Path| {
        let mut command = Command::new(program);
        command
            .args(["-h", "localhost", "-p", &port, "-i", id, "-q", "1", "-c", "--cafile"])
            .arg(bundle.join("broker-ca.crt"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
        command
    };
    let (cert, key) = (bundle.join("device.crt"), bundle.join("device.key"));
    let reply_topic = format!("devices/{id}/renew/reply");
    // 1. A persistent subscription to the reply topic (one connection per device id at a time,
    //    so the reply waits in the session while the request is sent).
    run_ok(mqtt(&mosquitto_sub, &cert, &key).args(["-E", "-t", &reply_topic]));
    // 2. A new key and CSR with openssl; the request with mosquitto_pub.
    let (new_key, new_csr) = (bundle.join("tool.key"), bundle.join("tool.csr"));
    e2e::openssl_csr(
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        id,
        &new_key,
        &new_csr,
    );
    let request = serde_json::json!({ "request_id": "tool-1", "csr": std::fs::read_to_string(&new_csr).unwrap() });
    run_ok(mqtt(&mosquitto_pub, &cert, &key).args([
        "-t",
        &format!("devices/{id}/renew/request"),
        "-m",
        &request.to_string(),
    ]));
    // 3. The reply.
    let reply = run_ok(mqtt(&mosquitto_sub, &cert, &key).args(["-C", "1", "-W", "30", "-t", &reply_topic]));
    let reply: Value = serde_json::from_str(reply.trim()).unwrap();
    assert_eq!(reply["request_id"], "tool-1", "{reply}");
    let chain = reply["certificate"].as_str().expect("a certificate");
    let new_cert = bundle.join("tool.crt");
    std::fs::write(&new_cert, chain).unwrap();
    let serial = run_ok(
        Command::new(&openssl)
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&new_cert),
    );
    let serial = serial.trim().trim_start_matches("serial=").to_lowercase();
    // 4. Connect with the new pair and confirm (retained): the old certificate is revoked.
    let confirm = serde_json::json!({ "serial": serial }).to_string();
    run_ok(mqtt(&mosquitto_pub, &new_cert, &new_key).args([
        "-r",
        "-t",
        &format!("devices/{id}/renew/confirm"),
        "-m",
        &confirm,
    ]));
    issuer
        .log
        .wait_for("the superseded certificate revoked", Duration::from_secs(15), |e| {
            e["decision"] == "superseded" && e["device_id"] == id && e["serial"] == serial.as_str()
        });
    assert_eq!(check_chain(&site, id), 2);
}
