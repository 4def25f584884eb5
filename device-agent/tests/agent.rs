//! The device agent as a process against our broker, a rogue broker, and Debian's Mosquitto.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_agent::config::Agent;
use device_agent::diagnosis::Diagnosis;
use device_agent::session::{connect_once, mqtt_options};
use device_agent::trust::{build_time, load_credentials, Credentials, FlooredClock};
use e2e::{connect_with, next_publish, require_tool, run_ok, workspace_bin, BrokerProcess, ClientFiles, TestFleet};
use fleet_identity::tls::spki_sha256;
use rumqttc::QoS;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_device-agent"))
}

fn start_broker(fleet: &TestFleet, env: &[(&str, &str)]) -> BrokerProcess {
    BrokerProcess::start(&workspace_bin("broker"), &fleet.broker_config(), env)
}

fn broker_url(port: u16) -> String {
    format!("mqtts://localhost:{port}")
}

/// `device-agent <sub> --config <bundle>/agent.toml` pointed at `port`.
fn agent_cmd(sub: &str, bundle: &Path, port: u16) -> Command {
    let mut command = agent();
    command
        .arg(sub)
        .arg("--config")
        .arg(bundle.join("agent.toml"))
        .env("DEVICE_AGENT__BROKER_URL", broker_url(port));
    command
}

/// The `ingest` service, connected and subscribed to `filter` (its SUBACK received). Its packet
/// limit is 1 MiB rather than rumqttc's 10 KiB, so it can carry anything a broker may accept.
async fn subscribed_service(fleet: &TestFleet, port: u16, filter: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (svc, mut svc_loop) = connect_with(port, &ClientFiles::service(&fleet.service("ingest")), "ingest", |o| {
        o.set_max_packet_size(1 << 20, 1 << 20);
    })
    .await
    .unwrap();
    svc.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    e2e::wait_for_incoming(&mut svc_loop, Duration::from_secs(5), "SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_))
    })
    .await;
    (svc, svc_loop)
}

fn exit_code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[test]
fn check_passes_against_our_broker() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let output = e2e::run(&mut agent_cmd("check", &bundle, broker.port()));
    assert_eq!(exit_code(&output), 0, "{}", text(&output));
    assert!(
        text(&output).contains("device id dev-1") && text(&output).contains("OK: connected"),
        "{}",
        text(&output)
    );
}

#[tokio::test]
async fn publish_exits_zero_once_the_broker_acknowledged_and_a_service_receives_it() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/#").await;
    let output =
        e2e::run(agent_cmd("publish", &bundle, broker.port()).args(["--topic", "telemetry", "--message", "21.5"]));
    assert_eq!(exit_code(&output), 0, "{}", text(&output));
    let received = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("the service receives it");
    assert_eq!(
        (received.topic.as_str(), &received.payload[..]),
        ("devices/dev-1/telemetry", &b"21.5"[..])
    );
}

/// A running `device-agent run` with its stdin, stdout lines and stderr lines.
struct RunningAgent {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl RunningAgent {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |stream: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Self { child, stdout, stderr }
    }

    /// `device-agent run` for `bundle` against the broker on `port`, once it says it connected.
    fn connected(bundle: &Path, port: u16) -> Self {
        let agent = Self::start(agent_cmd("run", bundle, port));
        agent.wait_stderr("connected to", Duration::from_secs(10));
        agent
    }

    fn send(&mut self, line: &str) {
        self.send_bytes(line.as_bytes());
    }

    /// Writes `line` and a newline to the agent's stdin, whatever its bytes.
    fn send_bytes(&mut self, line: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(line).and_then(|()| stdin.write_all(b"\n")).unwrap();
    }

    fn wait_stderr(&self, needle: &str, limit: Duration) -> String {
        let mut lines = self.stderr_until(&format!("{needle:?}"), limit, |lines| {
            lines.last().is_some_and(|l| l.contains(needle))
        });
        lines.pop().expect("the line that matched")
    }

    /// The agent's next stderr lines, up to the one after which `done` holds of all of them;
    /// panics (naming `what`, with the lines) after `limit`.
    fn stderr_until(&self, what: &str, limit: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        while !done(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => panic!("the agent never logged {what}; it logged:\n{}", lines.join("\n")),
            }
        }
        lines
    }
}

/// The messages in a queue directory (`*.msg`).
fn queued_files(queue: &Path) -> usize {
    fs::read_dir(queue)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until every message in `queue` was acknowledged; panics (saying `why`) after `limit`.
fn wait_until_drained(queue: &Path, limit: Duration, why: &str) {
    let deadline = Instant::now() + limit;
    while queued_files(queue) > 0 {
        assert!(Instant::now() < deadline, "{why}: {} still queued", queued_files(queue));
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Multi-threaded: the test blocks on the agent's stdout while the service's event loop runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_carries_commands_to_the_device_and_telemetry_to_a_service() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let mut agent = RunningAgent::connected(&bundle, broker.port());
    broker.wait_for("the agent's subscription", Duration::from_secs(5), |e| {
        e["event"] == "accept" && e["device_id"] == "dev-1"
    });

    agent.send("telemetry 21.5");
    let telemetry = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("telemetry arrives");
    assert_eq!(&telemetry.payload[..], b"21.5");

    // The command subscription is in place once telemetry flowed (it was sent first).
    svc.publish("devices/dev-1/cmd/reboot", QoS::AtLeastOnce, false, "now")
        .await
        .unwrap();
    tokio::spawn(async move { while svc_loop.poll().await.is_ok() {} });
    let line = agent
        .stdout
        .recv_timeout(Duration::from_secs(5))
        .expect("a command line on stdout");
    let command: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (command["topic"].as_str(), command["payload"].as_str()),
        (Some("devices/dev-1/cmd/reboot"), Some("now"))
    );
}

#[test]
fn a_rogue_broker_is_refused_as_possible_impersonation() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let rogue = TestFleet::new(); // another CA, a broker certificate for the same name
    let broker = start_broker(&rogue, &[]);
    let output = e2e::run(&mut agent_cmd("check", &bundle, broker.port()));
    assert_eq!(exit_code(&output), 20, "{}", text(&output));
    assert!(text(&output).contains("possible impersonation"));

    let mut agent = RunningAgent::start(agent_cmd("run", &bundle, broker.port()));
    let line = agent.wait_stderr("connect_failed", Duration::from_secs(10));
    assert!(line.contains("possible impersonation"), "{line}");
    agent.send("telemetry x");
}

fn with_config(bundle: &Path, extra: &str) -> PathBuf {
    let config = fs::read_to_string(bundle.join("agent.toml")).unwrap();
    let path = bundle.join("variant.toml");
    fs::write(&path, format!("{config}{extra}\n")).unwrap();
    path
}

#[test]
fn a_pin_mismatch_is_refused_and_the_right_pin_accepted() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let run_with = |config: &Path| {
        e2e::run(
            agent()
                .arg("check")
                .arg("--config")
                .arg(config)
                .env("DEVICE_AGENT__BROKER_URL", broker_url(broker.port())),
        )
    };
    let wrong = with_config(
        &bundle,
        "pin_sha256 = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]",
    );
    let output = run_with(&wrong);
    assert_eq!(exit_code(&output), 22, "{}", text(&output));
    assert!(text(&output).contains("not one of pin_sha256"));

    let broker_cert = fleet_identity::pem::load_certs(&fleet.broker_dir().join("broker.crt"))
        .unwrap()
        .remove(0);
    let right = with_config(
        &bundle,
        &format!("pin_sha256 = [\"{}\"]", spki_sha256(&broker_cert).unwrap()),
    );
    assert_eq!(exit_code(&run_with(&right)), 0);
}

#[test]
fn a_broker_name_mismatch_is_diagnosed() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let output =
        e2e::run(agent_cmd("check", &bundle, broker.port()).env("DEVICE_AGENT__SERVER_NAME", "gateway.example"));
    assert_eq!(exit_code(&output), 21, "{}", text(&output));
    assert!(text(&output).contains("does not name the server_name"));
}

#[test]
fn a_revoked_device_is_told_so_and_backs_off_to_the_maximum() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    fleet.revoke("dev-1");
    let broker = start_broker(&fleet, &[]);
    let output = e2e::run(&mut agent_cmd("check", &bundle, broker.port()));
    assert_eq!(exit_code(&output), 31, "{}", text(&output));
    assert!(text(&output).contains("REVOKED"));

    let mut command = agent_cmd("run", &bundle, broker.port());
    command
        .env("DEVICE_AGENT__BACKOFF_MIN_MS", "100")
        .env("DEVICE_AGENT__BACKOFF_MAX_MS", "40000");
    let agent = RunningAgent::start(command);
    let line = agent.wait_stderr("connect_failed", Duration::from_secs(10));
    let delay: u64 = line
        .split("retry_in_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("retry_in_ms logged");
    assert!(
        delay >= 20_000,
        "a revoked identity waits in the upper half of the maximum, not {delay} ms: {line}"
    );
}

#[test]
fn an_expired_device_certificate_is_diagnosed_from_the_brokers_alert() {
    let fleet = TestFleet::new();
    let bundle = fleet.custom_device("old-1", |p| {
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    fs::write(
        bundle.join("agent.toml"),
        "broker_url = \"mqtts://localhost:1\"\nca = \"broker-ca.crt\"\ncert = \"device.crt\"\nkey = \"device.key\"\n",
    )
    .unwrap();
    let broker = start_broker(&fleet, &[]);
    let output = e2e::run(&mut agent_cmd("check", &bundle, broker.port()));
    assert_eq!(exit_code(&output), 30, "{}", text(&output));
    assert!(text(&output).contains("EXPIRED"));
}

#[test]
fn an_unreachable_broker_is_diagnosed() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let output = e2e::run(&mut agent_cmd("check", &bundle, free_port()));
    assert_eq!(exit_code(&output), 50, "{}", text(&output));
    assert!(text(&output).contains("unreachable"));
}

#[tokio::test]
async fn a_clock_stuck_in_1970_is_floored_at_the_build_time() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let mut agent_config = Agent::load(&bundle.join("agent.toml")).unwrap();
    agent_config.broker.port = broker.port();
    let attempt = |clock: FlooredClock| {
        let Credentials { identity, tls, .. } = load_credentials(&agent_config, Arc::new(clock)).unwrap();
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(mqtt_options(&agent_config, &identity, tls), 4);
        async move { connect_once(&mut eventloop, Duration::from_secs(5)).await }
    };
    // Without a floor, 1970 makes the broker's certificate "not valid yet".
    assert!(matches!(
        attempt(FlooredClock::new(0, || 0)).await,
        Diagnosis::BrokerCertificateInvalid(_)
    ));
    // Floored at a time after the broker certificate was issued (as the build time is for a
    // fleet provisioned before the agent was built), the same 1970 clock accepts the broker.
    assert!(build_time() > 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(attempt(FlooredClock::new(now, || 0)).await, Diagnosis::Ok);
}

#[tokio::test]
async fn queued_messages_survive_sigkill_and_arrive_in_order_when_the_broker_returns() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let port = free_port();
    let fast = |mut command: Command| {
        command
            .env("DEVICE_AGENT__BACKOFF_MIN_MS", "100")
            .env("DEVICE_AGENT__BACKOFF_MAX_MS", "400");
        command
    };
    // Broker down: 500 messages accepted into the on-disk queue, then kill -9.
    let mut first = RunningAgent::start(fast(agent_cmd("run", &bundle, port)));
    for n in 0..500 {
        first.send(&format!("telemetry {n}"));
    }
    let queue = bundle.join("queue");
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued_files(&queue) < 500 {
        assert!(Instant::now() < deadline, "the agent did not queue 500 messages");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    // Broker up, a service listening, the agent restarted: everything arrives, in order.
    let port_text = format!("127.0.0.1:{port}");
    let broker = start_broker(&fleet, &[("BROKER__LISTEN", &port_text)]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let _second = RunningAgent::start(fast(agent_cmd("run", &bundle, port)));
    let mut seen: Vec<u32> = Vec::new();
    while seen.len() < 500 {
        let publish = next_publish(&mut svc_loop, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("only {} of 500 arrived", seen.len()));
        let n: u32 = std::str::from_utf8(&publish.payload).unwrap().parse().unwrap();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    assert_eq!(seen, (0..500).collect::<Vec<_>>(), "in order, none lost");
}

#[test]
fn keygen_makes_a_0600_key_and_a_csr_that_openssl_and_provision_accept() {
    use std::os::unix::fs::PermissionsExt;
    let openssl = require_tool("openssl", "openssl");
    let fleet = TestFleet::new();
    for key_type in ["ecdsa-p256", "ecdsa-p384", "ed25519"] {
        let out = fleet.path().join(format!("keygen-{key_type}"));
        run_ok(
            agent()
                .args(["keygen", "--id", "dev-9", "--key-type", key_type, "--out"])
                .arg(&out),
        );
        assert_eq!(
            fs::metadata(out.join("device.key")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let verified = e2e::run(
            Command::new(&openssl)
                .args(["req", "-verify", "-noout", "-in"])
                .arg(out.join("device.csr")),
        );
        assert!(verified.status.success(), "{key_type}: {}", text(&verified));
        let csr = provisioning::csr::read_csr(&out.join("device.csr")).expect("provision accepts the CSR");
        assert_eq!(csr.id.as_str(), "dev-9");
    }
    let refused = e2e::run(
        agent()
            .args(["keygen", "--id", "dev/9", "--out"])
            .arg(fleet.path().join("bad")),
    );
    assert!(!refused.status.success() && text(&refused).contains("invalid id"));
}

#[test]
fn the_agent_works_unchanged_against_mosquitto_with_mtls() {
    let mosquitto = require_tool("mosquitto", "mosquitto");
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let port = free_port();
    let broker = fleet.broker_dir();
    let config = fleet.path().join("mosquitto.conf");
    fs::write(
        &config,
        format!(
            "user root\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nlog_dest stderr\n",
            broker.join("device-ca.crt").display(),
            broker.join("broker.crt").display(),
            broker.join("broker.key").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(mosquitto)
        .arg("-c")
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Mosquitto logs when its listener is open.
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(
        log.by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Opening ipv4 listen socket")),
        "mosquitto did not start"
    );
    std::thread::spawn(move || log.for_each(drop));
    let check = e2e::run(&mut agent_cmd("check", &bundle, port));
    let publish = e2e::run(agent_cmd("publish", &bundle, port).args(["--topic", "telemetry", "--message", "hi"]));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exit_code(&check), 0, "{}", text(&check));
    assert_eq!(exit_code(&publish), 0, "{}", text(&publish));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_through_the_unix_socket_and_sigterm_exits_zero() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let socket = fleet.path().join("agent.sock");
    let mut command = agent_cmd("run", &bundle, broker.port());
    command.arg("--listen-socket").arg(&socket);
    let mut agent = RunningAgent::start(command);
    agent.wait_stderr("connected to", Duration::from_secs(10));
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    writeln!(stream, "telemetry via-socket").unwrap();
    let received = next_publish(&mut svc_loop, Duration::from_secs(5))
        .await
        .expect("the socket's message arrives");
    assert_eq!(&received.payload[..], b"via-socket");

    let pid = agent.child.id().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "SIGTERM ends the agent cleanly: {status}");
    agent.wait_stderr("stopped;", Duration::from_secs(2));
}

#[test]
fn sigterm_while_waiting_to_reconnect_exits_zero_and_says_so() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let mut agent = RunningAgent::start(agent_cmd("run", &bundle, free_port()));
    agent.wait_stderr("connect_failed", Duration::from_secs(10));
    let pid = agent.child.id().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = agent.child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM during the backoff ends the agent cleanly: {status}"
    );
    agent.wait_stderr("stopped;", Duration::from_secs(2));
}

/// The broker's default `limits.max_packet_bytes`, and so the agent's.
const BROKER_MAX_PACKET: usize = 262_144;

/// A telemetry payload whose PUBLISH from dev-1 is exactly `packet` bytes.
fn telemetry_payload(packet: usize) -> String {
    let topic = "devices/dev-1/telemetry".len();
    let mut payload = packet - device_agent::outbound::qos1_publish_bytes(topic, 0);
    // The remaining length's own size grows with the payload: settle on the exact fit.
    while device_agent::outbound::qos1_publish_bytes(topic, payload) > packet {
        payload -= 1;
    }
    assert_eq!(device_agent::outbound::qos1_publish_bytes(topic, payload), packet);
    "x".repeat(payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_up_to_the_brokers_packet_limit_go_both_ways() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let mut agent = RunningAgent::connected(&bundle, broker.port());

    let largest = telemetry_payload(BROKER_MAX_PACKET);
    agent.send(&format!("telemetry {largest}"));
    let telemetry = next_publish(&mut svc_loop, Duration::from_secs(10))
        .await
        .expect("a PUBLISH of exactly max_packet_bytes arrives");
    assert_eq!(telemetry.payload.len(), largest.len());

    let command = "c".repeat(200 * 1024);
    svc.publish("devices/dev-1/cmd/config", QoS::AtLeastOnce, false, command.clone())
        .await
        .unwrap();
    tokio::spawn(async move { while svc_loop.poll().await.is_ok() {} });
    let line = agent
        .stdout
        .recv_timeout(Duration::from_secs(10))
        .expect("the 200 KiB command on stdout");
    let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(printed["payload"].as_str(), Some(command.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_non_utf8_lines_are_refused_and_the_next_message_still_goes_out() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let mut agent = RunningAgent::connected(&bundle, broker.port());

    // Longer than any message could be: discarded while it is read.
    agent.send(&format!("telemetry {}", "x".repeat(300 * 1024)));
    // Short enough a line, but its PUBLISH is one byte over the limit.
    agent.send(&format!("telemetry {}x", telemetry_payload(BROKER_MAX_PACKET)));
    agent.send_bytes(b"telemetry \xff\xfe");
    agent.send("telemetry next");

    let first = next_publish(&mut svc_loop, Duration::from_secs(10))
        .await
        .expect("the message after the refused ones arrives");
    assert_eq!(&first.payload[..], b"next", "nothing refused was queued before it");
    let needles = [
        format!(
            "refused a line of {} bytes: longer than max_packet_bytes (262144)",
            10 + 300 * 1024
        ),
        "its PUBLISH would be 262145 bytes, larger than max_packet_bytes (262144)".to_owned(),
        "bytes that is not UTF-8".to_owned(),
    ];
    agent.stderr_until("the three refusals", Duration::from_secs(5), |lines| {
        needles.iter().all(|n| lines.iter().any(|l| l.contains(n.as_str())))
    });
    wait_until_drained(
        &bundle.join("queue"),
        Duration::from_secs(5),
        "nothing refused stays queued",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_too_large_does_not_lock_the_device_out() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    // The broker allows 1 MiB, the agent keeps its 256 KiB default: a mismatch an operator can make.
    let broker = start_broker(&fleet, &[("BROKER__LIMITS__MAX_PACKET_BYTES", "1048576")]);
    let (svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    svc.publish(
        "devices/dev-1/cmd/config",
        QoS::AtLeastOnce,
        true,
        vec![b'c'; 300 * 1024],
    )
    .await
    .unwrap();
    e2e::wait_for_incoming(
        &mut svc_loop,
        Duration::from_secs(5),
        "the retained command's PUBACK",
        |p| matches!(p, rumqttc::Packet::PubAck(_)),
    )
    .await;

    let mut command = agent_cmd("run", &bundle, broker.port());
    command
        .env("DEVICE_AGENT__BACKOFF_MIN_MS", "100")
        .env("DEVICE_AGENT__BACKOFF_MAX_MS", "400");
    let mut agent = RunningAgent::start(command);
    let mut seen: Vec<u32> = Vec::new();
    for n in 0..20 {
        agent.send(&format!("telemetry {n}"));
        // Spread over several connections, each ended by the retained command.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while seen.len() < 20 {
        let publish = next_publish(&mut svc_loop, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {seen:?} of 20 arrived"));
        let n: u32 = std::str::from_utf8(&publish.payload).unwrap().parse().unwrap();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());

    // Every message is acknowledged, though each subscription still ends its connection.
    wait_until_drained(
        &bundle.join("queue"),
        Duration::from_secs(10),
        "the queue never drained",
    );
    let lines = agent.stderr_until("five connections", Duration::from_secs(20), |lines| {
        lines.iter().filter(|l| l.contains("connected to")).count() >= 5
    });
    let reports: Vec<&String> = lines.iter().filter(|l| l.contains("command_too_large")).collect();
    // Its remaining length: topic length, topic, packet id, payload.
    assert_eq!(reports.len(), 1, "logged once, not per connection: {lines:#?}");
    assert!(
        reports[0].contains("bytes=307228") && reports[0].contains("max_packet_bytes=262144"),
        "names the size and the limit: {}",
        reports[0]
    );
}

#[tokio::test]
async fn unreadable_corrupt_and_unsendable_queue_entries_are_set_aside_and_the_rest_go_out() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let queue = bundle.join("queue");
    fs::create_dir_all(&queue).unwrap();
    let entry = |seq: u64, ext: &str| queue.join(format!("{seq:020}.{ext}"));
    fs::write(entry(1, "msg"), "telemetry\none").unwrap();
    fs::create_dir(entry(2, "msg")).unwrap(); // cannot be read as a file
    fs::write(entry(3, "msg"), b"\xff\xfe\npayload").unwrap(); // suffix not UTF-8
    let mut too_large = b"telemetry\n".to_vec(); // queued by an agent without a limit
    too_large.extend(vec![b'x'; 300 * 1024]);
    fs::write(entry(4, "msg"), too_large).unwrap();
    fs::write(entry(5, "msg"), "no newline").unwrap();
    fs::write(entry(6, "msg"), "telemetry\nsix").unwrap();

    let broker = start_broker(&fleet, &[]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/#").await;
    let agent = RunningAgent::start(agent_cmd("run", &bundle, broker.port()));
    for expected in [&b"one"[..], b"six"] {
        let publish = next_publish(&mut svc_loop, Duration::from_secs(10))
            .await
            .expect("the readable messages arrive");
        assert_eq!(
            (publish.topic.as_str(), &publish.payload[..]),
            ("devices/dev-1/telemetry", expected)
        );
    }
    let lines = agent.stderr_until("four set-aside entries", Duration::from_secs(5), |lines| {
        lines.iter().filter(|l| l.contains("queued_message_set_aside")).count() >= 4
    });
    for (seq, ext) in [(2, "corrupt"), (3, "corrupt"), (4, "refused"), (5, "corrupt")] {
        let aside = entry(seq, ext);
        assert!(aside.exists() && !entry(seq, "msg").exists(), "{}", aside.display());
        assert!(
            lines.iter().any(|l| l.contains(&aside.display().to_string())),
            "the log names {}: {lines:#?}",
            aside.display()
        );
    }
    wait_until_drained(&queue, Duration::from_secs(5), "the sent messages are acknowledged");
}

// Input that arrives while the agent connects must wait, not abort the connection: a message
// taken mid-handshake used to drop the connect in progress, which the broker logged as a
// refused handshake (`tls_error`), and the agent had to start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_during_the_connect_does_not_abort_the_handshake() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (_svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let mut agent = RunningAgent::start(agent_cmd("run", &bundle, broker.port()));
    // A message every millisecond from the moment the agent starts, through its handshake.
    for n in 0..50 {
        agent.send(&format!("telemetry {n}"));
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 50 {
        let publish = next_publish(&mut svc_loop, Duration::from_secs(10))
            .await
            .expect("every message arrives");
        seen.insert(publish.payload.to_vec());
    }
    let events = broker.events();
    let refused: Vec<_> = events.iter().filter(|e| e["event"] == "reject").collect();
    assert!(refused.is_empty(), "handshakes refused: {refused:?}");
    let accepted = events
        .iter()
        .filter(|e| e["event"] == "accept" && e["device_id"] == "dev-1")
        .count();
    assert_eq!(accepted, 1, "the agent connected more than once");
}

// An application that stops reading the agent's stdout must not stop the agent: commands wait
// (at most a bounded number, the oldest dropped and logged) and telemetry keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_stops_reading_commands_does_not_stop_the_agent() {
    let fleet = TestFleet::new();
    let bundle = fleet.device("dev-1");
    let broker = start_broker(&fleet, &[]);
    let (svc, mut svc_loop) = subscribed_service(&fleet, broker.port(), "devices/dev-1/telemetry").await;
    let mut command = agent_cmd("run", &bundle, broker.port());
    // stdout is a pipe nobody reads: it fills after 64 KiB.
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let connected = Instant::now() + Duration::from_secs(10);
    while !lines
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .contains("connected to")
    {
        assert!(Instant::now() < connected, "the agent never connected");
    }
    let (telemetry_tx, mut telemetry) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = svc_loop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
                let _ = telemetry_tx.send(publish);
            }
        }
    });
    let payload = "c".repeat(1024);
    for _ in 0..3000 {
        svc.publish("devices/dev-1/cmd/fill", QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"telemetry still-alive\n").unwrap();
    stdin.flush().unwrap();
    let telemetry = tokio::time::timeout(Duration::from_secs(20), telemetry.recv())
        .await
        .expect("telemetry still arrives")
        .unwrap();
    assert_eq!(&telemetry.payload[..], b"still-alive");
    let _ = child.kill();
    let _ = child.wait();
}
