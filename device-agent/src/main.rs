//! `device-agent`: run, publish, check, keygen. A thin CLI over the `device_agent` library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use device_agent::config::Agent;
use device_agent::diagnosis::Diagnosis;
use device_agent::identity_files::IdentityFiles;
use device_agent::input::read_messages;
use device_agent::keygen::{self, KeyType};
use device_agent::outbound::MessageRules;
use device_agent::queue::Queue;
use device_agent::session::{connect_once, mqtt_options, Mode, Outcome, Runner};
use device_agent::trust::{load_credentials, Credentials, FlooredClock};
use rumqttc::{Event, Packet, QoS};
use tokio::io::BufReader;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// MQTT agent for a fleet device: mutual TLS with the device's own certificate, only the
/// pinned broker CA trusted, an on-disk queue so no message is silently lost.
#[derive(Parser)]
#[command(name = "device-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect and stay connected: print commands received on devices/<id>/cmd/# as JSON lines,
    /// publish lines "<topic-suffix> <payload>" from stdin (or --listen-socket) at QoS 1 to
    /// devices/<id>/<topic-suffix>, and a heartbeat on devices/<id>/status.
    Run {
        /// The agent configuration (agent.toml from `provision device`).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Read messages from connections to this Unix socket instead of stdin.
        #[arg(long, value_name = "PATH")]
        listen_socket: Option<PathBuf>,
    },
    /// Publish one message; exit 0 only once the broker acknowledged it (QoS 1).
    Publish {
        /// The agent configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Topic below devices/<id>/.
        #[arg(long)]
        topic: String,
        /// The payload.
        #[arg(long)]
        message: String,
        /// 0 or 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
    },
    /// Check the certificate, key, CA and clock, then try one connection and say in plain words
    /// what is wrong. Exit codes: 0 OK, 10 local files, 20 impersonation, 21 name mismatch,
    /// 22 pin mismatch, 23 broker certificate invalid, 30 our certificate expired, 31 revoked,
    /// 32 refused, 40 client id refused, 50 unreachable, 60 other.
    Check {
        /// The agent configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Renew this device's certificate now, through the issuing service (`provision serve`):
    /// a new key on the device, its CSR over MQTT, the new certificate tried and committed once
    /// the broker accepts it. `run` does the same by itself when the certificate is due. Exit
    /// codes: 0 renewed, 70 refused by the issuer (the reason is printed), 50 no answer, others
    /// as `check`.
    Renew {
        /// The agent configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Generate this device's key (mode 0600) and a CSR (CN = id) for `provision sign-csr`.
    /// The key never leaves the device.
    Keygen {
        /// The device id.
        #[arg(long)]
        id: String,
        /// Where to write device.key and device.csr.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Key type.
        #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
        key_type: KeyType,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Cli::parse().command {
        Command::Run { config, listen_socket } => {
            let input = listen_socket.map_or(Input::Stdin, Input::Socket);
            runtime.block_on(run(&config, input, Mode::Run))
        }
        Command::Publish {
            config,
            topic,
            message,
            qos,
        } => runtime.block_on(publish(&config, &topic, message, qos)),
        Command::Check { config } => runtime.block_on(check(&config)),
        Command::Renew { config } => runtime.block_on(run(&config, Input::None, Mode::RenewOnce)),
        Command::Keygen { id, out, key_type } => generate_key(&id, &out, key_type),
    }
}

fn load(config: &Path) -> Result<Agent, ExitCode> {
    Agent::load(config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(Diagnosis::LocalProblem(String::new()).exit_code())
    })
}

fn report(diagnosis: &Diagnosis) -> ExitCode {
    if *diagnosis == Diagnosis::Ok {
        println!("{diagnosis}");
    } else {
        eprintln!("{diagnosis}");
    }
    ExitCode::from(diagnosis.exit_code())
}

async fn check(config: &Path) -> ExitCode {
    match load(config) {
        Ok(agent) => report(&device_agent::check::run(&agent).await),
        Err(code) => code,
    }
}

async fn publish(config: &Path, suffix: &str, message: String, qos: u8) -> ExitCode {
    let agent = match load(config) {
        Ok(agent) => agent,
        Err(code) => return code,
    };
    let Credentials { identity, tls, .. } = match load_credentials(&agent, Arc::new(FlooredClock::system())) {
        Ok(credentials) => credentials,
        Err(e) => return report(&Diagnosis::LocalProblem(e.to_string())),
    };
    let rules = MessageRules::new(identity.id.as_str(), agent.config.max_packet_bytes);
    if let Err(refusal) = rules.check(suffix, message.as_bytes()) {
        eprintln!("error: --topic/--message: {refusal}");
        return ExitCode::from(2);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt_options(&agent, &identity, tls), 4);
    let connected = connect_once(&mut eventloop, Duration::from_secs(15)).await;
    if connected != Diagnosis::Ok {
        return report(&connected);
    }
    let qos = if qos == 1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    if client.try_publish(rules.topic(suffix), qos, false, message).is_err() {
        return report(&Diagnosis::Other("could not hand the message to the client".into()));
    }
    let acknowledged = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => return Ok(()),
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(Diagnosis::of(&e)),
            }
        }
    })
    .await;
    match acknowledged {
        Ok(Ok(())) => {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            ExitCode::SUCCESS
        }
        Ok(Err(diagnosis)) => report(&diagnosis),
        Err(_) => report(&Diagnosis::Other(
            "the broker did not acknowledge the message within 15 s".into(),
        )),
    }
}

/// Where `run` reads the application's messages from.
enum Input {
    Stdin,
    Socket(PathBuf),
    /// `renew`: no messages.
    None,
}

async fn run(config: &Path, input: Input, mode: Mode) -> ExitCode {
    let agent = match load(config) {
        Ok(agent) => agent,
        Err(code) => return code,
    };
    let clock = Arc::new(FlooredClock::system());
    if clock.is_behind() {
        warn!(
            event = "clock_behind",
            "the system clock is earlier than this agent's build time: validating certificates against the build time"
        );
    }
    // One process at a time may swap this device's certificate.
    let _lock = match lock_identity(&agent) {
        Ok(lock) => lock,
        Err(why) => return report(&Diagnosis::LocalProblem(why)),
    };
    // Before the files are read: a crash in the middle of a certificate swap is finished or
    // undone first.
    match IdentityFiles::new(agent.config.cert.clone(), agent.config.key.clone()).recover() {
        Ok(Some(what)) => info!(event = "renewal_recovered", "{what}"),
        Ok(None) => {}
        Err(e) => {
            warn!(event = "renewal_recovery_failed", error = %e, "cannot tidy an interrupted certificate swap: {e}")
        }
    }
    let credentials = match load_credentials(&agent, clock.clone()) {
        Ok(credentials) => credentials,
        Err(e) => return report(&Diagnosis::LocalProblem(e.to_string())),
    };
    let queue = match Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages) {
        Ok(queue) => queue.limit_entries(agent.config.max_packet_bytes as u64),
        Err(e) => {
            return report(&Diagnosis::LocalProblem(format!(
                "{}: {e}",
                agent.config.queue_dir.display()
            )))
        }
    };
    let identity = &credentials.identity;
    info!(event = "starting", device_id = %identity.id, broker = %agent.broker, queued = queue.len(), "device {} starting", identity.id);
    if mode == Mode::Run {
        tokio::spawn(warn_before_expiry(credentials.cert.to_vec(), clock.clone()));
    }
    let (tx, rx) = mpsc::channel(1024);
    let max_line_bytes = agent.config.max_packet_bytes;
    match input {
        Input::Socket(path) => {
            let _ = std::fs::remove_file(&path);
            match tokio::net::UnixListener::bind(&path) {
                Ok(listener) => {
                    tokio::spawn(async move {
                        while let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(read_messages(BufReader::new(stream), tx.clone(), max_line_bytes));
                        }
                    });
                }
                Err(e) => return report(&Diagnosis::LocalProblem(format!("{}: {e}", path.display()))),
            }
        }
        Input::Stdin => {
            tokio::spawn(read_messages(BufReader::new(tokio::io::stdin()), tx, max_line_bytes));
        }
        // A closed input is one that never brings anything: the run loop does not wait on it.
        Input::None => drop(tx),
    }
    let (commands_tx, commands) = mpsc::unbounded_channel::<device_agent::session::Command>();
    tokio::spawn(print_commands(commands));
    let runner = Runner::new(agent, &credentials, clock, queue, commands_tx, mode);
    match runner.run(rx, stop_signal()).await {
        Outcome::Stopped => ExitCode::SUCCESS,
        Outcome::Renewed => {
            println!("renewed: the new certificate is in use");
            ExitCode::SUCCESS
        }
        Outcome::Refused(error) => {
            eprintln!(
                "the issuer refused the renewal ({}): {}",
                error.code.as_str(),
                error.message
            );
            ExitCode::from(RENEWAL_REFUSED)
        }
        Outcome::Unanswered => report(&Diagnosis::Unreachable(
            "the issuing service did not answer the renewal request: is `provision serve` running?".into(),
        )),
    }
}

/// The exit code of `renew` when the issuer refused.
const RENEWAL_REFUSED: u8 = 70;

/// Locks `<cert>.lock` beside the device certificate for as long as the returned file is open:
/// `run` and `renew` never swap the same certificate at once.
fn lock_identity(agent: &device_agent::config::Agent) -> Result<std::fs::File, String> {
    let path = agent.config.cert.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "{}: another device-agent (run or renew) is using this device's certificate; `run` renews by itself",
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

/// Commands held for stdout at most: beyond, while nothing reads stdout, the oldest go.
const COMMANDS_HELD: usize = 1024;

/// Prints each received command as one JSON line: topic, and payload as UTF-8 or base64.
/// Writes asynchronously, so an application that stops reading stdout holds up only this task
/// (a blocking print would stop the agent's single thread: telemetry, keepalive and all), and
/// keeps at most [`COMMANDS_HELD`] waiting, counting and logging what it drops.
async fn print_commands(mut commands: mpsc::UnboundedReceiver<device_agent::session::Command>) {
    use base64::Engine as _;
    use tokio::io::AsyncWriteExt as _;
    let mut stdout = tokio::io::stdout();
    let mut dropped = 0u64;
    while let Some((topic, payload)) = commands.recv().await {
        let before = dropped;
        while commands.len() > COMMANDS_HELD && commands.try_recv().is_ok() {
            dropped += 1;
        }
        if dropped > before {
            warn!(
                event = "commands_dropped",
                dropped_total = dropped,
                "stdout is not being read: dropped the oldest commands ({dropped} so far)"
            );
        }
        let line = match std::str::from_utf8(&payload) {
            Ok(text) => serde_json::json!({ "topic": topic, "payload": text }),
            Err(_) => {
                serde_json::json!({ "topic": topic, "payload_base64": base64::engine::general_purpose::STANDARD.encode(&payload) })
            }
        };
        let written = async {
            stdout.write_all(format!("{line}\n").as_bytes()).await?;
            stdout.flush().await
        };
        if written.await.is_err() {
            // Nobody will read them: stdout is gone.
            return;
        }
    }
}

/// Warns once a day from 30 days before the device certificate expires.
async fn warn_before_expiry(cert: Vec<u8>, clock: Arc<FlooredClock>) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(&cert) else {
        return;
    };
    let not_after = parsed.validity().not_after.timestamp();
    loop {
        let days_left = (not_after - clock.seconds() as i64) / 86_400;
        if days_left <= device_agent::check::EXPIRY_WARNING_DAYS {
            warn!(event = "certificate_expiring", days_left, "this device's certificate expires in {days_left} days: it renews itself through the issuing service (`provision serve`); check that it runs, or renew by hand (device-agent keygen + provision sign-csr --rotate)");
        }
        tokio::time::sleep(Duration::from_secs(86_400)).await;
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn generate_key(id: &str, out: &Path, key_type: KeyType) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Err(e) = fleet_identity::DeviceId::parse(id) {
        eprintln!("error: invalid id {id:?} (--id): {e}");
        return ExitCode::from(2);
    }
    let made = match keygen::generate(key_type, id) {
        Ok(made) => made,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let key_path = out.join("device.key");
    let csr_path = out.join("device.csr");
    let written = std::fs::create_dir_all(out)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
        })
        .and_then(|mut file| file.write_all(made.key_pem.as_bytes()))
        .and_then(|()| std::fs::write(&csr_path, made.csr_pem.as_bytes()));
    match written {
        Ok(()) => {
            println!(
                "key {} (0600) and CSR {} written; send the CSR to the operator for `provision sign-csr`",
                key_path.display(),
                csr_path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: {}: {e} (an existing key is never overwritten)",
                key_path.display()
            );
            ExitCode::FAILURE
        }
    }
}
