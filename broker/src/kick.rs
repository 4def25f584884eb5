//! The signal that tells one connection to close, from wherever the decision is made: the
//! reloader (revocation), the router (takeover, slow subscriber) or the listener (shutdown).
//!
//! A connection taken over closes its socket only once its successor has sent its CONNACK (see
//! `session::finish` for why), so the kick carries the successor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

use crate::reason::KickReason;

/// One connection's close signal. The first reason given wins: it is what the log says.
#[derive(Default)]
pub struct Kick {
    reason: OnceLock<KickReason>,
    waker: AtomicWaker,
    /// The connection that took this one's client id over.
    successor: OnceLock<Arc<Kick>>,
    /// Set once this connection has sent its CONNACK.
    connacked: AtomicBool,
    connacked_notify: Notify,
}

impl Kick {
    /// Tells the connection to close for `reason` (ignored if it was already told).
    pub fn give(&self, reason: KickReason) {
        let _ = self.reason.set(reason);
        self.waker.wake();
    }

    /// The reason, once given.
    pub fn reason(&self) -> Option<KickReason> {
        self.reason.get().copied()
    }

    /// Tells the connection it was taken over by `successor`.
    pub fn take_over(&self, successor: Arc<Kick>) {
        let _ = self.successor.set(successor);
        self.give(KickReason::TakenOver);
    }

    /// The connection that took this one over, if any.
    pub fn successor(&self) -> Option<&Arc<Kick>> {
        self.successor.get()
    }

    /// This connection has sent its CONNACK.
    pub fn mark_connacked(&self) {
        self.connacked.store(true, Ordering::Release);
        self.connacked_notify.notify_waiters();
    }

    /// Completes once this connection has sent its CONNACK.
    pub async fn connacked(&self) {
        loop {
            let notified = self.connacked_notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.connacked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Ready with the reason once the connection has been told to close.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<KickReason> {
        if let Some(reason) = self.reason() {
            return Poll::Ready(reason);
        }
        self.waker.register(cx.waker());
        // A kick between the check and the registration would otherwise go unnoticed.
        match self.reason() {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    #[test]
    fn the_first_reason_sticks() {
        let kick = Kick::default();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(kick.poll(&mut cx).is_pending());
        kick.give(KickReason::Revoked);
        kick.give(KickReason::TakenOver);
        assert_eq!(kick.poll(&mut cx), Poll::Ready(KickReason::Revoked));
    }
}
