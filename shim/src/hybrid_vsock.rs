//! Host end of a guest vsock port through the VM's hybrid vsock socket.
//!
//! The VMM's vsock device listens on a Unix socket. A host process connects,
//! writes `CONNECT <port>\n`, and the device opens a vsock connection to that
//! guest port; it answers `OK <host port>\n` once the guest accepted, and
//! closes the stream if nothing in the guest listens on the port (the caller
//! retries while the guest is still booting).

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// The longest reply line we accept: `OK ` and a u32 port fit easily.
const MAX_REPLY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error("connecting to hybrid vsock socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("hybrid vsock handshake for guest port {port}: {source}")]
    Io { port: u32, source: io::Error },
    #[error("guest port {port} refused the connection (nothing listening yet?)")]
    Refused { port: u32 },
    #[error("hybrid vsock handshake for guest port {port}: unexpected reply {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("hybrid vsock handshake for guest port {port} timed out after {timeout:?}")]
    Timeout { port: u32, timeout: Duration },
}

impl HybridVsockError {
    /// True for errors that a booting guest produces until its listener is up.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HybridVsockError::Refused { .. }
                | HybridVsockError::Connect { .. }
                | HybridVsockError::Io { .. }
        )
    }
}

/// Opens a stream to `port` in the guest. The returned stream carries only
/// the guest's bytes: the handshake reply has been consumed exactly.
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HybridVsockError> {
    tokio::time::timeout(timeout, handshake(uds, port))
        .await
        .map_err(|_| HybridVsockError::Timeout { port, timeout })?
}

async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, HybridVsockError> {
    let mut stream =
        UnixStream::connect(uds)
            .await
            .map_err(|source| HybridVsockError::Connect {
                path: uds.to_path_buf(),
                source,
            })?;
    let io_err = |source| HybridVsockError::Io { port, source };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err)?;

    // Byte by byte: anything after the newline is the guest's data and must
    // stay in the socket for the protocol that runs over it.
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(0) => return Err(HybridVsockError::Refused { port }),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_REPLY => line.push(b[0]),
            Ok(_) => {
                return Err(HybridVsockError::BadReply {
                    port,
                    reply: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HybridVsockError::Refused { port })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    match reply.strip_prefix("OK ").map(|n| n.trim().parse::<u32>()) {
        Some(Ok(_)) => Ok(stream),
        _ => Err(HybridVsockError::BadReply { port, reply }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake device end that answers the handshake with `reply` and then sends `tail`.
    async fn serve_once(listener: UnixListener, reply: &'static [u8], tail: &'static [u8]) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"CONNECT 1024\n");
        s.write_all(reply).await.unwrap();
        s.write_all(tail).await.unwrap();
    }

    #[tokio::test]
    async fn ok_reply_leaves_following_bytes_in_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(l, b"OK 1073741824\n", b"payload"));
        let mut s = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "payload");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn closed_stream_is_a_refusal_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(l, b"", b""));
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HybridVsockError::Refused { port: 1024 }),
            "{err}"
        );
        assert!(err.is_transient());
        server.await.unwrap();

        let path2 = dir.path().join("v2.sock");
        let l = UnixListener::bind(&path2).unwrap();
        let server = tokio::spawn(serve_once(l, b"NO WAY\n", b""));
        let err = connect(&path2, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::BadReply { .. }), "{err}");
        server.await.unwrap();

        let path3 = dir.path().join("v3.sock");
        let l = UnixListener::bind(&path3).unwrap();
        let server = tokio::spawn(serve_once(l, &[b'x'; 100], b""));
        let err = connect(&path3, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::BadReply { .. }), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn silent_device_times_out_and_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let _l = UnixListener::bind(&path).unwrap();
        let err = connect(&path, 7, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HybridVsockError::Timeout { port: 7, .. }),
            "{err}"
        );
        let err = connect(&dir.path().join("missing"), 7, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Connect { .. }), "{err}");
    }
}
