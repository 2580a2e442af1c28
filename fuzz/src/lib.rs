//! Shared pieces of the husk-vmm fuzz targets: a byte-input decoder, guest memory with an
//! awkward layout, and a driver-side split virtqueue that lays out descriptor chains the way a
//! (possibly hostile) virtio driver would.
//!
//! The ring is our own rather than the vmm crate's `#[cfg(test)]` helper: it never panics on
//! what the fuzzer asks for (a full ring, unknown used ids, descriptors pointing anywhere), and
//! it can also write raw descriptor-table entries and avail indices.

// Test code: an unwrap on the harness's own set-up is an assertion; a panic is a finding.

use std::collections::HashMap;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads the fuzz input front to back; past its end every read yields zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        for x in &mut b {
            *x = self.u8();
        }
        u32::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length-prefixed (u16) byte string, capped at `max`.
    pub fn blob(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }
}

/// Guest memory: two adjacent regions (a buffer may straddle them), a hole, then a small third
/// region. Rings live low in region 0; [`DATA_START`]..[`DATA_END`] is for buffers.
pub const REGION0: (u64, usize) = (0, 0x10_0000);
pub const REGION1: (u64, usize) = (0x10_0000, 0x8_0000);
pub const REGION2: (u64, usize) = (0x20_0000, 0x1_0000);
pub const DATA_START: u64 = 0x4_0000;
pub const DATA_END: u64 = 0x18_0000;
pub const MEM_END: u64 = 0x21_0000;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
        (GuestAddress(REGION2.0), REGION2.1),
    ])
    .expect("guest memory")
}

/// A guest address chosen by the fuzzer: mostly inside the data area, sometimes at an edge.
pub fn fuzz_addr(inp: &mut Input<'_>) -> u64 {
    let sel = inp.u8();
    match sel {
        0..=239 => DATA_START + u64::from(inp.u32()) % (DATA_END - DATA_START),
        240 => REGION1.0 - u64::from(inp.u8()), // straddles regions 0 and 1
        241 => REGION1.0 + REGION1.1 as u64 - u64::from(inp.u8()), // runs into the hole
        242 => MEM_END - u64::from(inp.u8()),   // runs off the end of memory
        243 => u64::MAX - u64::from(inp.u8()),
        244 => REGION2.0 + u64::from(inp.u16()) % REGION2.1 as u64,
        245 => 0, // the rings
        _ => inp.u64(),
    }
}

/// Bump allocator over the data area (wraps around; old buffers get overwritten, which a
/// hostile guest may do anyway).
pub struct Alloc {
    next: u64,
}

impl Default for Alloc {
    fn default() -> Self {
        Alloc { next: DATA_START }
    }
}

impl Alloc {
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.max(1) + 0xf) & !0xf;
        if self.next + len > DATA_END {
            self.next = DATA_START;
        }
        let addr = self.next;
        self.next = (self.next + len).min(DATA_END);
        addr
    }

    /// Copies `bytes` into fresh guest memory; returns the address.
    pub fn put(&mut self, mem: &GuestMemoryMmap, bytes: &[u8]) -> u64 {
        let addr = self.alloc(bytes.len() as u64);
        let _ = mem.write_slice(bytes, GuestAddress(addr));
        addr
    }
}

/// One descriptor of a chain the fuzz target builds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Driver side of one split queue. Descriptor indices below `size / 2` are handed out to
/// chains from a free list; the upper half is for raw entries the fuzzer writes as it likes.
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

/// Bytes a ring of `size` entries takes from its base (descriptors, avail, used).
pub fn ring_bytes(size: u16) -> u64 {
    let s = u64::from(size);
    let used = (16 * s + 6 + 2 * s + 3) & !3;
    used + 6 + 8 * s
}

impl Ring {
    /// Lays the ring out at `base` and returns it with a matching, ready `Queue`.
    pub fn new(base: u64, size: u16, event_idx: bool) -> (Self, Queue) {
        let ring = Ring::layout(base, size);
        let mut queue = Queue::new(size).expect("queue");
        queue.set_size(size);
        queue.set_desc_table_address(Some(ring.desc as u32), Some((ring.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(ring.avail as u32), Some((ring.avail >> 32) as u32));
        queue.set_used_ring_address(Some(ring.used as u32), Some((ring.used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        (ring, queue)
    }

    /// The driver-side bookkeeping only (the queue is programmed elsewhere, e.g. over MMIO).
    pub fn layout(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ring {
            size,
            desc,
            avail,
            used,
            free: (0..size / 2).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(idx % self.size);
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let _ = mem.write_obj(next, GuestAddress(at + 14));
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Writes the chain into the descriptor table and publishes its head; `None` (and nothing
    /// written) when the ring has no room or the chain is empty.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
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
            self.write_desc(mem, idx[i], d.addr, d.len, flags, next);
        }
        let head = idx[0];
        self.publish(mem, head);
        self.chains.insert(head, idx);
        Some(head)
    }

    /// Puts `descs` in an indirect table in guest memory at `table` and publishes one head
    /// descriptor pointing at it.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemoryMmap,
        table: u64,
        descs: &[Desc],
    ) -> Option<u16> {
        let head = self.free.pop()?;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = table + 16 * i as u64;
            let _ = mem.write_obj(d.addr, GuestAddress(at));
            let _ = mem.write_obj(d.len, GuestAddress(at + 8));
            let _ = mem.write_obj(flags, GuestAddress(at + 12));
            let _ = mem.write_obj((i + 1) as u16, GuestAddress(at + 14));
        }
        self.write_desc(
            mem,
            head,
            table,
            (16 * descs.len()) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.publish(mem, head);
        self.chains.insert(head, vec![head]);
        Some(head)
    }

    /// Hostile input: writes one raw descriptor-table entry in the upper half of the table.
    pub fn raw_desc(&mut self, mem: &GuestMemoryMmap, inp: &mut Input<'_>) {
        let half = self.size / 2;
        let idx = half + inp.u16() % (self.size - half).max(1);
        let addr = fuzz_addr(inp);
        let len = match inp.u8() % 4 {
            0 => u32::from(inp.u8()),
            1 => u32::from(inp.u16()),
            2 => inp.u32(),
            _ => 44,
        };
        let flags = inp.u16() & 0x7; // NEXT | WRITE | INDIRECT, any combination
        let next = inp.u16();
        self.write_desc(mem, idx, addr, len, flags, next);
    }

    /// Hostile input: publishes any head index (raw or not, in range or not).
    pub fn raw_publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        self.publish(mem, head);
    }

    /// Hostile input: sets the avail index to anything.
    pub fn raw_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        let _ = mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// Hostile input: sets the avail ring's flags or the used_event word.
    pub fn raw_avail_flags(&mut self, mem: &GuestMemoryMmap, flags: u16, used_event: u16) {
        let _ = mem.write_obj(flags, GuestAddress(self.avail));
        let _ = mem.write_obj(
            used_event,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
        );
    }

    /// Next used element: (id, len). Unknown ids are returned as they are.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).ok()?;
        if used_idx == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        if let Ok(head) = u16::try_from(id) {
            if let Some(idx) = self.chains.remove(&head) {
                self.free.extend(idx);
            }
        }
        Some((id, len))
    }

    /// Drains the used ring (bounded), calling `f` for each element.
    pub fn drain_used(&mut self, mem: &GuestMemoryMmap, mut f: impl FnMut(u32, u32)) {
        for _ in 0..(2 * u32::from(self.size)) {
            match self.pop_used(mem) {
                Some((id, len)) => f(id, len),
                None => break,
            }
        }
    }

    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }

    pub fn free_slots(&self) -> usize {
        self.free.len()
    }
}

/// Splits `total` bytes into up to `parts` pieces at fuzzer-chosen points.
pub fn split_lens(inp: &mut Input<'_>, total: usize, parts: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = total;
    for i in 0..parts {
        if left == 0 {
            break;
        }
        let n = if i + 1 == parts {
            left
        } else {
            (usize::from(inp.u16()) % (left + 1)).max(1)
        };
        out.push(n);
        left -= n;
    }
    if left > 0 {
        out.push(left);
    }
    out
}

/// Guest-memory footprints of the chains the driver has outstanding, so that a target stops
/// checking the contents of chains whose buffers overlap (the bump allocator wraps, and
/// fuzzer-chosen addresses land anywhere): overlapping buffers are the driver's own doing.
#[derive(Default)]
pub struct Footprints {
    map: HashMap<(usize, u16), Vec<(u64, u64)>>,
}

impl Footprints {
    /// Records chain `key` (queue, head) with its buffers as (addr, len); returns the
    /// outstanding chains it overlaps. The caller stops checking those, and the new one if the
    /// list is not empty.
    pub fn add(&mut self, key: (usize, u16), ranges: Vec<(u64, u64)>) -> Vec<(usize, u16)> {
        self.map.remove(&key);
        let clash = self.clash(&ranges);
        self.map.insert(key, ranges);
        clash
    }

    /// The outstanding chains that memory the driver just wrote (`ranges`) overlaps, whether
    /// or not that memory ends up in a published chain.
    pub fn clash(&self, ranges: &[(u64, u64)]) -> Vec<(usize, u16)> {
        let hit = |a: &(u64, u64), b: &(u64, u64)| {
            a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
        };
        self.map
            .iter()
            .filter(|(_, rs)| rs.iter().any(|r| ranges.iter().any(|n| hit(r, n))))
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn remove(&mut self, key: (usize, u16)) {
        self.map.remove(&key);
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// The footprint of a chain published as `descs` (plus its indirect table, if any), and of
/// `laid`: the descriptors as the driver first wrote their bytes, before breaking one of them
/// (pointing it elsewhere leaves the bytes where they were written, over whatever was there).
pub fn footprint(descs: &[Desc], laid: &[Desc], table: Option<u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = descs
        .iter()
        .chain(laid)
        .map(|d| (d.addr, u64::from(d.len)))
        .collect();
    if let Some(t) = table {
        v.push((t, 16 * descs.len() as u64));
    }
    v
}

/// Whether a chain lets the device write into ring memory (everything below [`DATA_START`]:
/// descriptor tables, avail and used rings). A driver that hands its own rings to the device
/// gets them overwritten, so later chains are no longer what it laid out; a target stops
/// checking contents from then on (the device must still not crash or overrun).
pub fn writes_rings(descs: &[Desc]) -> bool {
    descs
        .iter()
        .any(|d| d.write && d.len > 0 && d.addr < DATA_START)
}

/// Ignores SIGPIPE as every Rust binary does before `main` (husk-vmm included): libFuzzer's
/// `main` is C's, so without this a write to a closed socket would kill the fuzzer.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}
