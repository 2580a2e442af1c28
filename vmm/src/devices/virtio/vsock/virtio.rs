//! The vsock device as a [`VirtioDevice`], for husk-vmm's own virtio-mmio transport.
//!
//! It drives [`VsockDevice`] exactly as the vhost-user front end does: TX before RX on every
//! kick (guest packets produce the replies RX carries), and the backend's fd drained before
//! RX when the host side has news.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::defs::{EVQ_INDEX, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VIRTIO_ID_VSOCK};
use super::{VsockBackend, VsockDevice, VsockError};
use crate::devices::virtio::device::{DeviceError, QueueMask, VirtioDevice};

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

impl From<VsockError> for DeviceError {
    fn from(e: VsockError) -> Self {
        match e {
            VsockError::Queue(q) => DeviceError::Queue(q),
            other => DeviceError::Other(other.to_string()),
        }
    }
}

impl<T: VsockBackend> VsockDevice<T> {
    fn process_queues(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<QueueMask, DeviceError> {
        let mut mask = 0;
        if let Some(tx) = queues.get_mut(TXQ_INDEX) {
            if self.process_tx(mem, tx)? {
                mask |= 1 << TXQ_INDEX;
            }
        }
        if let Some(rx) = queues.get_mut(RXQ_INDEX) {
            if self.process_rx(mem, rx)? {
                mask |= 1 << RXQ_INDEX;
            }
        }
        Ok(mask)
    }
}

impl<T: VsockBackend> VirtioDevice for VsockDevice<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        Self::device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        VsockDevice::read_config(self, offset, data)
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<QueueMask, DeviceError> {
        match index {
            RXQ_INDEX | TXQ_INDEX => self.process_queues(mem, queues),
            // We never post transport events; event-queue buffers just wait.
            EVQ_INDEX => Ok(0),
            _ => Ok(0),
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(VsockDevice::backend_fd(self))
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<QueueMask, DeviceError> {
        self.notify_backend();
        self.process_queues(mem, queues)
    }

    fn reset(&mut self) {
        VsockDevice::reset(self)
    }
}
