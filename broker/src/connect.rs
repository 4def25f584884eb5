//! CONNECT: read it within its deadline, bind the client id to the certificate, attach the
//! connection to its router session and answer CONNACK. Every refusal is written and logged here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_identity::{Identity, Role};
use tokio::time::timeout;

use crate::acl::{TopicRules, Verdict};
use crate::codec::{ConnAckProperties, Connect, FrameError, Inbound, Outbound, ReasonCode, Version, Will};
use crate::connection::{Connection, ReadError};
use crate::context::SessionContext;
use crate::crl::RevocationKey;
use crate::handshake::Authenticated;
use crate::kick::Kick;
use crate::live::Registration;
use crate::reason::RejectReason;
use crate::router::{Attached, SessionKey};
use crate::tls::PresentedCert;

/// A session past its CONNACK: what the pump and the close need.
pub(crate) struct Established {
    pub(crate) identity: Identity,
    /// The certificate's issuer and serial (what revocation and the audit need of it from now on).
    pub(crate) revocation: RevocationKey,
    /// The client id as the client knows it (assigned if it sent none).
    pub(crate) client_id: String,
    pub(crate) rules: TopicRules,
    /// Tells this connection to close (revocation, takeover, slow subscriber, shutdown).
    pub(crate) kick: Arc<Kick>,
    /// The router session.
    pub(crate) attached: Attached,
    pub(crate) registration: Registration,
    /// Boxed: most sessions have none, and every session's task is allocated at full size.
    pub(crate) will: Option<Box<Will>>,
    /// 1.5 times the keepalive in force, if there is one.
    pub(crate) keepalive: Option<Duration>,
    /// What the client's CONNECT asked of this connection (MQTT 5; 3.1.1's are fixed).
    pub(crate) client: ClientTerms,
}

/// What an MQTT 5 client said it takes, and the MQTT 5 state it asked for; for a 3.1.1 client
/// the values 3.1.1 implies.
pub(crate) struct ClientTerms {
    /// The session expiry in force (capped by `limits.max_session_expiry_secs`).
    pub(crate) session_expiry: u32,
    /// The largest packet it takes.
    pub(crate) maximum_packet_size: Option<u32>,
    /// Topic aliases the broker may use towards it (its maximum, within the broker's).
    pub(crate) topic_alias_maximum: u16,
}

/// Reads and checks the CONNECT, attaches the session and answers CONNACK.
pub(crate) async fn establish(
    session: Authenticated,
    conn: &mut Connection,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<Established> {
    let Authenticated {
        identity,
        cert,
        tls_version,
        expired_grace,
    } = session;
    let connect = read_connect(conn, &cert, peer, ctx).await?;
    let rules = match expired_grace {
        Some(expired_at) => {
            ctx.audit.expired_grace(peer, &identity, &cert, expired_at);
            TopicRules::renewal_only(&identity)
        }
        None => ctx.acl.for_identity(&identity),
    };
    if let Err(refusal) = check_connect(&identity, &connect, &rules) {
        if let (RejectReason::WillDenied, Some(will)) = (refusal.reason, &connect.will) {
            ctx.audit
                .acl_denied(&identity, "will", &String::from_utf8_lossy(&will.topic));
        }
        let properties = ConnAckProperties {
            reason_string: Some(refusal.detail.clone()),
            ..ConnAckProperties::default()
        };
        let _ = conn
            .write_now(&Outbound::ConnAck {
                session_present: false,
                code: refusal.code,
                properties: &properties,
            })
            .await;
        ctx.audit.reject(peer, refusal.reason, &refusal.detail, Some(&cert));
        return None;
    }
    let Some(revocation) = cert.revocation.clone() else {
        // The verifier accepted a certificate it could read: never without a serial.
        ctx.audit.reject(
            peer,
            RejectReason::BadIdentity,
            "the certificate's serial cannot be read",
            Some(&cert),
        );
        return None;
    };
    let (key, client_id) = session_key(&identity, &connect.client_id);
    let kick = Arc::new(Kick::default());
    let registration = ctx
        .sessions
        .register(identity.clone(), revocation.clone(), kick.clone());
    // A CRL swapped in between this handshake and the registration above would miss us.
    if ctx.tls.is_revoked(&revocation) {
        ctx.audit
            .reject(peer, RejectReason::Revoked, "revoked while connecting", Some(&cert));
        return None;
    }
    let limits = &ctx.limits;
    let v5 = connect.version == Version::V5;
    let session_expiry = match connect.version {
        Version::V5 => connect.session_expiry.min(limits.max_session_expiry_secs),
        Version::V311 => connect.session_expiry,
    };
    let max_inflight = limits.max_inflight.min(usize::from(connect.receive_maximum));
    let attached = ctx
        .router
        .attach(key, connect.clean_start, session_expiry, kick.clone(), max_inflight);
    let keep_alive = match connect.version {
        Version::V5 if connect.keep_alive == 0 || connect.keep_alive > limits.max_keep_alive_secs => {
            limits.max_keep_alive_secs
        }
        _ => connect.keep_alive,
    };
    let properties = ConnAckProperties {
        session_expiry: (v5 && session_expiry != connect.session_expiry).then_some(session_expiry),
        receive_maximum: Some(u16::try_from(limits.max_inflight).unwrap_or(u16::MAX)),
        maximum_packet_size: Some(u32::try_from(limits.max_packet_bytes).unwrap_or(u32::MAX)),
        assigned_client_identifier: connect.client_id.is_empty().then(|| client_id.clone()),
        topic_alias_maximum: (limits.max_topic_aliases > 0).then_some(limits.max_topic_aliases),
        reason_string: None,
        server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
    };
    // The decision is recorded before the client can see it.
    ctx.audit.accept(peer, &identity, &cert, &tls_version);
    ctx.audit.metrics().session_opened(identity.role);
    let written = conn
        .write_now(&Outbound::ConnAck {
            session_present: attached.session_present(),
            code: ReasonCode::Success,
            properties: &properties,
        })
        .await;
    kick.mark_connacked();
    if written.is_err() {
        ctx.audit.metrics().session_closed(identity.role);
        return None;
    }
    let keepalive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let client = ClientTerms {
        session_expiry,
        maximum_packet_size: connect.maximum_packet_size,
        topic_alias_maximum: connect.topic_alias_maximum.min(limits.max_topic_aliases),
    };
    Some(Established {
        identity,
        revocation,
        client_id,
        rules,
        kick,
        attached,
        registration,
        will: connect.will.map(Box::new),
        keepalive,
        client,
    })
}

/// Reads the CONNECT, within the deadline. Refusals are written and logged here.
async fn read_connect(
    conn: &mut Connection,
    cert: &PresentedCert,
    peer: SocketAddr,
    ctx: &SessionContext,
) -> Option<Connect> {
    let deadline = Duration::from_millis(ctx.limits.connect_timeout_ms);
    let first = timeout(deadline, conn.read_packet()).await;
    let reject = |reason, detail: &str| ctx.audit.reject(peer, reason, detail, Some(cert));
    match first {
        Err(_) => reject(
            RejectReason::ConnectTimeout,
            &format!(
                "no CONNECT within {} ms of the handshake",
                ctx.limits.connect_timeout_ms
            ),
        ),
        Ok(Ok(Inbound::Connect(connect))) => return Some(*connect),
        Ok(Ok(other)) => reject(
            RejectReason::ProtocolError,
            &format!("first packet was {}, not CONNECT", other.name()),
        ),
        Ok(Err(ReadError::Frame(FrameError::UnsupportedProtocolLevel(level)))) => {
            let properties = ConnAckProperties::default();
            let _ = conn
                .write_now(&Outbound::ConnAck {
                    session_present: false,
                    code: ReasonCode::UnsupportedProtocolVersion,
                    properties: &properties,
                })
                .await;
            reject(
                RejectReason::UnsupportedProtocolVersion,
                &format!("MQTT protocol level {level}: only MQTT 3.1.1 (level 4) and 5 are supported"),
            );
        }
        Ok(Err(e)) => reject(RejectReason::ProtocolError, &e.to_string()),
    }
    None
}

/// The router session key of a peer, and the client id as the client knows it.
///
/// Roles live in separate namespaces, so no service can take over a device's session by naming
/// its client id, and several instances of a service may connect under different client ids. A
/// device's session is its certificate's id whatever it sent (`check_connect` refused anything
/// else but empty). A service without a client id gets a fresh, random one: unique across
/// restarts too, since an MQTT 5 client may keep such a session (it learns the id from CONNACK).
///
/// Shared subscription groups are scoped: each device alone, all services together. So a device
/// never takes messages from a backend's group, nor shares a group with another device.
fn session_key(identity: &Identity, requested: &str) -> (SessionKey, String) {
    let id = identity.id.as_str();
    let (client, scope, client_id) = match identity.role {
        Role::Device => (format!("device:{id}"), format!("device:{id}"), id.to_owned()),
        Role::Service | Role::Gateway => {
            let client_id = if requested.is_empty() {
                format!("{id}-auto-{}", random_suffix())
            } else {
                requested.to_owned()
            };
            (
                format!("{}:{id}:{client_id}", identity.role),
                "services".to_owned(),
                client_id,
            )
        }
    };
    let key = SessionKey {
        client: client.into(),
        share_scope: scope.into(),
    };
    (key, client_id)
}

/// A CONNECT refused: the code it gets, the audit word and why (also the MQTT 5 reason string).
struct Refusal {
    code: ReasonCode,
    reason: RejectReason,
    detail: String,
}

/// Binds the CONNECT to the certificate: the refusal to send and log, if any.
fn check_connect(identity: &Identity, connect: &Connect, rules: &TopicRules) -> Result<(), Refusal> {
    let requested = connect.client_id.as_str();
    let v5 = connect.version == Version::V5;
    if let Some(method) = &connect.authentication_method {
        return Err(Refusal {
            code: ReasonCode::BadAuthenticationMethod,
            reason: RejectReason::EnhancedAuthRefused,
            detail: format!(
                "enhanced authentication ({method:?}) is not offered: the client certificate is the authentication"
            ),
        });
    }
    match identity.role {
        Role::Device if !requested.is_empty() && requested != identity.id.as_str() => {
            return Err(Refusal {
                // 3.1.1 has no code for it; "not authorized" is what its clients have seen.
                code: if v5 {
                    ReasonCode::ClientIdentifierNotValid
                } else {
                    ReasonCode::NotAuthorized
                },
                reason: RejectReason::ClientIdMismatch,
                detail: format!(
                    "client id {requested:?} does not match certificate identity {:?}",
                    identity.id.as_str()
                ),
            });
        }
        // MQTT 5 lets a client without an id ask for a session that outlives the connection
        // (it learns its id from CONNACK); 3.1.1 does not (MQTT-3.1.3-7).
        Role::Service | Role::Gateway if requested.is_empty() && !connect.clean_start && !v5 => {
            return Err(Refusal {
                code: ReasonCode::ClientIdentifierNotValid,
                reason: RejectReason::ClientIdRequired,
                detail: "a persistent session (clean_session = false) needs a client id".into(),
            });
        }
        Role::Service | Role::Gateway if requested.chars().any(|c| "+$#/".contains(c) || c.is_control()) => {
            return Err(Refusal {
                code: ReasonCode::ClientIdentifierNotValid,
                reason: RejectReason::ProtocolError,
                detail: format!("client id {requested:?} contains '+', '$', '#', '/' or a control character"),
            });
        }
        _ => {}
    }
    if let Some(will) = &connect.will {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        if rules.may_publish(topic) != Verdict::Allowed {
            return Err(Refusal {
                code: ReasonCode::NotAuthorized,
                reason: RejectReason::WillDenied,
                detail: format!("will topic {topic:?} is outside what {identity} may publish to"),
            });
        }
    }
    Ok(())
}

/// 16 hex digits from the operating system's random source (via aws-lc).
fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // Only fails where the OS has no random source at all, and then TLS could not run either.
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
