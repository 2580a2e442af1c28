//! The pod VM's host-side logs, each one a [`BoundedLog`]: the guest console
//! (QEMU's serial arrives on a Unix socket; husk-vmm caps its own), the
//! agent's log stream (guest-initiated vsock connections to a host port), and
//! what the VM's processes print. The guest can write to all of them as fast
//! as it likes; none grows past its cap, and at most a few agent-log
//! connections are served at once.

use std::{
    io::Write,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use husk_bounds::BoundedLog;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::UnixListener,
    task::JoinHandle,
};

/// A capped log file several tasks write into.
#[derive(Clone)]
pub struct SharedLog(Arc<Mutex<BoundedLog>>);

impl SharedLog {
    pub fn create(path: &Path, max: u64) -> std::io::Result<SharedLog> {
        Ok(SharedLog(Arc::new(Mutex::new(BoundedLog::create(
            path, max,
        )?))))
    }

    /// Appends `data`. The lock is held for one write to a file in the pod's
    /// state directory (tmpfs): no await, no I/O that can stall.
    fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        log.write_all(data)
    }
}

/// Copies `r` into `log` until EOF or an error.
pub async fn copy_into(mut r: impl AsyncRead + Unpin, log: SharedLog) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = log.write(&buf[..n]) {
                    husk_bounds::ratelimited!(warn, "writing a pod VM log: {e}");
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("pod VM log stream ended: {e}");
                return;
            }
        }
    }
}

/// Serves `listener`: each connection's bytes go into `log`, at most
/// `max_conns` at once; one over that is closed at once.
pub fn serve(
    listener: UnixListener,
    log: SharedLog,
    max_conns: usize,
    what: &'static str,
) -> JoinHandle<()> {
    let live = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            if live.load(Ordering::Acquire) >= max_conns {
                husk_bounds::ratelimited!(
                    warn,
                    "{what}: the guest opened more than {max_conns} connections; closing the new one"
                );
                drop(stream);
                continue;
            }
            live.fetch_add(1, Ordering::AcqRel);
            let live = live.clone();
            let log = log.clone();
            tokio::spawn(async move {
                copy_into(stream, log).await;
                live.fetch_sub(1, Ordering::AcqRel);
            });
        }
    })
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use tokio::{io::AsyncWriteExt, net::UnixStream};

    use super::*;

    #[tokio::test]
    async fn connections_are_bounded_in_number_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log.sock");
        let path = dir.path().join("agent.log");
        let log = SharedLog::create(&path, 64 << 10).unwrap();
        let task = serve(UnixListener::bind(&sock).unwrap(), log, 2, "agent log");
        let mut kept = Vec::new();
        for _ in 0..2 {
            let mut s = UnixStream::connect(&sock).await.unwrap();
            s.write_all(b"hello\n").await.unwrap();
            kept.push(s);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A third is closed by the host: reading gives EOF.
        let mut third = UnixStream::connect(&sock).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut b))
            .await
            .expect("the extra connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // 16 MiB through one connection: the file stays under its cap.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            kept[0].write_all(&chunk).await.unwrap();
        }
        kept[0].write_all(b"\nlast line\n").await.unwrap();
        drop(kept);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let data = std::fs::read(&path).unwrap();
        assert!(data.len() <= 64 << 10, "{}", data.len());
        assert!(data.ends_with(b"last line\n"));
        task.abort();
    }
}
