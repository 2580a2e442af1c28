//! Driver-side split virtqueues for device tests: a test lays out descriptor chains in guest
//! memory the way a virtio driver would, hands the matching `virtio_queue::Queue` to a device,
//! and reads back what the device put in the used ring.
//!
//! Laid out by hand rather than with virtio-queue 0.17's `MockSplitQueue`, which sizes the
//! avail ring in elements rather than bytes, so that its used ring overlaps avail entries 128
//! and up.

use std::collections::HashMap;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One descriptor as the test wants it: where, how long, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Driver-side view of one split queue.
pub struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries whose descriptor table starts at `base`; the whole ring takes
    /// `16 * size` bytes of descriptors, then the avail ring, then the used ring.
    pub fn new(base: u64, size: u16) -> (Self, Queue) {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        let ring = Ring {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    /// Writes the chain into the descriptor table and publishes its head. Returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let idx: Vec<u16> = descs
            .iter()
            .map(|_| self.free.pop().expect("test ring full"))
            .collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                idx[i + 1]
            } else {
                0
            };
            let at = self.desc + 16 * u64::from(idx[i]);
            mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let head = idx[0];
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.chains.insert(head, idx);
        head
    }

    /// Next used element: (head, len).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if used_idx == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = id as u16;
        if let Some(idx) = self.chains.remove(&head) {
            self.free.extend(idx);
        }
        Some((head, len))
    }

    /// Chains published and not yet returned by the device.
    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }
}
