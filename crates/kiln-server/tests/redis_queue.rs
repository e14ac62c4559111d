//! The Redis job backend against a real `redis-server` (Debian's package;
//! `.ci/run` installs it): two backends play two worker processes, and the
//! guards that make a job complete exactly once are exercised directly:
//! takeover after a missed visibility timeout, a stalled worker's late result
//! refused, hand-back, cancellation while queued, exact queue bounds.
//! Skipped with a message only where no redis-server can be started.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_server::config::QueueSection;
use kiln_server::jobs::Job;
use kiln_server::jobs::backend::Ending;
use kiln_server::jobs::{
    JobBackend, JobError, JobOptions, JobStatus, Protocol, RedisBackend, SubmitError, now_ms,
};
use serde_json::json;

const MODEL: &str = "m";

struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "SKIPPED: redis-server cannot be started ({e}); apt-get install redis-server"
            );
            return None;
        }
    };
    let redis = Redis { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(redis)
}

async fn backend(redis: &Redis, visibility_ms: u64) -> RedisBackend {
    let settings = QueueSection {
        url: Some(format!("redis://127.0.0.1:{}/0", redis.port)),
        visibility_timeout: Duration::from_millis(visibility_ms),
        ..QueueSection::default()
    };
    RedisBackend::connect(&settings, &[MODEL.to_string()])
        .await
        .expect("connect")
}

fn job(id: &str) -> Job {
    Job::queued(
        id.into(),
        MODEL,
        Protocol::RunPod,
        json!({"prompt": id}),
        JobOptions::default(),
    )
}

fn ending(status: JobStatus) -> (Option<serde_json::Value>, Option<JobError>, JobStatus) {
    match status {
        JobStatus::Completed => (Some(json!({"done": true})), None, status),
        _ => (
            None,
            Some(JobError::Failed {
                message: "stopped".into(),
            }),
            status,
        ),
    }
}

async fn finish(
    backend: &RedisBackend,
    id: &str,
    claim: Option<&kiln_server::jobs::Claim>,
    status: JobStatus,
) -> bool {
    let (output, error, status) = ending(status);
    let now = now_ms();
    let token = uuid_like();
    let ending = Ending {
        token: &token,
        model: MODEL,
        status,
        output: output.as_ref(),
        error: error.as_ref(),
        logs: "",
        now,
        expires_at: now + 60_000,
    };
    backend.finish(id, claim, &ending).await.expect("finish")
}

const WAIT: Duration = Duration::from_millis(200);

/// A token no other ending in these tests has.
fn uuid_like() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("ending-{}-{n}", std::process::id())
}

#[tokio::test]
async fn a_silent_workers_job_is_taken_over_and_its_late_result_refused() {
    let Some(redis) = start_redis() else { return };
    let first = backend(&redis, 300).await;
    let second = backend(&redis, 300).await;
    first.submit(&job("j1"), 10).await.expect("submit");
    let claim = first.claim_next(MODEL, WAIT).await.unwrap().expect("a job");
    assert_eq!(claim.id, "j1");
    // Nothing else waits; the running job is not another worker's yet.
    assert!(second.claim_next(MODEL, WAIT).await.unwrap().is_none());
    assert_eq!(first.depth(MODEL).await.unwrap(), 0);
    // The first worker renews its claim while it is alive...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(first.heartbeat(&claim).await.unwrap());
    }
    assert!(second.claim_next(MODEL, WAIT).await.unwrap().is_none());
    // ...then goes silent past the visibility timeout: the second takes over.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let taken = second
        .claim_next(MODEL, WAIT)
        .await
        .unwrap()
        .expect("takeover");
    assert_eq!(taken.id, "j1");
    let record = second.get("j1", now_ms()).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::InProgress);
    assert_eq!(record.retries, 1);
    // The first worker learns it lost the job, and its result is refused.
    assert!(!first.heartbeat(&claim).await.unwrap());
    assert!(!finish(&first, "j1", Some(&claim), JobStatus::Completed).await);
    assert!(finish(&second, "j1", Some(&taken), JobStatus::Completed).await);
    // Exactly once: a second ending is refused whoever sends it.
    assert!(!finish(&second, "j1", Some(&taken), JobStatus::Completed).await);
    let done = first.get("j1", now_ms()).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.output, Some(json!({"done": true})));
    let counts = first.counts(MODEL).await.unwrap();
    assert!(counts.contains(&(JobStatus::Completed, 1, 1)), "{counts:?}");
}

#[tokio::test]
async fn bounds_duplicates_cancellation_hand_back_and_retry() {
    let Some(redis) = start_redis() else { return };
    let front = backend(&redis, 30_000).await;
    let worker = backend(&redis, 30_000).await;
    // The bound counts waiting jobs exactly; a taken id is refused.
    front.submit(&job("a"), 2).await.unwrap();
    front.submit(&job("b"), 2).await.unwrap();
    assert!(matches!(
        front.submit(&job("c"), 2).await,
        Err(SubmitError::QueueFull { limit: 2, .. })
    ));
    assert!(matches!(
        front.submit(&job("a"), 10).await,
        Err(SubmitError::Duplicate(id)) if id == "a"
    ));
    assert_eq!(front.depth(MODEL).await.unwrap(), 2);
    assert_eq!(front.queued_ids(MODEL).await.unwrap(), vec!["a", "b"]);
    // A job cancelled while queued never reaches a worker.
    assert!(finish(&front, "a", None, JobStatus::Cancelled).await);
    assert_eq!(front.depth(MODEL).await.unwrap(), 1);
    let claim = worker.claim_next(MODEL, WAIT).await.unwrap().expect("b");
    assert_eq!(claim.id, "b");
    assert!(worker.claim_next(MODEL, WAIT).await.unwrap().is_none());
    // Handed back at shutdown, it waits again and another worker takes it.
    assert!(worker.hand_back(&claim).await.unwrap());
    assert_eq!(
        front.get("b", now_ms()).await.unwrap().unwrap().status,
        JobStatus::InQueue
    );
    assert!(!finish(&worker, "b", Some(&claim), JobStatus::Completed).await);
    let again = front
        .claim_next(MODEL, WAIT)
        .await
        .unwrap()
        .expect("b again");
    assert_eq!(again.id, "b");
    assert!(finish(&front, "b", Some(&again), JobStatus::Failed).await);
    // A failed job is retried into the queue once; a completed one is not.
    let failed = front.get("b", now_ms()).await.unwrap().unwrap();
    assert!(front.retry(&failed, 10).await.unwrap());
    let retried = front.get("b", now_ms()).await.unwrap().unwrap();
    assert_eq!((retried.status, retried.retries), (JobStatus::InQueue, 1));
    assert!(retried.error.is_none());
    assert!(!front.retry(&retried, 10).await.unwrap());
    // Finished jobs can be forgotten, running or queued ones cannot.
    assert!(!front.delete_final("b").await.unwrap());
    assert!(front.delete_final("a").await.unwrap());
    assert!(front.get("a", now_ms()).await.unwrap().is_none());
}

#[tokio::test]
async fn large_outputs_go_to_the_shared_folder_and_refused_endings_leave_none() {
    let Some(redis) = start_redis() else { return };
    let shared = tempfile::tempdir().unwrap();
    let settings = QueueSection {
        url: Some(format!("redis://127.0.0.1:{}/0", redis.port)),
        results_dir: Some(shared.path().to_path_buf()),
        inline_results: 64,
        ..QueueSection::default()
    };
    let worker = RedisBackend::connect(&settings, &[MODEL.to_string()])
        .await
        .unwrap();
    let front = RedisBackend::connect(&settings, &[MODEL.to_string()])
        .await
        .unwrap();
    let files = || std::fs::read_dir(shared.path()).unwrap().count();
    for id in ["small", "large"] {
        front.submit(&job(id), 10).await.unwrap();
    }
    let big = json!({"image": "x".repeat(1000)});
    let small = json!({"ok": 1});
    for output in [&small, &big] {
        let claim = worker.claim_next(MODEL, WAIT).await.unwrap().unwrap();
        let now = now_ms();
        let ending = Ending {
            token: "one-ending",
            model: MODEL,
            status: JobStatus::Completed,
            output: Some(output),
            error: None,
            logs: "",
            now,
            expires_at: now + 60_000,
        };
        assert!(
            worker
                .finish(&claim.id, Some(&claim), &ending)
                .await
                .unwrap()
        );
        // The same ending again (a retry after a lost reply) is recognised as
        // recorded; its new file is removed, the first kept.
        assert!(
            worker
                .finish(&claim.id, Some(&claim), &ending)
                .await
                .unwrap()
        );
        // A different, late ending is refused and leaves no file either.
        let late = Ending {
            token: "another",
            ..ending
        };
        assert!(!worker.finish(&claim.id, Some(&claim), &late).await.unwrap());
    }
    assert_eq!(files(), 1, "only the large output is a file");
    assert_eq!(
        front.get("small", now_ms()).await.unwrap().unwrap().output,
        Some(small)
    );
    assert_eq!(
        front.get("large", now_ms()).await.unwrap().unwrap().output,
        Some(big)
    );
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_workers_is_given_up() {
    let Some(redis) = start_redis() else { return };
    let settings = QueueSection {
        url: Some(format!("redis://127.0.0.1:{}/0", redis.port)),
        visibility_timeout: Duration::from_millis(300),
        max_takeovers: 2,
        ..QueueSection::default()
    };
    let models = [MODEL.to_string()];
    let connect = || RedisBackend::connect(&settings, &models);
    let first = connect().await.unwrap();
    first.submit(&job("poison"), 10).await.unwrap();
    let claim = first.claim_next(MODEL, WAIT).await.unwrap().unwrap();
    assert!(!claim.exhausted);
    // Each worker "dies" (stops renewing); the next takes the job over.
    let mut exhausted = false;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let next = connect().await.unwrap();
        let taken = next
            .claim_next(MODEL, WAIT)
            .await
            .unwrap()
            .expect("takeover");
        exhausted = taken.exhausted;
    }
    assert!(exhausted, "the second takeover reaches max_takeovers = 2");
    // A process never takes over a job it still holds itself.
    let holder = connect().await.unwrap();
    holder.submit(&job("held"), 10).await.unwrap();
    let held = holder.claim_next(MODEL, WAIT).await.unwrap().unwrap();
    assert_eq!(held.id, "held");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // (Only "poison" and "held" exist; "poison" is held by the last taker.)
    assert!(holder.claim_next(MODEL, WAIT).await.unwrap().map(|c| c.id) != Some("held".into()));
}

#[tokio::test]
async fn rediss_connects_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| dir.path().join(name);
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // A private CA and a server certificate for localhost.
    let made = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=kiln-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]) && openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]) && std::fs::write(pem("san.ext"), "subjectAltName=DNS:localhost\n").is_ok()
        && openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
    if !made {
        eprintln!("SKIPPED: openssl cannot make test certificates here");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(pem("server.pem"))
        .arg("--tls-key-file")
        .arg(pem("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(pem("ca.pem"))
        .stdout(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIPPED: redis-server cannot be started");
        return;
    };
    let redis = Redis { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not listen for TLS"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut settings = QueueSection {
        url: Some(format!("rediss://localhost:{}/0", redis.port)),
        ..QueueSection::default()
    };
    // Without the private CA the server is not trusted...
    assert!(
        RedisBackend::connect(&settings, &[MODEL.to_string()])
            .await
            .is_err()
    );
    // ...with it, the queue works over TLS.
    settings.tls_ca_file = Some(pem("ca.pem"));
    let backend = RedisBackend::connect(&settings, &[MODEL.to_string()])
        .await
        .expect("connect over TLS");
    backend.submit(&job("tls"), 10).await.unwrap();
    let claim = backend.claim_next(MODEL, WAIT).await.unwrap().unwrap();
    assert_eq!(claim.id, "tls");
}
