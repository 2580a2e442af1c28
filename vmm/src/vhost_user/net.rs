//! The net device served as a vhost-user-net backend.
//!
//! QEMU (`-netdev vhost-user,id=n0,chardev=c0 -device virtio-net-device,netdev=n0,mac=...`)
//! keeps the device's config space (the MAC comes from its `-device` line) and forwards the
//! guest's kicks to us as eventfds; `vhost-user-backend`'s epoll thread calls
//! [`VhostUserBackendMut::handle_event`] for each kick and for the device's tap poll fd, and
//! we hand the queues to the shared [`NetDevice`].

use std::io;
use std::sync::{Arc, RwLock};

use super::daemon::{serve_one, ServeError};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::devices::virtio::net::defs::{
    NUM_QUEUES, RXQ_INDEX, TXQ_INDEX, VHOST_USER_MAX_QUEUE_SIZE,
};
use crate::devices::virtio::net::{NetBackend, NetDevice, NetError};

/// Epoll event id of the device's tap poll fd. `vhost-user-backend` reserves ids
/// `0..NUM_QUEUES` for the queues and `NUM_QUEUES` for its exit event.
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Largest config read we answer; the rest reads as zero.
const MAX_CONFIG_READ: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error("net backend lock poisoned")]
    Poisoned,
    #[error(transparent)]
    Device(#[from] NetError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The vhost-user backend around a [`NetDevice`].
pub struct VhostUserNetBackend<B: NetBackend> {
    device: NetDevice<B>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl<B: NetBackend> VhostUserNetBackend<B> {
    pub fn new(device: NetDevice<B>) -> Self {
        VhostUserNetBackend { device, mem: None }
    }

    pub fn device(&self) -> &NetDevice<B> {
        &self.device
    }

    /// Runs `what` on queue `index` if it is enabled, and interrupts the guest if needed.
    fn run_queue(
        &mut self,
        vrings: &[VringRwLock],
        index: usize,
        what: fn(
            &mut NetDevice<B>,
            &GuestMemoryMmap,
            &mut virtio_queue::Queue,
        ) -> Result<bool, NetError>,
    ) {
        let Some(atomic) = &self.mem else {
            return;
        };
        let mem = atomic.memory();
        let Some(vring) = vrings.get(index) else {
            return;
        };
        let res = {
            let mut state = vring.get_mut();
            if state.is_enabled() {
                what(&mut self.device, &mem, state.get_queue_mut())
            } else {
                Ok(false)
            }
        };
        match res {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    husk_bounds::ratelimited!(warn, queue = index, error = %e, "cannot interrupt the guest");
                }
            }
            Ok(false) => {}
            // A queue error means the driver gave us a broken ring; the device stays up and
            // the next kick retries.
            Err(e) => {
                husk_bounds::ratelimited!(warn, queue = index, error = %e, "net queue processing failed")
            }
        }
    }
}

impl<B: NetBackend + Sync> VhostUserBackendMut for VhostUserNetBackend<B> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(VHOST_USER_MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        // QEMU 7.2 refuses to start vhost-user-net without PROTOCOL_FEATURES ("unable to
        // start vhost net: 22"), but sends SET_VRING_ENABLE when the guest negotiates
        // features, before SET_FEATURES, which the vhost crate (0.16) rejects with "inactive
        // feature" and ends the session. See vmm/README.md: QEMU pods use a tap netdev.
        self.device.device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        husk_bounds::ratelimited!(debug, features, "vhost-user-net acked features");
        self.device.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // QEMU's virtio-net keeps the config space itself; nothing else is needed.
        VhostUserProtocolFeatures::empty()
    }

    fn reset_device(&mut self) {
        husk_bounds::ratelimited!(info, "vhost-user front end reset the net device");
        self.device.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // The queues themselves are switched by vhost-user-backend.
        husk_bounds::ratelimited!(debug, enabled, "net EVENT_IDX");
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
            e if usize::from(e) == RXQ_INDEX => {
                self.run_queue(vrings, RXQ_INDEX, NetDevice::rx_kick)
            }
            e if usize::from(e) == TXQ_INDEX => {
                self.run_queue(vrings, TXQ_INDEX, NetDevice::process_tx)
            }
            BACKEND_EVENT => {
                if self.mem.is_none()
                    || vrings
                        .get(RXQ_INDEX)
                        .is_none_or(|v| !v.get_ref().is_enabled())
                {
                    // Nowhere to put frames yet: stop polling the tap until RX is kicked.
                    self.device.reset_rx_poll();
                } else {
                    self.run_queue(vrings, RXQ_INDEX, NetDevice::process_rx)
                }
            }
            other => {
                husk_bounds::ratelimited!(warn, event = other, "unexpected vhost-user event id")
            }
        }
        Ok(())
    }
}

/// Serves `device` as a vhost-user-net device to exactly one front end connecting on
/// `listener`, and returns when that front end disconnects.
pub fn serve_net<B: NetBackend + Sync + 'static>(
    mut listener: Listener,
    device: NetDevice<B>,
) -> Result<(), VhostUserNetError> {
    let backend_fd = device.backend_fd();
    let backend = Arc::new(RwLock::new(VhostUserNetBackend::new(device)));
    serve_one(
        "husk-net",
        backend,
        &mut listener,
        Some((backend_fd, BACKEND_EVENT)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::tests::FakeTap;

    #[test]
    fn features_and_config() {
        let (tap, _peer) = FakeTap::pair();
        let mac = [0x02, 0, 0, 0, 0, 7];
        let backend = VhostUserNetBackend::new(NetDevice::new(tap, Some(mac)).unwrap());
        let f = backend.features();
        assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(f & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX");
        assert_ne!(f & (1 << 5), 0, "VIRTIO_NET_F_MAC");
        assert_ne!(f & (1 << 15), 0, "VIRTIO_NET_F_MRG_RXBUF");
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(backend.get_config(0, 8), vec![2, 0, 0, 0, 0, 7, 1, 0]);
        assert_eq!(backend.get_config(6, 4), vec![1, 0, 0, 0]);
        assert_eq!(backend.get_config(u32::MAX, 2), vec![0, 0]);
        assert_eq!(
            backend.get_config(0, u32::MAX).len(),
            MAX_CONFIG_READ as usize
        );
        assert_eq!(backend.num_queues(), 2);
        assert_eq!(backend.max_queue_size(), 1024);
    }

    #[test]
    fn legacy_driver_gets_the_short_header() {
        let (tap, _peer) = FakeTap::pair();
        let mut backend = VhostUserNetBackend::new(NetDevice::new(tap, None).unwrap());
        assert_eq!(
            backend.features() & (1 << 5),
            0,
            "no MAC offered without --mac"
        );
        // QEMU's legacy virtio-mmio never offers VERSION_1; without MRG_RXBUF the header is
        // the 10-byte struct virtio_net_hdr.
        backend.acked_features(1 << 29);
        assert_eq!(backend.device().hdr_len(), 10);
        backend.acked_features((1 << 29) | (1 << 15));
        assert_eq!(backend.device().hdr_len(), 12);
    }
}
