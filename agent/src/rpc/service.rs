//! The agent API's implementation: one method per RPC, each a thin mapping
//! between protocol messages and the guest facts ([`crate::guest_info`]) or
//! the container runtime ([`crate::container`]), whose errors carry their
//! ttrpc status code.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use husk_protocol::{
    agent::{
        health_response, CloseStdinRequest, CloseStdinResponse, CpuStats, CreateContainerRequest,
        CreateContainerResponse, CreateSandboxRequest, CreateSandboxResponse, ExecProcessRequest,
        ExecProcessResponse, GetOOMEventRequest, GetOOMEventResponse, GuestDetailsRequest,
        GuestDetailsResponse, HealthRequest, HealthResponse, IoStats, ListProcessesRequest,
        ListProcessesResponse, MemoryStats, PauseContainerRequest, PauseContainerResponse,
        PidsStats, ReadStreamRequest, ReadStreamResponse, RemoveContainerRequest,
        RemoveContainerResponse, RemoveProcessRequest, RemoveProcessResponse,
        ResumeContainerRequest, ResumeContainerResponse, ShutdownRequest, ShutdownResponse,
        SignalProcessRequest, SignalProcessResponse, StartContainerRequest, StartContainerResponse,
        StatsContainerRequest, StatsContainerResponse, TtyWinResizeRequest, TtyWinResizeResponse,
        UpdateContainerRequest, UpdateContainerResponse, UpdateInterfaceRequest,
        UpdateInterfaceResponse, UpdateRoutesRequest, UpdateRoutesResponse, VersionRequest,
        VersionResponse, WaitProcessRequest, WaitProcessResponse, WriteStdinRequest,
        WriteStdinResponse,
    },
    agent_ttrpc::AgentService,
    API_VERSION,
};
use ttrpc::r#async::TtrpcContext;

use crate::{
    clock::{self, BootStamps},
    container::{
        error::Error as RuntimeError,
        sandbox::SandboxConfig,
        stdio::{MAX_READ_BYTES, MAX_READ_WAIT},
        Runtime,
    },
    guest_info::{self, GuestInfoError, KernelInfo, MemInfo},
    network::{self, NetError},
    reaper::ExitStatus,
    shutdown,
};

pub struct Service {
    stamps: BootStamps,
    shutdown: shutdown::Requester,
    runtime: Arc<Runtime>,
}

/// Logs a failed call (the shim sees only the status) and converts it.
fn fail(call: &str, e: RuntimeError) -> ttrpc::Error {
    match e {
        RuntimeError::Internal(_) | RuntimeError::DeadlineExceeded(_) => {
            tracing::warn!("{call}: {e}")
        }
        _ => tracing::debug!("{call}: {e}"),
    }
    e.into()
}

/// A client's wait in ms; 0 (unset) and anything over the cap get the cap.
fn wait_of(ms: u32) -> Duration {
    match ms {
        0 => MAX_READ_WAIT,
        ms => Duration::from_millis(ms.into()).min(MAX_READ_WAIT),
    }
}

impl Service {
    pub fn new(stamps: BootStamps, shutdown: shutdown::Requester, runtime: Arc<Runtime>) -> Self {
        Self {
            stamps,
            shutdown,
            runtime,
        }
    }

    async fn read_stream(
        &self,
        call: &str,
        req: ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let max = match req.max_bytes {
            0 => MAX_READ_BYTES,
            n => n as usize,
        };
        let chunk = self
            .runtime
            .read_output(
                &req.container_id,
                &req.exec_id,
                stderr,
                max,
                wait_of(req.wait_ms),
            )
            .await
            .map_err(|e| fail(call, e))?;
        Ok(ReadStreamResponse {
            data: chunk.data,
            eof: chunk.eof,
            ..Default::default()
        })
    }

    fn guest_details(&self) -> Result<GuestDetailsResponse, GuestInfoError> {
        // procfs and sysfs reads are served from kernel memory and never
        // block on a disk, so they run inline rather than on a blocking pool.
        let kernel = KernelInfo::read()?;
        let mem = MemInfo::read()?;
        Ok(GuestDetailsResponse {
            kernel_release: kernel.release,
            kernel_version: kernel.version,
            machine: kernel.machine,
            cpus: guest_info::online_cpus()?,
            memory_total_bytes: mem.total_bytes,
            memory_available_bytes: mem.available_bytes,
            init_started_ns: self.stamps.init_started_ns,
            agent_ready_ns: self.stamps.agent_ready_ns,
            uptime_ns: clock::boottime_ns(),
            ..Default::default()
        })
    }
}

fn net_fail(call: &str, e: NetError) -> ttrpc::Error {
    let code = match &e {
        NetError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        NetError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
        NetError::Sys { .. } => ttrpc::Code::INTERNAL,
    };
    tracing::warn!("{call}: {e}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

impl Service {
    /// Network calls change the machine's interfaces: only PID 1 in a guest
    /// may make them, never an agent run on a host for tests.
    fn guest_only(&self, call: &str) -> ttrpc::Result<()> {
        if self.runtime.config().guest {
            Ok(())
        } else {
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "{call}: this agent is not a guest's init; it leaves the host's network alone"
                ),
            )))
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, e.to_string()))
}

#[async_trait]
impl AgentService for Service {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: HealthRequest,
    ) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            status: health_response::Status::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        self.guest_details().map_err(|e| {
            tracing::warn!("GetGuestDetails: {e}");
            internal(e)
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        tracing::info!("shutdown requested over RPC");
        // Acted on after shutdown::GRACE, once this reply has been sent.
        self.shutdown.request(shutdown::Reason::Rpc);
        Ok(ShutdownResponse::default())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        let cfg = SandboxConfig {
            hostname: req.hostname,
            dns: req.dns,
            share_tag: req.share_tag,
            share_mount_point: req.share_mount_point,
        };
        self.runtime
            .create_sandbox(&cfg)
            .map_err(|e| fail("CreateSandbox", e))?;
        Ok(CreateSandboxResponse::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let pid = self
            .runtime
            .create_container(&req.container_id, &req.oci_spec, &req.rootfs, req.terminal)
            .await
            .map_err(|e| fail("CreateContainer", e))?;
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        self.runtime
            .start_container(&req.container_id)
            .await
            .map_err(|e| fail("StartContainer", e))?;
        Ok(StartContainerResponse::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let pid = self
            .runtime
            .exec_process(&req.container_id, &req.exec_id, &req.process, req.terminal)
            .await
            .map_err(|e| fail("ExecProcess", e))?;
        Ok(ExecProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        self.runtime
            .signal_process(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(|e| fail("SignalProcess", e))?;
        Ok(SignalProcessResponse::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let (pid, status) = self
            .runtime
            .wait_process(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| fail("WaitProcess", e))?;
        let (signal, core_dumped) = match status {
            ExitStatus::Exited(_) => (0, false),
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => (signal as u32, core_dumped),
        };
        Ok(WaitProcessResponse {
            exit_status: status.code(),
            signal,
            core_dumped,
            pid: pid.as_raw() as u32,
            ..Default::default()
        })
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveProcessRequest,
    ) -> ttrpc::Result<RemoveProcessResponse> {
        self.runtime
            .remove_process(&req.container_id, &req.exec_id)
            .map_err(|e| fail("RemoveProcess", e))?;
        Ok(RemoveProcessResponse::default())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        let p = self
            .runtime
            .process(&req.container_id, &req.exec_id)
            .map_err(|e| fail("WriteStdin", e))?;
        let written =
            p.io.write_stdin(&req.data)
                .await
                .map_err(|e| fail("WriteStdin", e))?;
        Ok(WriteStdinResponse {
            written: written as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        let p = self
            .runtime
            .process(&req.container_id, &req.exec_id)
            .map_err(|e| fail("CloseStdin", e))?;
        p.io.close_stdin()
            .await
            .map_err(|e| fail("CloseStdin", e))?;
        Ok(CloseStdinResponse::default())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream("ReadStdout", req, false).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream("ReadStderr", req, true).await
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<TtyWinResizeResponse> {
        let p = self
            .runtime
            .process(&req.container_id, &req.exec_id)
            .map_err(|e| fail("TtyWinResize", e))?;
        p.io.resize(req.rows, req.columns)
            .map_err(|e| fail("TtyWinResize", e))?;
        Ok(TtyWinResizeResponse::default())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        self.runtime
            .remove_container(&req.container_id, req.force)
            .await
            .map_err(|e| fail("RemoveContainer", e))?;
        Ok(RemoveContainerResponse::default())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let s = self
            .runtime
            .stats(&req.container_id)
            .map_err(|e| fail("StatsContainer", e))?;
        Ok(StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_ns: s.cpu_usage_ns,
                user_ns: s.cpu_user_ns,
                system_ns: s.cpu_system_ns,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage_bytes: s.memory_usage_bytes,
                limit_bytes: s.memory_limit_bytes,
                max_usage_bytes: s.memory_max_usage_bytes,
                oom_kill_count: s.oom_kill_count,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            })
            .into(),
            io: Some(IoStats {
                read_bytes: s.io_read_bytes,
                write_bytes: s.io_write_bytes,
                ..Default::default()
            })
            .into(),
            unavailable: s.unavailable,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        self.runtime
            .update(&req.container_id, &req.resources)
            .map_err(|e| fail("UpdateContainer", e))?;
        Ok(UpdateContainerResponse::default())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        self.runtime
            .pause(&req.container_id)
            .await
            .map_err(|e| fail("PauseContainer", e))?;
        Ok(PauseContainerResponse::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        self.runtime
            .resume(&req.container_id)
            .await
            .map_err(|e| fail("ResumeContainer", e))?;
        Ok(ResumeContainerResponse::default())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        req: GetOOMEventRequest,
    ) -> ttrpc::Result<GetOOMEventResponse> {
        let id = self.runtime.oom_event(wait_of(req.wait_ms)).await;
        Ok(GetOOMEventResponse {
            container_id: id.unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self
            .runtime
            .list_processes(&req.container_id)
            .map_err(|e| fail("ListProcesses", e))?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<UpdateInterfaceResponse> {
        self.guest_only("UpdateInterface")?;
        let mac = network::parse_mac(&req.mac).map_err(|e| net_fail("UpdateInterface", e))?;
        let addrs = req
            .addresses
            .iter()
            .map(|a| network::IfAddr::parse(&a.address, a.prefix_len))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| net_fail("UpdateInterface", e))?;
        // ioctls: quick, but syscalls all the same; keep them off the
        // reactor threads.
        let name =
            tokio::task::spawn_blocking(move || network::update_interface(mac, &addrs, req.mtu))
                .await
                .map_err(internal)?
                .map_err(|e| net_fail("UpdateInterface", e))?;
        Ok(UpdateInterfaceResponse {
            name,
            ..Default::default()
        })
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<UpdateRoutesResponse> {
        self.guest_only("UpdateRoutes")?;
        let routes = req
            .routes
            .iter()
            .map(|r| network::RouteSpec::parse(&r.destination, &r.gateway, &r.device, &r.source))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| net_fail("UpdateRoutes", e))?;
        tokio::task::spawn_blocking(move || network::update_routes(&routes))
            .await
            .map_err(internal)?
            .map_err(|e| net_fail("UpdateRoutes", e))?;
        Ok(UpdateRoutesResponse::default())
    }
}
