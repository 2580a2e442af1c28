//! The virtio-fs device served as a vhost-user-fs backend.
//!
//! QEMU (`-device vhost-user-fs-device,chardev=...,tag=...`) owns the virtqueues' memory and
//! forwards guest kicks to us as eventfds; `vhost-user-backend`'s epoll thread calls
//! [`VhostUserBackendMut::handle_event`] for each kick and we hand that queue to the shared
//! [`FsDevice`]. QEMU builds the device's config space (tag, queue count) from its own
//! `-device` options; ours answers `get_config` for front ends that ask anyway.

use std::io;
use std::sync::{Arc, RwLock};

use super::daemon::{serve_one, ServeError};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::devices::virtio::fs::defs::MAX_QUEUE_SIZE;
use crate::devices::virtio::fs::FsDevice;

/// Largest config read we answer; the virtio-fs config is 40 bytes, the rest reads as zero.
const MAX_CONFIG_READ: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The vhost-user backend around an [`FsDevice`].
pub struct VhostUserFsBackend {
    device: FsDevice,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
}

impl VhostUserFsBackend {
    pub fn new(device: FsDevice) -> Self {
        VhostUserFsBackend {
            device,
            mem: None,
            event_idx: false,
        }
    }

    pub fn device(&self) -> &FsDevice {
        &self.device
    }

    /// Serves queue `index` and interrupts the guest if it needs it.
    fn process_queue(&self, index: usize, vrings: &[VringRwLock]) {
        let Some(atomic) = &self.mem else {
            return;
        };
        let Some(vring) = vrings.get(index) else {
            return;
        };
        let mem = atomic.memory();
        let res = {
            let mut state = vring.get_mut();
            if state.is_enabled() {
                self.device.process_queue(&*mem, state.get_queue_mut())
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
                husk_bounds::ratelimited!(warn, queue = index, error = %e, "virtio-fs queue processing failed")
            }
        }
    }
}

impl VhostUserBackendMut for VhostUserFsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        FsDevice::device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // MQ lets the front end check that we serve as many request queues as it configured.
        // No CONFIG: QEMU's vhost-user-fs-device builds the config space from its own
        // options and warns about a backend that offers it.
        VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        husk_bounds::ratelimited!(info, "vhost-user front end reset the virtio-fs device");
        self.device.reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // The queues themselves are switched by vhost-user-backend; we only keep it for logs.
        self.event_idx = enabled;
        husk_bounds::ratelimited!(debug, enabled, "virtio-fs EVENT_IDX");
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
        let index = usize::from(device_event);
        if index < self.device.num_queues() {
            self.process_queue(index, vrings);
        } else {
            husk_bounds::ratelimited!(warn, event = device_event, "unexpected vhost-user event id");
        }
        Ok(())
    }
}

/// Serves `device` as a vhost-user-fs device to exactly one front end connecting on
/// `listener`, and returns when that front end disconnects.
pub fn serve_fs(mut listener: Listener, device: FsDevice) -> Result<(), VhostUserFsError> {
    let backend = Arc::new(RwLock::new(VhostUserFsBackend::new(device)));
    serve_one("husk-fs", backend, &mut listener, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fs::FsConfig;

    #[test]
    fn features_queues_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let device = FsDevice::new(FsConfig::new(dir.path(), "rootfs")).unwrap();
        let backend = VhostUserFsBackend::new(device);
        let f = backend.features();
        assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(f & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX");
        assert_ne!(f & (1 << 28), 0, "VIRTIO_RING_F_INDIRECT_DESC");
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::MQ));
        assert_eq!(backend.num_queues(), 2);
        assert_eq!(backend.max_queue_size(), 1024);
        let config = backend.get_config(0, 40);
        assert_eq!(&config[..6], b"rootfs");
        assert!(config[6..36].iter().all(|&b| b == 0));
        assert_eq!(&config[36..40], &1u32.to_le_bytes());
        assert_eq!(backend.get_config(36, 4), 1u32.to_le_bytes().to_vec());
        assert_eq!(backend.get_config(u32::MAX, 2), vec![0, 0]);
        assert_eq!(
            backend.get_config(0, u32::MAX).len(),
            MAX_CONFIG_READ as usize
        );
    }
}
