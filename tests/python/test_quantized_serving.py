"""Quantized image weights end to end (issue 17): one `kiln serve` holding the
tiny FLUX.1-dev dense and with `config = { quantize = "int8" }` side by side,
called through the official runpod SDK, with each model's resident bytes on
/metrics; and a GGUF FLUX transformer written by gguf-py in a diffusers folder,
registered, shown loaded and predicted with the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import requests
import runpod
from PIL import Image

from conftest import API_KEY, REPO_ROOT, kiln_bin

TINY_DEV = REPO_ROOT / "fixtures" / "flux" / "tiny-dev"
GGUF = REPO_ROOT / "fixtures" / "gguf" / "flux1-tiny-dev-Q8_0.gguf"
SMALL = {"prompt": "a red fox", "width": 64, "height": 48, "num_inference_steps": 2, "seed": 9}


@pytest.fixture(scope="module")
def quantized_server(kiln_serve):
    return kiln_serve(
        name="quantized",
        models=[
            {"name": "dense", "source": str(TINY_DEV), "max_queue": 4},
            {"name": "int8", "source": str(TINY_DEV), "max_queue": 4, "config": {"quantize": "int8"}},
        ],
    )


def resident_bytes(server) -> dict[str, int]:
    text = requests.get(f"{server.base_url}/metrics", headers=server.auth_headers, timeout=30).text
    found = re.findall(r'kiln_model_resident_bytes\{model="([^"]+)"\} (\d+)', text)
    return {model: int(value) for model, value in found}


def test_a_quantized_model_serves_beside_its_dense_self(quantized_server):
    saved = (runpod.api_key, runpod.endpoint_url_base)
    runpod.api_key, runpod.endpoint_url_base = API_KEY, f"{quantized_server.base_url}/v2"
    try:
        outputs = {name: runpod.Endpoint(name).run_sync({"input": SMALL}, timeout=300) for name in ("dense", "int8")}
    finally:
        runpod.api_key, runpod.endpoint_url_base = saved
    for name, output in outputs.items():
        assert output["status"] == "success" and output["seed"] == 9, (name, output)
    resident = resident_bytes(quantized_server)
    assert resident["int8"] < resident["dense"], resident


def test_a_bad_quantization_fails_that_model_naming_the_key(kiln_serve):
    server = kiln_serve(
        name="quantized-bad",
        models=[
            {"name": "good", "source": str(TINY_DEV), "max_queue": 4},
            {"name": "bad", "source": str(TINY_DEV), "max_queue": 4, "config": {"quantize": "int3"}},
        ],
    )
    ready = requests.get(f"{server.base_url}/v2/models/bad/ready", headers=server.auth_headers, timeout=30).json()
    assert "quantize" in json.dumps(ready) and "int8, q8_0, q4_k" in json.dumps(ready), ready


def test_a_gguf_flux_transformer_registers_loads_and_predicts(tmp_path):
    folder = tmp_path / "flux-gguf"
    shutil.copytree(TINY_DEV, folder, ignore=shutil.ignore_patterns("reference", "*.safetensors"))
    shutil.copy(GGUF, folder / "transformer")
    # The copy kept every component's config; the weights of the others come back.
    for part in ("text_encoder", "text_encoder_2", "vae"):
        for weights in (TINY_DEV / part).glob("*.safetensors"):
            shutil.copy(weights, folder / part)
    env = {**os.environ, "KILN_HOME": str(tmp_path / "home")}
    kiln = str(kiln_bin())

    def run(*args):
        done = subprocess.run([kiln, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("models", "register", "test.images.flux_q8", "--from", str(folder))
    shown = json.loads(run("models", "show", "test.images.flux_q8", "--load", "--json"))
    assert shown["versions"][0]["pipeline"] == "text_to_image/flux", shown
    assert 0 < shown["loaded"]["resident_bytes"] < 1_100_000, shown["loaded"]
    out = tmp_path / "fox.png"
    run("predict", "test.images.flux_q8", *[f"-i={k}={v}" for k, v in SMALL.items()], "-o", str(out))
    assert Image.open(out).size == (64, 48)

    lone = subprocess.run([kiln, "models", "register", "test.images.lone", "--from", str(GGUF)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert lone.returncode != 0 and "transformer/" in lone.stderr, lone.stderr
