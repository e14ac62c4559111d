"""Pytest fixtures that start a real `kiln serve` for the official-client tests.

Environment:
  KILN_BIN   path to the kiln binary (default: target/debug/kiln, relative to the
             repository root). Build it first with `cargo build`.
  KILN_READY_TIMEOUT  seconds to wait for /v2/health/ready (default 120).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "kiln.examples.claims_frequency"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class KilnServer:
    host: str
    port: int
    model: str
    home: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def hostport(self) -> str:
        """`host:port` without a scheme, as tritonclient wants it."""
        return f"{self.host}:{self.port}"


def kiln_bin() -> Path:
    p = Path(os.environ.get("KILN_BIN", "target/debug/kiln"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no response yet"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited early with status {proc.returncode}")
        try:
            r = requests.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:.0f}s (last: {last})")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def kiln_server():
    """A `kiln serve` (default model only) on a free loopback port, fresh KILN_HOME."""
    binary = kiln_bin()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"kiln binary not found at {binary}; build it with `cargo build` "
            "or point KILN_BIN at it",
            pytrace=False,
        )
    timeout = float(os.environ.get("KILN_READY_TIMEOUT", "120"))

    with tempfile.TemporaryDirectory(prefix="kiln-pytest-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        port = free_port()
        cmd = [str(binary), "serve", "--host", HOST, "--port", str(port)]
        stdout_path, stderr_path = tmp / "stdout.log", tmp / "stderr.log"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                env=dict(os.environ, KILN_HOME=str(home)),
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        try:
            startup_error = None
            try:
                _wait_ready(proc, f"http://{HOST}:{port}/v2/health/ready", timeout)
            except RuntimeError as e:
                startup_error = e
            if startup_error is not None:
                _stop(proc)
                stderr = _read(stderr_path)
                print(f"\n---- kiln serve failed to start: {startup_error}")
                print(f"---- command: KILN_HOME={home} {' '.join(cmd)}")
                print("---- kiln stdout ----\n" + _read(stdout_path))
                print("---- kiln stderr ----\n" + stderr)
                pytest.fail(
                    f"kiln serve failed to start: {startup_error}\n"
                    f"---- kiln stderr (tail) ----\n{stderr[-4000:]}",
                    pytrace=False,
                )
            yield KilnServer(host=HOST, port=port, model=DEFAULT_MODEL, home=home)
        finally:
            _stop(proc)


# --------------------------------------------------------------------------
# `kiln serve --config` servers for the serving-protocol tests
# (tests/python/test_serving_protocols.py): RunPod, Cog, OpenAI over FLUX.

import json  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

API_KEY = "test-key"
FLUX_MODEL = "flux-schnell"
FLUX_SCHNELL_DIR = REPO_ROOT / "fixtures" / "flux" / "tiny-schnell"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string here
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def serve_config_toml(server: dict, jobs: dict, models: list[dict], cog: dict | None = None,
                      queue: dict | None = None) -> str:
    """The `kiln serve --config` file: [server], [jobs], [cog], [queue], [[models]]."""
    lines = ["[server]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    lines += ["", "[jobs]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in jobs.items()]
    for section, values in (("cog", cog), ("queue", queue)):
        if values:
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for model in models:
        lines += ["", "[[models]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


def flux_model_entry(**overrides) -> dict:
    """A [[models]] entry serving the tiny random FLUX.1-schnell fixture."""
    entry = {
        "name": FLUX_MODEL,
        "source": str(FLUX_SCHNELL_DIR),
        "max_queue": 8,
        "concurrency": 1,
        "execution_timeout": "5m",
    }
    entry.update(overrides)
    return entry


class KilnProcess:
    """One `kiln serve --config CONFIG.toml` with its own KILN_HOME.

    It can be SIGKILLed and started again on the same KILN_HOME, config and port
    (the durability tests do that). stdout/stderr of every run are appended to
    files in the work directory and shown when start-up fails.
    """

    def __init__(self, binary: Path, workdir: Path, port: int, config_text: str,
                 env: dict | None = None, subcommand: str = "serve"):
        self.subcommand = subcommand
        self.binary = binary
        self.env = env or {}
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port
        self.config_path = workdir / "kiln.toml"
        self.config_path.write_text(config_text)
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    @property
    def hostport(self) -> str:
        """`host:port` without a scheme, as tritonclient wants it."""
        return f"{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [str(self.binary), self.subcommand, "--config", str(self.config_path)]

    def start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = float(os.environ.get("KILN_READY_TIMEOUT", "120"))
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            banner = f"\n==== start #{self.starts}: {' '.join(self.command)}\n".encode()
            out.write(banner)
            err.write(banner)
            out.flush()
            err.flush()
            self.proc = subprocess.Popen(
                self.command,
                env=dict(os.environ, KILN_HOME=str(self.home), **self.env),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        try:
            _wait_ready(self.proc, f"{self.base_url}/v2/health/ready", timeout)
        except RuntimeError as e:
            _stop(self.proc)
            stderr = _read(self.stderr_path)
            print(f"\n---- kiln serve failed to start: {e}")
            print(f"---- command: KILN_HOME={self.home} {' '.join(self.command)}")
            print("---- config ----\n" + _read(self.config_path))
            print("---- kiln stdout ----\n" + _read(self.stdout_path))
            print("---- kiln stderr ----\n" + stderr)
            pytest.fail(
                f"kiln serve --config failed to start (start #{self.starts}): {e}\n"
                f"---- config ----\n{_read(self.config_path)}"
                f"---- kiln stderr (tail) ----\n{stderr[-4000:]}",
                pytrace=False,
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing; what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def stderr_tail(self, n: int = 3000) -> str:
        return _read(self.stderr_path)[-n:]


@pytest.fixture(scope="session")
def kiln_serve():
    """Factory: `kiln_serve(model_overrides={...}, jobs={...}, name=...)` writes a
    config (by default one flux-schnell model, see flux_model_entry; pass
    `models=[...]` for other [[models]] lists; `env` adds environment
    variables), starts `kiln serve --config` on a
    free port with a fresh KILN_HOME, waits for /v2/health/ready and returns the
    KilnProcess. Every server is stopped at the end of the session at the latest
    (tests may stop theirs earlier)."""
    binary = kiln_bin()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"kiln binary not found at {binary}; build it with `cargo build` "
            "or point KILN_BIN at it",
            pytrace=False,
        )
    started: list[KilnProcess] = []

    def start(
        *,
        models: list[dict] | None = None,
        model_overrides: dict | None = None,
        jobs: dict | None = None,
        api_keys: list[str] | None = None,
        name: str = "serve",
        env: dict | None = None,
        cog: dict | None = None,
    ) -> KilnProcess:
        if models is None:
            models = [flux_model_entry(**(model_overrides or {}))]
        workdir = Path(tempfile.mkdtemp(prefix=f"kiln-pytest-{name}-"))
        port = free_port()
        server = {
            "host": HOST,
            "port": port,
            "api_keys": [API_KEY] if api_keys is None else api_keys,
        }
        jobs_section = {
            "result_ttl": "30m",
            "on_restart": "requeue",
            # The tests receive webhooks on loopback, which Kiln refuses by default.
            "webhook_private_addresses": True,
        }
        jobs_section.update(jobs or {})
        text = serve_config_toml(server, jobs_section, models, cog)
        process = KilnProcess(binary, workdir, port, text, env)
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop()
        shutil.rmtree(process.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def flux_server(kiln_serve) -> KilnProcess:
    """The shared server for the protocol tests: tiny FLUX.1-schnell as
    "flux-schnell", API key "test-key", max_queue 8, concurrency 1. Cog
    predictions queue behind a busy slot (`[cog] queue`), so tests can hold the
    worker with a RunPod job and see Cog predictions wait; Cog's default (409
    and BUSY) is tested on a server of its own."""
    return kiln_serve(name="flux", cog={"queue": True})


class WebhookSink:
    """A loopback HTTP server that records every POST (webhook deliveries)."""

    def __init__(self):
        self.deliveries: list[dict] = []
        self._cond = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                # Recorded before the response: Kiln sends a job's next webhook
                # once this one is answered, and this server handles each POST
                # on its own thread, so recording after answering could list
                # two deliveries out of the order they were sent in.
                with sink._cond:
                    sink.deliveries.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                    sink._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self._server.server_address[1]}{path}"

    def received(self, path: str | None = None) -> list[dict]:
        with self._cond:
            return [d for d in self.deliveries if path is None or d["path"] == path]

    def wait_for(self, predicate, timeout: float = 60.0) -> list[dict]:
        """Wait until predicate(list of deliveries) is true; return the deliveries."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.deliveries)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"webhook condition not met within {timeout:.0f}s; "
                        f"received {len(self.deliveries)} deliveries: "
                        + json.dumps(
                            [{"path": d["path"], "body": d["body"]} for d in self.deliveries]
                        )[:3000]
                    )
                self._cond.wait(min(left, 0.5))
            return list(self.deliveries)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def webhook_sink():
    sink = WebhookSink()
    try:
        yield sink
    finally:
        sink.close()
