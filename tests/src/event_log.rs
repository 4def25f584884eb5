//! A child process's JSON log lines, read as events as they come, for tests to wait on.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Log events seen so far, and a signal for new ones.
#[derive(Default)]
struct Events {
    lines: Mutex<Vec<Value>>,
    added: Condvar,
}

/// The events of one process's log (a line that is not JSON becomes `{"raw": line}`).
#[derive(Clone)]
pub struct EventLog {
    events: Arc<Events>,
}

impl EventLog {
    /// Reads `stream` (a child's stderr) on a thread of its own until it closes.
    pub fn read(stream: impl Read + Send + 'static) -> Self {
        let events = Arc::new(Events::default());
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lines.lock().expect("events lock").push(event);
                sink.added.notify_all();
            }
        });
        Self { events }
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lines.lock().expect("events lock").clone()
    }

    /// Waits for an event matching `predicate`; panics with the whole log after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut lines = self.events.lines.lock().expect("events lock");
        loop {
            if let Some(found) = lines.iter().find(|e| predicate(e)) {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {limit:?}; log:\n{}", render(&lines));
            lines = self.events.added.wait_timeout(lines, left).expect("events lock").0;
        }
    }

    /// Waits until `count` events match `predicate`; panics with the whole log after `limit`.
    pub fn wait_for_count(&self, what: &str, limit: Duration, count: usize, predicate: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + limit;
        let mut lines = self.events.lines.lock().expect("events lock");
        loop {
            let seen = lines.iter().filter(|e| predicate(e)).count();
            if seen >= count {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: {seen} of {count} within {limit:?}; log:\n{}",
                render(&lines)
            );
            lines = self.events.added.wait_timeout(lines, left).expect("events lock").0;
        }
    }
}

fn render(lines: &[Value]) -> String {
    lines.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}
