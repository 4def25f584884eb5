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

use crate::live::Registration;
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
/// outbound pump through [`LazyLink::receiver`].
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
    /// the client id, so an old session never takes the router session from a newer one.
    pub async fn open(
        &mut self,
        router: &RouterHandle,
        registration: &Registration,
    ) -> Result<Notification, OpenError> {
        if !registration.is_current() {
            return Err(OpenError::TakenOver);
        }
        let (mut tx, rx, connack) = connect_off_thread(router, &self.client_id, self.clean_session).await?;
        if !registration.is_current() {
            disconnect(&mut tx).await;
            return Err(OpenError::TakenOver);
        }
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
/// channel). If the session stops waiting, the link that arrives anyway is disconnected, so no
/// orphan stays in the router.
async fn connect_off_thread(router: &RouterHandle, client_id: &str, clean_session: bool) -> Result<Link, OpenError> {
    let (done, built) = oneshot::channel();
    let (router, client_id, runtime) = (router.clone(), client_id.to_owned(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        if let Err(Ok((mut tx, ..))) = done.send(router.connect(&client_id, clean_session)) {
            runtime.block_on(disconnect(&mut tx));
        }
    });
    match built.await {
        Ok(link) => Ok(link?),
        Err(_) => Err(OpenError::Failed("the router thread did not answer".into())),
    }
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
