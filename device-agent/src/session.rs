//! The `run` loop: connect, carry messages both ways, reconnect with backoff and full jitter.
//!
//! Every message from the device's application is written to the on-disk queue before anything
//! else happens to it, and leaves the queue only when the broker acknowledges it. A connection
//! re-sends, in order, everything still queued (at least once). Each connection gets a fresh MQTT
//! client, so nothing of a dead connection's state is trusted.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_identity::Identity;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::Agent;
use crate::diagnosis::Diagnosis;
use crate::queue::Queue;

/// QoS 1 messages handed to the client and not yet acknowledged, at most.
const WINDOW: usize = 64;

/// A message from the device's application: the topic below `devices/<id>/`, and the payload.
pub type Outbound = (String, Vec<u8>);

/// A command received from the broker: its full topic and payload.
pub type Command = (String, Vec<u8>);

/// MQTT options for this device: client id = device id, TLS with our configuration.
pub fn mqtt_options(agent: &Agent, identity: &Identity, tls: Arc<ClientConfig>) -> MqttOptions {
    let mut options = MqttOptions::new(identity.id.as_str(), agent.broker.host.clone(), agent.broker.port);
    options.set_keep_alive(Duration::from_secs(agent.config.keep_alive_s.max(5)));
    options.set_clean_session(true);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    options
}

/// How a connection ended.
enum End {
    /// Asked to stop.
    Stopped,
    /// The connection failed or was refused.
    Failed(Diagnosis),
}

/// The running agent.
pub struct Runner {
    agent: Agent,
    identity: Identity,
    tls: Arc<ClientConfig>,
    queue: Queue,
    started: Instant,
    heartbeats: u64,
    /// Where received commands go.
    commands: mpsc::UnboundedSender<Command>,
}

impl Runner {
    /// A runner for this device with its queue opened; commands received go to `commands`.
    pub fn new(
        agent: Agent,
        identity: Identity,
        tls: Arc<ClientConfig>,
        queue: Queue,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            agent,
            identity,
            tls,
            queue,
            started: Instant::now(),
            heartbeats: 0,
            commands,
        }
    }

    fn topic(&self, suffix: &str) -> String {
        format!("devices/{}/{suffix}", self.identity.id)
    }

    fn accept(&mut self, (suffix, payload): Outbound) {
        if let Err(e) = self.queue.push(&suffix, &payload) {
            tracing::error!(error = %e, queue = %self.agent.config.queue_dir.display(), "cannot store a message in the queue; it was NOT accepted");
        }
    }

    /// Runs until `stop` completes. Messages arriving on `input` are queued durably at once.
    pub async fn run(mut self, mut input: mpsc::Receiver<Outbound>, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut backoff = Backoff::new(self.agent.config.backoff_min_ms, self.agent.config.backoff_max_ms);
        loop {
            let diagnosis = match self.connection(&mut input, &mut stop, &mut backoff).await {
                End::Stopped => return,
                End::Failed(diagnosis) => diagnosis,
            };
            let delay = if diagnosis.identity_refused() {
                backoff.longest()
            } else {
                backoff.next_delay()
            };
            warn!(event = "connect_failed", broker = %self.agent.broker, retry_in_ms = delay.as_millis() as u64, "{diagnosis}");
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    Some(message) = input.recv() => self.accept(message),
                    () = &mut stop => return self.log_stopped(),
                }
            }
        }
    }

    async fn connection(
        &mut self,
        input: &mut mpsc::Receiver<Outbound>,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        backoff: &mut Backoff,
    ) -> End {
        let (client, mut eventloop) =
            AsyncClient::new(mqtt_options(&self.agent, &self.identity, self.tls.clone()), WINDOW * 4);
        let mut flight = Flight::default();
        let heartbeat_period = Duration::from_secs(self.agent.config.heartbeat_s.max(1));
        let mut heartbeat = tokio::time::interval(heartbeat_period);
        let mut connected = false;
        loop {
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff.reset();
                        info!(event = "connected", broker = %self.agent.broker, device_id = %self.identity.id, queued = self.queue.len(), "connected to {}", self.agent.broker);
                        let _ = client.try_subscribe(self.topic("cmd/#"), QoS::AtLeastOnce);
                        self.fill(&client, &mut flight);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = self.commands.send((publish.topic, publish.payload.to_vec()));
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => flight.sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = flight.acked(ack.pkid) {
                            if let Err(e) = self.queue.ack(seq) {
                                warn!(error = %e, "cannot remove an acknowledged message from the queue; it may be sent again");
                            }
                        }
                        self.fill(&client, &mut flight);
                    }
                    Ok(_) => {}
                    Err(e) => return End::Failed(Diagnosis::of(&e)),
                },
                Some(message) = input.recv() => {
                    self.accept(message);
                    if connected {
                        self.fill(&client, &mut flight);
                    }
                }
                _ = heartbeat.tick(), if connected && self.agent.config.heartbeat_s > 0 => self.heartbeat(&client, &mut flight),
                () = stop.as_mut() => {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while eventloop.poll().await.is_ok() {} }).await;
                    self.log_stopped();
                    return End::Stopped;
                }
            }
        }
    }

    /// The last line of a run, whether it stopped while connected or while waiting to reconnect.
    fn log_stopped(&self) {
        info!(
            event = "stopped",
            queued = self.queue.len(),
            "stopped; {} messages stay queued on disk",
            self.queue.len()
        );
    }

    /// Hands queued messages to the client, in order, while the window has room.
    fn fill(&mut self, client: &AsyncClient, flight: &mut Flight) {
        while flight.open() < WINDOW {
            let Some(seq) = self.queue.after(flight.last_handed).next() else {
                return;
            };
            flight.last_handed = seq;
            let message = match self.queue.read(seq) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, seq, "cannot read a queued message; skipping it for this connection");
                    continue;
                }
            };
            if client
                .try_publish(self.topic(&message.suffix), QoS::AtLeastOnce, false, message.payload)
                .is_err()
            {
                return;
            }
            flight.handed(Some(seq));
        }
    }

    fn heartbeat(&mut self, client: &AsyncClient, flight: &mut Flight) {
        self.heartbeats += 1;
        let status = serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "seq": self.heartbeats,
            "queue_depth": self.queue.len(),
            "queue_dropped": self.queue.dropped(),
        });
        if client
            .try_publish(self.topic("status"), QoS::AtMostOnce, false, status.to_string())
            .is_ok()
        {
            flight.handed(None);
        }
    }
}

/// Matches the client's packet ids to queue sequence numbers.
#[derive(Default)]
struct Flight {
    /// Publishes handed to the client, in order, awaiting their packet id (None: QoS 0).
    handed: VecDeque<Option<u64>>,
    /// Packet id -> queue sequence number, awaiting PUBACK.
    unacked: HashMap<u16, u64>,
    /// The last queue sequence number handed to this connection.
    last_handed: u64,
}

impl Flight {
    fn handed(&mut self, seq: Option<u64>) {
        self.handed.push_back(seq);
    }

    fn sent(&mut self, pkid: u16) {
        if let Some(Some(seq)) = self.handed.pop_front() {
            self.unacked.insert(pkid, seq);
        }
    }

    fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.unacked.remove(&pkid)
    }

    fn open(&self) -> usize {
        self.unacked.len() + self.handed.iter().filter(|s| s.is_some()).count()
    }
}

/// Waits for one connection attempt's outcome: `Ok` once the broker accepted us.
pub async fn connect_once(eventloop: &mut EventLoop, limit: Duration) -> Diagnosis {
    let attempt = tokio::time::timeout(limit, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Diagnosis::Ok,
                Ok(_) => {}
                Err(e) => return Diagnosis::of(&e),
            }
        }
    });
    attempt
        .await
        .unwrap_or_else(|_| Diagnosis::Unreachable(format!("no answer within {} s", limit.as_secs())))
}
