#!/usr/bin/env python3
"""Benchmark: job throughput over the shared Redis queue with 1, 2 and 4
workers, and the per-job cost of Redis against the embedded SQLite store.

Starts a redis-server on a loopback port, then for each worker count a front
(`kiln serve --queue redis://...`) and that many `kiln worker` processes on
the tiny random FLUX.1-schnell fixture, submits --jobs RunPod jobs at once and
times until the last completes. The same jobs through one standalone
`kiln serve` (SQLite, jobs run in-process) give the baseline, side by side.

Per-job overhead: sequential /runsync calls of a 1-step 32x32 job; the
overhead is the client-seen latency minus the job's own `executionTime`
(what the queue, store, and hand-off between processes add).

Every worker gets --threads compute threads (RAYON_NUM_THREADS), so the
worker count, not a thread pool, is what varies; on a machine with C cores,
throughput can only scale while workers x threads <= C.

    python bench/queue_throughput.py --jobs 40 --workers 1,2,4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "fixtures" / "flux" / "tiny-schnell"
HOST = "127.0.0.1"
MODEL = "flux-schnell"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} was ready")
        try:
            if http("GET", url, timeout=2).get("ready"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout:.0f}s")


class Processes:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def kiln(self, binary: Path, subcommand: str, config: str, threads: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        home = Path(tempfile.mkdtemp(dir=self.workdir))
        path = home / "kiln.toml"
        path.write_text(config.replace("PORT", str(port)))
        env = dict(os.environ, KILN_HOME=str(home), RAYON_NUM_THREADS=str(threads), KILN_LOG="warn")
        proc = subprocess.Popen([str(binary), subcommand, "--config", str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(home / "stderr.log", "wb"))
        self.procs.append(proc)
        return proc, port

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def config(queue_url: str | None) -> str:
    text = f"""[server]
host = "{HOST}"
port = PORT
[jobs]
result_ttl = "30m"
"""
    if queue_url:
        text += f'[queue]\nurl = "{queue_url}"\n'
    text += f"""[[models]]
name = "{MODEL}"
source = "{FIXTURE}"
max_queue = 100000
concurrency = 1
"""
    return text


def throughput(base: str, jobs: int, job_input: dict) -> tuple[float, float]:
    """Submit `jobs` at once; jobs per second until the last completes, and
    the jobs' median execution time (ms) as the workers measured it."""
    started = time.monotonic()
    executions = []
    ids = [http("POST", f"{base}/v2/{MODEL}/run", {"input": {**job_input, "seed": i}})["id"]
           for i in range(jobs)]
    for job_id in ids:
        while True:
            status = http("GET", f"{base}/v2/{MODEL}/status/{job_id}")
            if status["status"] == "COMPLETED":
                executions.append(status["executionTime"])
                break
            if status["status"] in ("FAILED", "CANCELLED", "TIMED_OUT"):
                raise RuntimeError(f"job {job_id}: {status}")
            time.sleep(0.02)
    return jobs / (time.monotonic() - started), statistics.median(executions)


def overhead_ms(base: str, runs: int) -> tuple[float, float]:
    """Median client latency and median (latency - executionTime) of /runsync."""
    latencies, overheads = [], []
    job = {"prompt": "overhead", "width": 32, "height": 32, "num_inference_steps": 1}
    for i in range(runs + 2):
        started = time.monotonic()
        result = http("POST", f"{base}/v2/{MODEL}/runsync", {"input": {**job, "seed": i}})
        elapsed = (time.monotonic() - started) * 1000
        assert result["status"] == "COMPLETED", result
        if i >= 2:  # warm-up
            latencies.append(elapsed)
            overheads.append(elapsed - result["executionTime"])
    return statistics.median(latencies), statistics.median(overheads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kiln", type=Path, default=REPO_ROOT / "target" / "release" / "kiln")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--overhead-runs", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server is required (Debian: apt-get install redis-server)")
    job_input = {"prompt": "a lighthouse", "width": args.size, "height": args.size,
                 "num_inference_steps": args.steps}
    workdir = Path(tempfile.mkdtemp(prefix="kiln-queue-bench-"))
    procs = Processes(workdir)
    results: dict = {"jobs": args.jobs, "job": job_input, "threads_per_worker": args.threads}
    redis_port = free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", HOST, "--save", "",
                              "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir)],
                             stdout=subprocess.DEVNULL)
    try:
        # Baseline: one process, SQLite store, jobs run in-process.
        proc, port = procs.kiln(args.kiln, "serve", config(None), args.threads)
        base = f"http://{HOST}:{port}"
        wait_ready(f"{base}/v2/health/ready", proc)
        throughput(base, 4, job_input)  # warm-up
        results["sqlite"] = {
            "jobs_per_s_execution_ms": throughput(base, args.jobs, job_input),
            "latency_ms_overhead_ms": overhead_ms(base, args.overhead_runs),
        }
        log(f"sqlite, 1 process: {results['sqlite']}")
        procs.stop()
        results["redis"] = {}
        for count in [int(n) for n in args.workers.split(",")]:
            url = f"redis://{HOST}:{redis_port}/0"
            workers = [procs.kiln(args.kiln, "worker", config(url), args.threads) for _ in range(count)]
            for proc, port in workers:
                wait_ready(f"http://{HOST}:{port}/v2/health/ready", proc)
            front, port = procs.kiln(args.kiln, "serve", config(url), args.threads)
            base = f"http://{HOST}:{port}"
            wait_ready(f"{base}/v2/health/ready", front)
            throughput(base, 2 * count, job_input)  # warm-up: every worker loads
            entry = {"jobs_per_s_execution_ms": throughput(base, args.jobs, job_input)}
            if count == 1:
                entry["latency_ms_overhead_ms"] = overhead_ms(base, args.overhead_runs)
            results["redis"][count] = entry
            log(f"redis, {count} worker(s): {entry}")
            procs.stop()
    finally:
        procs.stop()
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    base_rate, base_exec = results["sqlite"]["jobs_per_s_execution_ms"]
    print(f"{args.jobs} jobs of {args.size}x{args.size}, {args.steps} steps, "
          f"{args.threads} thread(s) per worker")
    print(f"{'setup':<28} {'jobs/s':>8} {'vs SQLite':>10} {'job ms (median)':>16}")
    print(f"{'SQLite, 1 process':<28} {base_rate:>8.2f} {1.0:>9.2f}x {base_exec:>16.0f}")
    for count, entry in results["redis"].items():
        rate, execution = entry["jobs_per_s_execution_ms"]
        print(f"{f'Redis, front + {count} worker(s)':<28} {rate:>8.2f} "
              f"{rate / base_rate:>9.2f}x {execution:>16.0f}")
    s_lat, s_over = results["sqlite"]["latency_ms_overhead_ms"]
    r_lat, r_over = results["redis"].get(1, {}).get("latency_ms_overhead_ms", (float("nan"),) * 2)
    print(f"runsync 1-step 32x32, median: SQLite {s_lat:.1f} ms (overhead {s_over:.1f} ms), "
          f"Redis {r_lat:.1f} ms (overhead {r_over:.1f} ms); Redis adds {r_over - s_over:.1f} ms per job")


if __name__ == "__main__":
    main()
