//! Turning the shim's errors into the ttrpc statuses containerd maps to its
//! own error kinds (NotFound, AlreadyExists, FailedPrecondition, ...).

use std::fmt::Display;

use ttrpc::Code;

use crate::agent_client::AgentError;

pub type Result<T> = std::result::Result<T, ttrpc::Error>;

pub fn status(code: Code, msg: impl Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

pub fn invalid(msg: impl Display) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, msg)
}

pub fn not_found(msg: impl Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, msg)
}

pub fn precondition(msg: impl Display) -> ttrpc::Error {
    status(Code::FAILED_PRECONDITION, msg)
}

pub fn internal(msg: impl Display) -> ttrpc::Error {
    status(Code::INTERNAL, msg)
}

/// Keeps the agent's own status code (NOT_FOUND stays NOT_FOUND), with a
/// message that names the agent call.
pub fn agent(e: AgentError) -> ttrpc::Error {
    let code = e.code().unwrap_or(Code::UNAVAILABLE);
    status(code, e)
}
