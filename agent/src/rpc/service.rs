//! The agent API's implementation: one method per RPC, each a thin mapping
//! from the guest facts (see [`crate::guest_info`]) to protocol messages.
//! Container calls join this impl as the container runtime lands.

use async_trait::async_trait;
use husk_protocol::{
    agent::{
        health_response, GuestDetailsRequest, GuestDetailsResponse, HealthRequest, HealthResponse,
        ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse,
    },
    agent_ttrpc::AgentService,
    API_VERSION,
};
use ttrpc::r#async::TtrpcContext;

use crate::{
    clock::{self, BootStamps},
    guest_info::{self, GuestInfoError, KernelInfo, MemInfo},
    shutdown,
};

pub struct Service {
    stamps: BootStamps,
    shutdown: shutdown::Requester,
}

impl Service {
    pub fn new(stamps: BootStamps, shutdown: shutdown::Requester) -> Self {
        Self { stamps, shutdown }
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
}
