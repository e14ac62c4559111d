//! A model's worker: takes the next queued job, leases the model (loading it if it
//! was unloaded), runs the pipeline off the async executor with per-step progress,
//! stops it on cancellation or timeout, and records the final state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_pipelines::{PipelineError, Progress};
use serde_json::Value;

use super::backend::{Claim, Ending};
use super::{InputProblem, Job, JobError, JobEvent, JobStatus, LiveJob, now_ms};
use crate::error::ApiError;
use crate::protocols::{prediction_json, request_from_json};
use crate::state::{AppState, ServedModel};

/// The longest execution timeout honoured (a week); longer means "a week".
const MAX_EXECUTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// How a job ended.
struct Outcome {
    status: JobStatus,
    output: Option<Value>,
    error: Option<JobError>,
}

impl Outcome {
    fn failed(message: impl Into<String>) -> Self {
        Outcome {
            status: JobStatus::Failed,
            output: None,
            error: Some(JobError::Failed {
                message: message.into(),
            }),
        }
    }
}

/// How long one wait for a job lasts before the worker checks for shutdown.
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Serve `model`'s queue until shutdown.
pub(super) async fn run(state: Arc<AppState>, model: Arc<ServedModel>) {
    loop {
        if state.jobs.is_draining() {
            return;
        }
        state.jobs.claiming.fetch_add(1, Ordering::SeqCst);
        let claimed = state.jobs.backend.claim_next(&model.name, CLAIM_WAIT).await;
        if let Ok(Some(claim)) = &claimed {
            super::lock(&state.jobs.running).insert(claim.id.clone(), claim.clone());
        }
        state.jobs.claiming.fetch_sub(1, Ordering::SeqCst);
        let claim = match claimed {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                state.jobs.drained.notify_waiters();
                continue;
            }
            Err(e) => {
                state.jobs.drained.notify_waiters();
                tracing::error!(model = %model.name, error = %e, "cannot take a job; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let id = claim.id.clone();
        if state.jobs.is_draining() {
            // Shutdown began while this job was being taken: give it back.
            if let Err(e) = state.jobs.backend.hand_back(&claim).await {
                tracing::error!(job_id = %id, error = %e, "cannot hand a job back; another worker takes it after the visibility timeout");
            }
            super::lock(&state.jobs.running).remove(&id);
            state.jobs.drained.notify_waiters();
            return;
        }
        let running = std::panic::AssertUnwindSafe(run_one(&state, &model, &claim));
        if futures_util::FutureExt::catch_unwind(running)
            .await
            .is_err()
        {
            tracing::error!(job_id = %id, model = %model.name, "the worker panicked running this job");
            state
                .jobs
                .fail(&id, "internal error: the worker panicked".into())
                .await;
        }
        super::lock(&state.jobs.running).remove(&id);
        state.jobs.drained.notify_waiters();
    }
}

/// Renew the claim while the job runs; when it is lost (cancelled elsewhere,
/// or taken over after a missed visibility timeout) stop the computation.
fn keep_alive(state: &Arc<AppState>, claim: &Claim, live: &Arc<LiveJob>) -> Option<AbortOnDrop> {
    let every = state.jobs.backend.heartbeat_interval()?;
    let state = Arc::clone(state);
    let claim = claim.clone();
    let live = Arc::clone(live);
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match state.jobs.backend.heartbeat(&claim).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(job_id = %claim.id, "job ended elsewhere or was taken over; stopping it");
                    live.cancelled.store(true, Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = %claim.id, error = %e, "cannot renew a job's claim; retrying")
                }
            }
        }
    });
    Some(AbortOnDrop(task))
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Progress as Cog-style log lines.
pub fn progress_logs(events: &[JobEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, total } => Some(format!("step {step}/{total}\n")),
            JobEvent::Log(line) => Some(format!("{line}\n")),
            _ => None,
        })
        .collect()
}

async fn run_one(state: &Arc<AppState>, model: &Arc<ServedModel>, claim: &Claim) {
    let jobs = &state.jobs;
    let id = claim.id.as_str();
    let job = match jobs.get(id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            jobs.fail(id, format!("internal error: cannot read the job: {e}"))
                .await;
            return;
        }
    };
    let live = jobs.track_run(id);
    let _heartbeat = keep_alive(state, claim, &live);
    jobs.emit(id, &live, JobEvent::Started);
    jobs.deliver_event(&job, "start");
    state
        .metrics
        .job_started(&model.name, job.delay_ms().max(0) as f64 / 1000.0);
    tracing::info!(job_id = id, model = %model.name, protocol = job.protocol.as_str(), "job started");

    let started = Instant::now();
    let outcome = if claim.exhausted {
        // Its workers died running it, again and again: it is the job.
        Outcome::failed(format!(
            "the job's worker stopped while running it {} times; it is not run again",
            job.retries
        ))
    } else {
        execute(state, model, &job, &live).await
    };
    let seconds = started.elapsed().as_secs_f64();

    let logs = progress_logs(&live.events());
    // One token for every attempt to write this outcome, so a retry after a
    // lost reply is known for the same ending.
    let token = uuid::Uuid::new_v4().to_string();
    // A result is only as durable as its write: retry a failing store briefly.
    let mut recorded = Err(super::StoreError::new("the result was never written"));
    for attempt in 0..5 {
        let now = now_ms();
        let ending = Ending {
            token: &token,
            model: &model.name,
            status: outcome.status,
            output: outcome.output.as_ref(),
            error: outcome.error.as_ref(),
            logs: &logs,
            now,
            expires_at: jobs.expiry(&job.options, now),
        };
        recorded = jobs.backend.finish(id, Some(claim), &ending).await;
        if recorded.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    match recorded {
        Ok(true) => {
            state
                .metrics
                .job_finished(&model.name, outcome.status.as_str(), seconds);
            match &outcome.error {
                None => tracing::info!(job_id = id, model = %model.name, seconds, "job completed"),
                Some(error) => {
                    tracing::warn!(job_id = id, model = %model.name, status = outcome.status.as_str(), %error, "job did not complete")
                }
            }
            jobs.emit(id, &live, JobEvent::Finished);
            if let Ok(Some(job)) = jobs.get(id).await {
                if job.status == JobStatus::Completed {
                    // As Cog does: the output arrives while the prediction is
                    // still "processing"; "completed" follows.
                    let producing = Job {
                        status: JobStatus::InProgress,
                        completed_at: None,
                        ..job.clone()
                    };
                    jobs.deliver_event(&producing, "output");
                }
                jobs.deliver_final(&job);
            }
        }
        Ok(false) => {
            tracing::info!(job_id = id, model = %model.name, "job had already ended (cancelled) or was taken over");
            // This run is over here, whatever became of the job.
            live.push(JobEvent::Finished);
        }
        Err(e) => {
            tracing::error!(job_id = id, error = %e, "cannot record the job's result");
            live.push(JobEvent::Finished);
        }
    }
}

async fn execute(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    job: &Job,
    live: &Arc<LiveJob>,
) -> Outcome {
    let lease = match state.lease(model, true).await {
        Ok(lease) => lease,
        Err(e @ (ApiError::ModelFailed { .. } | ApiError::ModelNotReady(_))) => {
            return Outcome {
                status: JobStatus::Failed,
                output: None,
                error: Some(JobError::Unavailable {
                    message: e.to_string(),
                }),
            };
        }
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let request = match request_from_json(lease.pipeline.interface(), &job.input) {
        Ok(request) => request,
        Err(problems) => {
            return Outcome {
                status: JobStatus::Failed,
                output: None,
                error: Some(JobError::Invalid { problems }),
            };
        }
    };
    let timeout = job
        .options
        .execution_timeout_ms
        .map(|ms| Duration::from_millis(ms.min(MAX_EXECUTION_MS)))
        .or(model.settings.execution_timeout)
        .or(state.jobs.settings.execution_timeout)
        .map(|t| t.min(Duration::from_millis(MAX_EXECUTION_MS)));
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let task = {
        let live = Arc::clone(live);
        let state = Arc::clone(state);
        let model_name = model.name.clone();
        let running = Job {
            status: JobStatus::InProgress,
            ..job.clone()
        };
        tokio::task::spawn_blocking(move || {
            // The lease lives as long as the computation, so a timed-out job
            // still holds its slot until it really stops.
            let lease = lease;
            let mut on_progress = |progress: Progress| {
                state.jobs.emit(
                    &running.id,
                    &live,
                    JobEvent::Progress {
                        step: progress.step,
                        total: progress.total,
                    },
                );
                state.metrics.denoising_step(&model_name);
                state.jobs.deliver_progress(&running, &live);
                !live.is_cancelled() && deadline.is_none_or(|d| Instant::now() < d)
            };
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                lease
                    .pipeline
                    .predict_with_progress(request, &mut on_progress)
            }))
        })
    };
    let joined = match timeout {
        // Pipelines without steps cannot be stopped: give up waiting instead.
        Some(limit) => match tokio::time::timeout(limit + Duration::from_secs(1), task).await {
            Ok(joined) => joined,
            Err(_) => return timed_out(limit),
        },
        None => task.await,
    };
    match joined {
        Ok(Ok(Ok(prediction))) => Outcome {
            status: JobStatus::Completed,
            output: Some(prediction_json(&prediction)),
            error: None,
        },
        Ok(Ok(Err(PipelineError::Stopped))) => {
            if live.is_cancelled() {
                Outcome {
                    status: JobStatus::Cancelled,
                    output: None,
                    error: Some(JobError::Failed {
                        message: "cancelled".into(),
                    }),
                }
            } else {
                timed_out(timeout.unwrap_or_default())
            }
        }
        Ok(Ok(Err(PipelineError::InvalidInput(problems)))) => Outcome {
            status: JobStatus::Failed,
            output: None,
            error: Some(JobError::Invalid {
                problems: problems
                    .iter()
                    .map(InputProblem::from_field_problem)
                    .collect(),
            }),
        },
        Ok(Ok(Err(PipelineError::Upstream {
            field,
            message,
            timed_out,
        }))) => Outcome {
            status: JobStatus::Failed,
            output: None,
            error: Some(JobError::Upstream {
                message: format!("{field}: {message}"),
                timed_out,
            }),
        },
        Ok(Ok(Err(error @ PipelineError::Load { .. }))) => Outcome {
            status: JobStatus::Failed,
            output: None,
            error: Some(JobError::Unavailable {
                message: error.to_string(),
            }),
        },
        Ok(Ok(Err(error))) => Outcome::failed(error.to_string()),
        Ok(Err(panic)) => Outcome::failed(format!(
            "the pipeline panicked: {}",
            panic_message(panic.as_ref())
        )),
        Err(e) => Outcome::failed(format!("the job's task failed: {e}")),
    }
}

fn timed_out(limit: Duration) -> Outcome {
    Outcome {
        status: JobStatus::TimedOut,
        output: None,
        error: Some(JobError::Failed {
            message: format!(
                "the job ran past its execution timeout of {}",
                humantime::format_duration(limit)
            ),
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
