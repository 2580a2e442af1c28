//! The vsock device served as a vhost-user-vsock backend.
//!
//! QEMU (`-device vhost-user-vsock-device,chardev=...`) owns the virtqueues' memory and
//! forwards guest kicks to us as eventfds; `vhost-user-backend`'s epoll thread calls
//! [`VhostUserBackendMut::handle_event`] for each kick and for our muxer's epoll fd, and we
//! hand the queues to the shared [`VsockDevice`].

use std::io;
use std::sync::{Arc, RwLock};

use super::daemon::{serve_one, ServeError};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::devices::virtio::vsock::defs::{
    EVQ_INDEX, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX,
};
use crate::devices::virtio::vsock::{VsockDevice, VsockMuxer};

/// Epoll event id of the muxer's fd. `vhost-user-backend` reserves ids `0..NUM_QUEUES` for
/// the queues and `NUM_QUEUES` for its exit event.
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Largest config read we answer; the vsock config is 8 bytes, the rest reads as zero.
const MAX_CONFIG_READ: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error("vsock backend lock poisoned")]
    Poisoned,
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The vhost-user backend around a [`VsockDevice`] with the hybrid-vsock muxer.
pub struct VhostUserVsockBackend {
    device: VsockDevice<VsockMuxer>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
}

impl VhostUserVsockBackend {
    pub fn new(guest_cid: u64, muxer: VsockMuxer) -> Self {
        VhostUserVsockBackend {
            device: VsockDevice::new(guest_cid, muxer),
            mem: None,
            event_idx: false,
        }
    }

    pub fn device(&self) -> &VsockDevice<VsockMuxer> {
        &self.device
    }

    /// Runs the device over the TX then RX queue, and interrupts the guest where needed.
    /// TX goes first because guest packets produce replies (RESPONSE, RST, credit) for RX.
    fn process_queues(&mut self, vrings: &[VringRwLock]) {
        let Some(atomic) = &self.mem else {
            return;
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.get(RXQ_INDEX), vrings.get(TXQ_INDEX)) else {
            return;
        };

        let tx_notify = {
            let mut state = tx.get_mut();
            if state.is_enabled() {
                self.device.process_tx(&*mem, state.get_queue_mut())
            } else {
                Ok(false)
            }
        };
        signal(tx, "TX", tx_notify);

        let rx_notify = {
            let mut state = rx.get_mut();
            if state.is_enabled() {
                self.device.process_rx(&*mem, state.get_queue_mut())
            } else {
                Ok(false)
            }
        };
        signal(rx, "RX", rx_notify);
    }
}

fn signal<E: std::fmt::Display>(vring: &VringRwLock, name: &str, res: Result<bool, E>) {
    match res {
        Ok(true) => {
            if let Err(e) = vring.signal_used_queue() {
                husk_bounds::ratelimited!(warn, queue = name, error = %e, "cannot interrupt the guest");
            }
        }
        Ok(false) => {}
        // A queue error means the driver gave us a broken ring; the device stays up and the
        // next kick retries.
        Err(e) => {
            husk_bounds::ratelimited!(warn, queue = name, error = %e, "vsock queue processing failed")
        }
    }
}

impl VhostUserBackendMut for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        VsockDevice::<VsockMuxer>::device_features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&mut self) {
        husk_bounds::ratelimited!(info, "vhost-user front end reset the vsock device");
        self.device.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // The queues themselves are switched by vhost-user-backend; we only keep it for logs.
        self.event_idx = enabled;
        husk_bounds::ratelimited!(debug, enabled, "vsock EVENT_IDX");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        self.device.read_config(u64::from(offset), &mut buf);
        buf
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        super::daemon::exit_event()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here stop vhost-user-backend's event loop for good, so nothing
        // the guest can cause is reported as one.
        match device_event {
            e if usize::from(e) == RXQ_INDEX || usize::from(e) == TXQ_INDEX => {}
            e if usize::from(e) == EVQ_INDEX => {
                // We never post transport events, so event-queue buffers just wait.
                return Ok(());
            }
            BACKEND_EVENT => self.device.notify_backend(),
            other => {
                husk_bounds::ratelimited!(warn, event = other, "unexpected vhost-user event id");
                return Ok(());
            }
        }
        self.process_queues(vrings);
        Ok(())
    }
}

/// Serves `muxer` as a vhost-user-vsock device to exactly one front end connecting on
/// `listener`, and returns when that front end disconnects.
pub fn serve_vsock(
    mut listener: Listener,
    guest_cid: u64,
    muxer: VsockMuxer,
) -> Result<(), VhostUserVsockError> {
    let backend = Arc::new(RwLock::new(VhostUserVsockBackend::new(guest_cid, muxer)));
    let backend_fd = backend
        .read()
        .map_err(|_| VhostUserVsockError::Poisoned)?
        .device()
        .backend_fd();
    serve_one(
        "husk-vsock",
        backend,
        &mut listener,
        Some((backend_fd, BACKEND_EVENT)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::MuxerConfig;

    #[test]
    fn features_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let muxer = VsockMuxer::bind(MuxerConfig::new(42, dir.path().join("v.sock"))).unwrap();
        let backend = VhostUserVsockBackend::new(42, muxer);
        let f = backend.features();
        assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(f & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX");
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(backend.get_config(0, 8), 42u64.to_le_bytes().to_vec());
        assert_eq!(backend.get_config(4, 8), vec![0u8; 8]);
        assert_eq!(backend.get_config(0, 4), vec![42, 0, 0, 0]);
        assert_eq!(backend.get_config(u32::MAX, 2), vec![0, 0]);
        assert_eq!(
            backend.get_config(0, u32::MAX).len(),
            MAX_CONFIG_READ as usize
        );
        assert_eq!(backend.num_queues(), 3);
    }
}
