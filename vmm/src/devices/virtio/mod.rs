//! Virtio devices, written against guest memory and `virtio_queue::Queue` so that every front
//! end (vhost-user, husk-vmm's own virtio-mmio transport) shares them.

pub mod device;
pub mod fs;
pub mod net;
pub mod rng;
pub mod transport;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;
