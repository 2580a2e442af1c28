//! The hybrid-vsock backend: guest vsock connections carried over host Unix sockets.

pub(crate) mod connection;
pub(crate) mod handshake;
mod muxer;

use std::path::PathBuf;
use std::time::Duration;

/// The `CONNECT <port>\n` parser, for the fuzz targets (`../fuzz`).
#[cfg(feature = "fuzzing")]
pub use self::handshake::parse_connect_line;
pub use self::muxer::{ConnKey, VsockMuxer};

/// Settings of a [`VsockMuxer`].
#[derive(Debug, Clone)]
pub struct MuxerConfig {
    /// The guest's CID; packets from the guest must carry it as `src_cid`.
    pub guest_cid: u64,
    /// The hybrid vsock socket. Host clients connect here; guest connections to port `P` go
    /// to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Connections plus unfinished handshakes; beyond this, new ones are refused.
    pub max_connections: usize,
    /// Per-connection buffer for guest data the host has not read yet (the credit we give).
    pub conn_buf_size: u32,
    /// How long a host client may take to send its `CONNECT` line.
    pub handshake_timeout: Duration,
    /// How long the guest may take to answer a host-initiated REQUEST.
    pub connect_timeout: Duration,
    /// How long a closing connection may wait for the other side before it is reset.
    pub shutdown_timeout: Duration,
}

impl MuxerConfig {
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        MuxerConfig {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: 1024,
            conn_buf_size: 256 * 1024,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(2),
        }
    }
}
