//! The transport-independent part of virtio-net: frames between the guest's RX/TX queues and
//! a [`NetBackend`].
//!
//! A front end (husk-vmm's virtio-mmio transport, or vhost-user) owns the queues and the
//! event loop, and calls:
//! - [`NetDevice::process_tx`] when the guest kicks TX;
//! - [`NetDevice::rx_kick`] when the guest kicks RX (it added buffers);
//! - [`NetDevice::process_rx`] when [`NetDevice::backend_fd`] is readable.
//!
//! Each returns whether the guest needs an interrupt for that queue. Frames are copied
//! through one host buffer per direction; the virtio-net header travels with the frame, the
//! tap understands the same layout.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::defs::*;
use super::{NetBackend, NetError};
use crate::devices::virtio::device::read_config_space;

/// Rounds of "drain the TX ring, re-enable notifications, look again" per call. Bounded so
/// that a driver whose avail index keeps claiming new buffers cannot pin the event loop.
const MAX_TX_ROUNDS: usize = 8;
/// Frames moved from the backend per [`NetDevice::process_rx`] call. The poll fd is
/// level-triggered, so what is left wakes the front end again after other work.
const MAX_RX_FRAMES: usize = 256;

/// Counters of what the device moved and what it refused. Drops are never errors: a guest
/// that sends garbage only loses its own frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Malformed TX chains: device-writable descriptors, bad addresses, short headers,
    /// frames over [`MAX_FRAME_LEN`] or under an Ethernet header.
    pub tx_dropped: u64,
    /// Frames the backend refused (full, down, or a header the kernel rejected).
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the backend that did not fit the guest's buffers, or were runts.
    pub rx_dropped: u64,
    /// RX chains returned unused because they were malformed.
    pub rx_bad_buffers: u64,
    /// Backend read errors.
    pub rx_errors: u64,
}

/// An RX chain popped from the avail ring and kept until a frame fills it: with mergeable
/// buffers a frame may need more chains than the ring holds right now.
struct HeldChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    cap: usize,
}

enum Fill {
    /// Delivered.
    Done,
    /// Dropped; the held buffers stay for the next frame.
    Dropped,
    /// The ring ran dry before the frame fit.
    NeedBuffers,
}

/// The virtio-net device model over a backend `B`.
pub struct NetDevice<B: NetBackend> {
    backend: B,
    mac: Option<[u8; 6]>,
    acked: u64,
    /// Bytes of virtio-net header per frame: 12 with VERSION_1 or MRG_RXBUF, else 10.
    hdr_len: usize,
    /// Header length and offloads negotiated but not yet told to the backend. Applied from
    /// the queue-processing thread: in `husk-vmm run` activation happens on a vCPU thread,
    /// whose seccomp filter has no tap ioctls.
    pending_setup: Option<(usize, u32)>,
    backend_hdr_len: usize,
    /// Holds the backend fd while the device wants RX frames; front ends poll this fd.
    poll: Epoll,
    armed: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for guest buffers; 0 when none.
    rx_len: usize,
    rx_held: Vec<HeldChain>,
    rx_held_cap: usize,
    /// The RX queue's next_avail after the last pop, to notice a ring that was restarted
    /// under the held chains.
    rx_held_next: u16,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl<B: NetBackend> NetDevice<B> {
    /// A device over `backend` (header length 12 already set on it). `mac` is offered to the
    /// guest with VIRTIO_NET_F_MAC; without it the guest picks a random one.
    pub fn new(backend: B, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let poll = Epoll::new().map_err(NetError::Epoll)?;
        let mut dev = NetDevice {
            backend,
            mac,
            acked: 0,
            hdr_len: HDR_LEN_V1,
            pending_setup: None,
            backend_hdr_len: HDR_LEN_V1,
            poll,
            armed: false,
            rx_buf: vec![0; MAX_BUF_LEN],
            rx_len: 0,
            rx_held: Vec::new(),
            rx_held_cap: 0,
            rx_held_next: 0,
            tx_buf: vec![0; MAX_BUF_LEN],
            stats: NetStats::default(),
        };
        dev.arm();
        Ok(dev)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// Feature bits offered. Offloads are passed through to the tap, which does the
    /// checksum and segmentation work (and validates the guest's headers) in the kernel.
    pub fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_NET_F_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_HOST_TSO4)
            | (1u64 << VIRTIO_NET_F_HOST_TSO6)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO6);
        if self.mac.is_some() {
            f |= 1u64 << VIRTIO_NET_F_MAC;
        }
        f
    }

    /// The features the driver accepted (bits we never offered are ignored).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Header length in use.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// The driver acked `features`: fixes the header length and the offloads the backend may
    /// hand us, and starts taking frames.
    pub fn set_acked_features(&mut self, features: u64) {
        let acked = features & self.device_features();
        self.acked = acked;
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        self.hdr_len = if has(VIRTIO_F_VERSION_1) || has(VIRTIO_NET_F_MRG_RXBUF) {
            HDR_LEN_V1
        } else {
            HDR_LEN_LEGACY
        };
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= libc::TUN_F_CSUM;
            // Segmentation offloads need checksum offload (the kernel refuses them alone).
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= libc::TUN_F_TSO6;
            }
        }
        if self.rx_len != 0 && self.hdr_len != self.backend_hdr_len {
            // The frame waiting for buffers was read with the old header length.
            self.rx_len = 0;
        }
        self.pending_setup = Some((self.hdr_len, offload));
        self.arm();
    }

    /// `struct virtio_net_config`: mac, then status (link always up).
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.unwrap_or([0; 6]));
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    /// Reads `data.len()` bytes of config space at `offset`; bytes past its end read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    /// The fd a front end polls (level-triggered) for frames to receive. It is readable only
    /// while the backend has frames and the device wants them.
    pub fn backend_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// Whether the backend is in the poll set (tests).
    pub fn is_rx_armed(&self) -> bool {
        self.armed
    }

    /// The driver reset the device: forget negotiated state and anything half-received.
    pub fn reset(&mut self) {
        self.acked = 0;
        self.hdr_len = HDR_LEN_V1;
        self.rx_len = 0;
        self.rx_held.clear();
        self.rx_held_cap = 0;
        self.pending_setup = Some((HDR_LEN_V1, 0));
        // Stop reading until the driver is back: frames wait in the tap's own queue (which
        // drops when full) instead of waking us.
        self.disarm();
    }

    /// Stops polling the backend until the guest kicks RX (a front end with no RX queue yet).
    pub fn reset_rx_poll(&mut self) {
        self.disarm();
    }

    fn arm(&mut self) {
        if self.armed {
            return;
        }
        let fd = self.backend.as_raw_fd();
        match self.poll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        ) {
            Ok(()) => self.armed = true,
            Err(e) => {
                husk_bounds::ratelimited!(warn, error = %e, "virtio-net: cannot poll the tap")
            }
        }
    }

    fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        let fd = self.backend.as_raw_fd();
        if let Err(e) = self
            .poll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            husk_bounds::ratelimited!(warn, error = %e, "virtio-net: cannot stop polling the tap");
        }
        self.armed = false;
    }

    fn apply_pending_setup(&mut self) {
        let Some((hdr_len, offload)) = self.pending_setup.take() else {
            return;
        };
        if hdr_len != self.backend_hdr_len {
            match self.backend.set_vnet_hdr_len(hdr_len) {
                Ok(()) => self.backend_hdr_len = hdr_len,
                Err(e) => {
                    husk_bounds::ratelimited!(warn, error = %e, hdr_len, "virtio-net: cannot set the tap's header length")
                }
            }
        }
        if let Err(e) = self.backend.set_offload(offload) {
            husk_bounds::ratelimited!(warn, error = %e, offload, "virtio-net: cannot set the tap's offloads");
        }
    }

    /// Sends every frame the guest put in the TX queue to the backend. Returns whether the
    /// guest needs an interrupt for TX.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        self.apply_pending_setup();
        if !queue.ready() {
            return Ok(false);
        }
        let mut used = false;
        for _ in 0..MAX_TX_ROUNDS {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match self.read_tx_chain(mem, chain) {
                    Ok(len) => self.send(len),
                    Err(why) => {
                        self.stats.tx_dropped += 1;
                        if self.stats.tx_dropped.is_power_of_two() {
                            husk_bounds::ratelimited!(
                                warn,
                                why,
                                dropped = self.stats.tx_dropped,
                                "virtio-net: dropping malformed TX frame from the guest"
                            );
                        } else {
                            husk_bounds::ratelimited!(
                                debug,
                                why,
                                "virtio-net: dropping malformed TX frame"
                            );
                        }
                    }
                }
                // TX buffers are consumed whatever they held; the device writes nothing.
                queue.add_used(mem, head, 0)?;
                used = true;
            }
            // With EVENT_IDX the driver may add buffers between our last pop and re-enabling
            // notifications; enable_notification tells us so.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Gathers one TX chain into `tx_buf`; returns the header+frame length, or why the chain
    /// is refused.
    fn read_tx_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<usize, &'static str> {
        let limit = self.hdr_len + MAX_FRAME_LEN;
        let mut len = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                return Err("device-writable descriptor in a TX chain");
            }
            let dlen = desc.len() as usize;
            let end = len.checked_add(dlen).filter(|&e| e <= limit);
            let Some(end) = end else {
                return Err("frame longer than 65550 bytes");
            };
            let dst = self.tx_buf.get_mut(len..end).ok_or("frame too long")?;
            mem.read_slice(dst, desc.addr())
                .map_err(|_| "descriptor outside guest memory")?;
            len = end;
        }
        if len < self.hdr_len {
            return Err("shorter than the virtio-net header");
        }
        if len < self.hdr_len + ETH_HLEN {
            return Err("shorter than an Ethernet header");
        }
        Ok(len)
    }

    fn send(&mut self, len: usize) {
        let frame = &self.tx_buf[..len];
        let res = loop {
            match self.backend.write_frame(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match res {
            Ok(_) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (len - self.hdr_len) as u64;
            }
            Err(e) => {
                // A full or downed tap, or a GSO header the kernel refused: the frame is
                // lost, as on a real wire; TCP retransmits.
                self.stats.tx_errors += 1;
                if self.stats.tx_errors.is_power_of_two() {
                    husk_bounds::ratelimited!(warn, error = %e, errors = self.stats.tx_errors, "virtio-net: tap write failed; frame dropped");
                }
            }
        }
    }

    /// The guest added RX buffers: take frames from the backend again.
    pub fn rx_kick<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        self.arm();
        self.process_rx(mem, queue)
    }

    /// Moves frames from the backend into RX buffers while both last. Returns whether the
    /// guest needs an interrupt for RX.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        self.apply_pending_setup();
        if !queue.ready() {
            self.disarm();
            return Ok(false);
        }
        if !self.rx_held.is_empty() && queue.next_avail() != self.rx_held_next {
            // The ring was restarted (vhost-user stop/start) under our held chains: they
            // belong to the old ring.
            self.rx_held.clear();
            self.rx_held_cap = 0;
        }
        let mut used = false;
        let mut frames = 0;
        while frames < MAX_RX_FRAMES {
            if self.rx_len == 0 {
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < self.hdr_len + ETH_HLEN => {
                        frames += 1;
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        frames += 1;
                        self.stats.rx_errors += 1;
                        if self.stats.rx_errors.is_power_of_two() {
                            husk_bounds::ratelimited!(warn, error = %e, "virtio-net: tap read failed");
                        }
                        continue;
                    }
                }
            }
            frames += 1;
            let (fill, any_used) = self.fill_rx(mem, queue)?;
            used |= any_used;
            match fill {
                Fill::Done => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (self.rx_len - self.hdr_len) as u64;
                    self.rx_len = 0;
                }
                Fill::Dropped => {
                    self.stats.rx_dropped += 1;
                    self.rx_len = 0;
                }
                Fill::NeedBuffers => {
                    // Ask for a kick when buffers come; if some came meanwhile, go on.
                    if queue.enable_notification(mem)? {
                        continue;
                    }
                    husk_bounds::ratelimited!(
                        debug,
                        "virtio-net: guest RX buffers exhausted; tap paused"
                    );
                    self.disarm();
                    break;
                }
            }
        }
        self.rx_held_next = queue.next_avail();
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Puts the frame in `rx_buf[..rx_len]` into held and new RX chains. Returns what
    /// happened and whether anything went to the used ring.
    fn fill_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<(Fill, bool), NetError> {
        let len = self.rx_len;
        let mergeable = self.acked & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut used = false;
        while self.rx_held_cap < len {
            // Without mergeable buffers a frame takes exactly one chain; with them, at most
            // the whole ring (num_buffers is a u16, ring sizes are at most 32768).
            let full = if mergeable {
                self.rx_held.len() >= usize::from(queue.size())
            } else {
                !self.rx_held.is_empty()
            };
            if full {
                // It cannot fit whatever the guest adds: drop the frame, keep the buffers.
                return Ok((Fill::Dropped, used));
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Ok((Fill::NeedBuffers, used));
            };
            let head = chain.head_index();
            match writable_segments(mem, chain) {
                Some((segs, cap)) => {
                    self.rx_held.push(HeldChain { head, segs, cap });
                    self.rx_held_cap += cap;
                }
                None => {
                    // Give a malformed buffer back empty; a driver drops a too-short buffer.
                    self.stats.rx_bad_buffers += 1;
                    if self.stats.rx_bad_buffers.is_power_of_two() {
                        husk_bounds::ratelimited!(
                            warn,
                            bad = self.stats.rx_bad_buffers,
                            "virtio-net: malformed RX buffer from the guest; returned empty"
                        );
                    }
                    queue.add_used(mem, head, 0)?;
                    used = true;
                }
            }
        }

        // The fewest held chains that hold the frame; the rest wait for the next one.
        let mut need = 0;
        let mut cap = 0;
        while cap < len {
            cap += self.rx_held[need].cap;
            need += 1;
        }
        if need > 1 && !mergeable {
            // Chains held while MRG_RXBUF was acked, then the driver renegotiated without it:
            // a frame must not be spread over chains it cannot join.
            return Ok((Fill::Dropped, used));
        }
        if self.hdr_len == HDR_LEN_V1 {
            // need <= ring size <= 32768, so it fits.
            let n = u16::try_from(need).unwrap_or(u16::MAX);
            self.rx_buf[NUM_BUFFERS_OFFSET..HDR_LEN_V1].copy_from_slice(&n.to_le_bytes());
        }
        let chains: Vec<HeldChain> = self.rx_held.drain(..need).collect();
        self.rx_held_cap -= cap;
        let mut off = 0usize;
        let mut ok = true;
        let mut lens = Vec::with_capacity(chains.len());
        for chain in &chains {
            let mut written = 0u32;
            for &(addr, seg_len) in &chain.segs {
                if off >= len || !ok {
                    break;
                }
                let n = (seg_len as usize).min(len - off);
                if mem.write_slice(&self.rx_buf[off..off + n], addr).is_err() {
                    ok = false;
                    break;
                }
                off += n;
                written += n as u32;
            }
            lens.push(written);
        }
        for (chain, written) in chains.iter().zip(lens) {
            queue.add_used(mem, chain.head, if ok { written } else { 0 })?;
        }
        Ok((if ok { Fill::Done } else { Fill::Dropped }, true))
    }
}

/// The device-writable buffers of an RX chain and their total size, or `None` if the chain
/// has a device-readable descriptor, a buffer outside guest memory, or no room at all.
fn writable_segments<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
) -> Option<(Vec<(GuestAddress, u32)>, usize)> {
    let mut segs = Vec::new();
    let mut cap = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            return None;
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return None;
        }
        segs.push((desc.addr(), desc.len()));
        cap += desc.len() as usize;
    }
    (cap > 0).then_some((segs, cap))
}
