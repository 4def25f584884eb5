//! The device agent's run loop in this process (the library, not the binary): many agents
//! cost one tokio runtime instead of a process each.

use std::sync::Arc;

use device_agent::config::Agent;
use device_agent::queue::Queue;
use device_agent::session::{Mode, Outbound, Outcome, Runner};
use device_agent::trust::{load_credentials, FlooredClock};
use tokio::sync::{mpsc, oneshot};

/// One in-process agent.
pub struct RunningAgent {
    /// The application's messages, as `run` reads them from stdin.
    pub input: mpsc::Sender<Outbound>,
    /// Stops it, as SIGTERM does.
    pub stop: oneshot::Sender<()>,
    /// Its run loop.
    pub task: tokio::task::JoinHandle<Outcome>,
}

/// Starts `agent` (its certificate, key and queue read now) on the current tokio runtime.
pub fn start_agent(agent: Agent) -> RunningAgent {
    let clock = Arc::new(FlooredClock::system());
    let credentials = load_credentials(&agent, clock.clone()).expect("the device's credentials");
    let queue = Queue::open(&agent.config.queue_dir, agent.config.queue_max_messages).expect("the queue");
    let (input, input_rx) = mpsc::channel(64);
    let (commands, _) = mpsc::unbounded_channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let runner = Runner::new(agent, &credentials, clock, queue, commands, Mode::Run);
    let task = tokio::spawn(runner.run(input_rx, async move {
        let _ = stop_rx.await;
    }));
    RunningAgent { input, stop, task }
}
