//! The in-memory companion of a queued or running job: its cancellation flag,
//! progress events, `/stream` cursor, webhook channel, and a watch channel that
//! wakes anyone waiting on it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokio::sync::watch;

/// An event in a running job's life, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Started,
    Progress {
        step: usize,
        total: usize,
    },
    /// A line for the prediction's logs (e.g. input fields Cog strips).
    Log(String),
    Finished,
}

/// In-memory companion of a queued or running job: cancellation flag, progress
/// events, and a channel that wakes anyone waiting on it.
pub struct LiveJob {
    pub(super) cancelled: AtomicBool,
    events: Mutex<Vec<JobEvent>>,
    /// How many events `/stream` has handed out.
    streamed: Mutex<usize>,
    changed: watch::Sender<u64>,
    pub(super) last_webhook: Mutex<Option<std::time::Instant>>,
    pub(super) webhook_channel: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(Value, bool)>>>,
    /// When the job's final event was pushed (the companion is dropped a
    /// while later where the store does not expire jobs here).
    finished_at: std::sync::OnceLock<std::time::Instant>,
    created_at: std::time::Instant,
}

impl LiveJob {
    pub(super) fn new() -> Self {
        LiveJob {
            cancelled: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            streamed: Mutex::new(0),
            changed: watch::Sender::new(0),
            last_webhook: Mutex::new(None),
            webhook_channel: Mutex::new(None),
            finished_at: std::sync::OnceLock::new(),
            created_at: std::time::Instant::now(),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Whether the job has reached a final state.
    pub fn is_finished(&self) -> bool {
        self.events
            .lock()
            .map(|e| e.contains(&JobEvent::Finished))
            .unwrap_or(true)
    }

    pub(crate) fn push(&self, event: JobEvent) {
        if event == JobEvent::Finished {
            let _ = self.finished_at.set(std::time::Instant::now());
        }
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// How long this companion has existed.
    pub fn age(&self) -> std::time::Duration {
        self.created_at.elapsed()
    }

    /// How long ago the job finished, if it has.
    pub fn finished_for(&self) -> Option<std::time::Duration> {
        self.finished_at.get().map(|at| at.elapsed())
    }

    /// Events so far.
    pub fn events(&self) -> Vec<JobEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Events not yet handed to a `/stream` reader, marking them read.
    pub fn take_unstreamed(&self) -> Vec<JobEvent> {
        let events = self.events();
        match self.streamed.lock() {
            Ok(mut streamed) => {
                let fresh = events.get(*streamed..).unwrap_or_default().to_vec();
                *streamed = events.len();
                fresh
            }
            Err(_) => Vec::new(),
        }
    }

    /// A receiver that wakes on every event.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
