//! Counters for the Prometheus endpoint, and the endpoint itself (a minimal HTTP responder: it
//! answers any GET with the text exposition format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::audit::RejectReason;
use crate::reload::TlsState;

/// The broker's counters. All relaxed atomics: they are statistics, not synchronisation.
#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    devices: AtomicI64,
    services: AtomicI64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    acl_denials: AtomicU64,
}

impl Metrics {
    pub(crate) fn handshake_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake_rejected(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn acl_denied(&self) {
        self.acl_denials.fetch_add(1, Ordering::Relaxed);
    }

    fn sessions(&self, role: Role) -> &AtomicI64 {
        match role {
            Role::Device => &self.devices,
            Role::Service => &self.services,
        }
    }

    /// A session of `role` opened.
    pub fn session_opened(&self, role: Role) {
        self.sessions(role).fetch_add(1, Ordering::Relaxed);
    }

    /// A session of `role` closed.
    pub fn session_closed(&self, role: Role) {
        self.sessions(role).fetch_sub(1, Ordering::Relaxed);
    }

    /// `n` PUBLISH packets accepted from clients.
    pub fn messages_in(&self, n: u64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` PUBLISH packets delivered to clients.
    pub fn messages_out(&self, n: u64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Open sessions of `role`.
    pub fn open_sessions(&self, role: Role) -> i64 {
        self.sessions(role).load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, tls: &TlsState, now: i64) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        out.push_str("# HELP broker_handshakes_total Connections by outcome and reject reason.\n# TYPE broker_handshakes_total counter\n");
        out.push_str(&format!(
            "broker_handshakes_total{{outcome=\"accepted\",reason=\"\"}} {}\n",
            load(&self.accepted)
        ));
        for reason in RejectReason::ALL {
            out.push_str(&format!(
                "broker_handshakes_total{{outcome=\"rejected\",reason=\"{}\"}} {}\n",
                reason.as_str(),
                load(&self.rejected[reason.index()])
            ));
        }
        out.push_str("# HELP broker_sessions Connected sessions by role.\n# TYPE broker_sessions gauge\n");
        for role in [Role::Device, Role::Service] {
            out.push_str(&format!(
                "broker_sessions{{role=\"{role}\"}} {}\n",
                self.open_sessions(role)
            ));
        }
        out.push_str(&format!(
            "# TYPE broker_messages_in_total counter\nbroker_messages_in_total {}\n",
            load(&self.messages_in)
        ));
        out.push_str(&format!(
            "# TYPE broker_messages_out_total counter\nbroker_messages_out_total {}\n",
            load(&self.messages_out)
        ));
        out.push_str(&format!(
            "# TYPE broker_acl_denials_total counter\nbroker_acl_denials_total {}\n",
            load(&self.acl_denials)
        ));
        let material = tls.current();
        out.push_str(&format!(
            "# HELP broker_server_cert_expiry_seconds Seconds until the server certificate expires.\n# TYPE broker_server_cert_expiry_seconds gauge\nbroker_server_cert_expiry_seconds {}\n",
            material.server.not_after - now
        ));
        if let Some(crl) = &material.crl {
            out.push_str(&format!("# HELP broker_crl_age_seconds Seconds since the CRL's thisUpdate.\n# TYPE broker_crl_age_seconds gauge\nbroker_crl_age_seconds {}\n", now - crl.this_update));
            out.push_str(&format!(
                "# TYPE broker_crl_entries gauge\nbroker_crl_entries {}\n",
                crl.revoked.len()
            ));
        }
        out
    }
}

/// Serves the metrics on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    tls: Arc<TlsState>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, tls) = (metrics.clone(), tls.clone());
            tokio::spawn(async move {
                // Read the request head (bounded in size and time), then answer with the metrics.
                let mut head = vec![0u8; 4096];
                let mut len = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut head[len..]).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => len += n,
                        }
                    }
                    true
                })
                .await;
                if read != Ok(true) {
                    return;
                }
                let body = metrics.render(&tls, time::OffsetDateTime::now_utc().unix_timestamp());
                let response = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}
