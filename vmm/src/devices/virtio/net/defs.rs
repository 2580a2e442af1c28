//! virtio-net constants (virtio 1.2, 5.1; `linux/virtio_net.h`) and the limits husk puts on
//! what a guest may send.

pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};

/// `VIRTIO_ID_NET` (`linux/virtio_ids.h`).
pub const VIRTIO_ID_NET: u32 = 1;

pub const RXQ_INDEX: usize = 0;
pub const TXQ_INDEX: usize = 1;
/// One queue pair, no control queue (no VIRTIO_NET_F_CTRL_VQ, no MQ).
pub const NUM_QUEUES: usize = 2;
/// Queue size on husk-vmm's own transport.
pub const QUEUE_SIZE: u16 = 256;
/// Largest queue a vhost-user front end may ask for (QEMU 7.2 allows up to 1024).
pub const VHOST_USER_MAX_QUEUE_SIZE: u16 = 1024;

/// `struct virtio_net_hdr_v1` (also `virtio_net_hdr_mrg_rxbuf`): used with VERSION_1 or
/// MRG_RXBUF. Its last two bytes are `num_buffers`.
pub const HDR_LEN_V1: usize = 12;
/// `struct virtio_net_hdr`: a legacy driver without MRG_RXBUF (QEMU's legacy virtio-mmio).
pub const HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the v1 header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Largest Ethernet frame (without the virtio header) we move either way: a 64 KiB GSO
/// packet plus Ethernet and VLAN headers. Anything bigger from the guest is dropped.
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest frame worth handing on: an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Bytes of host buffer per direction: header plus the largest frame.
pub const MAX_BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME_LEN;

/// `struct virtio_net_config` as we fill it: mac[6], status (le16).
pub const CONFIG_LEN: usize = 8;
