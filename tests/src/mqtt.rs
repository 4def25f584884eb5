//! MQTT clients (rumqttc) presenting fleet certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::{pem, tls};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, TlsConfiguration, Transport,
};

/// Which files of a bundle to present.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Broker CA to trust.
    pub ca: PathBuf,
}

impl ClientFiles {
    /// A device bundle (device.crt, device.key, broker-ca.crt).
    pub fn device(bundle: &Path) -> Self {
        Self {
            cert: bundle.join("device.crt"),
            key: bundle.join("device.key"),
            ca: bundle.join("broker-ca.crt"),
        }
    }

    /// A service bundle (service.crt, service.key, broker-ca.crt).
    pub fn service(bundle: &Path) -> Self {
        Self {
            cert: bundle.join("service.crt"),
            key: bundle.join("service.key"),
            ca: bundle.join("broker-ca.crt"),
        }
    }
}

/// A rustls client configuration presenting `files`.
pub fn tls_config(files: &ClientFiles) -> rustls::ClientConfig {
    let provider = tls::hardened_provider(rustls::crypto::aws_lc_rs::default_provider());
    let roots = pem::load_certs(&files.ca).expect("broker CA");
    let verifier =
        Arc::new(tls::PinnedBrokerVerifier::new(provider.clone(), &roots, None, Vec::new()).expect("verifier"));
    let chain = pem::load_certs(&files.cert).expect("client certificate");
    let key = pem::load_key(&files.key).expect("client key");
    tls::client_config(
        provider,
        Arc::new(rustls::time_provider::DefaultTimeProvider),
        verifier,
        chain,
        key,
    )
    .expect("client config")
}

/// Connects as `client_id` and waits for the CONNACK (or the failure).
pub async fn connect(
    port: u16,
    files: &ClientFiles,
    client_id: &str,
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    connect_with(port, files, client_id, |_| {}).await
}

/// Like [`connect`], with a chance to adjust the options (clean session, will, ...).
pub async fn connect_with(
    port: u16,
    files: &ClientFiles,
    client_id: &str,
    adjust: impl FnOnce(&mut MqttOptions),
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(
        tls_config(files),
    ))));
    adjust(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => return Ok(()),
                _ => continue,
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok((client, eventloop)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnectionError::NetworkTimeout),
    }
}

/// Polls until a PUBLISH arrives; `None` on a connection error or after `limit`.
pub async fn next_publish(eventloop: &mut EventLoop, limit: Duration) -> Option<Publish> {
    tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => return Some(publish),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Polls until an incoming packet matches `wanted`; panics (naming `what`) on a connection
/// error or after `limit`.
pub async fn wait_for_incoming(
    eventloop: &mut EventLoop,
    limit: Duration,
    what: &str,
    wanted: impl Fn(&Packet) -> bool,
) -> Packet {
    let found = tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) if wanted(&packet) => return Ok(packet),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match found {
        Ok(Ok(packet)) => packet,
        Ok(Err(e)) => panic!("waiting for {what}: connection failed: {e}"),
        Err(_) => panic!("no {what} within {limit:?}"),
    }
}
