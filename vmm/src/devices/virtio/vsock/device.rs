//! The transport-independent part of the virtio-vsock device: moving packets between the
//! guest's virtqueues and a [`VsockBackend`].
//!
//! A front end (vhost-user today, husk-vmm's own virtio-mmio transport later) owns the queues
//! and the event loop. It calls [`VsockDevice::process_tx`] when the guest kicks the TX queue,
//! [`VsockDevice::process_rx`] when it kicks the RX queue or the backend has news, and
//! [`VsockDevice::notify_backend`] when the backend's fd is readable; each `process_*` returns
//! whether the guest must be interrupted for that queue.

use std::os::fd::RawFd;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemory;

use super::defs::*;
use super::packet::peek_tx_header;
use super::{VsockBackend, VsockError};
use crate::devices::virtio::device::read_config_space;

/// How many times one `process_*` call re-checks a queue that got new buffers while it was
/// being drained. Bounded so that a driver whose ring claims buffers it never yields (a broken
/// or hostile avail index) cannot keep the device thread spinning.
const MAX_ROUNDS: usize = 8;

/// The virtio-vsock device model over a backend `T`.
pub struct VsockDevice<T: VsockBackend> {
    guest_cid: u64,
    backend: T,
}

impl<T: VsockBackend> VsockDevice<T> {
    pub fn new(guest_cid: u64, backend: T) -> Self {
        VsockDevice { guest_cid, backend }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn backend(&self) -> &T {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut T {
        &mut self.backend
    }

    /// Virtio feature bits the device offers (transport-specific bits are the front end's).
    pub fn device_features() -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX)
    }

    /// `struct virtio_vsock_config`.
    pub fn config_space(&self) -> [u8; VSOCK_CONFIG_SIZE] {
        self.guest_cid.to_le_bytes()
    }

    /// Reads `data.len()` bytes of config space at `offset`; bytes beyond the config read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    /// The fd a front end must poll for host-side events.
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// Handles ready host-side events. Call [`VsockDevice::process_rx`] afterwards.
    pub fn notify_backend(&mut self) {
        self.backend.notify();
    }

    /// Whether the backend has packets waiting for RX buffers.
    pub fn has_pending_rx(&self) -> bool {
        self.backend.has_pending_rx()
    }

    /// The driver reset the device: forget every connection.
    pub fn reset(&mut self) {
        self.backend.reset();
    }

    /// Consumes every packet the guest put in the TX queue. Returns whether the guest needs an
    /// interrupt for the TX queue.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, VsockError> {
        if !queue.ready() {
            return Ok(false);
        }
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            queue.disable_notification(mem)?;
            while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let probe = chain.clone();
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_PAYLOAD) {
                    Ok(pkt) => self.backend.send_pkt(&pkt),
                    Err(e) => {
                        husk_bounds::ratelimited!(warn, error = %e, "dropping malformed TX packet from guest");
                        if let Some(hdr) = peek_tx_header(mem, probe) {
                            self.backend.on_malformed_pkt(&hdr);
                        }
                    }
                }
                // The TX buffer is consumed whatever it held: the device writes nothing back.
                queue.add_used(mem, head, 0)?;
                used = true;
            }
            // With EVENT_IDX the driver may add buffers between our last pop and re-enabling
            // notifications; enable_notification tells us so.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if used {
            Ok(queue.needs_notification(mem)?)
        } else {
            Ok(false)
        }
    }

    /// Fills RX buffers with whatever the backend has for the guest. Returns whether the guest
    /// needs an interrupt for the RX queue.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, VsockError> {
        if !queue.ready() {
            return Ok(false);
        }
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            queue.disable_notification(mem)?;
            let mut out_of_buffers = false;
            while self.backend.has_pending_rx() {
                let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                // We bound every payload ourselves, so a large RX buffer is not an error.
                let used_len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, u32::MAX) {
                    Ok(mut pkt) => match self.backend.recv_pkt(&mut pkt) {
                        Ok(true) => (VSOCK_PKT_HDR_SIZE as u32).saturating_add(pkt.len()),
                        Ok(false) => {
                            // Nothing to send after all: give the buffer back untouched.
                            queue.go_to_previous_position();
                            break;
                        }
                        Err(e) => {
                            husk_bounds::ratelimited!(warn, error = %e, "cannot fill RX buffer; returning it empty");
                            0
                        }
                    },
                    Err(e) => {
                        husk_bounds::ratelimited!(warn, error = %e, "malformed RX buffer from guest; returning it empty");
                        0
                    }
                };
                queue.add_used(mem, head, used_len)?;
                used = true;
            }
            let more_buffers = queue.enable_notification(mem)?;
            if !(out_of_buffers && more_buffers) {
                break;
            }
            husk_bounds::ratelimited!(debug, "RX buffers arrived while filling; continuing");
        }
        if used {
            Ok(queue.needs_notification(mem)?)
        } else {
            Ok(false)
        }
    }
}
