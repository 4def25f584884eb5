//! A session's router link, opened when the session first needs the router.
//!
//! rumqttd allocates about 30 KiB of buffers per link and answers each link's CONNECT on its
//! own thread. A device that has connected but not yet published or subscribed needs neither,
//! so a clean session gets its CONNACK from the front and its link on the first packet bound
//! for the router. Sessions that may resume state stored in the router open it at CONNECT.

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::Notification;
use tokio::sync::oneshot;

use crate::live::{LinkClaim, Registration};
use crate::router::{Link, LinkRefused, RouterHandle};

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A newer connection took over the client id first.
    #[error("a newer connection took over the client id")]
    TakenOver,
    /// The router did not accept the session.
    #[error("the router refused the session: {0}")]
    Refused(#[from] LinkRefused),
    /// The thread that waits for the router's answer failed.
    #[error("opening the router link failed: {0}")]
    Failed(String),
}

/// The sending half of a session's link, once open; the receiving half goes to the session's
/// outbound pump through the receiver [`LazyLink::new`] returns.
pub struct LazyLink {
    client_id: String,
    clean_session: bool,
    tx: Option<LinkTx>,
    handoff: Option<oneshot::Sender<LinkRx>>,
}

impl LazyLink {
    /// A link not yet open for the router client id `client_id`, and where its receiving half
    /// will arrive.
    pub fn new(client_id: String, clean_session: bool) -> (Self, oneshot::Receiver<LinkRx>) {
        let (handoff, receiver) = oneshot::channel();
        let link = Self {
            client_id,
            clean_session,
            tx: None,
            handoff: Some(handoff),
        };
        (link, receiver)
    }

    /// The sending half, if the link is open.
    pub fn tx(&mut self) -> Option<&mut LinkTx> {
        self.tx.as_mut()
    }

    /// Opens the link; the router's CONNACK. Refused when a newer connection has taken over
    /// the client id (see [`LinkClaim`]).
    pub async fn open(
        &mut self,
        router: &RouterHandle,
        registration: &Registration,
    ) -> Result<Notification, OpenError> {
        let claim = registration.link_claim();
        let (tx, rx, connack) = connect_off_thread(router, &self.client_id, self.clean_session, claim).await?;
        if let Some(handoff) = self.handoff.take() {
            let _ = handoff.send(rx);
        }
        self.tx = Some(tx);
        Ok(connack)
    }

    /// Tells the router the session is over, if it ever heard of it.
    pub async fn close(&mut self) {
        if let Some(tx) = self.tx.as_mut() {
            disconnect(tx).await;
        }
    }
}

/// Connects to the router from a blocking thread (rumqttd's `build` waits on a synchronous
/// channel), holding the client id's gate. If the session stops waiting, the link that arrives
/// anyway is disconnected, so no orphan stays in the router.
async fn connect_off_thread(
    router: &RouterHandle,
    client_id: &str,
    clean_session: bool,
    claim: LinkClaim,
) -> Result<Link, OpenError> {
    // Sessions already taken over need no thread to learn it.
    if !claim.is_current() {
        return Err(OpenError::TakenOver);
    }
    let (done, built) = oneshot::channel();
    let (router, client_id, runtime) = (router.clone(), client_id.to_owned(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        let _gate = claim.hold();
        let link = connect_if_current(&router, &client_id, clean_session, &claim, &runtime);
        if let Err(Ok((mut tx, ..))) = done.send(link) {
            runtime.block_on(disconnect(&mut tx));
        }
    });
    match built.await {
        Ok(link) => link,
        Err(_) => Err(OpenError::Failed("the router thread did not answer".into())),
    }
}

/// Connects if the session is still the newest with its client id, before and after: a newer
/// session that registered meanwhile connects after us (it waits for the gate) and wins.
fn connect_if_current(
    router: &RouterHandle,
    client_id: &str,
    clean_session: bool,
    claim: &LinkClaim,
    runtime: &tokio::runtime::Handle,
) -> Result<Link, OpenError> {
    if !claim.is_current() {
        return Err(OpenError::TakenOver);
    }
    let (mut tx, rx, connack) = router.connect(client_id, clean_session)?;
    if !claim.is_current() {
        runtime.block_on(disconnect(&mut tx));
        return Err(OpenError::TakenOver);
    }
    Ok((tx, rx, connack))
}

async fn disconnect(tx: &mut LinkTx) {
    let _ = tx
        .send(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ))
        .await;
}
