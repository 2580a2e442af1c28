//! virtio-fs protocol constants (`linux/virtio_fs.h`, virtio 1.2 section 5.11) and the limits
//! husk puts on guest requests.

/// Bytes of the tag in `struct virtio_fs_config`; shorter tags are NUL padded.
pub const TAG_LEN: usize = 36;

/// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`.
pub const FS_CONFIG_SIZE: usize = TAG_LEN + 4;

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT); request queues follow.
pub const HIPRIO_QUEUE: usize = 0;

/// Largest queue the device accepts. QEMU 7.2's `vhost-user-fs-device` asks for 1024.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Largest READ/WRITE/READDIR payload: what fuse-backend-rs negotiates at FUSE_INIT
/// (`max_write`, `max_pages` = 256 pages).
pub const MAX_IO_SIZE: u32 = fuse_backend_rs::api::server::MAX_BUFFER_SIZE;

/// Largest request the driver may queue: a maximal WRITE plus its headers, with room to spare
/// (the same bound fuse-backend-rs puts on the header's length field).
pub const MAX_REQUEST_SIZE: usize = MAX_IO_SIZE as usize + 0x1000;

/// Largest xattr value or name list (`XATTR_SIZE_MAX`, `XATTR_LIST_MAX` in linux/limits.h).
pub const MAX_XATTR_SIZE: u32 = 65536;
