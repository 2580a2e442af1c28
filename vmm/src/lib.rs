//! husk-vmm: husk's microVM monitor.
//!
//! This crate holds the virtio device models (written once, over guest memory and
//! `virtio_queue::Queue`) and the front ends that serve them to a guest: vhost-user for QEMU
//! today, husk-vmm's own KVM VM and virtio-mmio transport later.

pub mod devices;
pub mod sock;
pub mod vhost_user;
