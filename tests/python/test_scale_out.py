"""One endpoint served by many processes over Redis (docs/deploy.md).

A real `redis-server` (Debian's package; `.ci/run` installs it), a front
(`kiln serve --queue redis://...`) and two workers (`kiln worker`) run as
separate processes on the tiny random FLUX.1-schnell fixture. Jobs go in
through the official RunPod SDK and Cog's HTTP API; workers and the front are
killed with SIGKILL, Redis is restarted, and every job must still complete
exactly once (each worker logs `job completed job_id=...`; webhooks are
counted) and stay retrievable from the front.

Skipped, with the reason, only where no redis-server can be started.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests
import openai
import runpod

from conftest import (
    API_KEY,
    FLUX_MODEL,
    HOST,
    KilnProcess,
    WebhookSink,
    flux_model_entry,
    free_port,
    kiln_bin,
    serve_config_toml,
)

MODEL = FLUX_MODEL
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Jobs of ~50 ms on 2 cores, and one that runs for several seconds (512², 40
# steps: about 0.25 s a step in the debug build the tests use).
FAST = {"width": 32, "height": 32, "num_inference_steps": 2}
SLOW = {"width": 512, "height": 512, "num_inference_steps": 40}
VISIBILITY = "3s"
COMPLETED = re.compile(r'job completed job_id="([^"]+)"')


class RedisServer:
    """redis-server on a free loopback port, appending every write to disk
    (`appendfsync always`), so a restart keeps the queue."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def redis_server():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; "
                    ".ci/run installs it)")
    workdir = Path(tempfile.mkdtemp(prefix="kiln-pytest-redis-"))
    server = RedisServer(binary, workdir)
    try:
        server.start()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"redis-server cannot be started here: {e}")
    yield server
    server.kill()
    shutil.rmtree(workdir, ignore_errors=True)


class Cluster:
    def __init__(self, front: KilnProcess, workers: list[KilnProcess]):
        self.front = front
        self.workers = workers

    def completions(self) -> Counter:
        """How many times each job id was completed, over every worker's log."""
        counts: Counter = Counter()
        for worker in self.workers:
            counts.update(COMPLETED.findall(worker.stderr_path.read_text(errors="replace")))
        return counts

    def worker_running(self, job_id: str, timeout: float = 60) -> KilnProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in self.workers:
                if f'job started job_id="{job_id}"' in worker.stderr_path.read_text(errors="replace"):
                    return worker
            time.sleep(0.05)
        raise AssertionError(f"no worker started job {job_id} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def cluster(redis_server):
    binary = kiln_bin()
    queue = {"url": redis_server.url, "visibility_timeout": VISIBILITY}
    # A short grace, so a SIGTERMed worker hands its job back within the test.
    jobs = {"result_ttl": "30m", "webhook_private_addresses": True, "shutdown_grace": "1s"}
    models = [flux_model_entry(max_queue=64)]

    def process(name: str, subcommand: str) -> KilnProcess:
        workdir = Path(tempfile.mkdtemp(prefix=f"kiln-pytest-{name}-"))
        port = free_port()
        server = {"host": HOST, "port": port, "api_keys": [API_KEY]}
        text = serve_config_toml(server, jobs, models, queue=queue)
        return KilnProcess(binary, workdir, port, text, subcommand=subcommand)

    workers = [process(f"worker{i}", "worker") for i in (1, 2)]
    front = process("front", "serve")
    for p in workers + [front]:
        p.start()
    yield Cluster(front, workers)
    for p in [front] + workers:
        p.stop()
        shutil.rmtree(p.workdir, ignore_errors=True)


def rp(cluster: Cluster, path: str, body: dict | None = None) -> requests.Response:
    url = f"{cluster.front.base_url}/v2/{MODEL}/{path}"
    if body is None:
        return requests.get(url, headers=AUTH, timeout=60)
    return requests.post(url, json=body, headers=AUTH, timeout=300)


def wait_status(cluster: Cluster, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = rp(cluster, f"status/{job_id}")
        assert r.status_code == 200, f"status/{job_id}: HTTP {r.status_code}: {r.text[:300]}"
        body = r.json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}; last: {str(body)[:300]}")


def test_a_front_takes_jobs_but_runs_no_model(cluster):
    ready = requests.get(f"{cluster.front.base_url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    # Direct (non-job) protocols need the model in this process: a clear 503.
    r = requests.post(f"{cluster.front.base_url}/invocations", headers=AUTH, timeout=30,
                      json={"inputs": [{"prompt": "x"}]})
    assert r.status_code == 503, r.text[:300]
    assert "workers" in r.text
    # The queue depth autoscalers read is exported by the front.
    metrics = requests.get(f"{cluster.front.base_url}/metrics", headers=AUTH, timeout=10).text
    assert f'kiln_queue_depth{{model="{MODEL}"}}' in metrics
    assert f'kiln_queue_workers{{model="{MODEL}"}} 2' in metrics, metrics[-2000:]


def test_fifty_jobs_through_runpod_and_cog_complete_exactly_once(cluster):
    sink = WebhookSink()
    saved = (runpod.api_key, runpod.endpoint_url_base)
    runpod.api_key, runpod.endpoint_url_base = API_KEY, f"{cluster.front.base_url}/v2"
    try:
        endpoint = runpod.Endpoint(MODEL)
        runpod_jobs = [
            endpoint.run({"input": {"prompt": f"job {i}", "seed": i, **FAST},
                          "webhook": sink.url("/runpod")})
            for i in range(25)
        ]
        cog_ids = [f"cog-{uuid.uuid4()}" for _ in range(25)]
        for i, cog_id in enumerate(cog_ids):
            r = requests.put(
                f"{cluster.front.base_url}/predictions/{cog_id}",
                json={"input": {"prompt": f"cog {i}", "seed": 100 + i, **FAST},
                      "webhook": sink.url("/cog"), "webhook_events_filter": ["completed"]},
                headers={**AUTH, "Prefer": "respond-async"}, timeout=60,
            )
            assert r.status_code == 202, f"PUT /predictions: {r.status_code}: {r.text[:300]}"
        for job in runpod_jobs:
            output = job.output(timeout=180)
            assert output["image"]["image_base64"], f"job {job.job_id}: {str(output)[:200]}"
        # Cog has no GET for a prediction: its completion arrives by webhook.
        finished = sink.wait_for(lambda d: sum(x["path"] == "/cog" for x in d) >= 25, timeout=180)
        for delivery in finished:
            if delivery["path"] == "/cog":
                assert delivery["body"]["status"] == "succeeded", str(delivery["body"])[:300]
    finally:
        runpod.api_key, runpod.endpoint_url_base = saved
    ids = [job.job_id for job in runpod_jobs] + cog_ids
    completions = cluster.completions()
    assert all(completions[i] == 1 for i in ids), {i: completions[i] for i in ids if completions[i] != 1}
    # Both workers took work from the one queue.
    for worker in cluster.workers:
        ran = set(COMPLETED.findall(worker.stderr_path.read_text(errors="replace")))
        assert ran & set(ids), f"worker on port {worker.port} ran none of the 50 jobs"
    # Each job's final webhook arrives once, from whichever worker ran it.
    deliveries = sink.wait_for(lambda d: len(d) >= 50, timeout=60)
    time.sleep(1)
    hooks = Counter(d["body"]["id"] for d in sink.received())
    assert set(hooks) == set(ids) and set(hooks.values()) == {1}, hooks.most_common(3)
    assert len(deliveries) >= 50


def test_synchronous_routes_wait_on_the_shared_result(cluster):
    client = openai.OpenAI(base_url=f"{cluster.front.base_url}/v1", api_key=API_KEY,
                           max_retries=0, timeout=120)
    resp = client.images.generate(model=MODEL, prompt="a cat", n=2, size="32x32",
                                  response_format="b64_json",
                                  extra_body={"seed": 7, "num_inference_steps": 2})
    assert len(resp.data) == 2 and all(base64.b64decode(d.b64_json)[:4] == b"\x89PNG" for d in resp.data)
    # Cog's synchronous prediction waits on the shared result too.
    r = requests.post(f"{cluster.front.base_url}/predictions", headers=AUTH, timeout=120,
                      json={"input": {"prompt": "sync cog", "seed": 5, **FAST}})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:300]


def test_progress_streams_from_the_worker_through_the_front(cluster):
    steps = 6
    job_id = rp(cluster, "run", {"input": {"prompt": "stream", "seed": 4, "width": 128,
                                           "height": 128, "num_inference_steps": steps}}).json()["id"]
    seen, output, deadline = [], None, time.monotonic() + 120
    while output is None:
        assert time.monotonic() < deadline, f"no final output streamed; saw {seen}"
        body = rp(cluster, f"stream/{job_id}").json()
        for chunk in body["stream"]:
            if "step" in chunk["output"]:
                seen.append(chunk["output"]["step"])
            else:
                output = chunk["output"]
        time.sleep(0.05)
    # Every denoising step the worker ran reached the front, in order, once.
    assert seen == list(range(1, steps + 1)), seen
    assert output["image"]["image_base64"]


def test_a_job_whose_worker_is_killed_completes_on_another(cluster):
    job_id = rp(cluster, "run", {"input": {"prompt": "killed", "seed": 7, **SLOW}}).json()["id"]
    wait_status(cluster, job_id, {"IN_PROGRESS"})
    victim = cluster.worker_running(job_id)
    time.sleep(0.5)
    victim.kill()
    done = wait_status(cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}, 180)
    assert done["status"] == "COMPLETED", str(done)[:300]
    assert done["output"]["image"]["image_base64"]
    assert cluster.completions()[job_id] == 1
    survivor = next(w for w in cluster.workers if w is not victim)
    assert "took over a job whose worker went silent" in survivor.stderr_tail(20000)
    victim.start()


def test_a_stopping_worker_hands_its_job_back(cluster, redis_server):
    job_id = rp(cluster, "run", {"input": {"prompt": "handed back", "seed": 8, **SLOW}}).json()["id"]
    wait_status(cluster, job_id, {"IN_PROGRESS"})
    leaving = cluster.worker_running(job_id)
    time.sleep(0.5)
    pid = leaving.proc.pid
    leaving.stop()  # SIGTERM: finish within shutdown_grace (1 s) or hand back
    assert "job handed back to the queue" in leaving.stderr_tail(20000)
    # It left the consumer group (holding nothing), so the group does not grow
    # with every worker restart.
    consumers = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "XINFO", "CONSUMERS", f"kiln:queue:{MODEL}", "workers"],
        capture_output=True, text=True, check=True).stdout
    assert f"-{pid}-" not in consumers, consumers
    done = wait_status(cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}, 180)
    assert done["status"] == "COMPLETED", str(done)[:300]
    assert cluster.completions()[job_id] == 1
    leaving.start()


def test_a_failed_job_is_retried_through_the_queue(cluster):
    # The front has no schema (it never loads the model): the worker refuses it.
    job_id = rp(cluster, "run", {"input": {"prompt": "bad", "num_inference_steps": -3}}).json()["id"]
    failed = wait_status(cluster, job_id, {"FAILED", "COMPLETED"})
    assert failed["status"] == "FAILED" and "num_inference_steps" in json.dumps(failed), failed
    r = rp(cluster, f"retry/{job_id}", {})
    assert r.status_code == 200, r.text[:300]
    again = wait_status(cluster, job_id, {"FAILED", "COMPLETED"})
    assert again["status"] == "FAILED" and again["retries"] == 1, again


def test_killing_the_front_loses_no_accepted_job(cluster):
    ids = [rp(cluster, "run", {"input": {"prompt": f"front {i}", "seed": i, **FAST}}).json()["id"]
           for i in range(5)]
    cluster.front.kill()
    cluster.front.start()
    for job_id in ids:
        done = wait_status(cluster, job_id, {"COMPLETED", "FAILED"})
        assert done["status"] == "COMPLETED", str(done)[:300]
    # Sync routes wait on the shared result.
    r = rp(cluster, "runsync", {"input": {"prompt": "sync", "seed": 3, **FAST}})
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text[:300]


def test_cancellation_reaches_the_worker(cluster):
    job_id = rp(cluster, "run", {"input": {"prompt": "cancel me", "seed": 9, **SLOW}}).json()["id"]
    wait_status(cluster, job_id, {"IN_PROGRESS"})
    worker = cluster.worker_running(job_id)
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    r = rp(cluster, f"cancel/{job_id}", {})
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED", r.text[:300]
    # The worker stops at its next step, long before the job's ~10 s would end.
    stopped = f'job had already ended (cancelled) or was taken over job_id="{job_id}"'
    while stopped not in worker.stderr_tail(20000):
        assert time.monotonic() - cancelled_at < 5, "the worker did not stop the cancelled job"
        time.sleep(0.05)
    assert cluster.completions()[job_id] == 0
    assert wait_status(cluster, job_id, {"CANCELLED"})["status"] == "CANCELLED"


def test_workers_and_front_reconnect_after_redis_restarts(cluster, redis_server):
    before = rp(cluster, "runsync", {"input": {"prompt": "before", "seed": 1, **FAST}}).json()
    assert before["status"] == "COMPLETED"
    redis_server.kill()
    time.sleep(1)
    redis_server.start()
    deadline = time.monotonic() + 60
    while True:
        r = rp(cluster, "runsync", {"input": {"prompt": "after", "seed": 2, **FAST}})
        if r.status_code == 200 and r.json().get("status") == "COMPLETED":
            break
        assert time.monotonic() < deadline, f"no job completed after Redis restarted: {r.text[:300]}"
        time.sleep(0.5)
    # What was stored before the restart is still there (appendfsync always).
    assert rp(cluster, f"status/{before['id']}").json()["status"] == "COMPLETED"
