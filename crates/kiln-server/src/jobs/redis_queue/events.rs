//! Job events between processes over Redis pub/sub: a worker's progress
//! reaches the front that streams it, a front's cancellation reaches the
//! worker. Pub/sub loses messages while a subscriber reconnects, so nothing
//! depends on it alone: waiters also poll the job, and workers see a
//! cancellation in their heartbeat.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::super::JobEvent;
use super::super::backend::RemoteEvent;

/// An event as published.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Message {
    /// The publishing process (it ignores its own messages).
    origin: String,
    id: String,
    #[serde(flatten)]
    event: Wire,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Wire {
    Started,
    Progress { step: usize, total: usize },
    Log { line: String },
    Finished,
    Cancel,
}

impl From<&RemoteEvent> for Wire {
    fn from(event: &RemoteEvent) -> Wire {
        match event {
            RemoteEvent::Cancel => Wire::Cancel,
            RemoteEvent::Job(JobEvent::Started) => Wire::Started,
            RemoteEvent::Job(JobEvent::Progress { step, total }) => Wire::Progress {
                step: *step,
                total: *total,
            },
            RemoteEvent::Job(JobEvent::Log(line)) => Wire::Log { line: line.clone() },
            RemoteEvent::Job(JobEvent::Finished) => Wire::Finished,
        }
    }
}

impl From<Wire> for RemoteEvent {
    fn from(wire: Wire) -> RemoteEvent {
        match wire {
            Wire::Cancel => RemoteEvent::Cancel,
            Wire::Started => RemoteEvent::Job(JobEvent::Started),
            Wire::Progress { step, total } => RemoteEvent::Job(JobEvent::Progress { step, total }),
            Wire::Log { line } => RemoteEvent::Job(JobEvent::Log(line)),
            Wire::Finished => RemoteEvent::Job(JobEvent::Finished),
        }
    }
}

/// Publish this process's events, in order, until the job system is dropped.
pub(super) async fn publish(
    mut connection: ConnectionManager,
    channel: String,
    origin: String,
    mut outgoing: mpsc::UnboundedReceiver<(String, RemoteEvent)>,
) {
    while let Some((id, event)) = outgoing.recv().await {
        let message = Message {
            origin: origin.clone(),
            id,
            event: Wire::from(&event),
        };
        let Ok(text) = serde_json::to_string(&message) else {
            continue;
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(text)
            .query_async(&mut connection)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "cannot publish a job event; waiters poll instead");
        }
    }
}

/// Deliver other processes' events, reconnecting whenever the subscription
/// drops.
pub(super) async fn subscribe(
    client: redis::Client,
    channel: String,
    origin: String,
    deliver: mpsc::UnboundedSender<(String, RemoteEvent)>,
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Ok(text) = message.get_payload::<String>() else {
                            continue;
                        };
                        let Ok(message) = serde_json::from_str::<Message>(&text) else {
                            continue;
                        };
                        if message.origin == origin {
                            continue;
                        }
                        if deliver.send((message.id, message.event.into())).is_err() {
                            return;
                        }
                    }
                    tracing::warn!("lost the job event subscription; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to job events"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot connect for job events"),
        }
        if deliver.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cross_the_wire_unchanged() {
        for event in [
            RemoteEvent::Cancel,
            RemoteEvent::Job(JobEvent::Started),
            RemoteEvent::Job(JobEvent::Progress { step: 3, total: 4 }),
            RemoteEvent::Job(JobEvent::Log("a line".into())),
            RemoteEvent::Job(JobEvent::Finished),
        ] {
            let message = Message {
                origin: "w".into(),
                id: "j".into(),
                event: Wire::from(&event),
            };
            let text = serde_json::to_string(&message).unwrap();
            let back: Message = serde_json::from_str(&text).unwrap();
            assert_eq!(RemoteEvent::from(back.event), event);
        }
    }
}
