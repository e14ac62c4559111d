//! How requests reach an engine thread, shared by every engine: a submission
//! (the request, its event sender, its abort handle, when it came), the
//! channel it travels on, and the counters `health` reads.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{
    AbortHandle, EngineHealth, GenerationEvent, GenerationRequest, GenerationStream,
};
use crate::error::TextGenError;

/// A request on its way to (or inside) an engine thread.
pub(crate) struct Submission {
    pub(crate) request: GenerationRequest,
    pub(crate) events: UnboundedSender<GenerationEvent>,
    pub(crate) abort: AbortHandle,
    pub(crate) submitted: Instant,
}

/// What an engine thread counts, read by `health`.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) running: AtomicUsize,
    pub(crate) waiting: AtomicUsize,
    pub(crate) generated: AtomicU64,
    pub(crate) aborted: AtomicU64,
}

impl Counters {
    pub(crate) fn health(&self, capacity: usize) -> EngineHealth {
        EngineHealth {
            running: self.running.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
            capacity,
            generated_tokens: self.generated.load(Ordering::SeqCst),
            aborted: self.aborted.load(Ordering::SeqCst),
        }
    }
}

/// The sending end of an engine thread's channel.
pub(crate) struct Inbox(Mutex<mpsc::Sender<Submission>>);

impl Inbox {
    /// A new channel: the inbox, and the receiver the engine thread reads.
    pub(crate) fn new() -> (Inbox, mpsc::Receiver<Submission>) {
        let (sender, receiver) = mpsc::channel();
        (Inbox(Mutex::new(sender)), receiver)
    }

    /// Send `request` (already validated) to the engine, counted as waiting;
    /// its events arrive on the returned stream.
    pub(crate) fn submit(
        &self,
        request: GenerationRequest,
        counters: &Counters,
    ) -> Result<GenerationStream, TextGenError> {
        let (events, abort, stream) = GenerationStream::channel();
        let submission = Submission {
            request,
            events,
            abort,
            submitted: Instant::now(),
        };
        counters.waiting.fetch_add(1, Ordering::SeqCst);
        let sent = self
            .0
            .lock()
            .map_err(|_| TextGenError::Unavailable)?
            .send(submission);
        if sent.is_err() {
            counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(TextGenError::Unavailable);
        }
        Ok(stream)
    }
}
