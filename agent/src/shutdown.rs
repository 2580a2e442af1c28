//! The path from a `Shutdown` request to the agent actually stopping.
//!
//! The RPC handler only *asks*; the serve loop acts, after a short grace
//! period, so that the handler's reply is on the wire before the guest
//! reboots (or the process exits) under it.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

/// Time between a shutdown request and acting on it: long enough for the
/// ttrpc server to write the reply to the client, short enough to be lost in
/// a VM's teardown.
pub const GRACE: Duration = Duration::from_millis(100);

/// Why the agent is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The `Shutdown` RPC.
    Rpc,
    /// SIGINT/SIGTERM (only when running as an ordinary process).
    Signal,
}

/// Cloneable handle for whatever may ask the agent to stop.
#[derive(Clone)]
pub struct Requester(Arc<watch::Sender<Option<Reason>>>);

/// The serve loop's side: resolves once a stop was requested.
pub struct Waiter {
    rx: watch::Receiver<Option<Reason>>,
    // Keeps the channel open even when every requester is dropped, so
    // waiting means "until asked" and never "until nobody can ask".
    _tx: Arc<watch::Sender<Option<Reason>>>,
}

pub fn channel() -> (Requester, Waiter) {
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    (Requester(tx.clone()), Waiter { rx, _tx: tx })
}

impl Requester {
    /// Asks the agent to stop; the first reason sticks.
    pub fn request(&self, reason: Reason) {
        self.0.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

impl Waiter {
    /// Waits for a request, then for [`GRACE`].
    pub async fn wait(mut self) -> Reason {
        let reason = match self.rx.wait_for(Option::is_some).await {
            Ok(r) => *r,
            // Cannot happen while `_tx` lives; if it did, never stopping is
            // the safe reading for PID 1.
            Err(_) => None,
        };
        let Some(reason) = reason else {
            return std::future::pending().await;
        };
        tokio::time::sleep(GRACE).await;
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins_and_grace_is_observed() {
        let (req, waiter) = channel();
        let start = tokio::time::Instant::now();
        req.request(Reason::Signal);
        req.clone().request(Reason::Rpc);
        assert_eq!(waiter.wait().await, Reason::Signal);
        assert!(start.elapsed() >= GRACE);
    }
}
