//! Forwards the guest's OOM kills to containerd as TaskOOM events.
//!
//! The container id comes from the guest: only ids of this pod's containers
//! are forwarded (a guest must not fake events for another pod's container),
//! and at most a few a second.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::Duration,
};

use containerd_shim_protos::events::task::TaskOOM;
use husk_bounds::RateLimit;
use tracing::debug;

use crate::{agent_client::AgentClient, events::Events};

const POLL: Duration = Duration::from_secs(30);

/// The ids of the pod's containers, as the shim created them.
#[derive(Clone, Default)]
pub struct KnownContainers(Arc<RwLock<HashSet<String>>>);

impl KnownContainers {
    pub fn insert(&self, id: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }

    pub fn remove(&self, id: &str) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// Runs until aborted (the sandbox going down aborts it).
pub async fn forward(agent: AgentClient, events: Events, known: KnownContainers) {
    let limit = RateLimit::new(5, 20);
    loop {
        match agent.oom_event(POLL).await {
            Ok(Some(container_id)) => {
                if !known.contains(&container_id) {
                    husk_bounds::ratelimited!(
                        warn,
                        "the guest reported an OOM kill for unknown container {:?}; dropped",
                        container_id.chars().take(80).collect::<String>()
                    );
                    continue;
                }
                if limit.admit().is_none() {
                    husk_bounds::ratelimited!(warn, "OOM events over 5/s from the guest; dropped");
                    continue;
                }
                events.send(TaskOOM {
                    container_id,
                    ..Default::default()
                })
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
