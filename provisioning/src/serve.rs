//! `provision serve`: the issuing service on the wire. An MQTT client over mutual TLS with a
//! service identity of the fleet (`provision service`), so it needs nothing of the broker's
//! files: it subscribes to every device's renewal requests and confirmations and hands them to
//! [`Issuer`], which decides.
//!
//! Two tasks: the MQTT event loop, which never waits for signing (so keepalives and replies
//! keep flowing), and the signer on a blocking thread, which takes whatever has arrived as one
//! batch (one registry transaction for all of it) and publishes the answers. The session is
//! clean: requests that arrive while the issuer is down are lost, and the devices ask again
//! with backoff. Confirmations are retained by the broker, so none is lost.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_identity::renewal::{RenewalTopic, CONFIRM_FILTER, REQUEST_FILTER};
use fleet_identity::{pem, tls, BrokerUrl, DeviceId};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::output::{replace_atomically, PUBLIC_MODE};
use crate::renewal::{Counters, Incoming, Issuer};

/// Requests signed in one batch at most.
const BATCH_MAX: usize = 512;

/// How often the counters are logged and the metrics file rewritten.
const COUNTERS_EVERY: Duration = Duration::from_secs(10);

/// Where and as whom the issuer connects.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The broker.
    pub broker: BrokerUrl,
    /// The name on the broker's certificate (default: the URL's host).
    pub server_name: Option<String>,
    /// The issuer's service certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The broker CA to trust (the PKI's `broker-ca.crt`).
    pub ca: PathBuf,
    /// The MQTT client id.
    pub client_id: String,
    /// A Prometheus text file rewritten with the counters (node_exporter's textfile collector).
    pub metrics_file: Option<PathBuf>,
}

/// What the event loop hands the signer.
enum Work {
    Request(Incoming),
    Confirm(DeviceId, Vec<u8>),
}

/// Runs the issuing service until `stop` completes.
pub async fn serve(issuer: Issuer, options: ServeOptions, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&options)?, 4 * BATCH_MAX);
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let counters = Arc::new(Mutex::new(Counters::default()));
    let signer = {
        let (client, counters, runtime) = (client.clone(), counters.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || sign_forever(issuer, work_rx, client, counters, runtime))
    };
    let report = {
        let (counters, metrics_file) = (counters.clone(), options.metrics_file.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(COUNTERS_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                report_counters(&counters, metrics_file.as_deref());
            }
        })
    };
    let mut stop = std::pin::pin!(stop);
    let mut retry = Duration::from_millis(250);
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = &mut stop => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                retry = Duration::from_millis(250);
                // A clean session: subscribe on every connection.
                // Never awaited here: the channel drains only while this loop polls.
                for filter in [REQUEST_FILTER, CONFIRM_FILTER] {
                    if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                        warn!(event = "subscribe_failed", filter, error = %e, "cannot subscribe to {filter}: {e}");
                    }
                }
                info!(event = "connected", broker = %options.broker, "connected to {}", options.broker);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                info!(event = "serving", codes = ?ack.return_codes, "subscribed: serving renewal requests");
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let work = match RenewalTopic::parse(&publish.topic) {
                    Some((id, kind)) => match (DeviceId::parse(id), kind) {
                        (Ok(id), RenewalTopic::Request) => Work::Request(Incoming {
                            id,
                            payload: publish.payload.to_vec(),
                        }),
                        (Ok(id), RenewalTopic::Confirm) if !publish.payload.is_empty() => {
                            Work::Confirm(id, publish.payload.to_vec())
                        }
                        _ => continue,
                    },
                    None => continue,
                };
                if work_tx.send(work).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(event = "connect_failed", broker = %options.broker, retry_in_ms = retry.as_millis() as u64, error = %e, "connection to {} failed: {e}", options.broker);
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = &mut stop => break,
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
    drop(work_tx);
    report.abort();
    let _ = client.try_disconnect();
    let _ = signer.await;
    report_counters(&counters, options.metrics_file.as_deref());
    info!(event = "stopped", "stopped");
    Ok(())
}

/// The signer: takes what has arrived, up to [`BATCH_MAX`], as one batch; answers each request
/// on its device's reply topic.
fn sign_forever(
    mut issuer: Issuer,
    mut work: mpsc::UnboundedReceiver<Work>,
    client: AsyncClient,
    counters: Arc<Mutex<Counters>>,
    runtime: tokio::runtime::Handle,
) {
    while let Some(first) = work.blocking_recv() {
        let mut requests = Vec::new();
        let mut confirms = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Work::Request(incoming) => requests.push(incoming),
                Work::Confirm(id, payload) => confirms.push((id, payload)),
            }
            if requests.len() + confirms.len() < BATCH_MAX {
                next = work.try_recv().ok();
            }
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for answer in issuer.handle(requests, now) {
            let topic = RenewalTopic::Reply.topic(answer.id.as_str());
            let payload = serde_json::to_vec(&answer.reply).unwrap_or_default();
            if runtime
                .block_on(client.publish(topic, QoS::AtLeastOnce, false, payload))
                .is_err()
            {
                return;
            }
        }
        for (id, payload) in confirms {
            if let Err(e) = issuer.confirm(&id, &payload) {
                warn!(event = "renewal", decision = "confirm_failed", device_id = %id, error = %e, "cannot retire the superseded certificates of device {id}: {e}");
            }
        }
        if let Ok(mut shared) = counters.lock() {
            *shared = issuer.counters().clone();
        }
    }
}

fn report_counters(counters: &Mutex<Counters>, metrics_file: Option<&std::path::Path>) {
    let Ok(counters) = counters.lock().map(|c| c.clone()) else {
        return;
    };
    counters.log();
    if let Some(path) = metrics_file {
        if let Err(e) = replace_atomically(path, counters.prometheus().as_bytes(), PUBLIC_MODE) {
            warn!(event = "metrics_file_failed", error = %e, "cannot write the metrics file: {e}");
        }
    }
}

fn mqtt_options(options: &ServeOptions) -> Result<MqttOptions> {
    let provider = tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider());
    let roots = pem::load_certs(&options.ca)?;
    let server_name = options
        .server_name
        .clone()
        .unwrap_or_else(|| options.broker.host.clone());
    let name = ServerName::try_from(server_name.clone()).map_err(|_| Error::BadArgument {
        flag: "--server-name",
        reason: format!("{server_name:?} is not a DNS name or IP address"),
    })?;
    let tls_error = |e: tls::TlsError| Error::BadArgument {
        flag: "--cert/--key/--ca",
        reason: e.to_string(),
    };
    let verifier =
        Arc::new(tls::PinnedBrokerVerifier::new(provider.clone(), &roots, Some(name), Vec::new()).map_err(tls_error)?);
    let chain = pem::load_certs(&options.cert)?;
    let key = pem::load_key(&options.key)?;
    let config = tls::client_config(
        provider,
        Arc::new(rustls::time_provider::DefaultTimeProvider),
        verifier,
        chain,
        key,
    )
    .map_err(tls_error)?;
    let mut mqtt = MqttOptions::new(
        options.client_id.clone(),
        options.broker.host.clone(),
        options.broker.port,
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(true);
    mqtt.set_max_packet_size(256 * 1024, 256 * 1024);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
    Ok(mqtt)
}
