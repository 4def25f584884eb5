//! Fixtures shared by the end-to-end tests and the per-crate integration tests: a throwaway
//! fleet PKI, the real broker as a process with its audit log as events, MQTT clients with
//! fleet certificates (a full client, and a raw one that shows every byte), in-process device
//! agents, upstream brokers for the bridge (a NATS cluster, Mosquitto), and finding the
//! workspace's binaries and third-party tools.
//!
//! A test that needs an external program calls [`require_tool`]: it panics with the install
//! command when the program is missing, so a test never silently skips.

mod agent;
mod broker_process;
mod event_log;
mod fleet;
mod issuer_process;
mod mqtt;
pub mod raw;
pub mod raw5;
mod tools;
mod upstream;

pub use agent::{bundle_agent, start_agent, RunningAgent};
pub use broker_process::{proc_status_kib, BrokerProcess};
pub use event_log::EventLog;
pub use fleet::TestFleet;
pub use issuer_process::IssuerProcess;
pub use mqtt::{connect, connect_with, next_publish, tls_config, wait_for_incoming, ClientFiles};
pub use tools::{openssl_csr, require_tool, run, run_err, run_ok, target_dir, workspace_bin};
pub use upstream::{free_port, MosquittoUpstream, NatsCluster, NatsUser, UpstreamPki};
