//! The host side of a husk pod: containerd-shim-husk-v2's library.
//!
//! What lives here, by module:
//! - [`hypervisor`]: starting and stopping the pod's microVM (QEMU `-M microvm`
//!   with husk-vmm's vhost-user device backends today; husk-vmm itself on
//!   hosts with hardware virtualization later) and detecting what the host's
//!   KVM can do.
//! - [`hybrid_vsock`]: the host end of a guest vsock port, reached through the
//!   VM's hybrid vsock Unix socket (`CONNECT <port>\n` / `OK <n>\n`).
//! - [`agent_client`]: the ttrpc client for husk-agent's API, over hybrid vsock.
//!
//! The containerd Task service that drives these lands with the shim issue.

pub mod agent_client;
pub mod hybrid_vsock;
pub mod hypervisor;
