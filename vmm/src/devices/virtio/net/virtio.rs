//! The net device as a [`VirtioDevice`], for husk-vmm's own virtio-mmio transport.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::defs::{NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VIRTIO_ID_NET};
use super::{NetBackend, NetDevice, NetError};
use crate::devices::virtio::device::{DeviceError, QueueMask, VirtioDevice};

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

impl From<NetError> for DeviceError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Queue(q) => DeviceError::Queue(q),
            other => DeviceError::Other(other.to_string()),
        }
    }
}

impl<B: NetBackend> VirtioDevice for NetDevice<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        NetDevice::read_config(self, offset, data)
    }

    fn activate(&mut self, _mem: &GuestMemoryMmap, acked: u64) -> Result<(), DeviceError> {
        self.set_acked_features(acked);
        Ok(())
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
        let notify = match index {
            RXQ_INDEX => self.rx_kick(mem, queue)?,
            TXQ_INDEX => self.process_tx(mem, queue)?,
            _ => false,
        };
        Ok(if notify { 1 << index } else { 0 })
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(NetDevice::backend_fd(self))
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<QueueMask, DeviceError> {
        // Not active (the transport passes no queues): stop reading the tap until the
        // driver is set up; level-triggered polling would otherwise spin.
        let Some(rx) = queues.get_mut(RXQ_INDEX) else {
            self.reset();
            return Ok(0);
        };
        Ok(if self.process_rx(mem, rx)? {
            1 << RXQ_INDEX
        } else {
            0
        })
    }

    fn reset(&mut self) {
        NetDevice::reset(self)
    }
}
