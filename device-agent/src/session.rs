//! The `run` loop: connect, carry messages both ways, reconnect with backoff and full jitter.
//!
//! Every message from the device's application is written to the on-disk queue before anything
//! else happens to it, and leaves the queue only when the broker acknowledges it. A connection
//! re-sends, in order, everything still queued (at least once). Each connection gets a fresh MQTT
//! client, so nothing of a dead connection's state is trusted.
//!
//! No message can wedge it: one that cannot be sent is refused before it is queued
//! ([`crate::outbound`]), a queued one that cannot be read or sent is set aside
//! ([`crate::queue`]), and a command too large to receive ends only the connection it came on
//! (see `incoming_too_large`).
//!
//! Certificate renewal runs on the same connection: when [`crate::renewal::Schedule`] says it is
//! due, a request goes out and its reply is awaited beside the traffic; a certificate received
//! ends the connection ([`End::Swap`]) and the next one presents the renewed pair, committed at
//! its CONNACK ([`crate::identity_files`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_identity::renewal::{RenewConfirm, RenewError, RenewalTopic};
use fleet_identity::Identity;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, StateError, TlsConfiguration,
    Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::Agent;
use crate::diagnosis::Diagnosis;
use crate::identity_files::{IdentityFiles, Slot};
use crate::outbound::MessageRules;
use crate::queue::{Queue, SetAside};
use crate::renewal::{new_request, read_reply, Answer, InFlight, Schedule};
use crate::trust::{load_credentials_from, Credentials, FlooredClock};

/// QoS 1 messages handed to the client and not yet acknowledged, at most.
const WINDOW: usize = 64;

/// A message from the device's application: the topic below `devices/<id>/`, and the payload.
pub type Outbound = (String, Vec<u8>);

/// A command received from the broker: its full topic and payload.
pub type Command = (String, Vec<u8>);

/// MQTT options for this device: client id = device id, TLS with our configuration, and
/// `max_packet_bytes` both ways. rumqttc compares an incoming packet's remaining length with it,
/// as the broker does with what it receives, so nothing the broker accepted under the same limit
/// is refused here; it compares an outgoing packet's whole size (fixed header included), which is
/// what [`crate::outbound`] measures before a message is queued.
pub fn mqtt_options(agent: &Agent, identity: &Identity, tls: Arc<ClientConfig>) -> MqttOptions {
    let mut options = MqttOptions::new(identity.id.as_str(), agent.broker.host.clone(), agent.broker.port);
    options.set_max_packet_size(agent.config.max_packet_bytes, agent.config.max_packet_bytes);
    options.set_keep_alive(Duration::from_secs(agent.config.keep_alive_s.max(5)));
    options.set_clean_session(true);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    options
}

/// The remaining length of the incoming packet that ended a connection by exceeding
/// `max_packet_bytes`, if that is what `error` is.
///
/// What rumqttc 0.25.1 does with such a packet: its codec (`mqttbytes::check`) reads the fixed
/// header, sees the remaining length above the incoming limit and fails with
/// `PayloadSizeLimitExceeded(remaining length)` before reading the body, so the packet is never
/// buffered. But the stream cannot be resynchronised past bytes it did not read: the event loop
/// returns `ConnectionError::MqttState(StateError::Deserialization(..))` and the connection is
/// over, with every PUBACK behind the packet unread (and any read in the same batch before it
/// lost with the event loop). A clean session brings nothing back by itself, but a retained
/// command is sent again on every subscription: an agent that subscribed at once on every
/// connection would lose every connection the same way before its queue was acknowledged, and
/// resend the queue forever. So after such a packet, later connections subscribe only after a
/// delay ([`Runner`]), and the queue drains first.
fn incoming_too_large(error: &ConnectionError) -> Option<usize> {
    match error {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// What ended one turn of a connection's event loop.
enum Step {
    /// The event loop produced an event (or failed).
    Event(Result<Event, rumqttc::ConnectionError>),
    /// The agent is stopping.
    Stop,
    /// `renew`'s request went unanswered.
    Unanswered,
}

/// How a connection ended.
enum End {
    /// Asked to stop.
    Stopped,
    /// Connect again at once: a renewed certificate is waiting to be tried, or a refused one
    /// was rolled back.
    Swap,
    /// `device-agent renew` is done.
    Done(Outcome),
    /// The connection failed or was refused.
    Failed(Diagnosis),
    /// The broker sent a packet larger than `max_packet_bytes`, of this remaining length.
    CommandTooLarge(usize),
}

/// What the runner is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `device-agent run`: carry messages, renew when due, until stopped.
    Run,
    /// `device-agent renew`: renew now, then stop; no messages are sent or received.
    RenewOnce,
}

/// How [`Runner::run`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// Stopped by the signal.
    Stopped,
    /// Renewed: the new certificate is committed and the broker accepted it.
    Renewed,
    /// The issuer refused the renewal.
    Refused(RenewError),
    /// The issuer did not answer within `renewal.reply_timeout_s`.
    Unanswered,
}

/// The running agent.
pub struct Runner {
    agent: Agent,
    identity: Identity,
    /// The current and pending key and certificate: each connection reads the pair it presents.
    files: IdentityFiles,
    clock: Arc<FlooredClock>,
    mode: Mode,
    /// When to renew next.
    schedule: Schedule,
    queue: Queue,
    started: Instant,
    heartbeats: u64,
    /// Where received commands go.
    commands: mpsc::UnboundedSender<Command>,
    /// What a message must be to be queued and sent: the device's topics, `max_packet_bytes`.
    rules: MessageRules,
    /// The size of the packet too large to receive that ended the last connection subscribed to
    /// commands, if one did. It is likely retained and would end the next subscription too, so
    /// while this is set each connection first sends the queue and subscribes later.
    command_too_large: Option<usize>,
}

impl Runner {
    /// A runner for the device of `credentials` (its current certificate, loaded and checked),
    /// with its queue opened; commands received go to `commands`.
    pub fn new(
        agent: Agent,
        credentials: &Credentials,
        clock: Arc<FlooredClock>,
        queue: Queue,
        commands: mpsc::UnboundedSender<Command>,
        mode: Mode,
    ) -> Self {
        let identity = credentials.identity.clone();
        let rules = MessageRules::new(identity.id.as_str(), agent.config.max_packet_bytes);
        let (not_before, not_after) = validity(&credentials.cert);
        let mut schedule = Schedule::new(&agent.config.renewal, not_before, not_after);
        if mode == Mode::RenewOnce {
            schedule.now();
        }
        info!(event = "renewal_scheduled", device_id = %identity.id, at_unix = schedule.next_at(), "certificate renewal due at {} (Unix time)", schedule.next_at());
        Self {
            files: IdentityFiles::new(agent.config.cert.clone(), agent.config.key.clone()),
            agent,
            identity,
            clock,
            mode,
            schedule,
            queue,
            started: Instant::now(),
            heartbeats: 0,
            commands,
            rules,
            command_too_large: None,
        }
    }

    /// Queues a message from the application, unless it could never be sent.
    fn accept(&mut self, (suffix, payload): Outbound) {
        if let Err(refusal) = self.rules.check(&suffix, &payload) {
            warn!(event = "message_refused", "refused a message: {refusal}; not queued");
            return;
        }
        if let Err(e) = self.queue.push(&suffix, &payload) {
            tracing::error!(error = %e, queue = %self.agent.config.queue_dir.display(), "cannot store a message in the queue; it was NOT accepted");
        }
    }

    /// Runs until `stop` completes (or, for `renew`, the renewal is done). Messages arriving on
    /// `input` are queued durably at once.
    pub async fn run(mut self, mut input: mpsc::Receiver<Outbound>, stop: impl Future<Output = ()>) -> Outcome {
        let mut stop = std::pin::pin!(stop);
        let mut backoff = Backoff::new(self.agent.config.backoff_min_ms, self.agent.config.backoff_max_ms);
        loop {
            let delay = match self.connection(&mut input, &mut stop, &mut backoff).await {
                End::Stopped => return Outcome::Stopped,
                End::Done(outcome) => return outcome,
                End::Swap => Duration::ZERO,
                End::CommandTooLarge(size) => {
                    self.note_command_too_large(size);
                    backoff.next_delay()
                }
                End::Failed(diagnosis) => {
                    let delay = if diagnosis.identity_refused() {
                        backoff.longest()
                    } else {
                        backoff.next_delay()
                    };
                    warn!(event = "connect_failed", broker = %self.agent.broker, retry_in_ms = delay.as_millis() as u64, "{diagnosis}");
                    delay
                }
            };
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    Some(message) = input.recv() => self.accept(message),
                    () = &mut stop => {
                        self.log_stopped();
                        return Outcome::Stopped;
                    }
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
        let slot = self.files.first_choice();
        let (cert_path, key_path) = self.files.paths(slot);
        let credentials = match load_credentials_from(&self.agent, self.clock.clone(), &cert_path, &key_path) {
            Ok(credentials) => credentials,
            Err(e) if slot == Slot::Pending => {
                self.roll_back(&format!("it is unusable: {e}"));
                return End::Swap;
            }
            Err(e) => return End::Failed(Diagnosis::LocalProblem(e.to_string())),
        };
        // An expired certificate gets in only under the broker's renewal grace, to the renewal
        // topics alone: nothing else is sent, so no queued message is spent on a denial.
        let renewal_only = self.mode == Mode::RenewOnce || validity(&credentials.cert).1 <= self.clock.seconds() as i64;
        let reply_topic = RenewalTopic::Reply.topic(self.identity.id.as_str());
        let (client, mut eventloop) = AsyncClient::new(
            mqtt_options(&self.agent, &credentials.identity, credentials.tls.clone()),
            WINDOW * 4,
        );
        let mut flight = Flight::default();
        // The renewal request awaiting its reply, and when to give up on it.
        let mut in_flight: Option<(InFlight, tokio::time::Instant)> = None;
        let renew_wakeup = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(renew_wakeup);
        let heartbeat_period = Duration::from_secs(self.agent.config.heartbeat_s.max(1));
        let mut heartbeat = tokio::time::interval(heartbeat_period);
        let mut connected = false;
        let mut subscribed = false;
        // Armed at the CONNACK when a command too large ended an earlier connection.
        let subscribe_later = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(subscribe_later);
        let mut subscription_waits = false;
        loop {
            // One poll of the event loop stays alive while input, the heartbeat and timers are
            // served beside it: dropping it mid-connect would abandon the TLS handshake (the
            // broker logs a refused handshake, the agent starts over), and input must reach the
            // on-disk queue at once, connected or not.
            let step = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        event = &mut poll => break Step::Event(event),
                        () = &mut subscribe_later, if subscription_waits => {
                            subscription_waits = false;
                            subscribed = self.subscribe_to_commands(&client);
                        }
                        Some(message) = input.recv() => {
                            self.accept(message);
                            if connected && !renewal_only {
                                self.fill(&client, &mut flight);
                            }
                        }
                        () = &mut renew_wakeup, if connected => {
                            if in_flight.take().is_some() {
                                let delay = self.schedule.failed(self.clock.seconds());
                                self.abandon_request(&format!("no reply from the issuer within {:?}", self.schedule.reply_timeout()), delay);
                                if self.mode == Mode::RenewOnce {
                                    break Step::Unanswered;
                                }
                            } else {
                                in_flight = self.ask(&client, &mut flight);
                            }
                            renew_wakeup.as_mut().reset(self.wakeup(in_flight.as_ref()));
                        }
                        _ = heartbeat.tick(), if connected && !renewal_only && self.agent.config.heartbeat_s > 0 => self.heartbeat(&client, &mut flight),
                        () = stop.as_mut() => break Step::Stop,
                    }
                }
            };
            let event = match step {
                Step::Event(event) => event,
                Step::Stop => {
                    disconnect(&client, &mut eventloop).await;
                    self.log_stopped();
                    return End::Stopped;
                }
                Step::Unanswered => {
                    disconnect(&client, &mut eventloop).await;
                    return End::Done(Outcome::Unanswered);
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    info!(event = "connected", broker = %self.agent.broker, device_id = %self.identity.id, queued = self.queue.len(), "connected to {}", self.agent.broker);
                    if slot == Slot::Pending {
                        self.commit(&client, &mut flight, &credentials.cert);
                    } else if self.files.unconfirmed().exists() && !renewal_only {
                        // Committed by an earlier run that stopped before the issuer heard of it.
                        self.confirm(&client, &mut flight, &credentials.cert);
                    }
                    renew_wakeup.as_mut().reset(self.wakeup(None));
                    if renewal_only {
                        // Renewal topics only: no commands, no queue, no heartbeat.
                    } else if self.command_too_large.is_some() {
                        // The longest reconnect delay: a retained command stays until an
                        // operator replaces it, and meanwhile the queue drains.
                        subscribe_later
                            .as_mut()
                            .reset(tokio::time::Instant::now() + backoff.longest());
                        subscription_waits = true;
                    } else {
                        subscribed = self.subscribe_to_commands(&client);
                    }
                    self.fill(&client, &mut flight);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == reply_topic => {
                    let Some((request, deadline)) = in_flight.take() else {
                        continue;
                    };
                    let now = self.clock.seconds();
                    match read_reply(&publish.payload, &request, &self.identity, &credentials.cert) {
                        Ok(Answer::NotOurs) => in_flight = Some((request, deadline)),
                        Ok(Answer::Certificate(pem)) => match self.files.write_pending_cert(&pem) {
                            Ok(()) => {
                                info!(event = "renewal_received", device_id = %self.identity.id, request_id = %request.request_id, "received a renewed certificate: connecting with it");
                                disconnect(&client, &mut eventloop).await;
                                return End::Swap;
                            }
                            Err(e) => {
                                let delay = self.schedule.failed(now);
                                self.abandon_request(
                                    &format!("cannot write {}: {e}", self.files.pending_cert().display()),
                                    delay,
                                );
                            }
                        },
                        Ok(Answer::Refused(error)) => {
                            let delay = self.schedule.refused(now, &error);
                            self.abandon_request(
                                &format!("the issuer refused ({}): {}", error.code.as_str(), error.message),
                                delay,
                            );
                            if self.mode == Mode::RenewOnce {
                                disconnect(&client, &mut eventloop).await;
                                return End::Done(Outcome::Refused(error));
                            }
                        }
                        Err(problem) => {
                            let delay = self.schedule.failed(now);
                            self.abandon_request(&problem.to_string(), delay);
                        }
                    }
                    renew_wakeup.as_mut().reset(self.wakeup(in_flight.as_ref()));
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // A command got through: whatever was too large is gone (or was not one).
                    self.command_too_large = None;
                    let _ = self.commands.send((publish.topic, publish.payload.to_vec()));
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => flight.sent(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    match flight.acked(ack.pkid) {
                        Some(Handed::Queued(seq)) => {
                            if let Err(e) = self.queue.ack(seq) {
                                warn!(error = %e, "cannot remove an acknowledged message from the queue; it may be sent again");
                            }
                        }
                        Some(Handed::Confirm) => {
                            if let Err(e) = self.files.confirmed() {
                                warn!(error = %e, "cannot remove {}: the confirmation is sent again on the next start", self.files.unconfirmed().display());
                            }
                            if self.mode == Mode::RenewOnce {
                                disconnect(&client, &mut eventloop).await;
                                return End::Done(Outcome::Renewed);
                            }
                        }
                        Some(Handed::Untracked) | None => {}
                    }
                    if !renewal_only {
                        self.fill(&client, &mut flight);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(size) = incoming_too_large(&e) {
                        return End::CommandTooLarge(size);
                    }
                    if subscribed {
                        // That subscription did not bring the command back.
                        self.command_too_large = None;
                    }
                    let diagnosis = Diagnosis::of(&e);
                    if slot == Slot::Pending && !connected && diagnosis.identity_refused() {
                        self.roll_back(&format!("the broker refused it: {diagnosis}"));
                        return End::Swap;
                    }
                    return End::Failed(diagnosis);
                }
            }
        }
    }

    /// When the renewal timer fires next: the reply's deadline, or the next attempt.
    fn wakeup(&self, in_flight: Option<&(InFlight, tokio::time::Instant)>) -> tokio::time::Instant {
        match in_flight {
            Some((_, deadline)) => *deadline,
            None => {
                let wait = self.schedule.next_at().saturating_sub(self.clock.seconds());
                tokio::time::Instant::now() + Duration::from_secs(wait)
            }
        }
    }

    /// Starts a renewal: a new key, durably beside the current one, then the request.
    fn ask(&mut self, client: &AsyncClient, flight: &mut Flight) -> Option<(InFlight, tokio::time::Instant)> {
        let attempt = new_request(self.agent.config.renewal.key_type, &self.identity)
            .map_err(|e| e.to_string())
            .and_then(|(request, payload)| {
                self.files
                    .write_pending_key(&request.key.key_pem)
                    .map_err(|e| format!("cannot write {}: {e}", self.files.pending_key().display()))
                    .map(|()| (request, payload))
            });
        let (request, payload) = match attempt {
            Ok(made) => made,
            Err(why) => {
                let delay = self.schedule.failed(self.clock.seconds());
                warn!(event = "renewal_failed", device_id = %self.identity.id, retry_in_s = delay.as_secs(), "cannot start a renewal: {why}");
                return None;
            }
        };
        let id = self.identity.id.as_str();
        let _ = client.try_subscribe(RenewalTopic::Reply.topic(id), QoS::AtLeastOnce);
        if client
            .try_publish(RenewalTopic::Request.topic(id), QoS::AtLeastOnce, false, payload)
            .is_ok()
        {
            flight.handed(Handed::Untracked);
        }
        info!(event = "renewal_requested", device_id = %self.identity.id, request_id = %request.request_id, "asked the issuer for a renewed certificate");
        Some((request, tokio::time::Instant::now() + self.schedule.reply_timeout()))
    }

    /// A request ended without a certificate: its key goes, the next attempt is scheduled.
    fn abandon_request(&self, why: &str, retry_in: Duration) {
        if let Err(e) = self.files.rollback() {
            warn!(error = %e, "cannot remove {}: {e}", self.files.pending_key().display());
        }
        warn!(event = "renewal_failed", device_id = %self.identity.id, retry_in_s = retry_in.as_secs(), "certificate renewal failed: {why}; asking again in {} s", retry_in.as_secs());
    }

    /// The renewed pair failed: back to the current one, and ask again later.
    fn roll_back(&mut self, why: &str) {
        if let Err(e) = self.files.rollback() {
            warn!(error = %e, "cannot remove the renewed certificate: {e}");
        }
        let delay = self.schedule.failed(self.clock.seconds());
        warn!(event = "renewal_rolled_back", device_id = %self.identity.id, retry_in_s = delay.as_secs(), "the renewed certificate was not used ({why}): back to the current one");
    }

    /// The broker accepted the renewed pair: it becomes the current one, and the issuer is told
    /// (retained, so an issuer that is down now learns it when it next subscribes). Returns
    /// whether the confirmation was handed to the client.
    fn commit(&mut self, client: &AsyncClient, flight: &mut Flight, cert: &CertificateDer<'_>) -> bool {
        if let Err(e) = self.files.commit() {
            warn!(event = "renewal_failed", error = %e, "cannot commit the renewed certificate: {e}; it is tried again on the next connection");
            return false;
        }
        let (not_before, not_after) = validity(cert);
        self.schedule.restart(not_before, not_after);
        info!(event = "renewed", device_id = %self.identity.id, next_renewal_unix = self.schedule.next_at(), "now using the renewed certificate");
        self.confirm(client, flight, cert)
    }

    /// Tells the issuer which certificate this device connects with (see [`Runner::commit`]).
    /// Until its PUBACK, the commit's marker ([`IdentityFiles::unconfirmed`]) stays, and a
    /// later start sends it again: a crash between a commit and its confirmation would otherwise
    /// leave the superseded certificate valid until it expires.
    fn confirm(&mut self, client: &AsyncClient, flight: &mut Flight, cert: &CertificateDer<'_>) -> bool {
        let serial = fleet_identity::CertificateSummary::from_der(cert)
            .map(|summary| summary.serial.to_string())
            .unwrap_or_default();
        let confirm = serde_json::to_vec(&RenewConfirm { serial }).unwrap_or_default();
        let topic = RenewalTopic::Confirm.topic(self.identity.id.as_str());
        let handed = client.try_publish(topic, QoS::AtLeastOnce, true, confirm).is_ok();
        if handed {
            flight.handed(Handed::Confirm);
        }
        handed
    }

    fn subscribe_to_commands(&self, client: &AsyncClient) -> bool {
        client
            .try_subscribe(self.rules.topic("cmd/#"), QoS::AtLeastOnce)
            .is_ok()
    }

    /// Logs a packet too large to receive once, not on every connection it ends.
    fn note_command_too_large(&mut self, size: usize) {
        if self.command_too_large != Some(size) {
            warn!(
                event = "command_too_large",
                bytes = size,
                max_packet_bytes = self.agent.config.max_packet_bytes,
                "the broker sent a packet of {size} bytes, larger than max_packet_bytes ({}): the connection ended without reading it. \
                 If it is a retained command it comes back on every subscription: until it is replaced (or max_packet_bytes raised to the broker's), \
                 each connection sends the queue first and subscribes to commands up to {} ms later",
                self.agent.config.max_packet_bytes,
                self.agent.config.backoff_max_ms
            );
        }
        self.command_too_large = Some(size);
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
                    self.set_aside(seq, e.set_aside(), &e);
                    continue;
                }
            };
            if let Err(refusal) = self.rules.check(&message.suffix, &message.payload) {
                self.set_aside(seq, SetAside::Refused, &refusal);
                continue;
            }
            if client
                .try_publish(
                    self.rules.topic(&message.suffix),
                    QoS::AtLeastOnce,
                    false,
                    message.payload,
                )
                .is_err()
            {
                return;
            }
            flight.handed(Handed::Queued(seq));
        }
    }

    /// Takes a queued message that cannot be sent out of the queue, so that it is not retried on
    /// every connection and the messages after it go on.
    fn set_aside(&mut self, seq: u64, why: SetAside, reason: &dyn std::fmt::Display) {
        match self.queue.set_aside(seq, why) {
            Ok(file) => {
                warn!(event = "queued_message_set_aside", seq, file = %file.display(), "cannot send queued message {seq} ({reason}): set aside as {}", file.display())
            }
            Err(e) => {
                warn!(event = "queued_message_set_aside", seq, error = %e, "cannot send queued message {seq} ({reason}), nor rename it ({e}): skipped until the agent restarts")
            }
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
            .try_publish(self.rules.topic("status"), QoS::AtMostOnce, false, status.to_string())
            .is_ok()
        {
            flight.handed(Handed::Untracked);
        }
    }
}

/// notBefore and notAfter of a certificate, Unix seconds (0, 0 if it does not parse: renew at
/// once).
fn validity(cert: &CertificateDer<'_>) -> (i64, i64) {
    fleet_identity::CertificateSummary::from_der(cert).map_or((0, 0), |summary| (summary.not_before, summary.not_after))
}

/// Ends a connection politely: DISCONNECT, then a moment for it to go out.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// A publish handed to the client, as far as its PUBACK matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handed {
    /// A queued message (its sequence number): removed from the queue when acknowledged.
    Queued(u64),
    /// The renewal confirmation: its marker goes when acknowledged.
    Confirm,
    /// Nothing waits for it (QoS 0, or a renewal request).
    Untracked,
}

/// Matches the client's packet ids to queue sequence numbers.
#[derive(Default)]
struct Flight {
    /// Publishes handed to the client, in order, awaiting their packet id.
    handed: VecDeque<Handed>,
    /// Packet id -> what awaits its PUBACK.
    unacked: HashMap<u16, Handed>,
    /// The last queue sequence number handed to this connection.
    last_handed: u64,
}

impl Flight {
    fn handed(&mut self, what: Handed) {
        self.handed.push_back(what);
    }

    fn sent(&mut self, pkid: u16) {
        match self.handed.pop_front() {
            Some(Handed::Untracked) | None => {}
            Some(tracked) => {
                self.unacked.insert(pkid, tracked);
            }
        }
    }

    fn acked(&mut self, pkid: u16) -> Option<Handed> {
        self.unacked.remove(&pkid)
    }

    /// Queued messages in flight (what the window bounds).
    fn open(&self) -> usize {
        let queued = |h: &&Handed| matches!(h, Handed::Queued(_));
        self.unacked.values().filter(queued).count() + self.handed.iter().filter(queued).count()
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
