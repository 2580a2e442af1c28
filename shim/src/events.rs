//! Task events to containerd (create, start, exit, exec added/started, OOM,
//! paused, resumed, delete), sent through containerd's ttrpc event service.
//!
//! One queue, one publishing task: events reach containerd in the order the
//! shim queued them (a process's TaskStart always before its TaskExit), and
//! queueing never waits, so no task call holds anything while containerd is
//! slow to take an event. Publishing never fails a task call: an event that
//! cannot be delivered is logged, as containerd also learns the outcome from
//! the call's reply. The queue is unbounded: its producers are the shim's own
//! calls, and the guest-driven one (OOM) is rate-limited and filtered.

use containerd_shim::{event::Event, publisher::RemotePublisher, Context};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::mpsc;
use tracing::{debug, warn};

type Queued = (String, Box<dyn Event>);

#[derive(Clone)]
pub struct Events {
    queue: Option<mpsc::UnboundedSender<Queued>>,
}

impl Events {
    /// Starts the publishing task (on the current tokio runtime).
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        let namespace = namespace.to_string();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                debug!(%topic, "publishing event");
                if let Err(e) = publisher
                    .publish(Context::default(), &topic, &namespace, event)
                    .await
                {
                    warn!(%topic, "publishing event: {e}");
                }
            }
        });
        Self { queue: Some(tx) }
    }

    /// Drops every event (unit tests, or no containerd to talk to).
    pub fn disabled() -> Self {
        Self { queue: None }
    }

    /// A queue whose events the caller reads (tests).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { queue: Some(tx) }, rx)
    }

    /// Queues `event` behind every event queued before it.
    pub fn send<E: Event + 'static>(&self, event: E) {
        let Some(q) = &self.queue else {
            return;
        };
        let topic = event.topic();
        if q.send((topic.clone(), Box::new(event))).is_err() {
            warn!(%topic, "event queue closed; event dropped");
        }
    }
}

pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}
