//! husk's agent API, shared by the shim (client) and husk-agent (server).
//!
//! The messages and the async ttrpc client and server code are generated at
//! build time from `proto/agent.proto`. The agent listens on vsock port
//! [`AGENT_VSOCK_PORT`].

/// vsock port the agent's ttrpc server listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Version of the agent API served by this build; bumped when calls are added.
///
/// 1: health, version, guest details, shutdown.
/// 2: sandbox set-up, container lifecycle, stdio, stats, update, pause/resume,
///    OOM events, process lists.
/// 3: network interface and route set-up.
pub const API_VERSION: u32 = 3;

#[allow(
    clippy::all,
    non_upper_case_globals,
    non_camel_case_types,
    unused_qualifications,
    missing_docs,
    dead_code,
    unused_imports,
    unused_mut
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/generated/agent.rs"));
}

#[allow(
    clippy::all,
    non_upper_case_globals,
    non_camel_case_types,
    unused_qualifications,
    missing_docs,
    dead_code,
    unused_imports,
    unused_mut
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/generated/agent_ttrpc.rs"));
}
