//! What every connection shares: the TLS material in force, the ACL, the limits, the router,
//! the table of connected sessions and the audit trail.

use std::sync::Arc;

use crate::acl::AclConfig;
use crate::audit::Audit;
use crate::config::Limits;
use crate::live::LiveSessions;
use crate::reload::TlsState;
use crate::router::Router;

/// What every session shares.
pub struct SessionContext {
    /// The TLS material in force.
    pub tls: Arc<TlsState>,
    /// ACL templates.
    pub acl: Arc<AclConfig>,
    /// Deadlines and sizes.
    pub limits: Limits,
    /// The router.
    pub router: Router,
    /// Connected sessions, for revocation and shutdown.
    pub sessions: Arc<LiveSessions>,
    /// The audit trail.
    pub audit: Audit,
}
