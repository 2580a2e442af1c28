//! Host filesystem operations done as if the guest had written every path: /proc
//! files read as bytes, paths below a directory resolved without following
//! symlinks or leaving it, and trees removed without crossing into a mount.

pub mod detached;
pub mod mountinfo;
pub mod remove;
pub mod resolve;
