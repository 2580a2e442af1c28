//! vhost-user front ends: husk's device models served to QEMU over vhost-user.
//!
//! QEMU is the vhost-user front end (it connects); we listen and serve exactly one connection.

pub mod confine;
mod daemon;
pub mod fs;
pub mod net;
pub mod vsock;

pub use self::daemon::ServeError;
pub use self::fs::{serve_fs, VhostUserFsBackend, VhostUserFsError};
pub use self::net::{serve_net, VhostUserNetBackend, VhostUserNetError};
pub use self::vsock::{serve_vsock, VhostUserVsockBackend, VhostUserVsockError};
