//! The broker as a whole: binds the listeners, owns the connection limit and graceful shutdown,
//! and spawns a session task per accepted connection. It never does TLS itself.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::audit::Audit;
use crate::bridge::Bridge;
use crate::config::BrokerConfig;
use crate::context::SessionContext;
use crate::live::LiveSessions;
use crate::metrics::Metrics;
use crate::reason::RejectReason;
use crate::reload::{Reloader, TlsState};
use crate::router::{Limits as RouterLimits, Router};
use crate::session::serve;
use crate::store::{Store, StoreError};
use crate::tls::{TlsFiles, TlsLoadError, TlsMaterial};

/// How long shutdown waits for sessions to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsLoadError),
    /// The durable store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bridge cannot start.
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
}

/// The crypto provider for the broker: aws-lc-rs (cheaper handshakes, post-quantum hybrid key
/// exchange), restricted to TLS 1.3 and ECDHE + AEAD TLS 1.2 suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    fleet_identity::tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider())
}

/// A bound, not yet running broker.
pub struct Broker {
    listeners: Vec<TcpListener>,
    ctx: Arc<SessionContext>,
    reloader: Reloader,
    shutdown: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    metrics: Arc<Metrics>,
    metrics_listen: Option<SocketAddr>,
    /// The uplink to a central broker, if configured.
    bridge: Option<Bridge>,
}

impl Broker {
    /// Loads the TLS material, creates the router and binds every listen address.
    pub async fn bind(config: &BrokerConfig) -> Result<Self, StartError> {
        let provider = crypto_provider();
        let files = TlsFiles::of(config);
        let material = TlsMaterial::load(&files, &provider)?;
        let metrics = Arc::new(Metrics::default());
        let audit = Audit::new(metrics.clone());
        audit.revocation_coverage(material.crl.as_ref());
        let tls = Arc::new(TlsState::new(material));
        let mut listeners = Vec::new();
        for addr in &config.listen {
            listeners.push(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr: *addr, source })?,
            );
        }
        let (store, mut recovered) = match &config.persistence {
            Some(persistence) => {
                let (store, recovered) = Store::open(&persistence.settings())?;
                (Some(store), Some(recovered))
            }
            None => {
                warn!(
                    event = "persistence_off",
                    "no [persistence] configured: persistent sessions, their queued messages and retained messages live in memory and a restart loses them"
                );
                (None, None)
            }
        };
        let router = Router::new(router_limits(&config.limits), audit.clone(), store);
        let outbox = match (&config.bridge, &mut recovered) {
            (Some(bridge), Some(recovered)) => crate::bridge::take_outbox(recovered, bridge),
            _ => None,
        };
        if let Some(recovered) = recovered {
            router.restore(recovered);
        }
        let acl = Arc::new(config.acl.clone());
        // Attached before the listener opens, so it receives the first device's first message.
        let bridge = match &config.bridge {
            Some(bridge) => Some(Bridge::new(bridge, &router, acl.clone(), audit.clone(), outbox)?),
            None => None,
        };
        let sessions = Arc::new(LiveSessions::default());
        let (shutdown, _) = watch::channel(false);
        let max_connections = config.limits.max_connections;
        let ctx = Arc::new(SessionContext {
            tls: tls.clone(),
            acl,
            limits: config.limits.clone(),
            router,
            sessions: sessions.clone(),
            audit: audit.clone(),
        });
        Ok(Self {
            listeners,
            reloader: Reloader::new(files, provider, tls, sessions, audit),
            ctx,
            shutdown,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            metrics,
            metrics_listen: config.metrics.listen,
            bridge,
        })
    }

    /// The addresses actually bound (with the real port where the config said 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves until `stop` completes, then stops accepting, closes every session and returns.
    pub async fn run(self, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let shutdown_rx = self.shutdown.subscribe();
        tokio::spawn(self.reloader.run(shutdown_rx.clone()));
        let _expiry_task = AbortOnDrop(tokio::spawn(expire_sessions(self.ctx.router.clone())));
        let bridge_metrics = self.bridge.as_ref().map(Bridge::metrics);
        if let Some(bridge) = self.bridge {
            bridge.spawn();
        }
        let _metrics_task = match self.metrics_listen {
            Some(addr) => {
                let (metrics, ctx) = (self.metrics.clone(), self.ctx.clone());
                let render = Arc::new(move || {
                    let mut out = String::new();
                    metrics.render(&mut out);
                    ctx.router.render_metrics(&mut out);
                    if let Some(store) = ctx.router.store() {
                        store.render_metrics(&mut out);
                    }
                    if let Some(bridge) = &bridge_metrics {
                        bridge.render(&mut out);
                    }
                    ctx.tls
                        .render_metrics(time::OffsetDateTime::now_utc().unix_timestamp(), &mut out);
                    out
                });
                let (bound, task) = crate::metrics::serve(addr, render).await?;
                info!(event = "metrics", addr = %bound, "metrics on http://{bound}/metrics");
                Some(AbortOnDrop(task))
            }
            None => None,
        };
        for listener in self.listeners {
            let addr = listener.local_addr()?;
            info!(event = "listening", %addr, "listening on {addr}");
            tokio::spawn(accept_loop(
                listener,
                self.ctx.clone(),
                self.permits.clone(),
                shutdown_rx.clone(),
            ));
        }
        stop.await;
        info!(event = "shutdown", "shutting down: closing sessions");
        let _ = self.shutdown.send(true);
        self.ctx.sessions.close_all();
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(SHUTDOWN_GRACE, self.permits.acquire_many(all))
            .await
            .is_err()
        {
            warn!(
                event = "shutdown",
                open = self.ctx.sessions.len(),
                "sessions still open after the grace period"
            );
        }
        let queued = self.metrics.queued_messages();
        match self.ctx.router.store() {
            Some(store) => {
                store.close();
                info!(event = "shutdown", queued, path = %store.path().display(), "store closed");
            }
            // Sessions live in memory: say what the restart will not find.
            None if queued > 0 => warn!(
                event = "shutdown",
                queued, "{queued} messages queued for persistent sessions are lost with this process"
            ),
            None => {}
        }
        Ok(())
    }
}

/// What the router bounds, from `[limits]`.
fn router_limits(limits: &crate::config::Limits) -> RouterLimits {
    RouterLimits {
        max_queued_messages: limits.max_queued_messages,
        max_queued_bytes: limits.max_queued_bytes,
        max_inflight: limits.max_inflight,
        slow_subscriber_timeout: Duration::from_millis(limits.slow_subscriber_timeout_ms),
        max_subscriptions: limits.max_subscriptions,
        max_retained_messages: limits.max_retained_messages,
        max_retained_bytes: limits.max_retained_bytes,
    }
}

/// Ends detached sessions whose MQTT 5 Session Expiry Interval has run out, once a second (the
/// interval's own unit).
async fn expire_sessions(router: crate::router::Router) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        router.expire_sessions(std::time::Instant::now());
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Without it every small MQTT packet waits for a delayed ACK (about 40 ms).
                let _ = tcp.set_nodelay(true);
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = ctx.clone();
                        // A panic in one session ends that task only; the permit is released.
                        tokio::spawn(async move {
                            let _permit = permit;
                            serve(tcp, peer, ctx).await;
                        });
                    }
                    Err(_) => ctx.audit.reject(
                        peer,
                        RejectReason::TooManyConnections,
                        "limits.max_connections reached",
                        None,
                    ),
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(event = "accept_error", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
