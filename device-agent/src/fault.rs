//! Crash points, for the tests that prove a `kill -9` at any step of a certificate swap leaves
//! the device able to connect (the pattern of `provisioning`'s fault points).
//!
//! A debug build started with `DEVICE_AGENT_FAULT=<point>` aborts the moment it reaches that
//! named point, as a `kill -9` or a power cut would stop it there. Release builds never read the
//! variable.

/// The environment variable that names the point at which a debug build aborts.
pub const FAULT_VARIABLE: &str = "DEVICE_AGENT_FAULT";

/// Aborts the process if this is a debug build and `DEVICE_AGENT_FAULT` names `point`.
#[inline]
pub fn point(point: &str) {
    if cfg!(debug_assertions) && std::env::var(FAULT_VARIABLE).is_ok_and(|wanted| wanted == point) {
        std::process::abort();
    }
}
