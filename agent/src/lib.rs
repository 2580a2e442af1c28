//! husk-agent's modules, as a library so the binary stays a thin entry point
//! and tests reach the parts they check. See `main.rs` for what the agent is.

pub mod cli;
pub mod clock;
pub mod cmdline;
pub mod container;
pub mod guest_info;
pub mod init;
pub mod log_stream;
pub mod logging;
pub mod network;
pub mod power;
pub mod reaper;
pub mod rpc;
pub mod shutdown;
pub mod switch_root;
