//! Upstream brokers for bridge tests: a NATS server cluster (JetStream, its MQTT listener over
//! mutual TLS mapping client certificates to users) and Mosquitto, each as real processes on
//! loopback ports, with a CA of their own for their server certificates, trusting the fleet's
//! device CA for clients (gateways and backends).
//!
//! The configurations written here are the ones the README shows.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;

/// A CA of the upstream's own and the server certificate every upstream node presents
/// (`localhost`, `127.0.0.1`).
pub struct UpstreamPki {
    /// The CA certificate gateways trust for upstreams (`bridge.upstream_ca`).
    pub ca: PathBuf,
    /// The nodes' certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl UpstreamPki {
    /// Writes a new CA and node certificate into `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("upstream pki dir");
        let ca_key = rcgen::KeyPair::generate().expect("a key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "upstream test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "upstream");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).expect("node certificate");
        let pki = Self {
            ca: dir.join("upstream-ca.crt"),
            cert: dir.join("upstream.crt"),
            key: dir.join("upstream.key"),
        };
        std::fs::write(&pki.ca, ca.pem()).expect("write CA");
        std::fs::write(&pki.cert, cert.pem()).expect("write certificate");
        std::fs::write(&pki.key, key.serialize_pem()).expect("write key");
        pki
    }
}

/// A free loopback port (bound, read back, released: the program then binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `binary -c config`, its log beside the configuration (`.log`).
fn spawn_logged(binary: &Path, config: &Path) -> Child {
    let log = std::fs::File::create(config.with_extension("log")).expect("a log file");
    Command::new(binary)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

/// Polls until `ready` says yes; panics naming `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} not ready within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON body of an HTTP GET of `path` on `port` (NATS's monitoring endpoint), if it
/// answered 200.
fn http_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    http.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    http.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    let _ = http.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| serde_json::from_str(body).ok())?
}

/// A NATS user an MQTT client certificate maps to: its SAN URI, and the MQTT topic prefix it
/// may publish and subscribe under (`None`: everything).
pub struct NatsUser {
    /// The certificate's SAN URI, e.g. `urn:gateway:site-a`.
    pub uri: String,
    /// e.g. `sites/site-a/`.
    pub topics: Option<String>,
}

/// One node of the cluster.
struct NatsNode {
    name: String,
    config: PathBuf,
    mqtt_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

/// A NATS server cluster with JetStream and MQTT over mutual TLS, started by the test.
pub struct NatsCluster {
    nodes: Vec<NatsNode>,
    binary: PathBuf,
}

impl NatsCluster {
    /// Starts `size` nodes in `dir`, each with its own JetStream store, routes to the others
    /// (the MQTT streams replicated on up to 3),
    /// MQTT with TLS presenting `pki`'s certificate and verifying clients against `client_ca`,
    /// mapping their certificates to `users`; waits until every node is healthy.
    pub fn start(dir: &Path, size: usize, pki: &UpstreamPki, client_ca: &Path, users: &[NatsUser]) -> Self {
        let binary = require_tool("nats-server", "nats-server");
        std::fs::create_dir_all(dir).expect("nats dir");
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let users = users.iter().map(nats_user).collect::<Vec<_>>().join(",\n    ");
        let nodes = (0..size)
            .map(|n| {
                let name = format!("n{}", n + 1);
                let (client_port, mqtt_port, monitor_port) = (free_port(), free_port(), free_port());
                let others = routes
                    .iter()
                    .enumerate()
                    .filter(|(m, _)| *m != n)
                    .map(|(_, port)| format!("\"nats-route://127.0.0.1:{port}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                let text = format!(
                    r#"server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{monitor_port}
jetstream {{ store_dir: "{store}" }}
cluster {{
  name: fleet
  listen: 127.0.0.1:{route}
  routes: [{others}]
}}
authorization {{
  users = [
    {users}
  ]
}}
mqtt {{
  listen: 127.0.0.1:{mqtt_port}
  stream_replicas: {replicas}
  tls {{
    cert_file: "{cert}"
    key_file: "{key}"
    ca_file: "{ca}"
    verify_and_map: true
  }}
}}
"#,
                    store = dir.join(&name).display(),
                    route = routes[n],
                    cert = pki.cert.display(),
                    key = pki.key.display(),
                    ca = client_ca.display(),
                    replicas = size.min(3),
                );
                let config = dir.join(format!("{name}.conf"));
                std::fs::write(&config, text).expect("write nats config");
                NatsNode {
                    name,
                    config,
                    mqtt_port,
                    monitor_port,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { nodes, binary };
        for n in 0..size {
            cluster.spawn(n);
        }
        for n in 0..size {
            cluster.wait_healthy(n);
        }
        cluster
    }

    fn spawn(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.child = Some(spawn_logged(&self.binary, &node.config));
    }

    /// Waits until node `n` has a route to every other node and reports healthy (`/routez`,
    /// `/healthz`). Before that an MQTT client would make it create the MQTT streams with
    /// fewer replicas than the cluster has, and one node's death would then stop them.
    fn wait_healthy(&self, n: usize) {
        let node = &self.nodes[n];
        let others = self.nodes.len() - 1;
        wait_until(&format!("nats {}", node.name), Duration::from_secs(30), || {
            let routed = http_json(node.monitor_port, "/routez")
                .is_some_and(|routes| routes["num_routes"].as_u64() >= Some(others as u64));
            routed && http_json(node.monitor_port, "/healthz").is_some_and(|h| h["status"] == "ok")
        });
    }

    /// `mqtts://127.0.0.1:<port>` of node `n`.
    pub fn url(&self, n: usize) -> String {
        format!("mqtts://127.0.0.1:{}", self.nodes[n].mqtt_port)
    }

    /// The MQTT port of node `n`.
    pub fn mqtt_port(&self, n: usize) -> u16 {
        self.nodes[n].mqtt_port
    }

    /// Starts node `n` again (after [`NatsCluster::kill`]) and waits until it is healthy.
    pub fn restart(&mut self, n: usize) {
        self.spawn(n);
        self.wait_healthy(n);
    }

    /// Kills every node with SIGKILL: the whole cluster is away.
    pub fn kill_all(&mut self) {
        (0..self.nodes.len()).for_each(|n| self.kill(n));
    }

    /// Starts every node again (after [`NatsCluster::kill_all`]) and waits until each is healthy
    /// (each waits for routes to all the others, so all are started first).
    pub fn restart_all(&mut self) {
        (0..self.nodes.len()).for_each(|n| self.spawn(n));
        (0..self.nodes.len()).for_each(|n| self.wait_healthy(n));
    }

    /// Kills node `n` with SIGKILL.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
        }
    }
}

/// A NATS `users` entry: the MQTT topic prefix becomes a NATS subject (`/` is `.`); MQTT
/// subscriptions also need the server's internal delivery subjects (`$MQTT.sub.>`).
fn nats_user(user: &NatsUser) -> String {
    match &user.topics {
        None => format!("{{ user: \"{}\" }}", user.uri),
        Some(prefix) => {
            let subject = format!("{}>", prefix.replace('/', "."));
            format!(
                "{{ user: \"{}\", permissions: {{ publish: [\"{subject}\"], subscribe: [\"{subject}\", \"$MQTT.sub.>\"] }} }}",
                user.uri
            )
        }
    }
}

/// Mosquitto as an upstream: TLS with client certificates, each client's CN its user name, an
/// ACL file confining each gateway to its prefix, sessions saved across a graceful restart.
pub struct MosquittoUpstream {
    config: PathBuf,
    /// Its port.
    pub port: u16,
    child: Option<Child>,
    binary: PathBuf,
}

impl MosquittoUpstream {
    /// Starts Mosquitto in `dir`; `users` are (certificate CN, topic prefix or `None` for all).
    pub fn start(dir: &Path, pki: &UpstreamPki, client_ca: &Path, users: &[(&str, Option<&str>)]) -> Self {
        let binary = require_tool("mosquitto", "mosquitto");
        std::fs::create_dir_all(dir).expect("mosquitto dir");
        let port = free_port();
        let acl: String = users
            .iter()
            .map(|(user, prefix)| format!("user {user}\ntopic readwrite {}#\n\n", prefix.unwrap_or("")))
            .collect();
        let acl_file = dir.join("acl");
        std::fs::write(&acl_file, acl).expect("write acl");
        let text = format!(
            "user root\nper_listener_settings false\npersistence true\npersistence_location {dir}/\nmax_queued_messages 100000\nacl_file {acl}\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n",
            dir = dir.display(),
            acl = acl_file.display(),
            ca = client_ca.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        let config = dir.join("mosquitto.conf");
        std::fs::write(&config, text).expect("write mosquitto config");
        let mut upstream = Self {
            config,
            port,
            child: None,
            binary,
        };
        upstream.restart();
        upstream
    }

    /// `mqtts://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.child = Some(spawn_logged(&self.binary, &self.config));
        let port = self.port;
        wait_until("mosquitto", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stops it with SIGTERM (it saves its sessions) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for MosquittoUpstream {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
