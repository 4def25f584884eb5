//! Collects the broker's audit events in memory, so the demo can show the same decisions, with
//! the same reason words, that the broker logs.

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// One audit decision.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    /// accept, reject, acl_denied, revoked_kick, ...
    pub event: String,
    /// The certificate's id, if any.
    pub device_id: String,
    /// reject: the reason word.
    pub reason: String,
    /// acl_denied: publish / subscribe / will.
    pub action: String,
    /// acl_denied: the topic.
    pub topic: String,
}

impl Visit for Decision {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "event" => &mut self.event,
            "device_id" => &mut self.device_id,
            "reason" => &mut self.reason,
            "action" => &mut self.action,
            "topic" => &mut self.topic,
            _ => return,
        };
        *slot = value.to_owned();
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "device_id" {
            self.device_id = format!("{value:?}");
        }
    }
}

/// A tracing layer that keeps the broker's audit decisions.
#[derive(Clone, Default)]
pub struct AuditCapture {
    decisions: Arc<Mutex<Vec<Decision>>>,
}

impl AuditCapture {
    /// Every decision so far.
    pub fn decisions(&self) -> Vec<Decision> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (polling every 20 ms, up to `limit`) for a decision matching `predicate`.
    pub async fn wait_for(&self, limit: std::time::Duration, predicate: impl Fn(&Decision) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.decisions().iter().any(&predicate) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }
}

impl<S: Subscriber> Layer<S> for AuditCapture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("broker") {
            return;
        }
        let mut decision = Decision::default();
        event.record(&mut decision);
        if matches!(
            decision.event.as_str(),
            "accept" | "reject" | "acl_denied" | "revoked_kick"
        ) {
            self.decisions.lock().unwrap_or_else(|p| p.into_inner()).push(decision);
        }
    }
}
