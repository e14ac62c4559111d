"""Kiln's serving protocols for generative models, judged by official clients.

A real `kiln serve --config kiln.toml` serves the tiny random FLUX.1-schnell
fixture (fixtures/flux/tiny-schnell) as "flux-schnell" behind API key
"test-key", and is driven with:

  * the RunPod Python SDK (`runpod.Endpoint`, `runpod.AsyncioEndpoint`) with
    its base URL pointed at Kiln's `/v2` mount, plus raw HTTP for what the SDK
    does not expose (429s, /retry, /stream of a cancelled job, the root mount);
  * the OpenAI Python SDK (`client.models.list`, `client.images.generate`);
  * the Replicate Cog container HTTP API (raw HTTP: Cog has no Python client
    for it), including async webhooks and Server-Sent Events;
  * durability (SIGKILL mid-job, restart on the same KILN_HOME) and overload
    (429 + Retry-After) against servers of their own.

Images from the tiny model are noise, but deterministic per seed. Tests use
32x32 images and 2 denoising steps so that each job is cheap.

Run:  pip install -r tests/python/requirements.txt && cargo build &&
      pytest tests/python/test_serving_protocols.py -q
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import openai
import pytest
import requests
import runpod
from PIL import Image

API_KEY = "test-key"  # the key in the servers' configs (conftest.py)
MODEL = "flux-schnell"
FAST = {"width": 32, "height": 32, "num_inference_steps": 2}
# A job that keeps the single worker busy for a while (concurrency = 1), so
# that jobs submitted after it stay IN_QUEUE long enough to be observed: about
# 1 s in a release build on 2 cores (`kiln bench flux`, tiny-schnell, 64x64,
# 100 steps, 256 T5 tokens); tests cancel it as soon as they are done with it.
SLOW = {"width": 64, "height": 64, "num_inference_steps": 100}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
HTTP_TIMEOUT = 60


# ------------------------------------------------------------------- helpers


def fast_input(prompt: str = "a photo of a cat", **extra) -> dict:
    return {"prompt": prompt, **FAST, **extra}


def auth(server) -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def rp_url(server, path: str) -> str:
    """URL under the per-model RunPod mount: /v2/flux-schnell/<path>."""
    return f"{server.base_url}/v2/{MODEL}/{path}"


def rp_post(server, path: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.post(
        rp_url(server, path), json=body, headers=auth(server), timeout=HTTP_TIMEOUT, **kw
    )


def rp_get(server, path: str, **kw) -> requests.Response:
    return requests.get(rp_url(server, path), headers=auth(server), timeout=HTTP_TIMEOUT, **kw)


def rp_submit(server, job_input: dict, **body) -> str:
    r = rp_post(server, "run", {"input": job_input, **body})
    assert r.status_code == 200, f"POST /run: HTTP {r.status_code}: {r.text[:500]}"
    data = r.json()
    assert isinstance(data.get("id"), str) and data["id"], f"/run gave no job id: {data}"
    assert data.get("status") in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED"}, data
    return data["id"]


def rp_status(server, job_id: str) -> dict:
    r = rp_get(server, f"status/{job_id}")
    assert r.status_code == 200, f"GET /status/{job_id}: HTTP {r.status_code}: {r.text[:500]}"
    return r.json()


def wait_final(server, job_id: str, timeout: float = 180.0) -> dict:
    """Poll /status until the job is in a final state; return that body."""
    deadline = time.monotonic() + timeout
    while True:
        body = rp_status(server, job_id)
        if body.get("status") in FINAL_STATES:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not final after {timeout:.0f}s: {short(body)}")
        time.sleep(0.1)


def wait_status(server, job_id: str, wanted: set[str], timeout: float = 30.0) -> dict:
    """Poll /status until status is in `wanted` or final; return that body."""
    deadline = time.monotonic() + timeout
    while True:
        body = rp_status(server, job_id)
        if body.get("status") in wanted | FINAL_STATES:
            return body
        if time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def wait_idle(server, timeout: float = 180.0) -> None:
    """Wait until no RunPod-visible job of the model is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = rp_get(server, "health").json()["jobs"]
        if jobs["inQueue"] == 0 and jobs["inProgress"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout:.0f}s: {jobs}")
        time.sleep(0.1)


@contextlib.contextmanager
def busy_worker(server):
    """Occupy the model's only worker with a slow job; cancel it on exit.

    Jobs submitted inside the block stay IN_QUEUE behind it (concurrency 1)."""
    wait_idle(server)  # an earlier blocker may still be finishing
    job_id = rp_submit(server, {"prompt": "blocker", **SLOW})
    seen = wait_status(server, job_id, {"IN_PROGRESS"})
    assert seen.get("status") == "IN_PROGRESS", (
        f"the blocker job should be running by now (SLOW = {SLOW}): {short(seen)}"
    )
    try:
        yield job_id
    finally:
        rp_post(server, f"cancel/{job_id}")


def short(value, limit: int = 600) -> str:
    """A readable excerpt of a JSON body (base64 images shortened)."""

    def shrink(v):
        if isinstance(v, dict):
            return {k: shrink(x) for k, x in v.items()}
        if isinstance(v, list):
            return [shrink(x) for x in v]
        if isinstance(v, str) and len(v) > 80:
            return v[:40] + f"...({len(v)} chars)"
        return v

    text = json.dumps(shrink(value)) if not isinstance(value, str) else value
    return text[:limit]


def decode_b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AssertionError(f"not valid base64 ({e}): {data[:80]!r}") from None


def open_image(raw: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def assert_image(raw: bytes, size=(32, 32), fmt="PNG", what="image") -> Image.Image:
    image = open_image(raw)
    assert image.format == fmt, f"{what}: expected {fmt}, got {image.format}"
    assert image.size == size, f"{what}: expected {size[0]}x{size[1]}, got {image.size}"
    return image


def data_uri_bytes(uri: str, mime: str = "image/png") -> bytes:
    prefix = f"data:{mime};base64,"
    assert isinstance(uri, str) and uri.startswith(prefix), (
        f"expected a {prefix}... data URI, got {uri[:60]!r}"
    )
    return decode_b64(uri[len(prefix) :])


def assert_runpod_image(obj: dict, size=(32, 32), fmt="PNG", what="image") -> bytes:
    assert isinstance(obj, dict), f"{what}: expected an object, got {short(obj)}"
    assert set(obj) >= {"image_base64", "width", "height"}, f"{what}: keys {sorted(obj)}"
    assert (obj["width"], obj["height"]) == size, f"{what}: {obj['width']}x{obj['height']}"
    raw = decode_b64(obj["image_base64"])
    assert_image(raw, size, fmt, what)
    return raw


def assert_flux_output(output, prompt: str, seed: int | None = None, size=(32, 32)) -> bytes:
    """The FLUX.1 shorts-handler output shape; returns the image bytes."""
    assert isinstance(output, dict), f"output is not an object: {short(output)}"
    assert output.get("status") == "success", f"output.status: {short(output)}"
    assert output.get("prompt") == prompt, f"output.prompt: {short(output)}"
    assert output.get("model") == MODEL, f"output.model: {short(output)}"
    assert isinstance(output.get("seed"), int), f"output.seed must be an integer: {short(output)}"
    if seed is not None:
        assert output["seed"] == seed, f"output.seed {output['seed']} != requested {seed}"
    return assert_runpod_image(output.get("image"), size, what="output.image")


def error_text(body: dict) -> str:
    err = body.get("error")
    return err if isinstance(err, str) else json.dumps(err)


def drain(generator, timeout: float) -> list:
    """Consume a generator in a thread; fail if it does not end within timeout."""
    items: list = []
    failure: list[BaseException] = []

    def run():
        try:
            for item in generator:
                items.append(item)
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), (
        f"generator did not end within {timeout:.0f}s; {len(items)} items so far, "
        f"last: {short(items[-1]) if items else None}"
    )
    if failure:
        raise failure[0]
    return items


# -------------------------------------------------------------- RunPod (SDK)


@pytest.fixture(scope="session")
def runpod_endpoint(flux_server):
    """`runpod.Endpoint("flux-schnell")` aimed at Kiln.

    The SDK reads RUNPOD_ENDPOINT_BASE_URL once, at `import runpod`
    (runpod/__init__.py), into `runpod.endpoint_url_base`; the port is only known
    now, so set the module attribute (what the env var would have set)."""
    saved = (runpod.api_key, runpod.endpoint_url_base)
    runpod.api_key = API_KEY
    runpod.endpoint_url_base = f"{flux_server.base_url}/v2"
    try:
        yield runpod.Endpoint(MODEL)
    finally:
        runpod.api_key, runpod.endpoint_url_base = saved


def test_runpod_run_sync_returns_flux_output(runpod_endpoint):
    prompt = "a photo of a cat"
    output = runpod_endpoint.run_sync({"input": fast_input(prompt, seed=7)}, timeout=120)
    assert_flux_output(output, prompt, seed=7)
    assert "images" not in output or len(output["images"]) == 1, (
        f"num_outputs=1 must not give several images: {short(output)}"
    )


def test_runpod_sdk_pointed_by_environment_variable(flux_server):
    # The user's flow exactly: RUNPOD_ENDPOINT_BASE_URL set before `import runpod`.
    import os
    import subprocess
    import sys

    script = (
        "import json, runpod\n"
        f"runpod.api_key = {API_KEY!r}\n"
        f"out = runpod.Endpoint({MODEL!r}).run_sync({json.dumps(fast_input('env', seed=5))}, timeout=120)\n"
        "print(json.dumps({'width': out['image']['width'], 'seed': out['seed']}))\n"
    )
    env = dict(os.environ, RUNPOD_ENDPOINT_BASE_URL=f"{flux_server.base_url}/v2")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["seed"] == 5, reply
    assert reply["width"] == fast_input("env", seed=5)["width"], reply


def test_runpod_sdk_wraps_bare_input(runpod_endpoint):
    # Endpoint.run_sync({...}) without an "input" key sends {"input": {...}}.
    output = runpod_endpoint.run_sync(fast_input("blurry", seed=3), timeout=120)
    assert_flux_output(output, "blurry", seed=3)


def test_runpod_num_outputs_gives_images_list(runpod_endpoint):
    output = runpod_endpoint.run_sync({"input": fast_input(seed=11, num_outputs=2)}, timeout=120)
    assert_flux_output(output, "a photo of a cat", seed=11)
    images = output.get("images")
    assert isinstance(images, list) and len(images) == 2, (
        f"num_outputs=2 must give output.images with 2 entries: {short(output)}"
    )
    for i, item in enumerate(images):
        assert_runpod_image(item, what=f"output.images[{i}]")


def test_runpod_same_seed_same_bytes(runpod_endpoint):
    a = runpod_endpoint.run_sync({"input": fast_input(seed=42)}, timeout=120)
    b = runpod_endpoint.run_sync({"input": fast_input(seed=42)}, timeout=120)
    c = runpod_endpoint.run_sync({"input": fast_input(seed=43)}, timeout=120)
    raw_a, raw_b, raw_c = (assert_flux_output(o, "a photo of a cat") for o in (a, b, c))
    assert raw_a == raw_b, "same seed and inputs must give byte-identical PNGs"
    assert raw_a != raw_c, "different seeds gave identical images"


def test_runpod_reported_seed_reproduces_unseeded_job(runpod_endpoint):
    first = runpod_endpoint.run_sync({"input": fast_input()}, timeout=120)
    raw = assert_flux_output(first, "a photo of a cat")
    again = runpod_endpoint.run_sync({"input": fast_input(seed=first["seed"])}, timeout=120)
    assert assert_flux_output(again, "a photo of a cat", seed=first["seed"]) == raw, (
        "re-running with the seed an unseeded job reported must reproduce its image"
    )


@pytest.mark.parametrize("fmt,pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_runpod_output_format(runpod_endpoint, fmt, pil_format):
    output = runpod_endpoint.run_sync(
        {"input": fast_input(seed=5, output_format=fmt, output_quality=80)}, timeout=120
    )
    assert isinstance(output, dict) and output.get("status") == "success", short(output)
    assert_runpod_image(output["image"], fmt=pil_format, what=f"output_format={fmt}")


def test_runpod_run_then_status_and_output(runpod_endpoint):
    job = runpod_endpoint.run({"input": fast_input(seed=9)})
    assert isinstance(job.job_id, str) and job.job_id
    first = job.status()
    assert first in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}, f"status() gave {first!r}"
    output = job.output(timeout=120)  # SDK polls /status once a second
    assert_flux_output(output, "a photo of a cat", seed=9)
    assert job.status() == "COMPLETED"


def test_runpod_runsync_http_shape(flux_server):
    r = rp_post(flux_server, "runsync", {"input": fast_input(seed=1)})
    assert r.status_code == 200, f"/runsync: HTTP {r.status_code}: {r.text[:500]}"
    body = r.json()
    assert body.get("status") == "COMPLETED", short(body)
    assert set(body) >= {"id", "status", "output", "delayTime", "executionTime"}, (
        f"/runsync keys: {sorted(body)}"
    )
    assert isinstance(body["delayTime"], int) and body["delayTime"] >= 0, short(body)
    assert isinstance(body["executionTime"], int) and body["executionTime"] >= 0, short(body)
    assert_flux_output(body["output"], "a photo of a cat", seed=1)
    # The result stays readable through /status.
    again = rp_status(flux_server, body["id"])
    assert again["status"] == "COMPLETED" and again["output"] == body["output"], short(again)


@pytest.mark.parametrize(
    "job_input,expected",
    [
        ({**FAST}, "prompt is a required input."),
        (fast_input(width=33), "width does not meet the constraints."),
        (fast_input(height=8), "height does not meet the constraints."),
        (fast_input(num_inference_steps=0), "num_inference_steps does not meet the constraints."),
        (fast_input(num_outputs=5), "num_outputs does not meet the constraints."),
        (fast_input(foo=1), "Unexpected input. foo is not a valid input option."),
    ],
    ids=["missing-prompt", "width-33", "height-8", "steps-0", "num_outputs-5", "unknown-foo"],
)
def test_runpod_invalid_input_fails_with_rp_validator_wording(flux_server, job_input, expected):
    r = rp_post(flux_server, "runsync", {"input": job_input})
    assert r.status_code == 200, (
        f"invalid input is a FAILED job, not an HTTP error: HTTP {r.status_code}: {r.text[:300]}"
    )
    body = r.json()
    if body.get("status") not in FINAL_STATES:
        body = wait_final(flux_server, body["id"])
    assert body["status"] == "FAILED", f"expected FAILED: {short(body)}"
    assert expected in error_text(body), f"error should contain {expected!r}: {short(body)}"


def test_runpod_sdk_run_sync_of_failed_job_returns_none(runpod_endpoint):
    # The SDK returns job_request.get("output") for any final state: a FAILED job
    # has no output, so run_sync gives None rather than raising.
    assert runpod_endpoint.run_sync({"input": {**FAST}}, timeout=120) is None


def test_runpod_unknown_job_is_404(flux_server, runpod_endpoint):
    r = rp_get(flux_server, "status/no-such-job-0000")
    assert r.status_code == 404, f"/status of an unknown id: HTTP {r.status_code}: {r.text[:300]}"
    job = runpod.endpoint.Job(MODEL, "no-such-job-0000", runpod_endpoint.rp_client)
    with pytest.raises(requests.HTTPError):
        job.status()


def test_runpod_stream_progress_then_output(runpod_endpoint):
    steps = 4
    job = runpod_endpoint.run({"input": fast_input(seed=21, num_inference_steps=steps)})
    chunks = drain(job.stream(), timeout=120)  # SDK polls /stream once a second
    assert chunks, "stream() yielded nothing"
    progress = [c for c in chunks if isinstance(c, dict) and "step" in c]
    assert progress, f"no progress chunks {{'step','total'}}: {short(chunks)}"
    for c in progress:
        assert c.get("total") == steps, f"progress chunk total != {steps}: {c}"
        assert 0 <= c["step"] <= steps, f"progress step out of range: {c}"
    step_numbers = [c["step"] for c in progress]
    assert step_numbers == sorted(step_numbers), f"steps not increasing: {step_numbers}"
    final = chunks[-1]
    assert_flux_output(final, "a photo of a cat", seed=21)
    assert job.status() == "COMPLETED"


def test_runpod_cancel_queued_job_and_its_stream_ends(flux_server, runpod_endpoint):
    with busy_worker(flux_server):
        job = runpod_endpoint.run({"input": fast_input(seed=31)})
        queued = rp_status(flux_server, job.job_id)
        assert queued["status"] == "IN_QUEUE", (
            f"job behind a busy worker should be IN_QUEUE: {short(queued)}"
        )
        cancelled = job.cancel()
        assert cancelled.get("status") == "CANCELLED", f"/cancel: {short(cancelled)}"
        assert cancelled.get("id") == job.job_id, f"/cancel id: {short(cancelled)}"
    assert rp_status(flux_server, job.job_id)["status"] == "CANCELLED"
    # The SDK's stream() does not treat CANCELLED as final; Kiln's /stream must
    # still end cleanly: status CANCELLED, nothing more to read.
    r = rp_get(flux_server, f"stream/{job.job_id}")
    assert r.status_code == 200, f"/stream of a cancelled job: HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    assert body.get("status") == "CANCELLED", short(body)
    assert isinstance(body.get("stream"), list), short(body)
    again = rp_get(flux_server, f"stream/{job.job_id}").json()
    assert again.get("status") == "CANCELLED" and again.get("stream") == [], (
        f"a second /stream read of a cancelled job must be empty: {short(again)}"
    )


def test_runpod_retry_failed_job(flux_server):
    job_id = rp_submit(flux_server, {**FAST})  # no prompt: FAILED
    assert wait_final(flux_server, job_id)["status"] == "FAILED"
    r = rp_post(flux_server, f"retry/{job_id}")
    assert r.status_code == 200, f"/retry: HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    assert body.get("status") == "IN_QUEUE", f"/retry of a FAILED job: {short(body)}"
    assert body.get("id") == job_id, f"/retry id: {short(body)}"
    again = wait_final(flux_server, job_id)
    assert again["status"] == "FAILED", short(again)  # same invalid input
    assert "prompt is a required input." in error_text(again), short(again)


def test_runpod_retry_of_completed_job_is_refused(flux_server):
    job_id = rp_submit(flux_server, fast_input(seed=2))
    assert wait_final(flux_server, job_id)["status"] == "COMPLETED"
    r = rp_post(flux_server, f"retry/{job_id}")
    assert r.status_code in (400, 404, 409), (
        f"/retry is only for FAILED/TIMED_OUT jobs; a COMPLETED one gave "
        f"HTTP {r.status_code}: {r.text[:300]}"
    )


def test_runpod_purge_queue_and_health(flux_server, runpod_endpoint):
    with busy_worker(flux_server):
        queued = [rp_submit(flux_server, fast_input(seed=100 + i)) for i in range(3)]
        health = runpod_endpoint.health()
        assert set(health) >= {"jobs", "workers"}, f"/health: {short(health)}"
        jobs, workers = health["jobs"], health["workers"]
        for key in ("completed", "failed", "inProgress", "inQueue", "retried"):
            assert isinstance(jobs.get(key), int) and jobs[key] >= 0, f"jobs.{key}: {health}"
        for key in ("idle", "running"):
            assert isinstance(workers.get(key), int) and workers[key] >= 0, (
                f"workers.{key}: {health}"
            )
        assert jobs["inQueue"] >= 3, f"3 jobs queued behind a busy worker: {health}"
        assert jobs["inProgress"] >= 1, f"the busy worker's job: {health}"

        purged = runpod_endpoint.purge_queue()
        assert purged.get("status") == "completed", f"/purge-queue: {purged}"
        assert purged.get("removed") == 3, f"3 queued jobs should be removed: {purged}"
        assert runpod_endpoint.health()["jobs"]["inQueue"] == 0
        for job_id in queued:
            r = rp_get(flux_server, f"status/{job_id}")
            assert r.status_code == 404 or r.json().get("status") != "IN_QUEUE", (
                f"purged job {job_id} still queued: {r.text[:300]}"
            )


def test_runpod_webhook_gets_status_body(runpod_endpoint, flux_server, webhook_sink):
    hook = webhook_sink.url("/runpod")
    job = runpod_endpoint.run({"input": fast_input(seed=55), "webhook": hook})
    deliveries = webhook_sink.wait_for(
        lambda ds: any(d["path"] == "/runpod" for d in ds), timeout=120
    )
    body = [d for d in deliveries if d["path"] == "/runpod"][-1]["body"]
    assert isinstance(body, dict), f"webhook body is not JSON: {str(body)[:300]}"
    assert body.get("id") == job.job_id, f"webhook id: {short(body)}"
    assert body.get("status") == "COMPLETED", f"webhook status: {short(body)}"
    status = rp_status(flux_server, job.job_id)
    assert body.get("output") == status.get("output"), "webhook output differs from /status"
    assert_flux_output(body["output"], "a photo of a cat", seed=55)


def test_runpod_root_mount_serves_first_model(flux_server):
    r = requests.post(
        f"{flux_server.base_url}/runsync",
        json={"input": fast_input(seed=8)},
        headers=auth(flux_server),
        timeout=HTTP_TIMEOUT,
    )
    assert r.status_code == 200, f"root /runsync: HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    assert body.get("status") == "COMPLETED", short(body)
    assert_flux_output(body["output"], "a photo of a cat", seed=8)
    s = requests.get(
        f"{flux_server.base_url}/status/{body['id']}", headers=auth(flux_server), timeout=30
    )
    assert s.status_code == 200 and s.json().get("status") == "COMPLETED", s.text[:300]


def test_runpod_asyncio_endpoint(flux_server, runpod_endpoint):
    # AsyncioEndpoint goes through aiohttp (resp.json() insists on an
    # application/json content type) and always wraps the input itself.
    async def go():
        async with aiohttp.ClientSession() as session:
            endpoint = runpod.AsyncioEndpoint(MODEL, session)
            job = await endpoint.run(fast_input(seed=77))
            output = await job.output(timeout=120)
            status = await job.status()
            health = await endpoint.health()
            return output, status, health

    output, status, health = asyncio.run(go())
    assert status == "COMPLETED"
    assert_flux_output(output, "a photo of a cat", seed=77)
    assert "jobs" in health and "workers" in health, short(health)


def test_runpod_sdk_with_wrong_key_raises_unauthorized(runpod_endpoint):
    endpoint = runpod.Endpoint(MODEL, api_key="wrong-key")
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        endpoint.run_sync({"input": fast_input()}, timeout=30)


# ---------------------------------------------------------------- Cog (HTTP)


def cog_post(server, path: str, body: dict | None, headers: dict | None = None, **kw):
    return requests.post(
        f"{server.base_url}{path}",
        json=body,
        headers={**auth(server), **(headers or {})},
        timeout=kw.pop("timeout", HTTP_TIMEOUT),
        **kw,
    )


def test_cog_discovery_and_health_check(flux_server):
    wait_idle(flux_server)
    r = requests.get(f"{flux_server.base_url}/", headers=auth(flux_server), timeout=30)
    assert r.status_code == 200, f"GET /: HTTP {r.status_code}: {r.text[:300]}"
    doc = r.json()
    assert doc.get("predictions_url") == "/predictions", f"GET / discovery doc: {doc}"
    assert doc.get("openapi_url") == "/openapi.json", f"GET / discovery doc: {doc}"
    h = requests.get(f"{flux_server.base_url}/health-check", timeout=30)
    assert h.status_code == 200, f"/health-check: HTTP {h.status_code}: {h.text[:300]}"
    health = h.json()
    assert health.get("status") == "READY", f"/health-check of an idle server: {health}"
    assert isinstance(health.get("setup"), dict), f"/health-check setup: {health}"
    assert health["setup"].get("status") == "succeeded", f"/health-check setup: {health}"


def test_cog_openapi_input_schema(flux_server):
    r = requests.get(f"{flux_server.base_url}/openapi.json", headers=auth(flux_server), timeout=30)
    assert r.status_code == 200, f"/openapi.json: HTTP {r.status_code}: {r.text[:300]}"
    schemas = r.json()["components"]["schemas"]
    assert "Input" in schemas, f"components.schemas: {sorted(schemas)}"
    inp = schemas["Input"]
    assert "prompt" in inp.get("required", []), f"Input.required: {inp.get('required')}"
    props = inp["properties"]
    for field in ("prompt", "width", "height", "num_inference_steps", "seed", "num_outputs"):
        assert field in props, f"Input.properties lacks {field}: {sorted(props)}"
    orders = {name: p.get("x-order") for name, p in props.items()}
    assert all(isinstance(o, int) for o in orders.values()), f"x-order missing: {orders}"
    assert len(set(orders.values())) == len(orders), f"x-order values repeat: {orders}"
    assert props["prompt"]["x-order"] == 0, f"prompt should come first: {orders}"
    assert props["width"].get("minimum") == 16 and props["width"].get("maximum") == 4096, (
        f"width bounds: {props['width']}"
    )
    # As cog's FastAPI server writes it: a choice is a component of its own.
    assert props["output_format"]["allOf"] == [{"$ref": "#/components/schemas/output_format"}]
    assert schemas["output_format"]["enum"] == ["png", "jpeg", "webp"]
    assert props["image"]["format"] == "uri"
    for name in ("HTTPValidationError", "ValidationError", "PredictionRequest",
                 "PredictionResponse", "Status", "WebhookEvent", "Output"):
        assert name in schemas, sorted(schemas)
    paths = r.json()["paths"]
    put = paths["/predictions/{prediction_id}"]["put"]
    assert put["operationId"] == "predict_idempotent_predictions__prediction_id__put"
    assert {"name": "prediction_id", "in": "path", "required": True,
            "schema": {"type": "string", "title": "Prediction ID"}} in put["parameters"]
    assert {"200", "202", "422"} <= set(put["responses"]), put["responses"]


def test_cog_sync_prediction(flux_server):
    prompt = "a photo of a cat"
    r = cog_post(flux_server, "/predictions", {"input": fast_input(prompt, seed=4, num_outputs=2)})
    assert r.status_code == 200, f"POST /predictions: HTTP {r.status_code}: {r.text[:500]}"
    p = r.json()
    expected = {
        "id", "status", "output", "error", "logs", "metrics",
        "created_at", "started_at", "completed_at", "input",
    }  # fmt: skip
    assert set(p) >= expected, f"prediction keys: missing {sorted(expected - set(p))}"
    assert p["status"] == "succeeded", short(p)
    assert p["error"] is None, short(p)
    assert isinstance(p["metrics"].get("predict_time"), (int, float)), short(p)
    assert p["input"].get("prompt") == prompt and p["input"].get("seed") == 4, short(p)
    assert isinstance(p["output"], list) and len(p["output"]) == 2, short(p)
    for i, uri in enumerate(p["output"]):
        assert_image(data_uri_bytes(uri), what=f"output[{i}]")


def test_cog_same_seed_same_bytes(flux_server):
    outs = []
    for _ in range(2):
        r = cog_post(flux_server, "/predictions", {"input": fast_input(seed=12)})
        assert r.status_code == 200, r.text[:300]
        outs.append(data_uri_bytes(r.json()["output"][0]))
    assert outs[0] == outs[1], "same seed and inputs must give byte-identical PNGs"


@pytest.mark.parametrize(
    "job_input,field",
    [
        (fast_input(width=33), "width"),
        ({**FAST}, "prompt"),
        (fast_input(num_outputs=9), "num_outputs"),
        (fast_input(output_format="gif"), "output_format"),
    ],
    ids=["width-33", "missing-prompt", "num_outputs-9", "format-gif"],
)
def test_cog_invalid_input_is_422(flux_server, job_input, field):
    r = cog_post(flux_server, "/predictions", {"input": job_input})
    assert r.status_code == 422, f"invalid input: HTTP {r.status_code}: {r.text[:500]}"
    detail = r.json().get("detail")
    assert isinstance(detail, list) and detail, f"422 body: {r.text[:500]}"
    locs = [d.get("loc") for d in detail]
    assert ["body", "input", field] in locs, f"422 detail should point at {field}: {detail}"
    for d in detail:
        assert isinstance(d.get("msg"), str) and isinstance(d.get("type"), str), d


def read_sse(response: requests.Response) -> list[tuple[str, object]]:
    """Parse an SSE body into (event, data) pairs; data JSON-decoded when it can be."""
    events: list[tuple[str, object]] = []
    name, data_lines = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line is None:
            continue
        if line == "":
            if data_lines:
                text = "\n".join(data_lines)
                try:
                    data = json.loads(text)
                except ValueError:
                    data = text
                events.append((name, data))
            name, data_lines = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data_lines.append(line[len("data:") :].lstrip(" "))
    if data_lines:
        events.append((name, "\n".join(data_lines)))
    return events


def test_cog_server_sent_events(flux_server):
    with cog_post(
        flux_server,
        "/predictions",
        {"input": fast_input(seed=6)},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=120,
    ) as r:
        assert r.status_code == 200, f"SSE: HTTP {r.status_code}: {r.text[:300]}"
        ctype = r.headers.get("Content-Type", "")
        assert ctype.startswith("text/event-stream"), f"Content-Type: {ctype}"
        events = read_sse(r)
    names = [n for n, _ in events]
    assert names and names[0] == "start", f"first event must be start: {names}"
    assert "output" in names, f"no output event: {names}"
    assert names[-1] == "completed", f"last event must be completed: {names}"
    done = events[-1][1]
    assert isinstance(done, dict) and done.get("status") == "succeeded", short(done)
    assert_image(data_uri_bytes(done["output"][0]), what="completed.output[0]")


def test_cog_async_prediction_webhooks(flux_server, webhook_sink):
    def terminal(path):
        return [
            d for d in webhook_sink.received(path)
            if isinstance(d["body"], dict) and d["body"].get("status") == "succeeded"
        ]  # fmt: skip

    # All events to /all; then (one at a time) only "completed" to /done.
    r_all = cog_post(
        flux_server,
        "/predictions",
        {"input": fast_input(seed=13), "webhook": webhook_sink.url("/all")},
        headers={"Prefer": "respond-async"},
    )
    webhook_sink.wait_for(lambda _: terminal("/all"), timeout=120)
    r_done = cog_post(
        flux_server,
        "/predictions",
        {
            "input": fast_input(seed=14),
            "webhook": webhook_sink.url("/done"),
            "webhook_events_filter": ["completed"],
        },
        headers={"Prefer": "respond-async"},
    )
    for r in (r_all, r_done):
        assert r.status_code == 202, f"Prefer: respond-async: HTTP {r.status_code}: {r.text[:300]}"
        assert r.json().get("status") in {"starting", "processing"}, r.text[:300]
    id_all, id_done = r_all.json()["id"], r_done.json()["id"]
    webhook_sink.wait_for(lambda _: terminal("/done"), timeout=120)
    time.sleep(1.0)  # let any stray late delivery arrive

    all_hooks = [d["body"] for d in webhook_sink.received("/all")]
    assert all(b.get("id") == id_all for b in all_hooks), short(all_hooks)
    assert all_hooks[0].get("status") in {"starting", "processing"}, (
        f"the first (start) webhook: {short(all_hooks[0])}"
    )
    assert all_hooks[-1].get("status") == "succeeded", "completed must be the last webhook"
    assert len(terminal("/all")) == 1, "exactly one terminal webhook"
    assert_image(data_uri_bytes(all_hooks[-1]["output"][0]), what="webhook output")

    done_hooks = [d["body"] for d in webhook_sink.received("/done")]
    assert len(done_hooks) == 1, (
        f"webhook_events_filter=['completed'] must give exactly one webhook, "
        f"got {[h.get('status') for h in done_hooks]}"
    )
    assert done_hooks[0].get("id") == id_done and done_hooks[0].get("status") == "succeeded"


def test_cog_put_is_idempotent(flux_server, webhook_sink):
    pred_id = f"kiln-put-{uuid.uuid4().hex[:12]}"
    body = {
        "input": fast_input(seed=15),
        "webhook": webhook_sink.url("/put"),
        "webhook_events_filter": ["completed"],
    }
    url = f"{flux_server.base_url}/predictions/{pred_id}"
    headers = {**auth(flux_server), "Prefer": "respond-async"}
    with busy_worker(flux_server):  # keep the prediction in flight for both PUTs
        first = requests.put(url, json=body, headers=headers, timeout=30)
        second = requests.put(url, json=body, headers=headers, timeout=30)
    for r in (first, second):
        assert r.status_code == 202, f"PUT {url}: HTTP {r.status_code}: {r.text[:300]}"
        assert r.json().get("id") == pred_id, r.text[:300]
    webhook_sink.wait_for(lambda _: webhook_sink.received("/put"), timeout=180)
    time.sleep(1.0)
    hooks = [d["body"] for d in webhook_sink.received("/put")]
    assert len(hooks) == 1, (
        f"two PUTs of one id must run one prediction; got {len(hooks)} completed webhooks"
    )
    assert hooks[0].get("id") == pred_id and hooks[0].get("status") == "succeeded", short(hooks)


def test_cog_cancel(flux_server, webhook_sink):
    r = cog_post(flux_server, "/predictions/no-such-prediction/cancel", None)
    assert r.status_code == 404, f"cancel of an unknown id: HTTP {r.status_code}: {r.text[:300]}"
    with busy_worker(flux_server):  # the prediction waits in the queue
        start = cog_post(
            flux_server,
            "/predictions",
            {
                "input": fast_input(seed=16),
                "webhook": webhook_sink.url("/cancel"),
                "webhook_events_filter": ["completed"],
            },
            headers={"Prefer": "respond-async"},
        )
        assert start.status_code == 202, start.text[:300]
        pred_id = start.json()["id"]
        c = cog_post(flux_server, f"/predictions/{pred_id}/cancel", None)
        assert c.status_code == 200, f"cancel: HTTP {c.status_code}: {c.text[:300]}"
        assert c.json() == {}, f"cancel body: {c.text[:300]}"
    webhook_sink.wait_for(lambda _: webhook_sink.received("/cancel"), timeout=120)
    final = webhook_sink.received("/cancel")[-1]["body"]
    assert final.get("id") == pred_id and final.get("status") == "canceled", short(final)


def test_cog_defaults_busy_409_and_stripped_inputs(kiln_serve):
    """Cog's own behaviour, on a server without `[cog] queue`: all slots busy is
    BUSY and 409; unknown input fields are dropped and named in the logs."""
    server = kiln_serve(name="cog-default")
    r = cog_post(server, "/predictions", {"input": fast_input(seed=3, colour="red")})
    assert r.status_code == 200, r.text[:300]
    assert "colour" not in r.json()["input"], short(r.json())
    assert r.json()["logs"].startswith("Stripped unknown input fields: colour\n"), short(r.json())
    with busy_worker(server):
        health = requests.get(f"{server.base_url}/health-check", timeout=10).json()
        assert health["status"] == "BUSY", health
        r = cog_post(server, "/predictions", {"input": fast_input(seed=4)},
                     headers={"Prefer": "respond-async"})
        assert r.status_code == 409, r.text[:300]
        assert r.json() == {"detail": "Already running a prediction"}, r.text[:300]
    server.stop()


# ------------------------------------------------------------- OpenAI (SDK)


@pytest.fixture(scope="session")
def openai_client(flux_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{flux_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


def test_openai_models_list(openai_client):
    ids = [m.id for m in openai_client.models.list()]
    assert MODEL in ids, f"models.list(): {ids}"
    model = next(m for m in openai_client.models.list() if m.id == MODEL)
    assert model.object == "model", model
    assert isinstance(model.created, int) and isinstance(model.owned_by, str), model


def test_openai_images_generate(openai_client):
    resp = openai_client.images.generate(
        model=MODEL,
        prompt="a photo of a cat",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 2},
    )
    assert isinstance(resp.created, int) and resp.created > 1_600_000_000, resp.created
    assert resp.data is not None and len(resp.data) == 2, resp
    for i, item in enumerate(resp.data):
        assert item.b64_json, f"data[{i}].b64_json is empty"
        assert_image(decode_b64(item.b64_json), what=f"data[{i}]")


def test_openai_url_responses_serve_the_image_for_an_hour(openai_client, flux_server):
    def generate(response_format):
        return openai_client.images.generate(
            model=MODEL, prompt="a photo of a cat", n=1, size="32x32",
            response_format=response_format, extra_body={"seed": 21, "num_inference_steps": 2},
        ).data[0]

    linked = generate("url")
    assert linked.url.startswith(f"{flux_server.base_url}/v1/images/files/"), linked.url
    # Fetched as a browser would: no API key, the token is the capability.
    r = requests.get(linked.url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    assert r.content == decode_b64(generate("b64_json").b64_json), "the link serves the image"
    gone = requests.get(f"{flux_server.base_url}/v1/images/files/{'0' * 64}", timeout=30)
    assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"], gone.text


def test_openai_same_seed_same_bytes(openai_client):
    def one():
        resp = openai_client.images.generate(
            model=MODEL,
            prompt="a photo of a cat",
            n=1,
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 99, "num_inference_steps": 2},
        )
        return decode_b64(resp.data[0].b64_json)

    assert one() == one(), "same seed and inputs must give byte-identical PNGs"


def test_openai_bad_size_is_bad_request(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(
            model=MODEL, prompt="a cat", size="33x32", response_format="b64_json"
        )
    err = info.value
    assert err.status_code == 400
    # The SDK keeps the inner "error" object as .body and copies param/type/code.
    assert isinstance(err.body, dict), err.body
    assert set(err.body) >= {"message", "type", "param", "code"}, (
        f"error object needs message, type, param and code: {err.body}"
    )
    assert err.param == "size" and err.body["param"] == "size", err.body
    assert isinstance(err.body["message"], str) and err.body["message"], err.body


def test_openai_unknown_model_is_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.images.generate(
            model="no-such-model", prompt="a cat", size="32x32", response_format="b64_json"
        )
    assert isinstance(info.value.body, dict) and "message" in info.value.body, info.value.body


def test_openai_wrong_key_is_authentication_error(flux_server):
    client = openai.OpenAI(
        base_url=f"{flux_server.base_url}/v1", api_key="wrong-key", max_retries=0, timeout=30
    )
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ---------------------------------------------------------- across protocols


def test_same_seed_same_pixels_across_protocols(flux_server, runpod_endpoint, openai_client):
    prompt, seed = "a photo of a cat", 2024
    rp = runpod_endpoint.run_sync({"input": fast_input(prompt, seed=seed)}, timeout=120)
    rp_img = open_image(assert_flux_output(rp, prompt, seed=seed))
    r = cog_post(flux_server, "/predictions", {"input": fast_input(prompt, seed=seed)})
    assert r.status_code == 200, r.text[:300]
    cog_img = open_image(data_uri_bytes(r.json()["output"][0]))
    oa = openai_client.images.generate(
        model=MODEL,
        prompt=prompt,
        n=1,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": 2},
    )
    oa_img = open_image(decode_b64(oa.data[0].b64_json))
    assert rp_img.tobytes() == cog_img.tobytes(), "RunPod and Cog images differ for one seed"
    assert rp_img.tobytes() == oa_img.tobytes(), "RunPod and OpenAI images differ for one seed"


# ---------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/models"),
        ("POST", f"/v2/{MODEL}/run"),
        ("POST", f"/v2/{MODEL}/runsync"),
        ("GET", f"/v2/{MODEL}/status/any-id"),
        ("POST", "/run"),
        ("POST", "/predictions"),
    ],
)
def test_routes_need_a_key(flux_server, method, path):
    url = f"{flux_server.base_url}{path}"
    body = {"input": fast_input()} if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        r = requests.request(method, url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (
            f"{method} {path} with headers {headers}: expected 401, got "
            f"HTTP {r.status_code}: {r.text[:300]}"
        )


def test_raw_key_without_bearer_is_accepted(flux_server):
    r = requests.get(
        f"{flux_server.base_url}/v1/models", headers={"Authorization": API_KEY}, timeout=30
    )
    assert r.status_code == 200, f"raw key in Authorization: HTTP {r.status_code}: {r.text[:300]}"


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/health/live", "/ping", "/health-check"])
def test_health_routes_need_no_key(flux_server, path):
    r = requests.get(f"{flux_server.base_url}{path}", timeout=30)
    assert r.status_code == 200, f"GET {path} without a key: HTTP {r.status_code}: {r.text[:300]}"


# ---------------------------------------------------------------- durability


DURABLE_JOBS = 6
DURABLE_INPUT = {"width": 64, "height": 64, "num_inference_steps": 100}


@pytest.mark.parametrize("on_restart", ["requeue", "fail"])
def test_jobs_survive_sigkill(kiln_serve, on_restart):
    server = kiln_serve(
        model_overrides={"max_queue": 8},
        jobs={"result_ttl": "30m", "on_restart": on_restart},
        name=f"durable-{on_restart}",
    )
    try:
        ids = [
            rp_submit(server, {"prompt": f"durable {i}", "seed": 1000 + i, **DURABLE_INPUT})
            for i in range(DURABLE_JOBS)
        ]
        # Kill while a job runs: poll until one is IN_PROGRESS (give up after 30 s).
        before: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            before = {i: rp_status(server, i)["status"] for i in ids}
            if "IN_PROGRESS" in before.values() or all(s in FINAL_STATES for s in before.values()):
                break
            time.sleep(0.02)
        server.kill()
        server.start()

        after = {i: wait_final(server, i, timeout=300) for i in ids}
        summary = {i: (before.get(i), after[i]["status"]) for i in ids}
        print(f"on_restart={on_restart}: (status before the kill, after restart): {summary}")
        was_done = {i for i, s in before.items() if s == "COMPLETED"}
        for i in was_done:
            assert after[i]["status"] == "COMPLETED", (
                f"job {i} was COMPLETED before the kill but is not after restart: {summary}"
            )
        failed = [i for i in ids if after[i]["status"] == "FAILED"]
        if on_restart == "requeue":
            assert not failed, f"on_restart=requeue lost jobs (before, after): {summary}"
        else:
            # Only the job running at the kill may be FAILED (concurrency 1); the
            # queued ones must still run. Which job that was is only known to
            # the server (one may finish between our last poll and the kill).
            assert len(failed) <= 1, f"on_restart=fail failed more than the running job: {summary}"
            for i in failed:
                assert after[i].get("error"), f"FAILED job {i} carries no error: {after[i]}"
        for i in ids:
            if after[i]["status"] == "FAILED" and on_restart == "fail":
                continue
            assert after[i]["status"] == "COMPLETED", f"job {i}: {summary}"
            out = after[i].get("output")
            assert_runpod_image(
                (out or {}).get("image"), size=(64, 64), what=f"job {i} output.image"
            )
    except Exception:
        print("---- kiln stderr (tail) ----\n" + server.stderr_tail())
        raise
    finally:
        server.stop()


# ------------------------------------------------------------------ overload


def test_overload_gives_429_with_retry_after(kiln_serve):
    server = kiln_serve(model_overrides={"max_queue": 2}, name="overload")
    try:
        job_input = {"prompt": "overload", "width": 64, "height": 64, "num_inference_steps": 50}

        def submit(i):
            return rp_post(server, "run", {"input": {**job_input, "seed": i}})

        with ThreadPoolExecutor(max_workers=10) as pool:
            responses = list(pool.map(submit, range(10)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, f"/run under load: {codes}"
        rejected = [r for r in responses if r.status_code == 429]
        accepted = [r.json()["id"] for r in responses if r.status_code == 200]
        assert rejected, f"10 jobs at once with max_queue=2 must get some 429s: {codes}"
        assert accepted, f"some jobs must be accepted: {codes}"
        for r in rejected:
            retry_after = r.headers.get("Retry-After")
            assert retry_after, f"429 without Retry-After: {dict(r.headers)}"
            assert retry_after.isdigit() or email.utils.parsedate_to_datetime(retry_after), (
                f"Retry-After is neither seconds nor an HTTP date: {retry_after!r}"
            )
        for job_id in accepted:
            final = wait_final(server, job_id, timeout=300)
            assert final["status"] == "COMPLETED", f"accepted job {job_id}: {short(final)}"

        # Memory stays bounded: hundreds of refused submissions against a full
        # queue leave the server's resident set where it was.
        blocker = rp_post(server, "run", {"input": {**job_input, "num_inference_steps": 100}})
        assert blocker.status_code == 200, blocker.text
        for i in range(2):
            rp_post(server, "run", {"input": {**job_input, "seed": 100 + i}})
        before = rss_kib(server.proc.pid)
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(lambda i: submit(1000 + i).status_code, range(400)))
        after = rss_kib(server.proc.pid)
        assert codes.count(429) >= 390, f"a full queue must refuse: {sorted(set(codes))}"
        assert after - before < 32 * 1024, f"RSS grew {before} -> {after} KiB under refused load"
        rp_post(server, "purge-queue", {})
        rp_post(server, f"cancel/{blocker.json()['id']}", {})
    finally:
        server.stop()


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc status")


@pytest.mark.parametrize("url", ["not a url", "file:///etc/passwd", "ftp://example.com/hook"])
def test_unusable_webhooks_are_refused_at_submission(flux_server, url):
    """Issue 20 item 8: a webhook delivery could never use is refused, naming the field."""
    cog = cog_post(flux_server, "/predictions", {"input": fast_input(), "webhook": url},
                   headers={"Prefer": "respond-async"})
    assert cog.status_code == 422, cog.text[:300]
    assert ["body", "webhook"] in [d.get("loc") for d in cog.json()["detail"]], cog.text[:300]
    runpod = requests.post(f"{flux_server.base_url}/v2/{MODEL}/run", headers=flux_server.auth_headers,
                           json={"input": fast_input(), "webhook": url}, timeout=30)
    assert runpod.status_code == 400, runpod.text[:300]
    assert "webhook" in runpod.text
