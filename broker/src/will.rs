//! A will waiting out its MQTT 5 Will Delay Interval: published when the delay (or the
//! session, if it ends first) runs out, never if a connection resumes the session before, at
//! once if a connection starts the session afresh (MQTT 5 section 3.1.3.2.2).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

const WAITING: u8 = 0;
const CANCELLED: u8 = 1;
const NOW: u8 = 2;

/// The decision about one delayed will, made by whichever comes first.
#[derive(Default)]
pub struct DelayedWill {
    state: AtomicU8,
    changed: Notify,
}

impl DelayedWill {
    /// The session was resumed: the will is not published.
    pub fn cancel(&self) {
        let _ = self
            .state
            .compare_exchange(WAITING, CANCELLED, Ordering::AcqRel, Ordering::Acquire);
        self.changed.notify_one();
    }

    /// The session ended (replaced or expired): the will is published now.
    pub fn publish_now(&self) {
        let _ = self
            .state
            .compare_exchange(WAITING, NOW, Ordering::AcqRel, Ordering::Acquire);
        self.changed.notify_one();
    }

    /// Waits up to `delay`: true if the will is to be published.
    pub async fn wait(&self, delay: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            match self.state.load(Ordering::Acquire) {
                CANCELLED => return false,
                NOW => return true,
                _ => {}
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                return self
                    .state
                    .compare_exchange(WAITING, NOW, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                    || self.state.load(Ordering::Acquire) == NOW;
            }
        }
    }
}
