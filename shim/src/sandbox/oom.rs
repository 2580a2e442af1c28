//! Forwards the guest's OOM kills to containerd as TaskOOM events.

use std::time::Duration;

use containerd_shim_protos::events::task::TaskOOM;
use tracing::debug;

use crate::{agent_client::AgentClient, events::Events};

const POLL: Duration = Duration::from_secs(30);

/// Runs until aborted (the sandbox going down aborts it).
pub async fn forward(agent: AgentClient, events: Events) {
    loop {
        match agent.oom_event(POLL).await {
            Ok(Some(container_id)) => {
                events
                    .send(TaskOOM {
                        container_id,
                        ..Default::default()
                    })
                    .await
            }
            Ok(None) => {}
            Err(e) => {
                if e.code() == Some(ttrpc::Code::UNIMPLEMENTED) {
                    debug!("the agent has no OOM events: {e}");
                    return;
                }
                // The VM going down ends the connection; back off until
                // the sandbox aborts this task.
                debug!("waiting for OOM events: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
