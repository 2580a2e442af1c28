//! One process of a container (its init, or an exec) as the shim tracks it:
//! what containerd asked for, where it is in its life, and its exit.

use std::{sync::Arc, time::Duration};

use containerd_shim_protos::{
    events::task::TaskExit, protobuf::well_known_types::timestamp::Timestamp,
};
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::{
    agent_client::AgentClient,
    events::{self, Events},
    io::{ProcessIo, StdioSpec},
};

/// How long output may keep flowing after the process exited (a child it
/// left behind holding stdout) before containerd's streams are closed.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Exit {
    pub code: u32,
    pub at: Timestamp,
}

pub struct Process {
    pub exec_id: String,
    pub stdio: StdioSpec,
    /// OCI process JSON of an exec; `None` for the init process.
    pub exec_spec: Option<Vec<u8>>,
    /// Pid inside the guest, once the agent created or started it.
    pub guest_pid: u32,
    pub started: bool,
    /// A start is under way (the agent call in flight): a second is refused.
    pub starting: bool,
    pub io: Option<Arc<Mutex<ProcessIo>>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioSpec, exec_spec: Option<Vec<u8>>) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            guest_pid: 0,
            started: false,
            starting: false,
            io: None,
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    pub fn exited(&self) -> bool {
        self.exit_tx.borrow().is_some()
    }

    pub fn running(&self) -> bool {
        self.started && !self.exited()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    /// Marks a process that never ran as gone (deleted before start).
    pub fn set_exit_if_unset(&self, code: u32) {
        self.exit_tx.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(Exit {
                    code,
                    at: events::now(),
                });
                true
            } else {
                false
            }
        });
    }

    /// Starts watching for the exit of a started process: waits in the
    /// agent, lets the output drain, then records the exit and tells
    /// containerd (TaskExit).
    pub fn watch_exit(
        &self,
        agent: AgentClient,
        container_id: &str,
        host_pid: u32,
        events: Events,
    ) {
        let tx = self.exit_tx.clone();
        let io = self.io.clone();
        let cid = container_id.to_string();
        let exec = self.exec_id.clone();
        tokio::spawn(async move {
            let code = match agent.wait_process(&cid, &exec).await {
                Ok(s) => s.code.max(0) as u32,
                Err(e) => {
                    // The VM or the agent went away: the process is gone too.
                    warn!(container = %cid, exec = %exec, "waiting for exit: {e}");
                    255
                }
            };
            if let Some(io) = io {
                io.lock().await.finish(OUTPUT_GRACE).await;
            }
            let at = events::now();
            info!(container = %cid, exec = %exec, code, "process exited");
            tx.send_replace(Some(Exit {
                code,
                at: at.clone(),
            }));
            events.send(TaskExit {
                container_id: cid.clone(),
                id: if exec.is_empty() { cid } else { exec },
                pid: host_pid,
                exit_status: code,
                exited_at: Some(at).into(),
                ..Default::default()
            });
        });
    }
}
