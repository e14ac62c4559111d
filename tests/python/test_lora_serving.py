"""LoRAs through a real `kiln serve` over RunPod's API: a LoRA from the LoRA
folder and the same file from a loopback URL give the same image (and one that
differs from no LoRA, so a LoRA that silently does nothing fails), the response
reports what matched, fused mode gives the runtime image, and bad sources fail
their job alone with a message naming the field while the server keeps serving.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import requests

from conftest import REPO_ROOT, flux_model_entry

LORA_DIR = REPO_ROOT / "fixtures" / "flux" / "lora"
TINY_DEV = REPO_ROOT / "fixtures" / "flux" / "tiny-dev"
MODEL = "flux-dev"
CALL = json.loads((LORA_DIR / "index.json").read_text())["call"]
BASE = {**CALL, "seed": 7}


@pytest.fixture(scope="module")
def lora_host():
    """A loopback HTTP server for the LoRA fixture folder."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(LORA_DIR)
    )
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def lora_server(kiln_serve, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-cache")
    return kiln_serve(
        name="lora",
        models=[flux_model_entry(name=MODEL, source=str(TINY_DEV))],
        env={
            "KILN_LORA_DIRS": str(LORA_DIR),
            "KILN_LORA_CACHE_DIR": str(cache),
            # Open the allow-list to this test's loopback server only.
            "KILN_LORA_ALLOWED_HOSTS": "127.0.0.1",
            "KILN_LORA_PRIVATE_HOSTS": "127.0.0.1",
        },
    )


def runsync(server, job_input: dict) -> dict:
    r = requests.post(
        f"{server.base_url}/v2/{MODEL}/runsync?wait=120000",
        json={"input": job_input},
        headers=server.auth_headers,
        timeout=180,
    )
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert body["status"] in {"COMPLETED", "FAILED"}, body
    return body


def image_of(body: dict) -> str:
    assert body["status"] == "COMPLETED", body.get("error")
    return body["output"]["image"]["image_base64"]


def test_url_and_folder_loras_give_the_same_image_and_report_their_match(lora_server, lora_host):
    base = image_of(runsync(lora_server, BASE))
    local = runsync(lora_server, {**BASE, "lora_weights": "style_peft.safetensors", "lora_scale": 0.7})
    assert image_of(local) != base, "the LoRA must change the image"
    report = local["output"]["loras"][0]
    assert report["format"] == "diffusers/PEFT"
    assert report["unmatched_modules"] == [] and report["matched_modules"] > 0
    remote = runsync(lora_server, {**BASE, "loras": [
        {"source": f"{lora_host}/style_peft.safetensors", "scale": 0.7}]})
    assert image_of(remote) == image_of(local)
    assert len(remote["output"]["loras"][0]["sha256"]) == 64
    fused = runsync(lora_server, {**BASE, "lora_path": "style_peft.safetensors",
                                  "lora_scale": 0.7, "lora_mode": "fused"})
    assert fused["output"]["lora_mode"] == "fused"
    assert image_of(fused) == image_of(local)
    assert image_of(runsync(lora_server, BASE)) == base, "unfused weights are exact"


@pytest.mark.parametrize("lora,expected", [
    ("../tiny-dev/transformer/diffusion_pytorch_model.safetensors", "is not a file in the LoRA folders"),
    ("https://example.com/style.safetensors", "not in the allowed hosts"),
    ("http://localhost:9/style.safetensors", "not in the allowed hosts"),
    ("missing.safetensors", "is not a file in the LoRA folders"),
    ("references.safetensors", "unknown LoRA format"),
], ids=["traversal", "host", "loopback-name", "missing", "not-a-lora"])
def test_bad_sources_fail_their_job_alone(lora_server, lora_host, lora, expected):
    body = runsync(lora_server, {**BASE, "lora_weights": lora})
    assert body["status"] == "FAILED"
    error = body["error"] if isinstance(body["error"], str) else json.dumps(body["error"])
    assert "lora_weights" in error and expected in error, error
    assert body_ok(runsync(lora_server, BASE))


def test_an_unreachable_url_is_a_clear_failure(lora_server, lora_host):
    body = runsync(lora_server, {**BASE, "lora_weights": f"{lora_host}/nope.safetensors"})
    assert body["status"] == "FAILED" and "404" in json.dumps(body["error"]), body
    health = requests.get(f"{lora_server.base_url}/v2/health/ready", timeout=10)
    assert health.status_code == 200


def body_ok(body: dict) -> bool:
    return body["status"] == "COMPLETED" and bool(image_of(body))
