//! Crash points, for the tests that prove a crash at any step leaves the PKI consistent.
//!
//! A debug build of `provision` started with `PROVISION_FAULT=<point>` aborts the moment it
//! reaches that named point, exactly as a `kill -9` or a power cut would stop it there: no
//! destructor runs, no transaction is rolled back politely, no staging folder is cleaned up.
//! `provisioning/tests/crash.rs` runs every command with every point and checks what is left.
//! Release builds never read the variable: [`point`] compiles to nothing.

/// The environment variable that names the point at which a debug build aborts.
pub const FAULT_VARIABLE: &str = "PROVISION_FAULT";

/// Aborts the process if this is a debug build and `PROVISION_FAULT` names `point`.
#[inline]
pub fn point(point: &str) {
    if cfg!(debug_assertions) && std::env::var_os(FAULT_VARIABLE).is_some_and(|wanted| wanted == point) {
        std::process::abort();
    }
}
