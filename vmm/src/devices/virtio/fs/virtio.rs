//! The virtio-fs device as a [`VirtioDevice`], for husk-vmm's own virtio-mmio transport:
//! the same [`FsDevice`] the vhost-user front end serves, driven from husk-vmm's event loop.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::defs::MAX_QUEUE_SIZE;
use super::{FsDevice, FsError};
use crate::devices::virtio::device::{DeviceError, QueueMask, VirtioDevice};

/// `VIRTIO_ID_FS` (virtio 1.2, section 5).
pub const VIRTIO_ID_FS: u32 = 26;

/// The high-priority queue plus at most this many request queues on the mmio transport.
pub const MAX_MMIO_REQUEST_QUEUES: usize = 8;

const QUEUE_SIZES: [u16; 1 + MAX_MMIO_REQUEST_QUEUES] =
    [MAX_QUEUE_SIZE; 1 + MAX_MMIO_REQUEST_QUEUES];

impl From<FsError> for DeviceError {
    fn from(e: FsError) -> Self {
        DeviceError::Other(e.to_string())
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES[..self.num_queues().min(QUEUE_SIZES.len())]
    }

    fn features(&self) -> u64 {
        Self::device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        FsDevice::read_config(self, offset, data)
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<QueueMask, DeviceError> {
        let Some(queue) = queues.get_mut(index) else {
            return Ok(0);
        };
        let interrupt = FsDevice::process_queue(self, mem, queue)?;
        Ok(if interrupt { 1 << index } else { 0 })
    }

    fn reset(&mut self) {
        // Called on a vCPU thread (a status register write): see `reset_later`.
        FsDevice::reset_later(self)
    }
}
