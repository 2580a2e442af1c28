//! Protocol constants of virtio-vsock.
//!
//! Values and names follow the Linux UAPI header `include/uapi/linux/virtio_vsock.h` and the
//! virtio 1.2 specification, section 5.10 ("Socket Device").

/// The CID of the host: every packet the guest sends to us must carry it as `dst_cid`.
pub const VSOCK_HOST_CID: u64 = 2;

/// `VIRTIO_ID_VSOCK` from `linux/virtio_ids.h`.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// `enum virtio_vsock_type`: only stream sockets are supported.
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;

// `enum virtio_vsock_op`.
pub const VIRTIO_VSOCK_OP_INVALID: u16 = 0;
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;

// `enum virtio_vsock_shutdown`: flags of a SHUTDOWN packet.
/// The sender will receive no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_SEND: u32 = 2;
/// Both directions are closed.
pub const VIRTIO_VSOCK_SHUTDOWN_ALL: u32 = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND;

/// Size of `struct virtio_vsock_hdr`.
pub const VSOCK_PKT_HDR_SIZE: usize = 44;

/// The largest payload we read from or write to one packet. Linux uses the same bound
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`, 64 KiB); anything larger from the guest is malformed.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;

// Virtqueue indices of the device (virtio spec 5.10.2).
pub const RXQ_INDEX: usize = 0;
pub const TXQ_INDEX: usize = 1;
pub const EVQ_INDEX: usize = 2;
pub const NUM_QUEUES: usize = 3;
/// Largest queue size we accept. QEMU 7.2's vhost-user-vsock-device asks for 1024.
pub const QUEUE_SIZE: u16 = 1024;

/// Size of `struct virtio_vsock_config` (a single little-endian `guest_cid`).
pub const VSOCK_CONFIG_SIZE: usize = 8;
