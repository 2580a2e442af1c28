//! ttrpc client for husk-agent's API, reached over the VM's hybrid vsock.

use std::{path::Path, time::Duration};

use husk_protocol::{agent, agent_ttrpc::AgentServiceClient, AGENT_VSOCK_PORT};
use ttrpc::r#async::{transport::Socket, Client};

use crate::hybrid_vsock::{self, HybridVsockError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] HybridVsockError),
    #[error("agent call {call} failed: {source}")]
    Rpc {
        call: &'static str,
        source: ttrpc::Error,
    },
}

/// A connection to the agent. Each call carries its own deadline, so a hung
/// guest turns into an error instead of a hang.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient,
    call_timeout: Duration,
}

impl AgentClient {
    /// Connects to the agent's port through the hybrid vsock socket `uds`.
    pub async fn connect(uds: &Path, call_timeout: Duration) -> Result<Self, AgentError> {
        let stream = hybrid_vsock::connect(uds, AGENT_VSOCK_PORT, call_timeout).await?;
        let client = Client::new(Socket::new(stream));
        Ok(Self {
            inner: AgentServiceClient::new(client),
            call_timeout,
        })
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.call_timeout.as_nanos().min(i64::MAX as u128) as i64)
    }

    pub async fn health(&self) -> Result<agent::HealthResponse, AgentError> {
        self.inner
            .health(self.ctx(), &agent::HealthRequest::new())
            .await
            .map_err(|source| AgentError::Rpc {
                call: "Health",
                source,
            })
    }

    pub async fn version(&self) -> Result<agent::VersionResponse, AgentError> {
        self.inner
            .version(self.ctx(), &agent::VersionRequest::new())
            .await
            .map_err(|source| AgentError::Rpc {
                call: "Version",
                source,
            })
    }

    pub async fn guest_details(&self) -> Result<agent::GuestDetailsResponse, AgentError> {
        self.inner
            .get_guest_details(self.ctx(), &agent::GuestDetailsRequest::new())
            .await
            .map_err(|source| AgentError::Rpc {
                call: "GetGuestDetails",
                source,
            })
    }

    /// Asks the guest to power off. Returns once the agent acknowledged; the
    /// VM goes down shortly after.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.inner
            .shutdown(self.ctx(), &agent::ShutdownRequest::new())
            .await
            .map(|_| ())
            .map_err(|source| AgentError::Rpc {
                call: "Shutdown",
                source,
            })
    }
}
