//! The shim binary's actions, as containerd's runtime v2 runs them: `start`
//! and `delete` (one-shot), and the long-running server (no action).

pub mod serve;
pub mod start_delete;

/// The runtime name containerd knows husk by.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";
