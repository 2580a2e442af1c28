//! ttrpc client for husk-agent's API, reached over the VM's hybrid vsock.
//! The guest side of the pod ([`containers`]: the container calls).

mod containers;
mod network;

pub use containers::ExitStatus;
pub use network::GuestRoute;

use std::{path::Path, time::Duration};

use husk_protocol::{agent, agent_ttrpc::AgentServiceClient, AGENT_VSOCK_PORT};
use ttrpc::r#async::{transport::Socket, Client};

use crate::hybrid_vsock::{self, HybridVsockError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] HybridVsockError),
    #[error("agent call {call} failed: {}", describe(source))]
    Rpc {
        call: &'static str,
        source: ttrpc::Error,
    },
}

impl AgentError {
    /// The ttrpc status code the agent answered with, if it answered.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => s.code.enum_value().ok(),
            _ => None,
        }
    }
}

/// The agent's own message for status errors, rather than ttrpc's debug dump.
fn describe(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            format!("{:?}: {}", s.code.enum_value_or_default(), s.message)
        }
        other => other.to_string(),
    }
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

    /// The same connection with another per-call deadline.
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    fn ctx(&self) -> ttrpc::context::Context {
        self.ctx_with_extra(Duration::ZERO)
    }

    /// A deadline for calls that may wait in the agent (long polls).
    fn ctx_with_extra(&self, extra: Duration) -> ttrpc::context::Context {
        let t = self.call_timeout + extra;
        ttrpc::context::with_timeout(t.as_nanos().min(i64::MAX as u128) as i64)
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
