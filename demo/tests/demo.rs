//! The README's "run it" command: the demo completes, shows every refusal with the broker's
//! reason words, and reuses its PKI on a second run.

use std::process::Command;

fn run_demo(dir: &std::path::Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_fleet-demo"))
        .env("FLEET_DEMO_DIR", dir)
        .output()
        .expect("the demo runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[test]
fn the_demo_shows_mutual_authentication_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let first = run_demo(dir.path());
    assert!(first.contains("minting a demo PKI"));
    for expected in [
        "4 telemetry messages in, 4 commands answered",
        "REFUSED   unknown_issuer",
        "REFUSED   client_id_mismatch",
        "DENIED    acl_denied: publish devices/sensor-1/cmd/unlock",
        "DENIED    acl_denied: subscribe devices/+/telemetry",
        "KICKED    revoked_kick",
    ] {
        assert!(first.contains(expected), "{expected} missing from:\n{first}");
    }
    let second = run_demo(dir.path());
    assert!(
        second.contains("reusing the demo PKI") && second.contains("KICKED    revoked_kick"),
        "{second}"
    );
}
