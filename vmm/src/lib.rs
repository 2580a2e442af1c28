//! husk-vmm: husk's microVM monitor.
//!
//! This crate holds the virtio device models (written once, over guest memory and
//! `virtio_queue::Queue`) and the front ends that serve them to a guest: vhost-user for QEMU,
//! and husk-vmm's own KVM VM ([`builder`], [`vstate`], [`arch`]) with its virtio-mmio
//! transport.

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod jail;
pub mod limits;
pub mod loader;
pub mod logging;
pub mod seccomp;
pub mod sock;
pub mod vhost_user;
pub mod vstate;
