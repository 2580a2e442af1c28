//! The control API on a Unix socket.
//!
//! The protocol is line-based JSON, chosen because a shell (`socat`, `nc -U`) and the shim
//! can both speak it without an HTTP stack: the client writes one request object per line and
//! reads one response object per line, on a connection it may keep open.
//!
//! ```text
//! -> {"action":"state"}
//! <- {"ok":true,"state":"running"}
//! -> {"action":"pause"}
//! <- {"ok":true,"state":"paused"}
//! -> {"action":"resume"}
//! <- {"ok":true,"state":"running"}
//! -> {"action":"shutdown"}
//! <- {"ok":true,"state":"stopping"}        (then husk-vmm exits with status 0)
//! -> {"action":"reboot"}
//! <- {"ok":false,"error":"unknown action \"reboot\""}
//! ```

use serde::{Deserialize, Serialize};

/// Longest request line we accept; anything longer closes the connection.
pub const MAX_REQUEST_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    State,
    Pause,
    Resume,
    Shutdown,
}

#[derive(Debug, Deserialize)]
struct RawRequest {
    action: String,
}

/// VM states the API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn state(state: VmState) -> Self {
        Response {
            ok: true,
            state: Some(state),
            error: None,
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            state: None,
            error: Some(msg.into()),
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing this struct cannot fail; fall back to a fixed error line regardless.
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"internal"}"#.to_vec());
        line.push(b'\n');
        line
    }
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Action, String> {
    let raw: RawRequest = serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
    match raw.action.as_str() {
        "state" => Ok(Action::State),
        "pause" => Ok(Action::Pause),
        "resume" => Ok(Action::Resume),
        "shutdown" => Ok(Action::Shutdown),
        other => Err(format!("unknown action {other:?}")),
    }
}

/// A request line grew past [`MAX_REQUEST_LEN`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("request line longer than {MAX_REQUEST_LEN} bytes")]
pub struct LineTooLong;

/// A connection's unread bytes, split into lines.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes; returns complete lines, or `Err` if a line grew past the limit.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, LineTooLong> {
        self.buf.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !line.is_empty() {
                lines.push(line);
            }
        }
        if self.buf.len() > MAX_REQUEST_LEN {
            return Err(LineTooLong);
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses() {
        assert_eq!(parse_request(br#"{"action":"pause"}"#), Ok(Action::Pause));
        assert_eq!(
            parse_request(br#"{"action":"state","x":1}"#),
            Ok(Action::State)
        );
        assert!(parse_request(br#"{"action":"reboot"}"#)
            .unwrap_err()
            .contains("unknown action"));
        assert!(parse_request(b"nonsense").is_err());
        assert_eq!(
            Response::state(VmState::Paused).to_line(),
            b"{\"ok\":true,\"state\":\"paused\"}\n".to_vec()
        );
        assert_eq!(
            Response::error("no").to_line(),
            b"{\"ok\":false,\"error\":\"no\"}\n".to_vec()
        );
    }

    #[test]
    fn line_buffer_splits_and_limits() {
        let mut lb = LineBuffer::default();
        assert_eq!(
            lb.push(b"{\"a\":1}\r\n{\"b\""),
            Ok(vec![b"{\"a\":1}".to_vec()])
        );
        assert_eq!(lb.push(b":2}\n\n"), Ok(vec![b"{\"b\":2}".to_vec()]));
        assert!(lb.push(&vec![b'x'; MAX_REQUEST_LEN + 1]).is_err());
    }
}
