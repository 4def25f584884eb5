//! Records the build time: the agent's floor for the clock on devices without a real-time clock.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!("cargo:rustc-env=DEVICE_AGENT_BUILD_UNIX={now}");
    println!("cargo:rerun-if-changed=build.rs");
}
