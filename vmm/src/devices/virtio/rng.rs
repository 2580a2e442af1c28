//! virtio-rng (virtio 1.2, 5.4): fills the guest's buffers with bytes from the host's
//! `/dev/urandom`, so the guest kernel has entropy from its first second instead of waiting
//! for its own pool (which in a microVM with no disk or input devices fills slowly).

use std::fs::File;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::device::{DeviceError, QueueMask, VirtioDevice};

/// `VIRTIO_ID_RNG`.
pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [256];
/// Bytes we hand out per buffer at most, so one huge request cannot stall the event loop.
const MAX_BYTES_PER_BUFFER: u32 = 64 * 1024;

pub struct Rng {
    source: File,
}

impl Rng {
    /// Opens the entropy source now, before the sandbox takes `open` away.
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            source: File::open("/dev/urandom")?,
        })
    }

    /// Uses `source` instead of `/dev/urandom` (tests).
    pub fn with_source(source: File) -> Self {
        Rng { source }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<QueueMask, DeviceError> {
        let Some(queue) = queues.get_mut(index).filter(|_| index == 0) else {
            return Ok(0);
        };
        if !queue.ready() {
            return Ok(0);
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    // The spec says the driver only gives writable buffers; skip the others.
                    continue;
                }
                let len = desc.len().min(MAX_BYTES_PER_BUFFER - written);
                if len == 0 {
                    break;
                }
                match mem.read_volatile_from(desc.addr(), &mut self.source, len as usize) {
                    Ok(n) => written += n as u32,
                    Err(e) => {
                        husk_bounds::ratelimited!(warn, error = %e, "virtio-rng: bad buffer from guest; returning it short");
                        break;
                    }
                }
            }
            queue.add_used(mem, head, written)?;
            used = true;
        }
        Ok(if used && queue.needs_notification(mem)? {
            1
        } else {
            0
        })
    }

    fn reset(&mut self) {}
}
