#!/usr/bin/env python3
"""Benchmark: Kiln vs `mlflow models serve` serving the same Poisson GLM.

Fits the claims-frequency GLM with statsmodels on crates/kiln/data/claims.csv
(the formula Kiln's built-in default model uses), saves it as an MLflow pyfunc
model, starts `mlflow models serve` and `kiln serve` (default model) on loopback
ports, and drives both with wrk, POSTing the same 1-row dataframe_split body to
/invocations at each concurrency level. Prints req/s, p50 and p99 per server and
the Kiln/MLflow throughput ratio.

See bench/README.md. Example:
    python bench/glm_serving.py --duration 10 --concurrency 1,8,64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "crates" / "kiln" / "data" / "claims.csv"
FORMULA = "claims ~ driver_age + vehicle_power + C(region) + urban + driver_age:urban"
FEATURES = ["driver_age", "vehicle_power", "region", "urban", "exposure"]
HOST = "127.0.0.1"
# One row, MLflow's dataframe_split format, exactly what ScoringServerClient sends.
ROW = {"driver_age": 35, "vehicle_power": 7, "region": "north", "urban": 1, "exposure": 0.75}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------- model


def fit_glm(data_path: Path):
    import pandas as pd
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    df = pd.read_csv(data_path)
    model = smf.glm(FORMULA, data=df, family=sm.families.Poisson(), exposure=df["exposure"])
    results = model.fit()
    results.remove_data()  # keep the pickle small; predict() only needs params + design info
    return results


def save_mlflow_model(results, model_dir: Path) -> None:
    import mlflow.pyfunc

    class ClaimsGLM(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: expected claim count = results.predict(X, exposure=X.exposure)."""

        def load_context(self, context):
            import pickle as _pickle

            with open(context.artifacts["glm"], "rb") as f:
                self.results = _pickle.load(f)

        def predict(self, context, model_input, params=None):
            import numpy as _np

            return _np.asarray(
                self.results.predict(model_input, exposure=model_input["exposure"]),
                dtype=float,
            )

    art_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-art-"))
    glm_path = art_dir / "glm.pkl"
    with open(glm_path, "wb") as f:
        pickle.dump(results, f)
    import pandas as pd
    import statsmodels

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*type hints.*")
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=ClaimsGLM(),
        artifacts={"glm": str(glm_path)},
        # Explicit requirements: skips MLflow's (slow) requirement inference.
        pip_requirements=[f"statsmodels=={statsmodels.__version__}", f"pandas=={pd.__version__}"],
    )
    shutil.rmtree(art_dir, ignore_errors=True)


# ------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, ready_path: str, port: int, logdir: Path):
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        # Own session/process group so the whole tree (mlflow -> uvicorn) can be stopped.
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        self._log.close()


def post_json(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------- wrk

LUA_TEMPLATE = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%BODY%]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "KILNBENCH requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def write_lua(body: str, path: Path) -> None:
    assert "]==]" not in body
    path.write_text(LUA_TEMPLATE.replace("%BODY%", body))


def run_wrk(url: str, lua: Path, connections: int, threads: int, duration: int) -> dict:
    threads = max(1, min(threads, connections))  # wrk needs threads <= connections
    cmd = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
        "--timeout", "10s", "--latency", "-s", str(lua), url,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr}\n{p.stdout}")
    line = next((l for l in p.stdout.splitlines() if l.startswith("KILNBENCH ")), None)
    if line is None:
        raise RuntimeError(f"no KILNBENCH line in wrk output:\n{p.stdout}\n{p.stderr}")
    vals = dict(kv.split("=") for kv in line.split()[1:])
    r = {k: float(v) for k, v in vals.items()}
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = int(sum(r[k] for k in r if k.startswith("err_")))
    r["threads"] = threads
    r["connections"] = connections
    return r


# ---------------------------------------------------------------------- main


def default_kiln_bin() -> Path:
    if os.environ.get("KILN_BIN"):
        return Path(os.environ["KILN_BIN"])
    release = REPO_ROOT / "target" / "release" / "kiln"
    return release if release.exists() else REPO_ROOT / "target" / "debug" / "kiln"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="whole seconds per wrk run (default 10)")
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated connection counts (default 1,8,64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="wrk threads, capped at the connection count (default: CPU count)")
    ap.add_argument("--warmup", type=int, default=2, help="whole seconds of warm-up load per server, 0 = none (default 2)")
    ap.add_argument("--kiln-bin", type=Path, default=None,
                    help="kiln binary (default: $KILN_BIN, else target/release/kiln, else target/debug/kiln)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="claims CSV (default crates/kiln/data/claims.csv)")
    ap.add_argument("--mlflow-workers", type=int, default=1,
                    help="uvicorn workers for `mlflow models serve -w` (default 1, MLflow's own default)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for each server")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.duration < 1 or args.warmup < 0:
        ap.error("--duration must be >= 1 and --warmup >= 0 (wrk takes whole seconds)")

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    kiln_bin = (args.kiln_bin or default_kiln_bin()).resolve()
    if shutil.which("wrk") is None:
        log("error: wrk not found (Debian/Ubuntu: apt-get install wrk)")
        return 2
    if not kiln_bin.is_file():
        log(f"error: kiln binary not found at {kiln_bin} (cargo build --release -p kiln, or --kiln-bin)")
        return 2
    if "debug" in kiln_bin.parts:
        log(f"warning: {kiln_bin} is a debug build; numbers are not representative (cargo build --release)")

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    servers: list[Server] = []
    try:
        log(f"fitting statsmodels GLM on {args.data} ...")
        results = fit_glm(args.data)
        model_dir = work / "mlflow-model"
        save_mlflow_model(results, model_dir)
        log(f"saved MLflow pyfunc model to {model_dir}")

        bindir = str(Path(sys.executable).parent)
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                   MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        mlflow_port, kiln_port = free_port(), free_port()
        while kiln_port == mlflow_port:
            kiln_port = free_port()
        servers.append(Server(
            "mlflow",
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
             "--env-manager", "local", "-h", HOST, "-p", str(mlflow_port), "-w", str(args.mlflow_workers)],
            env, "/ping", mlflow_port, work))
        kiln_home = work / "kiln-home"
        kiln_home.mkdir()
        servers.append(Server(
            "kiln", [str(kiln_bin), "serve", "--host", HOST, "--port", str(kiln_port)],
            dict(env, KILN_HOME=str(kiln_home)), "/v2/health/ready", kiln_port, work))
        for s in servers:
            log(f"waiting for {s.name} on {s.url} ...")
            s.wait_ready(args.ready_timeout)

        body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": [[ROW[c] for c in FEATURES]]}})
        import pandas as pd

        reference = float(results.predict(pd.DataFrame([ROW]), exposure=[ROW["exposure"]]).iloc[0])
        preds = {}
        for s in servers:
            preds[s.name] = post_json(s.url + "/invocations", body.encode())["predictions"][0]
            rel = abs(preds[s.name] - reference) / abs(reference)
            flag = "" if rel < 1e-6 else "   <-- MISMATCH vs statsmodels"
            log(f"{s.name:>6} prediction {preds[s.name]:.12g} (statsmodels {reference:.12g}, rel diff {rel:.1e}){flag}")

        lua = work / "post.lua"
        write_lua(body, lua)
        if args.warmup > 0:
            for s in servers:
                log(f"warm-up {s.name} ({args.warmup:g}s) ...")
                run_wrk(s.url + "/invocations", lua, 8, args.threads, args.warmup)

        rows = []
        for c in levels:
            row = {"concurrency": c}
            for s in servers:
                log(f"wrk {s.name} -c {c} -d {args.duration:g}s ...")
                row[s.name] = run_wrk(s.url + "/invocations", lua, c, args.threads, args.duration)
            row["ratio"] = row["kiln"]["rps"] / row["mlflow"]["rps"] if row["mlflow"]["rps"] else float("inf")
            rows.append(row)

        print()
        print(f"Poisson GLM, 1-row dataframe_split POST /invocations, wrk {args.duration:g}s per run, "
              f"{os.cpu_count()} CPUs, mlflow workers={args.mlflow_workers}, kiln={kiln_bin}")
        hdr = (f"{'conc':>5} | {'kiln req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | "
               f"{'mlflow req/s':>12} {'p50 ms':>8} {'p99 ms':>8} | {'kiln/mlflow':>11}")
        print(hdr)
        print("-" * len(hdr))
        for row in rows:
            k, m = row["kiln"], row["mlflow"]
            print(f"{row['concurrency']:>5} | {k['rps']:>10.0f} {k['p50_us'] / 1e3:>8.2f} {k['p99_us'] / 1e3:>8.2f} | "
                  f"{m['rps']:>12.0f} {m['p50_us'] / 1e3:>8.2f} {m['p99_us'] / 1e3:>8.2f} | {row['ratio']:>10.2f}x")
        errs = [(row["concurrency"], n, row[n]["errors"]) for row in rows for n in ("kiln", "mlflow") if row[n]["errors"]]
        for c, n, e in errs:
            print(f"warning: {n} had {e} socket/non-2xx errors at concurrency {c}; its numbers are suspect")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "predictions": preds, "reference": reference,
                                             "duration_s": args.duration, "cpus": os.cpu_count(),
                                             "mlflow_workers": args.mlflow_workers,
                                             "kiln_bin": str(kiln_bin)}, indent=2))
        return 1 if errs else 0
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
