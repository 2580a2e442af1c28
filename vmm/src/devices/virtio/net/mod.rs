//! The virtio-net device: the pod's network interface inside the guest.
//!
//! The shim puts a tap device in the pod's network namespace and redirects the CNI veth to
//! it with tc; this device moves Ethernet frames between that tap and the guest's two
//! virtqueues (RX 0, TX 1). The tap is opened with `IFF_VNET_HDR`, so the virtio-net header
//! the guest writes goes to the kernel as is (and the kernel validates its checksum and GSO
//! fields, as it does for vhost-net), and the tap's header for received frames goes to the
//! guest with `num_buffers` filled in.
//!
//! - `device.rs`: [`NetDevice`], transport-independent queue processing over guest memory
//!   (`process_tx`, `process_rx`, `rx_kick`), feature negotiation and config space.
//! - `tap.rs`: [`Tap`], opening an existing tap by name or adopting an open tap fd.
//! - `virtio.rs`: the [`crate::devices::virtio::device::VirtioDevice`] impl for husk-vmm's
//!   own virtio-mmio transport; `crate::vhost_user::net` serves the same device to QEMU.
//!
//! RX never spins: the device reads the tap only while the guest has RX buffers. When they
//! run out it takes the tap out of its own small epoll set (whose fd is what front ends poll)
//! and puts it back when the guest kicks the RX queue.

pub mod defs;
mod device;
pub mod tap;
mod virtio;

use std::io;
use std::os::fd::AsRawFd;

pub use self::device::{NetDevice, NetStats};
pub use self::tap::{Tap, TapError};

#[cfg(test)]
pub(crate) mod tests;

/// Errors that stop queue processing; everything a guest can cause short of a broken ring
/// is counted in [`NetStats`] instead.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("cannot set up the tap poll set: {0}")]
    Epoll(#[source] io::Error),
}

/// The host side of the device: something that carries whole frames, each prefixed with a
/// virtio-net header of the length last set by [`NetBackend::set_vnet_hdr_len`]. A tap in
/// production; a datagram socket pair in tests.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one header+frame into `buf`; `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one header+frame.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The header length the guest negotiated (10 or 12 bytes).
    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()>;
    /// Which offloaded frames (`TUN_F_*`) the guest can take on RX.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("{0:?}: expected six hex octets separated by ':' (aa:bb:cc:dd:ee:ff)")]
    Syntax(String),
    #[error("{0:?}: a multicast address cannot be an interface's address")]
    Multicast(String),
    #[error("{0:?}: the all-zero address is not an interface's address")]
    Zero(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` into a unicast MAC address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mac = s
        .parse::<macaddr::MacAddr6>()
        .map_err(|_| MacError::Syntax(s.into()))?
        .into_array();
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.into()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero(s.into()));
    }
    Ok(mac)
}
