//! The host side of a husk pod: containerd-shim-husk-v2's library.
//!
//! What lives here, by module:
//! - [`cli`]: the containerd runtime v2 entry points (`start`, `delete`, the
//!   long-running server).
//! - [`task`]: containerd's Task API, mapped onto the pod's agent.
//! - [`sandbox`]: the pod: its VM, agent connection and host directory.
//! - [`io`]: stdio between containerd's FIFOs (or log URIs) and the agent.
//! - [`mount`]: containerd's rootfs mounts into the pod's shared directory.
//! - [`guest_spec`]: the host paths in a CRI spec (bind sources, pause
//!   namespaces) rewritten for the guest.
//! - [`bundle`], [`options`], [`config`]: what containerd and the operator
//!   hand the shim.
//! - [`state`]: the pod's host state, and cleanup after a crashed shim.
//! - [`events`]: task events to containerd.
//! - [`hypervisor`]: starting and stopping the pod's microVM (QEMU
//!   `-M microvm` with husk-vmm's vhost-user device backends) and detecting
//!   what the host's KVM can do.
//! - [`hybrid_vsock`]: the host end of a guest vsock port, reached through the
//!   VM's hybrid vsock Unix socket (`CONNECT <port>\n` / `OK <n>\n`).
//! - [`agent_client`]: the ttrpc client for husk-agent's API, over hybrid vsock.

pub mod agent_client;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod events;
pub mod guest_spec;
pub mod hybrid_vsock;
pub mod hypervisor;
pub mod io;
pub mod logging;
pub mod mount;
pub mod network;
pub mod options;
pub mod sandbox;
pub mod state;
pub mod task;
