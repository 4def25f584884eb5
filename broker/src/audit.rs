//! The audit trail: one structured `tracing` event per decision, and the metric it moves.
//!
//! Every event carries `event` (accept, reject, disconnect, acl_denied, subscription_refused,
//! revoked_kick, expired_grace, slow_subscriber, queue_overflow, qos0_dropped, retain_refused, reload,
//! reload_failed, crl_stale) so a log pipeline can filter on it; rejects and disconnects carry
//! `reason`, one of the stable words of [`crate::reason`], which the README's troubleshooting
//! table explains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::{Identity, Serial};
use tracing::{info, warn};

use crate::metrics::{DropReason, Metrics};
use crate::reason::{RejectReason, SessionEnd};
use crate::tls::PresentedCert;

/// Writes audit events and counts them.
#[derive(Clone)]
pub struct Audit {
    metrics: Arc<Metrics>,
}

impl Audit {
    /// An audit trail that also feeds `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }

    /// The metrics this trail feeds.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A session was accepted.
    pub fn accept(&self, peer: SocketAddr, identity: &Identity, cert: &PresentedCert, tls_version: &str) {
        self.metrics.handshake_accepted();
        info!(
            event = "accept",
            device_id = %identity.id,
            role = %identity.role,
            serial = cert.revocation.as_ref().map_or("-", |key| key.serial.as_str()),
            sha256 = %cert.sha256,
            %peer,
            tls_version,
            "accepted {} {}",
            identity.role,
            identity.id
        );
    }

    /// A device whose certificate expired less than `renewal_grace_days` ago was admitted, to
    /// its renewal topics only.
    pub fn expired_grace(&self, peer: SocketAddr, identity: &Identity, cert: &PresentedCert, expired_at: i64) {
        warn!(
            event = "expired_grace",
            device_id = %identity.id,
            serial = cert.revocation.as_ref().map_or("-", |key| key.serial.as_str()),
            expired_at,
            %peer,
            "admitted {identity} with a certificate expired at {expired_at} (Unix time) to its renewal topics only"
        );
    }

    /// A connection was refused.
    pub fn reject(&self, peer: SocketAddr, reason: RejectReason, detail: &str, cert: Option<&PresentedCert>) {
        self.metrics.handshake_rejected(reason);
        let id = cert.and_then(|c| c.id.as_deref()).unwrap_or("-");
        let serial = cert
            .and_then(|c| c.revocation.as_ref())
            .map_or("-", |key| key.serial.as_str());
        warn!(event = "reject", reason = reason.as_str(), %peer, device_id = id, serial, detail, "rejected {peer}: {}", reason.as_str());
    }

    /// A PUBLISH, SUBSCRIBE filter or will was denied by the ACL.
    pub fn acl_denied(&self, identity: &Identity, action: &'static str, topic: &str) {
        self.metrics.acl_denied();
        warn!(event = "acl_denied", device_id = %identity.id, role = %identity.role, action, topic, "{} {} may not {action} {topic:?}", identity.role, identity.id);
    }

    /// A live session was closed because its certificate was revoked.
    pub fn revoked_kick(&self, identity: &Identity, serial: &Serial) {
        warn!(event = "revoked_kick", device_id = %identity.id, role = %identity.role, serial = serial.as_str(), "closed the session of {} {}: certificate revoked", identity.role, identity.id);
    }

    /// An established session ended (other than by revocation or a protocol error, which have
    /// their own events).
    pub fn disconnect(&self, peer: SocketAddr, identity: &Identity, client_id: &str, end: &SessionEnd) {
        info!(event = "disconnect", reason = end.as_str(), device_id = %identity.id, role = %identity.role, client_id, %peer, cause = %end, "{identity} disconnected: {end}");
    }

    /// A detached session's expiry interval ran out: it ended, with what it held.
    pub fn session_expired(&self, client_id: &str) {
        info!(
            event = "session_expired",
            client_id, "the session of {client_id} expired"
        );
    }

    /// A SUBSCRIBE filter the ACL allowed but the router did not take.
    pub fn subscription_refused(&self, identity: &Identity, filter: &str, why: &str) {
        warn!(event = "subscription_refused", device_id = %identity.id, role = %identity.role, filter, why, "{identity} may not subscribe to {filter:?}: {why}");
    }

    /// A session's queue stayed full, nothing taken from it, while publishers waited: it is being
    /// disconnected.
    pub fn slow_subscriber(&self, client_id: &str, timeout: Duration) {
        self.metrics.slow_subscriber();
        warn!(
            event = "slow_subscriber",
            client_id,
            timeout_ms = timeout.as_millis() as u64,
            "disconnecting {client_id}: its queue stayed full, nothing taken from it, for {timeout:?} while publishers waited"
        );
    }

    /// Deliveries to `client_id` were dropped (`count` since the last report for this session
    /// and reason; reported at most every few seconds while it continues).
    pub fn deliveries_dropped(&self, client_id: &str, reason: DropReason, count: u64) {
        warn!(
            event = reason.as_str(),
            client_id,
            count,
            "dropped {count} deliveries to {client_id} ({})",
            reason.as_str()
        );
    }

    /// The bridge is connected (and subscribed) to `upstream`; `refused` are the filters it
    /// refused; `outbox` messages wait to be forwarded.
    pub fn bridge_connected(&self, upstream: &str, refused: &[&str], outbox: usize) {
        if refused.is_empty() {
            info!(
                event = "bridge_connected",
                upstream, outbox, "bridge connected to {upstream}; {outbox} message(s) to forward"
            );
        } else {
            let refused = refused.join(",");
            warn!(
                event = "bridge_connected",
                upstream, outbox, refused, "bridge connected to {upstream}, which refused the subscriptions {refused}"
            );
        }
    }

    /// The bridge moved from one upstream to another.
    pub fn bridge_failover(&self, from: &str, to: &str) {
        warn!(
            event = "bridge_failover",
            from, to, "bridge failed over from {from} to {to}"
        );
    }

    /// The bridge's connection to `upstream` ended (`reason`, a stable word, and the detail).
    pub fn bridge_disconnected(&self, upstream: &str, reason: &str, detail: &str, outbox: usize) {
        warn!(
            event = "bridge_disconnected",
            upstream, reason, detail, outbox, "bridge lost {upstream}: {detail}"
        );
    }

    /// An attempt to connect the bridge to `upstream` failed.
    pub fn bridge_connect_failed(&self, upstream: &str, reason: &str, detail: &str) {
        warn!(
            event = "bridge_connect_failed",
            upstream, reason, detail, "bridge cannot connect: {detail}"
        );
    }

    /// Messages from the upstream were not delivered (`count` since the last report), the last
    /// on `topic`, for `why`.
    pub fn bridge_downstream_refused(&self, topic: &str, why: &str, count: u64) {
        warn!(
            event = "downstream_refused",
            topic, why, count, "did not deliver {count} message(s) from the upstream, the last on {topic:?}: {why}"
        );
    }

    /// A retained message was not stored (it was still delivered); `count` since the last report.
    pub fn retain_refused(&self, topic: &str, why: &str, count: u64) {
        warn!(
            event = "retain_refused",
            topic, why, count, "did not retain {count} message(s), the last on {topic:?}: {why}"
        );
    }

    /// New TLS material is in force.
    pub fn reload(&self, what: &str) {
        info!(event = "reload", changed = what, "reloaded {what}");
    }

    /// New TLS material was refused; the old configuration stays.
    pub fn reload_failed(&self, error: &str) {
        tracing::error!(
            event = "reload_failed",
            error,
            "kept the previous TLS configuration: {error}"
        );
    }

    /// What revocation covers, said at start and after every reload: off without a CRL; every
    /// client CA that no CRL covers (its certificates refused, or accepted unchecked if exempt).
    pub fn revocation_coverage(&self, crl: Option<&crate::crl::CrlInfo>) {
        let Some(crl) = crl else {
            warn!(
                event = "revocation_off",
                "no `crl` configured: revocation is OFF, a revoked certificate is accepted; set `crl` to each client CA's CRL file"
            );
            return;
        };
        for ca in &crl.uncovered {
            tracing::error!(
                event = "crl_missing",
                ca = %ca.subject,
                ca_sha256 = %ca.sha256,
                "no CRL covers client CA {} (sha256 {}): its certificates are REFUSED (crl_missing) until its CRL is added to `crl`, or it is named in `crl_exempt_cas`",
                ca.subject,
                ca.sha256
            );
        }
        for ca in &crl.exempt {
            warn!(
                event = "crl_exempt",
                ca = %ca.subject,
                ca_sha256 = %ca.sha256,
                "client CA {} (sha256 {}) has no CRL and is in `crl_exempt_cas`: its certificates are accepted WITHOUT a revocation check",
                ca.subject,
                ca.sha256
            );
        }
    }

    /// The CRL is past its nextUpdate. It is still enforced.
    pub fn crl_stale(&self, path: &str, next_update: &str) {
        warn!(event = "crl_stale", crl = path, next_update, "CRL {path} is past its nextUpdate ({next_update}); still enforcing it: run `provision crl` and deliver the new file");
    }
}
