//! Task events to containerd (create, start, exit, exec added/started, OOM,
//! paused, resumed, delete), sent through containerd's ttrpc event service.
//!
//! Publishing never fails a task call: an event that cannot be queued is
//! logged, as containerd also learns the outcome from the call's reply.

use std::sync::Arc;

use containerd_shim::{event::Event, publisher::RemotePublisher, Context};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tracing::{debug, warn};

#[derive(Clone)]
pub struct Events {
    publisher: Option<Arc<RemotePublisher>>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher: Some(Arc::new(publisher)),
            namespace: namespace.to_string(),
        }
    }

    /// Drops every event (unit tests, or no containerd to talk to).
    pub fn disabled() -> Self {
        Self {
            publisher: None,
            namespace: String::new(),
        }
    }

    pub async fn send<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        let Some(p) = &self.publisher else {
            return;
        };
        debug!(%topic, "publishing event");
        if let Err(e) = p
            .publish(Context::default(), &topic, &self.namespace, Box::new(event))
            .await
        {
            warn!(%topic, "publishing event: {e}");
        }
    }
}

pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}
