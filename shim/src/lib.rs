//! The host side of a husk pod: containerd-shim-husk-v2's library.
//!
//! What lives here, by module:
//! - [`cli`]: the containerd runtime v2 entry points (`start`, `delete`, the
//!   long-running server).
//! - [`task`]: containerd's Task API, mapped onto the pod's agent.
//! - [`sandbox`]: the pod: its VM, agent connection and host directory.
//! - [`io`]: stdio between containerd's FIFOs (or log URIs) and the agent.
//! - [`pod_share`]: every host path of the pod share: containerd's rootfs
//!   and CRI's bind mounts made in a shim-private directory, the guest's
//!   read-only view of it, and crossing-free teardown.
//! - [`hostfs`]: host filesystem operations safe against guest-chosen names:
//!   mountinfo as bytes, `openat2` resolution, removal that never crosses a
//!   mount.
//! - [`ids`]: sandbox, container and exec ids, checked at the edge.
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
pub mod hostfs;
pub mod hybrid_vsock;
pub mod hypervisor;
pub mod ids;
pub mod io;
pub mod logging;
pub mod network;
pub mod options;
pub mod pod_share;
pub mod sandbox;
pub mod state;
pub mod task;
