//! `broker`: the gateway MQTT broker. `broker --config broker.toml` runs it;
//! `broker check-config --config broker.toml` validates every file and prints a summary.

use std::path::PathBuf;
use std::process::ExitCode;

use broker::bridge::BridgeConfig;
use broker::config::{LogFormat, SyncMode};
use broker::listener::crypto_provider;
use broker::tls::{TlsFiles, TlsMaterial};
use broker::{Broker, BrokerConfig};
use clap::{Parser, Subcommand};
use time::OffsetDateTime;
use tracing_subscriber::EnvFilter;

/// MQTT broker for a device fleet: mutual TLS only, client id bound to the certificate, each
/// device confined to its own topics, revocation and certificate reload without a restart.
#[derive(Parser)]
#[command(name = "broker", version)]
struct Cli {
    /// The configuration file (written by `provision broker`). Environment variables
    /// BROKER__<KEY> override it, e.g. BROKER__LISTEN=0.0.0.0:8883.
    #[arg(long, global = true, value_name = "FILE", default_value = "broker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and every file it names, print a summary, exit non-zero on
    /// any problem.
    CheckConfig {
        /// Also try the TLS handshake with each `[bridge]` upstream, with the gateway's
        /// certificate (no MQTT CONNECT: that would take over the running gateway's session).
        #[arg(long)]
        probe_bridge: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match BrokerConfig::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::CheckConfig { probe_bridge }) => check_config(&cli.config, &config, probe_bridge),
        None => serve(config),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(config: BrokerConfig) -> ExitCode {
    init_logging(config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let broker = Broker::bind(&config).await?;
        broker.run(stop_signal()).await?;
        Ok::<_, anyhow::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
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

fn date(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| unix.to_string())
}

fn check_config(path: &std::path::Path, config: &BrokerConfig, probe_bridge: bool) -> ExitCode {
    let files = TlsFiles::of(config);
    let material = match TlsMaterial::load(&files, &crypto_provider()) {
        Ok(material) => material,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let listen: Vec<String> = config.listen.iter().map(ToString::to_string).collect();
    println!("{}: OK", path.display());
    println!("listen: {}", listen.join(", "));
    println!(
        "server certificate {}: names {}; expires {} ({} days)",
        files.server_cert.display(),
        material.server.names.join(", "),
        date(material.server.not_after),
        (material.server.not_after - now) / 86_400
    );
    println!("client CAs {}:", files.client_ca.display());
    let crl = material.crl.as_ref();
    for ca in &material.client_cas {
        let coverage = match crl {
            None => "",
            Some(crl) if crl.refuses_issuer(&ca.subject_der) => "  NO CRL: its certificates are refused (crl_missing)",
            Some(crl) if crl.exempt.iter().any(|e| e.sha256 == ca.sha256) => "  no CRL, exempt: accepted unchecked",
            Some(_) => "  covered by a CRL",
        };
        println!("  {} (sha256 {}){coverage}", ca.subject, ca.sha256);
    }
    match crl {
        Some(crl) => println!(
            "CRLs {}: {} revoked, number {}, next update {}{}",
            files
                .crl
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            crl.revoked.len(),
            crl.number.as_deref().unwrap_or("-"),
            crl.next_update.map(date).unwrap_or_else(|| "-".into()),
            if crl.is_stale(now) {
                " (STALE: still enforced; run `provision crl`)"
            } else {
                ""
            }
        ),
        None => println!("CRL: none configured (revocation OFF: a revoked certificate is accepted)"),
    }
    match &config.persistence {
        Some(persistence) => println!(
            "persistence: {} (sync {}; at most {} bytes queued on disk)",
            persistence.dir.display(),
            match persistence.sync {
                SyncMode::Always => "always: acknowledged once fsynced".to_owned(),
                SyncMode::Interval => format!(
                    "every {} ms: a crash loses up to that much acknowledged traffic",
                    persistence.interval_ms
                ),
            },
            persistence.max_bytes
        ),
        None => println!("persistence: off (a restart loses persistent sessions, their queues and retained messages)"),
    }
    match &config.bridge {
        Some(bridge) => check_bridge(bridge, probe_bridge, now),
        None if probe_bridge => {
            eprintln!("error: --probe-bridge: broker.toml has no [bridge]");
            ExitCode::FAILURE
        }
        None => {
            println!("bridge: none");
            ExitCode::SUCCESS
        }
    }
}

/// Prints what `[bridge]` says, after loading its files; with `probe`, tries the TLS handshake
/// with every upstream and fails if none completes.
fn check_bridge(bridge: &BridgeConfig, probe: bool, now: i64) -> ExitCode {
    let (dialer, certificate) = match broker::bridge::dialer(bridge) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "bridge: {} ({}, expires {} ({} days)); upstreams {}; trusting {}",
        certificate.identity,
        bridge.cert.display(),
        date(certificate.not_after),
        (certificate.not_after - now) / 86_400,
        bridge.upstreams.join(", "),
        bridge.upstream_ca.display()
    );
    let prefix = bridge.rendered_prefix();
    println!(
        "  up: {} -> {prefix}<topic>; down: {prefix}<topic> -> {}; outbox at most {} messages, {} bytes",
        bridge.up.join(", "),
        bridge.down.join(", "),
        bridge.outbox_max_messages,
        bridge.outbox_max_bytes
    );
    if !probe {
        return ExitCode::SUCCESS;
    }
    let urls = match bridge.upstream_urls() {
        Ok(urls) => urls,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reached = 0;
    for url in &urls {
        match runtime.block_on(dialer.probe(url)) {
            Ok(()) => {
                reached += 1;
                println!("  probe {url}: TLS handshake OK, certificate accepted");
            }
            Err(e) => println!("  probe {url}: FAILED ({}): {e}", e.reason()),
        }
    }
    if reached == 0 {
        eprintln!("error: no upstream completed the TLS handshake");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
