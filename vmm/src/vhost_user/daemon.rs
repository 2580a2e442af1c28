//! What every husk vhost-user backend does around its device: serve exactly one front end
//! on one listener, with the device's host-side fd (if it has one) in the daemon's epoll, and
//! treat the front end going away as the normal end of a VM.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, RwLock};

use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The daemon's own error is not `Sync` (it can carry a thread panic payload), so only its
    /// message is kept.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot register the device's host fd with the vhost-user event loop: {0}")]
    RegisterBackend(#[source] io::Error),
    #[error("the vhost-user daemon has no event loop thread")]
    NoEventLoop,
}

fn daemon_err(e: vhost_user_backend::Error) -> ServeError {
    ServeError::Daemon(e.to_string())
}

/// Serves `backend` to exactly one front end connecting on `listener`; returns when it
/// disconnects. `host_fd` is the device's host-side fd and the event id it reports under.
pub(crate) fn serve_one<B>(
    name: &str,
    backend: Arc<RwLock<B>>,
    listener: &mut Listener,
    host_fd: Option<(RawFd, u16)>,
) -> Result<(), ServeError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + 'static,
{
    let mut daemon = VhostUserDaemon::new(
        name.to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(daemon_err)?;
    if let Some((fd, event)) = host_fd {
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers.first().ok_or(ServeError::NoEventLoop)?;
        handler
            .register_listener(fd, EventSet::IN, u64::from(event))
            .map_err(ServeError::RegisterBackend)?;
    }

    info!("waiting for the vhost-user front end");
    daemon.start(listener).map_err(daemon_err)?;
    info!("vhost-user front end connected");
    let res = daemon.wait();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match res {
        Ok(()) => Ok(()),
        // The front end going away is how a VM ends, not an error.
        Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(daemon_err(e)),
    }
}

/// The event pair `VhostUserBackendMut::exit_event` hands the daemon, so that it can stop
/// the backend's event loop thread.
pub(crate) fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
        Ok(pair) => Some(pair),
        Err(e) => {
            warn!(error = %e, "cannot create the vhost-user exit event");
            None
        }
    }
}
