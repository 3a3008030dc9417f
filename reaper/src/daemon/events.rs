//! The live event stream behind `watch`: every audit line (grants,
//! extends, revokes, kills), and the refusals and reloads, offered to the
//! watchers that follow it. Publishing never waits: a watcher that falls
//! more than `CAPACITY` events behind is dropped (told so, then closed),
//! and the daemon goes on at its own pace.

#![forbid(unsafe_code)]

use std::sync::Arc;

use tokio::sync::broadcast;

use super::core::model::EventScope;

/// Events a watcher may lag behind before it is dropped.
pub const CAPACITY: usize = 4096;

/// One event: whom it concerns (for the filters) and its JSON line.
#[derive(Debug)]
pub struct Event {
    pub scope: EventScope,
    pub line: String,
}

#[derive(Debug, Clone)]
pub struct EventBus(broadcast::Sender<Arc<Event>>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(broadcast::channel(CAPACITY).0)
    }
}

impl EventBus {
    /// Whether anyone is watching (events nobody follows are not built).
    pub fn watched(&self) -> bool {
        self.0.receiver_count() > 0
    }

    pub fn publish(&self, scope: EventScope, line: String) {
        if self.watched() {
            let _ = self.0.send(Arc::new(Event { scope, line }));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.0.subscribe()
    }
}
