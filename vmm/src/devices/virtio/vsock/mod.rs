//! The virtio-vsock device, with a "hybrid vsock" host side.
//!
//! What it is for: it gives the guest an `AF_VSOCK` network to the host without needing
//! `/dev/vhost-vsock` or any privilege on the host. Guest sockets are connected to plain Unix
//! sockets, following the convention of Firecracker and Kata Containers:
//!
//! - A host process reaches guest port `P` by connecting to the device's Unix socket `<uds>`
//!   and writing `CONNECT P\n`. When the guest accepts, it reads back `OK <host port>\n` and
//!   the stream is then connected to the guest socket; if nobody listens on `P` in the guest
//!   the stream is closed (callers retry while the guest boots).
//! - A guest process connecting to CID 2 (the host), port `P`, reaches whoever listens on the
//!   Unix socket `<uds>_P`.
//!
//! husk's shim uses it to talk ttrpc to the agent inside the VM.
//!
//! The code is split so that the virtio part is written once and used by every front end:
//!
//! - [`device::VsockDevice`] moves packets between the guest's RX/TX virtqueues and a backend.
//!   It knows nothing about vhost-user or MMIO: a front end hands it guest memory and a
//!   `virtio_queue::Queue`, and it reports whether the guest needs an interrupt.
//! - [`VsockBackend`] is what the device talks to; [`unix::VsockMuxer`] is the hybrid-vsock
//!   implementation, which multiplexes host Unix streams onto guest connections and keeps one
//!   [`unix::connection`] state machine per stream.
//! - [`defs`] holds the protocol constants.
//!
//! Everything the guest writes is treated as hostile: malformed packets are dropped or answered
//! with RST, logged, and never stop the device.

pub mod defs;
pub mod device;
pub mod packet;
pub mod unix;
pub mod virtio;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

pub use self::device::VsockDevice;
pub use self::packet::PktHeader;
pub use self::unix::{MuxerConfig, VsockMuxer};

/// Errors of the vsock device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("cannot write packet header: {0}")]
    PacketHeader(virtio_vsock::packet::Error),
    #[error("epoll error: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("timer error: {0}")]
    Timer(#[source] std::io::Error),
    #[error("cannot listen on hybrid vsock socket {}", path.display())]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: crate::sock::BindError,
    },
}

/// The packet interface between the device and its host side.
///
/// "send" and "recv" are from the guest's point of view, as in the virtio spec: the guest
/// sends on the TX queue, receives on the RX queue.
pub trait VsockChannel {
    /// Handles one packet the guest sent (already parsed from a TX chain).
    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>);

    /// Fills an RX packet (header and, for data, payload) for the guest. Returns `Ok(false)`
    /// when there is nothing to send; the buffer is then left untouched for next time.
    fn recv_pkt<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Result<bool, VsockError>;

    /// Whether [`VsockChannel::recv_pkt`] may have something to send.
    fn has_pending_rx(&self) -> bool;
}

/// A host side for the vsock device.
///
/// The backend owns its host file descriptors behind a single pollable fd (`as_raw_fd`); a
/// front end registers that fd with its event loop and calls [`VsockBackend::notify`] when it
/// becomes readable, then lets the device process the queues.
pub trait VsockBackend: VsockChannel + AsRawFd + Send {
    /// Handles whatever host-side events are ready. Never blocks.
    fn notify(&mut self);

    /// A TX chain could not be parsed as a packet, but its header could: the connection it
    /// names has lost data and must be reset.
    fn on_malformed_pkt(&mut self, hdr: &PktHeader);

    /// Drops every connection (the driver reset the device).
    fn reset(&mut self);
}
