//! The container calls of the agent API: what the shim's Task service maps
//! containerd's requests onto. Each is a thin, typed wrapper that names the
//! call in its error.

use std::time::Duration;

use husk_protocol::agent::*;

use super::{AgentClient, AgentError};

fn rpc(call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |source| AgentError::Rpc { call, source }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The shell convention: the exit code, or 128 + signal number.
    pub code: i32,
    /// The signal that killed the process, 0 if it exited.
    pub signal: u32,
}

impl AgentClient {
    /// Sets up the sandbox: hostname, DNS, and the virtio-fs share mount.
    pub async fn create_sandbox(
        &self,
        hostname: &str,
        dns: &str,
        share_tag: &str,
        share_mount_point: &str,
    ) -> Result<(), AgentError> {
        let req = CreateSandboxRequest {
            hostname: hostname.into(),
            dns: dns.into(),
            share_tag: share_tag.into(),
            share_mount_point: share_mount_point.into(),
            ..Default::default()
        };
        self.inner
            .create_sandbox(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("CreateSandbox"))
    }

    /// Creates a container from an OCI runtime spec (JSON); returns its init pid.
    pub async fn create_container(
        &self,
        id: &str,
        oci_spec: &[u8],
        rootfs: &str,
        terminal: bool,
    ) -> Result<u32, AgentError> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: oci_spec.to_vec(),
            rootfs: rootfs.into(),
            terminal,
            ..Default::default()
        };
        self.inner
            .create_container(self.ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(rpc("CreateContainer"))
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.inner
            .start_container(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("StartContainer"))
    }

    /// Starts an extra process (OCI process JSON) in a running container.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: &[u8],
        terminal: bool,
    ) -> Result<u32, AgentError> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: process.to_vec(),
            terminal,
            ..Default::default()
        };
        self.inner
            .exec_process(self.ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(rpc("ExecProcess"))
    }

    /// Signals a process (`exec_id` empty: the container's init), or with
    /// `all` every process of the container.
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.inner
            .signal_process(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("SignalProcess"))
    }

    /// Waits for a process to end. Has no deadline of its own: the caller
    /// bounds it (a container may run for days).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<ExitStatus, AgentError> {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.inner
            .wait_process(ttrpc::context::with_timeout(0), &req)
            .await
            .map(|r| ExitStatus {
                code: r.exit_status,
                signal: r.signal,
            })
            .map_err(rpc("WaitProcess"))
    }

    pub async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = RemoveProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.inner
            .remove_process(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("RemoveProcess"))
    }

    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<u32, AgentError> {
        let req = WriteStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.inner
            .write_stdin(self.ctx(), &req)
            .await
            .map(|r| r.written)
            .map_err(rpc("WriteStdin"))
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.inner
            .close_stdin(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("CloseStdin"))
    }

    /// Reads what the process wrote to stdout, waiting up to `wait` for
    /// something to arrive. `None` is end of stream.
    pub async fn read_stdout(
        &self,
        id: &str,
        exec_id: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = read_req(id, exec_id, wait);
        let r = self
            .inner
            .read_stdout(self.ctx_with_extra(wait), &req)
            .await
            .map_err(rpc("ReadStdout"))?;
        Ok(stream_chunk(r))
    }

    /// As [`AgentClient::read_stdout`], for stderr.
    pub async fn read_stderr(
        &self,
        id: &str,
        exec_id: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = read_req(id, exec_id, wait);
        let r = self
            .inner
            .read_stderr(self.ctx_with_extra(wait), &req)
            .await
            .map_err(rpc("ReadStderr"))?;
        Ok(stream_chunk(r))
    }

    pub async fn tty_resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let req = TtyWinResizeRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            columns,
            ..Default::default()
        };
        self.inner
            .tty_win_resize(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("TtyWinResize"))
    }

    pub async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            force,
            ..Default::default()
        };
        self.inner
            .remove_container(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("RemoveContainer"))
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse, AgentError> {
        let req = StatsContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.inner
            .stats_container(self.ctx(), &req)
            .await
            .map_err(rpc("StatsContainer"))
    }

    /// Applies OCI `LinuxResources` (JSON) to a running container.
    pub async fn update_container(&self, id: &str, resources: &[u8]) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: id.into(),
            resources: resources.to_vec(),
            ..Default::default()
        };
        self.inner
            .update_container(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("UpdateContainer"))
    }

    pub async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        let req = PauseContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.inner
            .pause_container(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("PauseContainer"))
    }

    pub async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        let req = ResumeContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.inner
            .resume_container(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("ResumeContainer"))
    }

    /// Waits up to `wait` for a container to hit an OOM kill; returns its id.
    pub async fn oom_event(&self, wait: Duration) -> Result<Option<String>, AgentError> {
        let req = GetOOMEventRequest {
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            ..Default::default()
        };
        let r = self
            .inner
            .get_oom_event(self.ctx_with_extra(wait), &req)
            .await
            .map_err(rpc("GetOOMEvent"))?;
        Ok((!r.container_id.is_empty()).then_some(r.container_id))
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ListProcessesRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.inner
            .list_processes(self.ctx(), &req)
            .await
            .map(|r| r.pids)
            .map_err(rpc("ListProcesses"))
    }
}

fn read_req(id: &str, exec_id: &str, wait: Duration) -> ReadStreamRequest {
    ReadStreamRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        max_bytes: 64 * 1024,
        wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
        ..Default::default()
    }
}

fn stream_chunk(r: ReadStreamResponse) -> Option<Vec<u8>> {
    if r.eof && r.data.is_empty() {
        None
    } else {
        Some(r.data)
    }
}
