//! The bridge: this gateway's uplink to a central (clustered) broker, with store-and-forward.
//!
//! Messages on the `up` topics are taken from the local router by a persistent router session of
//! the bridge's own ([`intake`]), put in a bounded on-disk [`outbox`], and published upstream
//! at QoS 1 by the [`uplink`], each removed only on the upstream's PUBACK; the uplink fails over
//! between the configured upstreams. Upstream messages on the `down` topics are delivered to
//! the devices they name ([`downstream`]) if those devices' ACLs let them subscribe there
//! ([`topics`]). Nothing a device was acknowledged for is lost across an uplink outage, a
//! failed upstream node or `kill -9` of the gateway: it is in the bridge's router session or in
//! the outbox, both in the durable store, until an upstream has acknowledged it. What the
//! outbox's bounds drop is counted and audited.
//!
//! The bridge is a client of the router's public API ([`crate::router::Router::attach`],
//! [`crate::router::Router::publish`]) and of the store's, and changes neither.

pub mod config;
pub mod downstream;
pub mod intake;
pub mod outbox;
pub mod topics;
pub mod uplink;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_identity::pem::{load_certs, load_key, PemError};
use fleet_identity::{tls, BrokerUrl, CertificateSummary, Identity, Role};
use rustls::pki_types::ServerName;
use tokio::sync::Notify;

use crate::acl::AclConfig;
use crate::audit::Audit;
use crate::metrics::DropReason;
use crate::router::{Reporter, Router, SubscribeRefused};
use crate::store::{Recovered, StoredSession};
pub use config::{BridgeConfig, BridgeConfigError};
use intake::Intake;
use outbox::Outbox;
use topics::{DownstreamRefusal, TopicMap};
use uplink::{Dialer, Uplink, UplinkError};

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A `[bridge]` value is unusable.
    #[error(transparent)]
    Config(#[from] BridgeConfigError),
    /// `bridge.cert`, `bridge.key` or `bridge.upstream_ca` cannot be read.
    #[error(transparent)]
    File(#[from] PemError),
    /// `bridge.cert` is not this gateway's certificate.
    #[error("bridge.cert {path}: {reason}")]
    Identity {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS client configuration cannot be built (e.g. the key does not fit the certificate).
    #[error("bridge: {0}")]
    Tls(#[from] tls::TlsError),
    /// The router refused a subscription for an `up` filter.
    #[error("bridge.up: the router refused a filter: {0}")]
    Subscribe(#[from] SubscribeRefused),
}

/// What the bridge's certificate says, for `check-config`.
pub struct GatewayCertificate {
    /// Its identity (`gateway <name>`).
    pub identity: Identity,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// Builds how to reach the upstreams from `config`: checks the gateway certificate is a
/// gateway's of `bridge.name`, and that the key fits it.
pub fn dialer(config: &BridgeConfig) -> Result<(Dialer, GatewayCertificate), BridgeError> {
    config.validate()?;
    let chain = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let roots = load_certs(&config.upstream_ca)?;
    let identity_error = |reason: String| BridgeError::Identity {
        path: config.cert.display().to_string(),
        reason,
    };
    let (summary, identity) =
        CertificateSummary::with_identity(&chain[0]).map_err(|e| identity_error(e.to_string()))?;
    let identity = identity.map_err(|e| identity_error(e.to_string()))?;
    if identity.role != Role::Gateway || identity.id.as_str() != config.name {
        return Err(identity_error(format!(
            "it identifies {identity}, not gateway {} (issue one with `provision gateway --name {}`)",
            config.name, config.name
        )));
    }
    let provider = crate::listener::crypto_provider();
    let server_name = config
        .server_name
        .as_ref()
        .map(|name| {
            ServerName::try_from(name.clone()).map_err(|e| BridgeConfigError {
                field: "bridge.server_name",
                reason: format!("{name:?}: {e}"),
            })
        })
        .transpose()?;
    let verifier = Arc::new(tls::PinnedBrokerVerifier::new(
        provider.clone(),
        &roots,
        server_name.clone(),
        Vec::new(),
    )?);
    let client = tls::client_config(
        provider,
        Arc::new(rustls::time_provider::DefaultTimeProvider),
        verifier,
        chain,
        key,
    )?;
    let dialer = Dialer {
        tls: Arc::new(client),
        server_name,
        timeout: config.connect_timeout(),
    };
    Ok((
        dialer,
        GatewayCertificate {
            identity,
            not_after: summary.not_after,
        },
    ))
}

/// Takes the bridge's outbox out of what the store recovered, so the router does not restore
/// it as a session of its own.
pub fn take_outbox(recovered: &mut Recovered, config: &BridgeConfig) -> Option<StoredSession> {
    let key = Outbox::store_key(&config.name);
    let at = recovered.sessions.iter().position(|s| s.client == key)?;
    Some(recovered.sessions.swap_remove(at))
}

/// A bridge ready to run: its router session attached, its outbox restored.
pub struct Bridge {
    shared: Arc<Shared>,
    intake: Intake,
    uplink: Uplink,
}

/// Its metrics, for the Prometheus endpoint.
#[derive(Clone)]
pub struct BridgeMetrics(Arc<Shared>);

impl Bridge {
    /// Attaches the bridge's router session and restores its outbox (`recovered`, from
    /// [`take_outbox`]); nothing runs until [`Bridge::spawn`].
    pub fn new(
        config: &BridgeConfig,
        router: &Router,
        acl: Arc<AclConfig>,
        audit: Audit,
        recovered: Option<StoredSession>,
    ) -> Result<Self, BridgeError> {
        let (dialer, _) = dialer(config)?;
        let topics = TopicMap::new(config.rendered_prefix(), config.up.clone(), config.down.clone());
        let intake = Intake::attach(router, &config.name, topics.up_filters())?;
        if router.store().is_none() {
            tracing::warn!(
                event = "persistence_off",
                "no [persistence] configured: the bridge's outbox lives in memory and a restart loses what it holds"
            );
        }
        let outbox = Outbox::new(
            &config.name,
            config.outbox_max_messages,
            config.outbox_max_bytes,
            router.store().cloned(),
            recovered,
            audit.clone(),
        );
        let uplink = Uplink {
            urls: config.upstream_urls()?,
            dialer,
            client_id: config.name.clone(),
            keepalive: Duration::from_secs(u64::from(config.keepalive_s)),
            retry: Duration::from_millis(config.retry_ms),
            max_inflight: config.max_inflight,
            subscriptions: topics.upstream_filters(),
        };
        let shared = Arc::new(Shared {
            outbox: Mutex::new(outbox),
            arrived: Notify::new(),
            topics,
            acl,
            router: router.clone(),
            audit,
            uplink: Mutex::new(None),
            forwarded: AtomicU64::new(0),
            downstream: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            refusals: Mutex::new(Reporter::default()),
        });
        Ok(Self { shared, intake, uplink })
    }

    /// Its metrics, readable while it runs.
    pub fn metrics(&self) -> BridgeMetrics {
        BridgeMetrics(self.shared.clone())
    }

    /// Starts taking deliveries and connecting upstream.
    pub fn spawn(self) {
        let (depth, _) = self.shared.outbox().depth();
        tracing::info!(
            event = "bridge_started",
            upstreams = %self.uplink.urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            outbox = depth,
            "bridge to {} upstream(s), {depth} message(s) waiting in the outbox",
            self.uplink.urls.len()
        );
        tokio::spawn(self.intake.run(self.shared.clone()));
        tokio::spawn(self.uplink.run(self.shared));
    }
}

/// What the intake, the uplink and the downstream deliveries share.
pub struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox has something new for the uplink.
    arrived: Notify,
    topics: TopicMap,
    acl: Arc<AclConfig>,
    router: Router,
    audit: Audit,
    /// The upstream connected to now, and since when.
    uplink: Mutex<Option<(String, Instant)>>,
    forwarded: AtomicU64,
    downstream: AtomicU64,
    refused: AtomicU64,
    failovers: AtomicU64,
    /// Refused downstream messages, reported at a limited rate.
    refusals: Mutex<Reporter>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    fn delivered_down(&self) {
        self.downstream.fetch_add(1, Ordering::Relaxed);
    }

    fn refused_down(&self, topic: &str, refusal: &DownstreamRefusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.audit.metrics().dropped(DropReason::DownstreamRefused, 1);
        if let Some(count) = lock(&self.refusals).note(1, Instant::now()) {
            self.audit.bridge_downstream_refused(topic, &refusal.to_string(), count);
        }
    }

    fn too_long(&self, topic: &str) {
        self.audit.metrics().dropped(DropReason::UpstreamTopicTooLong, 1);
        tracing::warn!(
            event = "upstream_topic_too_long",
            topic_bytes = topic.len(),
            "not forwarded: with the bridge's prefix the topic would be longer than MQTT allows"
        );
    }

    fn connected(&self, url: &str, refused: &[&str]) {
        *lock(&self.uplink) = Some((url.to_owned(), Instant::now()));
        let (depth, _) = self.outbox().depth();
        self.audit.bridge_connected(url, refused, depth);
    }

    fn failover(&self, from: &BrokerUrl, to: &BrokerUrl) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        self.audit.bridge_failover(&from.to_string(), &to.to_string());
    }

    fn disconnected(&self, url: &BrokerUrl, end: &UplinkError) {
        *lock(&self.uplink) = None;
        let (depth, _) = self.outbox().depth();
        self.audit
            .bridge_disconnected(&url.to_string(), end.reason(), &end.to_string(), depth);
    }

    fn connect_failed(&self, url: &BrokerUrl, error: &UplinkError) {
        self.audit
            .bridge_connect_failed(&url.to_string(), error.reason(), &error.to_string());
    }
}

impl BridgeMetrics {
    /// The bridge's gauges and counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let shared = &self.0;
        let now = Instant::now();
        let (depth, bytes, age, dropped) = {
            let outbox = shared.outbox();
            let (depth, bytes) = outbox.depth();
            (depth, bytes, outbox.oldest_age(now), outbox.dropped())
        };
        let uplink = lock(&shared.uplink).clone();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP broker_bridge_uplink_up 1 while the bridge is connected (and subscribed) to an upstream, labelled with it.\n# TYPE broker_bridge_uplink_up gauge\n");
        match &uplink {
            Some((url, since)) => {
                let _ = writeln!(
                    out,
                    "broker_bridge_uplink_up{{upstream=\"{}\"}} 1\n# TYPE broker_bridge_uplink_connected_seconds gauge\nbroker_bridge_uplink_connected_seconds {:.3}",
                    url.escape_default(),
                    now.duration_since(*since).as_secs_f64()
                );
            }
            None => out.push_str("broker_bridge_uplink_up{upstream=\"\"} 0\n"),
        }
        let _ = writeln!(
            out,
            "# HELP broker_bridge_outbox_messages Messages waiting to be acknowledged by the upstream.\n# TYPE broker_bridge_outbox_messages gauge\nbroker_bridge_outbox_messages {depth}\n# TYPE broker_bridge_outbox_bytes gauge\nbroker_bridge_outbox_bytes {bytes}\n# HELP broker_bridge_outbox_oldest_age_seconds How long the oldest message in the outbox has waited (recovered ones count from the start).\n# TYPE broker_bridge_outbox_oldest_age_seconds gauge\nbroker_bridge_outbox_oldest_age_seconds {:.3}",
            age.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "# HELP broker_bridge_forwarded_total Messages the upstream acknowledged.\n# TYPE broker_bridge_forwarded_total counter\nbroker_bridge_forwarded_total {}\n# HELP broker_bridge_dropped_total Messages the bridge did not carry, by reason.\n# TYPE broker_bridge_dropped_total counter\nbroker_bridge_dropped_total{{reason=\"outbox_overflow\"}} {dropped}\nbroker_bridge_dropped_total{{reason=\"downstream_refused\"}} {}\n# TYPE broker_bridge_downstream_total counter\nbroker_bridge_downstream_total {}\n# TYPE broker_bridge_failovers_total counter\nbroker_bridge_failovers_total {}",
            load(&shared.forwarded),
            load(&shared.refused),
            load(&shared.downstream),
            load(&shared.failovers),
        );
    }
}
