//! `provision batch --count 10000` next to the obvious alternative: a shell loop of
//! `openssl req` + `openssl x509` minting the same kind of device certificate.
//!
//! Run: `cargo bench -p provisioning --bench batch_vs_openssl`. Prints the median of several runs
//! of each; the openssl loop runs on fewer devices (it is slow) and is compared per device.
//! Environment: `BENCH_DEVICES` (default 10000), `BENCH_OPENSSL_DEVICES` (default 300),
//! `BENCH_RUNS` (default 3).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn must(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(status.success(), "{command:?} failed: {status}");
}

/// The openssl loop: a P-256 key and CSR, then a certificate with the same extensions ours carry.
const OPENSSL_LOOP: &str = r#"
set -e
pki="$1"; out="$2"; n="$3"
printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
  'extendedKeyUsage=clientAuth' 'subjectAltName=URI:urn:device:${ENV::ID}' 'authorityKeyIdentifier=keyid' > "$out/ext.cnf"
for i in $(seq -w 1 "$n"); do
  id="o-$i"; mkdir -p "$out/$id"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$id/O=fleet" \
    -keyout "$out/$id/device.key" -out "$out/$id/device.csr" 2>/dev/null
  ID="$id" openssl x509 -req -in "$out/$id/device.csr" -CA "$pki/device-ca.crt" -CAkey "$pki/device-ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 1095 -extfile "$out/ext.cnf" -out "$out/$id/device.crt" 2>/dev/null
  cp "$pki/broker-ca.crt" "$out/$id/broker-ca.crt"
done
"#;

fn time_provision(pki: &Path, out: &Path, prefix: &str, count: usize) -> Duration {
    let started = Instant::now();
    must(
        Command::new(env!("CARGO_BIN_EXE_provision"))
            .args(["batch", "--count", &count.to_string(), "--prefix", prefix])
            .arg("--pki")
            .arg(pki)
            .arg("--out")
            .arg(out)
            .stdout(Stdio::null()),
    );
    started.elapsed()
}

fn time_openssl(pki: &Path, out: &Path, count: usize) -> Duration {
    std::fs::create_dir_all(out).unwrap();
    let started = Instant::now();
    must(
        Command::new("bash")
            .args(["-c", OPENSSL_LOOP, "openssl-loop"])
            .arg(pki)
            .arg(out)
            .arg(count.to_string()),
    );
    started.elapsed()
}

fn main() {
    let devices = env_number("BENCH_DEVICES", 10_000);
    let openssl_devices = env_number("BENCH_OPENSSL_DEVICES", 300);
    let runs = env_number("BENCH_RUNS", 3).max(1);
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    must(
        Command::new(env!("CARGO_BIN_EXE_provision"))
            .arg("init")
            .arg("--pki")
            .arg(&pki)
            .stdout(Stdio::null()),
    );

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        ours.push(time_provision(
            &pki,
            &dir.path().join(format!("ours-{run}")),
            &format!("r{run}-"),
            devices,
        ));
        theirs.push(time_openssl(
            &pki,
            &dir.path().join(format!("openssl-{run}")),
            openssl_devices,
        ));
    }
    let (ours, theirs) = (median(ours), median(theirs));
    let ours_per = ours.as_secs_f64() / devices as f64;
    let theirs_per = theirs.as_secs_f64() / openssl_devices as f64;
    println!(
        "provision batch: {devices} devices, median of {runs}: {:.2} s ({:.0} us/device, {:.0} devices/s)",
        ours.as_secs_f64(),
        ours_per * 1e6,
        1.0 / ours_per
    );
    println!(
        "openssl loop:    {openssl_devices} devices, median of {runs}: {:.2} s ({:.0} us/device, {:.0} devices/s; {devices} would take about {:.0} s)",
        theirs.as_secs_f64(),
        theirs_per * 1e6,
        1.0 / theirs_per,
        theirs_per * devices as f64
    );
    println!(
        "ratio: provision batch is {:.0}x faster per device",
        theirs_per / ours_per
    );
}
