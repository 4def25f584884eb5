//! How fast one issuer (`provision serve`'s [`Issuer`]) renews: a fleet of devices all due at
//! once, each sending a P-256 CSR, answered in the batches the service takes them in.
//!
//! Run: `cargo bench -p provisioning --bench renewal_throughput`. Per run, a fresh PKI whose
//! registry holds every device with a certificate in its renewal window; the CSRs and request
//! payloads are made beforehand (that is the devices' work). Timed: [`Issuer::handle`] on every
//! request, in batches of `BENCH_BATCH`: parsing the JSON, verifying the CSR's signature, the
//! registry checks, signing, one registry transaction per batch (fsynced) and the replies'
//! JSON. Not timed: the MQTT transport (the broker's own figures are in BENCHMARKS.md). One
//! thread, so one core. Prints the median of `BENCH_RUNS` runs.
//! Environment: `BENCH_DEVICES` (default 10000), `BENCH_BATCH` (default 512, the service's),
//! `BENCH_RUNS` (default 3).

use std::time::{Duration, Instant};

use fleet_identity::renewal::RenewRequest;
use fleet_identity::DeviceId;
use provisioning::key_type::KeyType;
use provisioning::pki::{InitOptions, Pki};
use provisioning::registry::Issued;
use provisioning::renewal::{Incoming, Issuer, Policy, DEFAULT_RENEW_AFTER};
use provisioning::validity::Validity;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A PKI whose registry holds `ids`, each with a certificate in its renewal window.
fn due_fleet(dir: &std::path::Path, ids: &[DeviceId]) -> Pki {
    let options = InitOptions {
        fleet: "bench".into(),
        key_type: KeyType::EcdsaP256,
        ca_validity_days: 30,
    };
    Pki::init(dir, &options).expect("init");
    let mut pki = Pki::open(dir).expect("open");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let issued: Vec<Issued> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| Issued {
            id: id.to_string(),
            role: "device",
            serial: format!("{:032x}", 0x1000_0000_0000_0000_0000_0000_0000_0000_u128 + n as u128),
            fingerprint: format!("{n:064x}"),
            not_before: now - 3000,
            not_after: now + 1000,
        })
        .collect();
    pki.registry.record(&issued, false, now).expect("record");
    pki
}

/// Each device's request: a fresh P-256 key's CSR with its id as CN.
fn requests(ids: &[DeviceId]) -> Vec<(DeviceId, Vec<u8>)> {
    ids.iter()
        .map(|id| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name.push(rcgen::DnType::CommonName, id.as_str());
            let csr = params.serialize_request(&key).expect("a CSR").pem().expect("PEM");
            let payload = serde_json::to_vec(&RenewRequest {
                request_id: format!("r-{id}"),
                csr,
            })
            .expect("JSON");
            (id.clone(), payload)
        })
        .collect()
}

fn main() {
    let devices = env_number("BENCH_DEVICES", 10_000);
    let batch = env_number("BENCH_BATCH", 512).max(1);
    let runs = env_number("BENCH_RUNS", 3).max(1);
    let ids: Vec<DeviceId> = (0..devices)
        .map(|n| format!("due-{n:06}").parse().expect("an id"))
        .collect();
    let payloads = requests(&ids);
    let mut samples = Vec::new();
    for run in 1..=runs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pki = due_fleet(dir.path(), &ids);
        let policy = Policy {
            renew_after: DEFAULT_RENEW_AFTER,
            force: false,
            allowed_key_types: vec![KeyType::EcdsaP256],
            min_interval_s: 60,
            validity: Validity::days(365),
            publish_crl_to: Vec::new(),
        };
        let mut issuer = Issuer::new(pki, policy);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let started = Instant::now();
        let mut issued = 0;
        for chunk in payloads.chunks(batch) {
            let incoming = chunk
                .iter()
                .map(|(id, payload)| Incoming {
                    id: id.clone(),
                    payload: payload.clone(),
                })
                .collect();
            issued += issuer
                .handle(incoming, now)
                .iter()
                .filter(|answer| answer.reply.certificate.is_some())
                .count();
        }
        let elapsed = started.elapsed();
        assert_eq!(issued, devices, "every request answered with a certificate");
        println!(
            "run {run}: {devices} renewals in {:.2} s ({:.0}/s)",
            elapsed.as_secs_f64(),
            devices as f64 / elapsed.as_secs_f64()
        );
        samples.push(elapsed);
    }
    let median = median(samples);
    println!(
        "median of {runs}: {devices} devices due at once served in {:.2} s: {:.0} renewals/s on one core (batches of {batch})",
        median.as_secs_f64(),
        devices as f64 / median.as_secs_f64()
    );
}
