//! The device agent in the test's own process: the agent crate's `Runner` on a bundle that
//! `provision` wrote, fed telemetry through a channel, its commands read from another.

use std::path::Path;
use std::sync::Arc;

use device_agent::config::Agent;
use device_agent::queue::Queue;
use device_agent::session::{Command, Mode, Outbound, Outcome, Runner};
use device_agent::trust::{load_credentials, FlooredClock};
use tokio::sync::{mpsc, oneshot};

/// A running agent.
pub struct RunningAgent {
    /// Telemetry to publish: (topic suffix, payload), e.g. ("telemetry", ...).
    pub input: mpsc::Sender<Outbound>,
    /// The commands it received: (topic, payload).
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// Stops it.
    pub stop: oneshot::Sender<()>,
    /// Its task.
    pub task: tokio::task::JoinHandle<Outcome>,
}

/// Starts the agent of `bundle` (its `agent.toml`), after `adjust` had its say on the settings.
pub fn start_agent(bundle: &Path, adjust: impl FnOnce(&mut Agent)) -> RunningAgent {
    let mut agent = Agent::load(&bundle.join("agent.toml")).expect("agent.toml from provision");
    agent.config.heartbeat_s = 0;
    adjust(&mut agent);
    let clock = Arc::new(FlooredClock::system());
    let credentials = load_credentials(&agent, clock.clone()).expect("the bundle's credentials");
    let queue = Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages).expect("the agent's queue");
    let (input, input_rx) = mpsc::channel(64);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(
        Runner::new(agent, &credentials, clock, queue, commands_tx, Mode::Run).run(input_rx, async move {
            let _ = stop_rx.await;
        }),
    );
    RunningAgent {
        input,
        commands,
        stop,
        task,
    }
}
