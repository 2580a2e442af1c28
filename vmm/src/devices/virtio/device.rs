//! The interface between a virtio device model and a transport.
//!
//! The transport (husk-vmm's virtio-mmio) owns the virtqueues and the guest-facing registers;
//! the device owns what the queues mean. A new device (virtio-fs, blk, ...) implements
//! [`VirtioDevice`] and plugs into the transport unchanged.

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Which queues need an interrupt: bit `i` for queue `i`.
pub type QueueMask = u64;

/// A device error the guest caused or the device cannot recover from. The transport stops
/// the device (DEVICE_NEEDS_RESET) and the VMM carries on.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0}")]
    Other(String),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// `VIRTIO_ID_*` from `linux/virtio_ids.h`.
    fn device_type(&self) -> u32;

    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered, including `VIRTIO_F_VERSION_1` and ring features.
    fn features(&self) -> u64;

    /// Reads device config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device config space. Devices with read-only config ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver set DRIVER_OK with `acked` features; queues are set up and valid.
    fn activate(&mut self, _mem: &GuestMemoryMmap, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The driver notified queue `index`. Returns the queues to interrupt for.
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<QueueMask, DeviceError>;

    /// A host-side fd the event loop polls for the device, if it has one.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    /// The backend fd is readable. Returns the queues to interrupt for.
    fn process_backend(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: &mut [Queue],
    ) -> Result<QueueMask, DeviceError> {
        Ok(0)
    }

    /// The driver reset the device: drop all state tied to the old queues.
    fn reset(&mut self);
}

/// Copies `data.len()` bytes of a device's config space from `offset` into `data`; bytes past
/// its end (or an offset no usize holds) read as zero, whatever the guest asks for.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}
