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
