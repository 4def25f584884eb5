//! The real `broker` binary as a child process, its JSON audit log read as events.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::event_log::EventLog;

/// A running broker. Killed when dropped.
pub struct BrokerProcess {
    child: Child,
    events: EventLog,
    /// The address it listens on (read from its `listening` event).
    pub addr: SocketAddr,
}

impl BrokerProcess {
    /// Starts `broker --config CONFIG` on 127.0.0.1 port 0 with JSON logs, plus `env`
    /// overrides, and waits for its `listening` event.
    pub fn start(binary: &Path, config: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_pinned(binary, config, env, None)
    }

    /// Like [`BrokerProcess::start`], restricted to the CPUs in `cpus` (a `taskset` list, for
    /// benchmarks) when given.
    pub fn start_pinned(binary: &Path, config: &Path, env: &[(&str, &str)], cpus: Option<&str>) -> Self {
        let command = match cpus {
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", cpus]).arg(binary);
                taskset
            }
            None => Command::new(binary),
        };
        Self::launch(command, config, env)
    }

    /// Like [`BrokerProcess::start`], running as the user and group `uid`:`gid` (the test must
    /// run as root), as a gateway runs it: unprivileged.
    pub fn start_as(binary: &Path, config: &Path, env: &[(&str, &str)], uid: u32, gid: u32) -> Self {
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(binary);
        command.uid(uid).gid(gid);
        Self::launch(command, config, env)
    }

    fn launch(mut command: Command, config: &Path, env: &[(&str, &str)]) -> Self {
        let binary = command.get_program().to_owned();
        command
            .arg("--config")
            .arg(config)
            .env("BROKER__LISTEN", "127.0.0.1:0")
            .env("BROKER__LOG__FORMAT", "json")
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", Path::new(&binary).display()));
        let events = EventLog::read(child.stderr.take().expect("piped stderr"));
        let mut broker = Self {
            child,
            events,
            addr: "0.0.0.0:0".parse().expect("an address"),
        };
        let listening = broker.wait_for("the listening event", Duration::from_secs(20), |e| {
            e["event"] == "listening"
        });
        broker.addr = listening["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("listening event carries addr");
        broker
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now (`VmRSS`), KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// The most resident memory so far (`VmHWM`), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// The Prometheus text from the metrics endpoint (start the broker with
    /// `BROKER__METRICS__LISTEN=127.0.0.1:0`).
    pub fn metrics(&self) -> String {
        let event = self.wait_for("the metrics address", Duration::from_secs(5), |e| {
            e["event"] == "metrics"
        });
        let addr = event["addr"].as_str().expect("metrics event carries addr");
        let mut http = std::net::TcpStream::connect(addr).expect("metrics endpoint");
        std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut body = String::new();
        std::io::Read::read_to_string(&mut http, &mut body).expect("response");
        body
    }

    /// The value of the metric line that starts with `series` (name and labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.events()
    }

    /// Waits for an event matching `predicate`; panics with the whole log after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, predicate: impl Fn(&Value) -> bool) -> Value {
        self.events.wait_for(what, limit, predicate)
    }

    /// Waits until `count` events match `predicate`; panics with the whole log after `limit`.
    pub fn wait_for_count(&self, what: &str, limit: Duration, count: usize, predicate: impl Fn(&Value) -> bool) {
        self.events.wait_for_count(what, limit, count, predicate)
    }

    /// Waits for a `reject` event with `reason`.
    pub fn wait_for_reject(&self, reason: &str) -> Value {
        self.wait_for(&format!("reject with reason {reason}"), Duration::from_secs(10), |e| {
            e["event"] == "reject" && e["reason"] == reason
        })
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait for the broker")
    }

    /// Kills it with SIGKILL, which gives it no chance to write anything more, and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-HUP", &pid]).status();
    }
}

/// A `/proc/<pid>/status` field in KiB (0 if the process is gone).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
