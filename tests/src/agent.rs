//! The device agent's run loop in the test's own process (the library, not the binary), on a
//! bundle that `provision` wrote: many agents cost one tokio runtime instead of a process each.

use std::path::Path;
use std::sync::Arc;

use device_agent::config::Agent;
use device_agent::queue::Queue;
use device_agent::session::{Command, Mode, Outbound, Outcome, Runner};
use device_agent::trust::{load_credentials, FlooredClock};
use tokio::sync::{mpsc, oneshot};

/// One in-process agent.
pub struct RunningAgent {
    /// The application's messages, as `run` reads them from stdin.
    pub input: mpsc::Sender<Outbound>,
    /// The commands it received: (topic, payload).
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// Stops it, as SIGTERM does.
    pub stop: oneshot::Sender<()>,
    /// Its run loop.
    pub task: tokio::task::JoinHandle<Outcome>,
}

/// The agent of `bundle` (its `agent.toml`, without heartbeats), after `adjust` had its say.
pub fn bundle_agent(bundle: &Path, adjust: impl FnOnce(&mut Agent)) -> Agent {
    let mut agent = Agent::load(&bundle.join("agent.toml")).expect("agent.toml from provision");
    agent.config.heartbeat_s = 0;
    adjust(&mut agent);
    agent
}

/// Starts `agent` (its certificate, key and queue read now) on the current tokio runtime.
pub fn start_agent(agent: Agent) -> RunningAgent {
    let clock = Arc::new(FlooredClock::system());
    let credentials = load_credentials(&agent, clock.clone()).expect("the device's credentials");
    let queue = Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages).expect("the queue");
    let (input, input_rx) = mpsc::channel(64);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let runner = Runner::new(agent, &credentials, clock, queue, commands_tx, Mode::Run);
    let task = tokio::spawn(runner.run(input_rx, async move {
        let _ = stop_rx.await;
    }));
    RunningAgent {
        input,
        commands,
        stop,
        task,
    }
}
