//! `provision`: the operator's tool for the fleet PKI. A thin CLI over the `provisioning` library.

use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleet_identity::{BrokerUrl, DeviceId, Role};
use provisioning::batch::{issue_devices, manifest_ids, numbered_ids, write_manifest, IssueOptions, MANIFEST};
use provisioning::broker_bundle::{issue_broker, BrokerRequest, BROKER_CONFIG, DEFAULT_BROKER_VALIDITY_DAYS};
use provisioning::csr::{read_csr, sign_device_csr};
use provisioning::issue::{issue_named, DEFAULT_LEAF_VALIDITY_DAYS};
use provisioning::key_type::KeyType;
use provisioning::output::{ensure_writable, write_new, Overwrite, PUBLIC_MODE};
use provisioning::pki::{InitOptions, Pki};
use provisioning::registry::{ListFilter, Record, RevokeTarget};
use provisioning::renewal::{Issuer, Policy, DEFAULT_RENEW_AFTER};
use provisioning::revocation::{Reason, DEFAULT_NEXT_UPDATE_DAYS};
use provisioning::serve::ServeOptions;
use provisioning::validity::Validity;
use provisioning::{Error, Result};
use time::OffsetDateTime;

/// Default CA validity: ten years.
const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// Written into `agent.toml` when `--broker-url` is not given.
const DEFAULT_BROKER_URL: &str = "mqtts://localhost:8883";

/// Fleet PKI for MQTT devices: two CAs, per-device identities, CSR signing, revocation and an
/// inventory of everything issued.
///
/// The device CA signs device and service certificates and the CRL; the broker trusts it for
/// clients. The broker CA signs the broker's server certificate; devices trust only it.
#[derive(Parser)]
#[command(name = "provision", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new PKI: writes device-ca.crt/.key, broker-ca.crt/.key, an empty crl.pem and
    /// registry.db into --pki. Refuses a directory that already holds a PKI.
    Init(InitArgs),
    /// Issue the broker's server certificate: writes broker.crt, broker.key, device-ca.crt (the
    /// client trust anchor) and a ready broker.toml into --out.
    Broker(BrokerArgs),
    /// Issue one device identity: writes OUT/<id>/device.crt, device.key, broker-ca.crt and
    /// agent.toml.
    Device(DeviceArgs),
    /// Issue many device identities on all cores: a bundle per device as for `device`, plus
    /// OUT/manifest.csv (id, serial, sha256, not_after). A progress bar on a terminal only.
    Batch(BatchArgs),
    /// Issue a backend service identity (may use all topics by default): writes
    /// OUT/<name>/service.crt, service.key and broker-ca.crt.
    Service(ServiceArgs),
    /// Issue a gateway's bridge identity (SAN URI urn:gateway:<name>, signed by the device CA):
    /// the client certificate a gateway broker presents to its upstream. Writes
    /// OUT/<name>/gateway.crt, gateway.key and broker-ca.crt.
    Gateway(ServiceArgs),
    /// Sign a device's CSR (the key never leaves the device): checks the signature, takes the id
    /// from the CN, writes the certificate to --out.
    SignCsr(SignCsrArgs),
    /// Revoke certificates and rewrite crl.pem atomically (the broker picks it up live).
    Revoke(RevokeArgs),
    /// Re-sign crl.pem with the same revoked set and a fresh nextUpdate (run it from cron).
    Crl(CrlArgs),
    /// List the inventory: a table, or JSON for scripts, with each device certificate's
    /// renewal state (current, renewed, pending, due, overdue, failed).
    List(ListArgs),
    /// Run the issuing service: connect to the broker as a service, answer every device's
    /// renewal requests (devices/<id>/renew/request) with a certificate signed by the device CA,
    /// and revoke (superseded) what a renewal replaced once the device connected with it.
    Serve(ServeArgs),
}

#[derive(Args)]
struct PkiArg {
    /// The PKI directory made by `provision init`.
    #[arg(long, value_name = "DIR")]
    pki: PathBuf,
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Organisation name written into every certificate.
    #[arg(long, default_value = "fleet")]
    fleet: String,
    /// Key type of both CAs.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    key_type: KeyType,
    /// Validity of both CAs, in days.
    #[arg(long, default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
    ca_validity_days: u32,
}

#[derive(Args)]
struct BrokerArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A DNS name devices use to reach the broker (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// An IP address devices use to reach the broker (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<IpAddr>,
    /// Certificate validity in days.
    #[arg(long, default_value_t = DEFAULT_BROKER_VALIDITY_DAYS)]
    validity_days: u32,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
}

/// A leaf certificate's validity: `--validity-days`, or `--validity` with a unit.
#[derive(Args)]
struct ValidityArgs {
    /// Certificate validity in days.
    #[arg(long, default_value_t = DEFAULT_LEAF_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    validity_days: u32,
    /// Certificate validity with a unit (90s, 10m, 12h, 30d), instead of --validity-days: short
    /// lifetimes are for testing renewal.
    #[arg(long, value_name = "DURATION", conflicts_with = "validity_days")]
    validity: Option<Validity>,
}

impl ValidityArgs {
    fn validity(&self) -> Validity {
        self.validity.unwrap_or(Validity::days(self.validity_days))
    }
}

#[derive(Args)]
struct IssueArgs {
    #[command(flatten)]
    validity: ValidityArgs,
    /// Device key type.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    key_type: KeyType,
    /// Broker address written into each agent.toml.
    #[arg(long, value_name = "mqtts://HOST:PORT", default_value = DEFAULT_BROKER_URL)]
    broker_url: BrokerUrl,
    /// Replace existing bundles.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DeviceArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Device id: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'.
    #[arg(long)]
    id: String,
    /// Output directory; the bundle goes into OUT/<id>/.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    issue: IssueArgs,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["count", "manifest"])))]
struct BatchArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Output directory; one OUT/<id>/ bundle per device plus OUT/manifest.csv.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of devices, named <prefix>00001, <prefix>00002, ...
    #[arg(long, requires = "prefix")]
    count: Option<usize>,
    /// Id prefix for --count.
    #[arg(long)]
    prefix: Option<String>,
    /// A CSV file with an `id` column: one device per row.
    #[arg(long, value_name = "FILE.csv")]
    manifest: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    #[command(flatten)]
    issue: IssueArgs,
}

#[derive(Args)]
struct ServiceArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Service (or gateway) name (same rules as a device id).
    #[arg(long)]
    name: String,
    /// Output directory; the bundle goes into OUT/<name>/.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    validity: ValidityArgs,
    /// Replace an existing bundle.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct SignCsrArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// The CSR (PEM or DER); its CN is the device id.
    #[arg(long, value_name = "FILE")]
    csr: PathBuf,
    /// Where to write the signed certificate (PEM).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    validity: ValidityArgs,
    /// Allow a second active certificate for the id (re-keying): the old one records the new one
    /// as its successor and both stay valid until the old one expires or is revoked.
    #[arg(long)]
    rotate: bool,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "serial"])))]
struct RevokeArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Revoke every active certificate of this device or service id.
    #[arg(long)]
    id: Option<String>,
    /// With --id: revoke the device or the service of that name. Needed when both exist.
    #[arg(long, value_enum, conflicts_with = "serial")]
    kind: Option<Kind>,
    /// Revoke the certificate with this serial (hex, colons allowed).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// Recorded in the registry and the CRL.
    #[arg(long, value_enum, default_value_t = Reason::Unspecified)]
    reason: Reason,
    /// The new CRL's nextUpdate, in days from now.
    #[arg(long, default_value_t = DEFAULT_NEXT_UPDATE_DAYS)]
    next_update_days: u32,
    #[command(flatten)]
    deliver: DeliverArg,
}

/// Where else the CRL goes.
#[derive(Args)]
struct DeliverArg {
    /// Also write the new CRL, atomically, as DIR/crl.pem (repeatable): one folder per gateway
    /// (a mount, or what a sync job copies), so every gateway enforces the same revocations.
    #[arg(long = "publish-to", value_name = "DIR")]
    publish_to: Vec<PathBuf>,
}

impl DeliverArg {
    /// Writes the PKI's CRL into every `--publish-to` folder and says so.
    fn deliver(&self, pki: &Pki) -> Result<()> {
        for written in pki.deliver_crl(&self.publish_to)? {
            println!("{} written", written.display());
        }
        Ok(())
    }
}

/// Which holder of an id `revoke --kind` means.
#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    /// The device of that id.
    Device,
    /// The service of that name.
    Service,
    /// The gateway of that name.
    Gateway,
}

impl From<Kind> for Role {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Device => Role::Device,
            Kind::Service => Role::Service,
            Kind::Gateway => Role::Gateway,
        }
    }
}

#[derive(Args)]
struct CrlArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// The CRL's nextUpdate, in days from now.
    #[arg(long, default_value_t = DEFAULT_NEXT_UPDATE_DAYS)]
    next_update_days: u32,
    #[command(flatten)]
    deliver: DeliverArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusFilter {
    Active,
    Revoked,
    Expired,
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// Only certificates with this status.
    #[arg(long, value_enum)]
    status: Option<StatusFilter>,
    /// Only active certificates that expire within this many days.
    #[arg(long, value_name = "N")]
    expiring_within_days: Option<u32>,
    /// Print JSON (an array of records) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    pki: PkiArg,
    /// The broker to connect to.
    #[arg(long, value_name = "mqtts://HOST:PORT")]
    broker_url: BrokerUrl,
    /// The name the broker's certificate must carry (default: the URL's host).
    #[arg(long)]
    server_name: Option<String>,
    /// This service's certificate (from `provision service`).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// This service's key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The broker CA to trust (default: the PKI's broker-ca.crt).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The MQTT client id.
    #[arg(long, default_value = "renewal-issuer")]
    client_id: String,
    #[command(flatten)]
    validity: ValidityArgs,
    /// The renewal window opens after this fraction of a certificate's validity.
    #[arg(long, default_value_t = DEFAULT_RENEW_AFTER)]
    renew_after: f64,
    /// Sign requests outside the renewal window too (an operator-triggered re-key).
    #[arg(long)]
    force: bool,
    /// Key types signed (repeatable).
    #[arg(long = "allow-key-type", value_enum, default_values_t = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519])]
    allowed_key_types: Vec<KeyType>,
    /// Seconds a device must wait between two requests (beyond: rate_limited).
    #[arg(long, default_value_t = 60)]
    min_interval_s: u32,
    /// Rewrite this file with Prometheus counters every 10 s (node_exporter's textfile
    /// collector).
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    #[command(flatten)]
    deliver: DeliverArg,
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Init(args) => init(args),
        Command::Broker(args) => broker(args),
        Command::Device(args) => device(args),
        Command::Batch(args) => batch(args),
        Command::Service(args) => named(Role::Service, args),
        Command::Gateway(args) => named(Role::Gateway, args),
        Command::SignCsr(args) => sign_csr(args),
        Command::Revoke(args) => revoke(args),
        Command::Crl(args) => crl(args),
        Command::List(args) => list(args),
        Command::Serve(args) => serve(args),
    }
}

fn overwrite(force: bool) -> Overwrite {
    if force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn parse_id(value: &str, origin: &str) -> Result<DeviceId> {
    DeviceId::parse(value).map_err(|source| Error::InvalidId {
        value: value.into(),
        origin: origin.into(),
        source,
    })
}

fn init(args: InitArgs) -> Result<()> {
    let options = InitOptions {
        fleet: args.fleet,
        key_type: args.key_type,
        ca_validity_days: args.ca_validity_days,
    };
    Pki::init(&args.pki.pki, &options)?;
    println!(
        "created PKI for fleet {:?} in {}",
        options.fleet,
        args.pki.pki.display()
    );
    Ok(())
}

fn broker(args: BrokerArgs) -> Result<()> {
    let mut pki = Pki::open(&args.pki.pki)?;
    let request = BrokerRequest {
        dns: args.dns,
        ips: args.ip,
        validity_days: args.validity_days,
        overwrite: overwrite(args.force),
    };
    let issued = issue_broker(&mut pki, &args.out, &request)?;
    println!(
        "broker certificate {} (serial {}) written to {}; start it with: broker --config {}",
        issued.id,
        issued.serial,
        args.out.display(),
        args.out.join(BROKER_CONFIG).display()
    );
    Ok(())
}

fn issue_options(issue: &IssueArgs, jobs: usize, progress: bool) -> IssueOptions {
    IssueOptions {
        broker_url: issue.broker_url.clone(),
        validity: issue.validity.validity(),
        key_type: issue.key_type,
        jobs,
        overwrite: overwrite(issue.force),
        progress,
    }
}

fn device(args: DeviceArgs) -> Result<()> {
    let id = parse_id(&args.id, "--id")?;
    let mut pki = Pki::open(&args.pki.pki)?;
    let issued = issue_devices(
        &mut pki,
        std::slice::from_ref(&id),
        &args.out,
        &issue_options(&args.issue, 1, false),
    )?;
    println!(
        "device {id} (serial {}) written to {}",
        issued[0].serial,
        args.out.join(id.as_str()).display()
    );
    Ok(())
}

fn batch(args: BatchArgs) -> Result<()> {
    let ids = match (&args.manifest, args.count, &args.prefix) {
        (Some(manifest), _, _) => manifest_ids(manifest)?,
        (None, Some(count), Some(prefix)) => numbered_ids(prefix, count)?,
        _ => {
            return Err(Error::BadArgument {
                flag: "--count/--manifest",
                reason: "give --count N --prefix P, or --manifest FILE.csv".into(),
            })
        }
    };
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = issue_options(&args.issue, jobs, std::io::stderr().is_terminal());
    ensure_writable(&args.out.join(MANIFEST), options.overwrite)?;
    let mut pki = Pki::open(&args.pki.pki)?;
    let started = std::time::Instant::now();
    let issued = issue_devices(&mut pki, &ids, &args.out, &options)?;
    let manifest = write_manifest(&args.out, &issued, options.overwrite)?;
    println!(
        "{} devices issued in {:.2} s; manifest: {}",
        issued.len(),
        started.elapsed().as_secs_f64(),
        manifest.display()
    );
    Ok(())
}

/// `provision service` and `provision gateway`: a named identity of `role`.
fn named(role: Role, args: ServiceArgs) -> Result<()> {
    let id = parse_id(&args.name, "--name")?;
    let mut pki = Pki::open(&args.pki.pki)?;
    let minted = issue_named(
        &mut pki,
        role,
        &id,
        &args.out,
        args.validity.validity(),
        overwrite(args.force),
    )?;
    println!(
        "{role} {id} (serial {}) written to {}",
        minted.issued.serial,
        args.out.join(id.as_str()).display()
    );
    Ok(())
}

fn sign_csr(args: SignCsrArgs) -> Result<()> {
    let overwrite = overwrite(args.force);
    ensure_writable(&args.out, overwrite)?;
    // The certificate is recorded before it is written: refuse a --out that cannot be written
    // first, rather than leave a recorded certificate behind.
    let folder = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(Error::BadArgument {
            flag: "--out",
            reason: format!("{} is not a directory", folder.display()),
        });
    }
    let csr = read_csr(&args.csr)?;
    let mut pki = Pki::open(&args.pki.pki)?;
    let minted = sign_device_csr(&pki, csr, args.validity.validity())?;
    pki.record_then_write(std::slice::from_ref(&minted.issued), args.rotate, |_| {
        write_new(&args.out, minted.cert_pem.as_bytes(), PUBLIC_MODE, overwrite)
    })?;
    println!(
        "device {} (serial {}) certificate written to {}",
        minted.identity.id,
        minted.issued.serial,
        args.out.display()
    );
    Ok(())
}

fn revoke(args: RevokeArgs) -> Result<()> {
    let target = match (&args.id, &args.serial) {
        (Some(id), _) => RevokeTarget::Id {
            id: parse_id(id, "--id")?.to_string(),
            kind: args.kind.map(Role::from),
        },
        (None, Some(serial)) => RevokeTarget::Serial(
            fleet_identity::Serial::parse(serial)
                .map(|s| s.to_string())
                .ok_or_else(|| Error::BadArgument {
                    flag: "--serial",
                    reason: format!("{serial:?} is not a hexadecimal serial number"),
                })?,
        ),
        (None, None) => {
            return Err(Error::BadArgument {
                flag: "--id/--serial",
                reason: "say which certificate to revoke".into(),
            })
        }
    };
    let mut pki = Pki::open(&args.pki.pki)?;
    let revoked = pki.revoke_and_publish(&target, args.reason, args.next_update_days)?;
    println!("revoked {}; {} rewritten", revoked.join(", "), pki.crl_path().display());
    args.deliver.deliver(&pki)
}

fn crl(args: CrlArgs) -> Result<()> {
    let mut pki = Pki::open(&args.pki.pki)?;
    pki.publish_crl(args.next_update_days)?;
    println!(
        "{} re-signed, next update in {} days",
        pki.crl_path().display(),
        args.next_update_days
    );
    args.deliver.deliver(&pki)
}

fn list(args: ListArgs) -> Result<()> {
    let pki = Pki::open(&args.pki.pki)?;
    let filter = ListFilter {
        status: args.status.map(|s| {
            s.to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        }),
        expiring_before: args.expiring_within_days.map(|days| now() + i64::from(days) * 86_400),
    };
    let records = pki.registry.list(&filter, now())?;
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &records)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write_table(&mut out, &records)
    };
    match written {
        // A reader that stops early (`provision list | head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(|source| Error::Io {
            path: "standard output".into(),
            source,
        }),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if !(args.renew_after > 0.0 && args.renew_after < 1.0) {
        return Err(Error::BadArgument {
            flag: "--renew-after",
            reason: format!(
                "{} must be between 0 and 1 (a fraction of the validity)",
                args.renew_after
            ),
        });
    }
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false);
    if args.log_json {
        subscriber.json().flatten_event(true).init();
    } else {
        subscriber.init();
    }
    let pki = Pki::open(&args.pki.pki)?;
    let options = ServeOptions {
        broker: args.broker_url,
        server_name: args.server_name,
        cert: args.cert,
        key: args.key,
        ca: args
            .ca
            .unwrap_or_else(|| pki.dir.join(provisioning::pki::BROKER_CA_CERT)),
        client_id: args.client_id,
        metrics_file: args.metrics_file,
    };
    let policy = Policy {
        renew_after: args.renew_after,
        force: args.force,
        allowed_key_types: args.allowed_key_types,
        min_interval_s: i64::from(args.min_interval_s),
        validity: args.validity.validity(),
        publish_crl_to: args.deliver.publish_to,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            path: "the async runtime".into(),
            source,
        })?;
    runtime.block_on(provisioning::serve::serve(
        Issuer::new(pki, policy),
        options,
        stop_signal(),
    ))
}

/// Completes on SIGTERM or Ctrl-C.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
}

fn date(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| unix.to_string())
}

fn write_table(out: &mut impl Write, records: &[Record]) -> std::io::Result<()> {
    let width = records.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
    writeln!(
        out,
        "{:<7}  {:<width$}  {:<32}  {:<7}  {:<10}  {:<8}  SUCCESSOR",
        "ROLE", "ID", "SERIAL", "STATUS", "NOT_AFTER", "RENEWAL"
    )?;
    for r in records {
        writeln!(
            out,
            "{:<7}  {:<width$}  {:<32}  {:<7}  {:<10}  {:<8}  {}",
            r.role,
            r.id,
            r.serial,
            r.status,
            date(r.not_after),
            r.renewal.map_or("-", |state| state.as_str()),
            r.successor.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}
