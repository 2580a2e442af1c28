//! A process's stdio between containerd and the guest: containerd's FIFOs (or
//! log URIs, see [`sinks`]) on the host side, the agent's stream calls on the
//! guest side.
//!
//! - stdin: read from the host FIFO, sent with `WriteStdin`; the host's EOF
//!   (or containerd's CloseIO) becomes `CloseStdin`.
//! - stdout/stderr: long-poll `ReadStdout`/`ReadStderr` until the agent says
//!   EOF, writing what arrives; closing the host end then tells containerd's
//!   reader that the stream is complete. With a terminal, all output is on
//!   stdout.
//!
//! Output is always drained from the agent, even with nowhere to write it,
//! so the agent's buffers never fill.

pub mod sinks;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
    sync::Notify,
    task::JoinHandle,
};
use tracing::debug;

use crate::agent_client::AgentClient;

/// Longest wait of one output long poll.
const READ_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("stdio URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging binary {path}: {why}")]
    Logger { path: PathBuf, why: String },
}

/// The stdio containerd asked for, as it sent it.
#[derive(Debug, Clone, Default)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The running copies of one process's streams.
pub struct ProcessIo {
    stdin: Option<(JoinHandle<()>, Arc<Notify>)>,
    outputs: Vec<JoinHandle<()>>,
    logger: Option<tokio::process::Child>,
    agent: AgentClient,
    container_id: String,
    exec_id: String,
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

impl ProcessIo {
    /// Opens the host ends and starts copying. Call once the agent knows the
    /// process (after CreateContainer or ExecProcess).
    pub async fn start(
        agent: &AgentClient,
        container_id: &str,
        exec_id: &str,
        namespace: &str,
        spec: &StdioSpec,
    ) -> Result<ProcessIo, IoError> {
        let outs = sinks::open(&spec.stdout, &spec.stderr, container_id, namespace).await?;
        let mut io = ProcessIo {
            stdin: None,
            outputs: Vec::new(),
            logger: outs.logger,
            agent: agent.clone(),
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        io.outputs.push(tokio::spawn(copy_out(
            agent.clone(),
            container_id.to_string(),
            exec_id.to_string(),
            Stream::Stdout,
            outs.stdout,
        )));
        if !spec.terminal {
            io.outputs.push(tokio::spawn(copy_out(
                agent.clone(),
                container_id.to_string(),
                exec_id.to_string(),
                Stream::Stderr,
                outs.stderr,
            )));
        }
        if !spec.stdin.is_empty() {
            // Non-blocking read-only open: succeeds before the writer (the
            // containerd client) opens its end; reads wait for data and end
            // at the writer's close.
            let path = spec
                .stdin
                .strip_prefix("fifo://")
                .unwrap_or(&spec.stdin)
                .to_string();
            let rx = pipe::OpenOptions::new()
                .open_receiver(&path)
                .map_err(|source| IoError::Open {
                    path: path.clone().into(),
                    source,
                })?;
            let stop = Arc::new(Notify::new());
            let task = tokio::spawn(copy_in(
                agent.clone(),
                container_id.to_string(),
                exec_id.to_string(),
                rx,
                stop.clone(),
            ));
            io.stdin = Some((task, stop));
        }
        Ok(io)
    }

    /// containerd's CloseIO: no more input.
    pub async fn close_stdin(&mut self) {
        match self.stdin.take() {
            // The copy closes the guest's stdin once it has sent what it read.
            Some((task, stop)) => {
                stop.notify_one();
                let _ = task.await;
            }
            None => {
                if let Err(e) = self
                    .agent
                    .close_stdin(&self.container_id, &self.exec_id)
                    .await
                {
                    debug!("closing stdin of {}: {e}", self.container_id);
                }
            }
        }
    }

    /// Waits up to `grace` for the output copies to reach EOF (the process
    /// exited, but a child it left behind may still hold its stdout), then
    /// stops them; either way containerd's readers see EOF after this.
    pub async fn finish(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for t in self.outputs.iter_mut() {
            if tokio::time::timeout_at(deadline, &mut *t).await.is_err() {
                t.abort();
            }
        }
        self.outputs.clear();
        if let Some((task, _)) = self.stdin.take() {
            task.abort();
        }
        if let Some(mut logger) = self.logger.take() {
            // Its input pipes are closed now: it exits by itself.
            if tokio::time::timeout(Duration::from_secs(5), logger.wait())
                .await
                .is_err()
            {
                let _ = logger.kill().await;
            }
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        for t in &self.outputs {
            t.abort();
        }
        if let Some((t, _)) = &self.stdin {
            t.abort();
        }
    }
}

async fn copy_out(
    agent: AgentClient,
    cid: String,
    exec: String,
    stream: Stream,
    mut sink: Option<sinks::Sink>,
) {
    let mut errors = 0;
    // A long poll that answers empty at once, again and again, is a guest
    // that wants the host to spin: back off until data comes.
    let mut idle = Duration::ZERO;
    loop {
        let r = match stream {
            Stream::Stdout => agent.read_stdout(&cid, &exec, READ_WAIT).await,
            Stream::Stderr => agent.read_stderr(&cid, &exec, READ_WAIT).await,
        };
        match r {
            Ok(Some(data)) => {
                errors = 0;
                if data.is_empty() {
                    idle = (idle * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tokio::time::sleep(idle).await;
                    continue;
                }
                idle = Duration::ZERO;
                if let Some(s) = sink.as_mut() {
                    if let Err(e) = s.write_all(&data).await {
                        // The reader went away: keep draining the guest.
                        debug!(%cid, ?stream, "host end closed: {e}");
                        sink = None;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                errors += 1;
                if e.code() == Some(ttrpc::Code::NOT_FOUND) || errors >= 3 {
                    debug!(%cid, ?stream, "output stream ended: {e}");
                    break;
                }
                husk_bounds::ratelimited!(warn, %cid, ?stream, "reading output: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if let Some(mut s) = sink {
        let _ = s.flush().await;
        let _ = s.shutdown().await;
    }
}

async fn copy_in(
    agent: AgentClient,
    cid: String,
    exec: String,
    mut rx: pipe::Receiver,
    stop: Arc<Notify>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    'outer: loop {
        let n = tokio::select! {
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.notified() => break,
        };
        let mut off = 0;
        while off < n {
            match agent.write_stdin(&cid, &exec, &buf[off..n]).await {
                Ok(0) => break 'outer,
                Ok(w) => off += w as usize,
                Err(e) => {
                    debug!(%cid, "writing stdin: {e}");
                    break 'outer;
                }
            }
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &exec).await {
        debug!(%cid, "closing stdin: {e}");
    }
}
