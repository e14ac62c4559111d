"""FLUX.2-klein end to end, as the RunPod FLUX.2 system's users run it: the
tiny base klein folder registered with `kiln models register` and run with
`kiln predict`, then served by `kiln serve` and called through the official
runpod SDK with the handler's preset, its `lora_path` + `lora_scale` (an
ai-toolkit LoRA) and `output_format`.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess

import pytest
import requests
import runpod
from PIL import Image

from conftest import API_KEY, REPO_ROOT, kiln_bin

KLEIN_BASE = REPO_ROOT / "fixtures" / "flux2" / "tiny-klein-base"
LORA_DIR = REPO_ROOT / "fixtures" / "flux2" / "lora"
MODEL = "flux2-klein"
# The handler's preset, made small by explicit fields (explicit fields win).
FAST = {"preset": "realistic_character", "width": 48, "height": 32, "num_inference_steps": 2,
        "max_sequence_length": 16}


def test_register_and_predict_from_the_command_line(tmp_path):
    env = {**os.environ, "KILN_HOME": str(tmp_path / "home")}
    kiln = str(kiln_bin())
    register = subprocess.run([kiln, "models", "register", "test.images.klein", "--from", str(KLEIN_BASE)],
                              env=env, capture_output=True, text=True, timeout=300)
    assert register.returncode == 0, register.stderr
    shown = subprocess.run([kiln, "models", "show", "test.images.klein"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert "text_to_image/flux2" in shown.stdout, shown.stdout
    out = tmp_path / "fox.png"
    args = [f"-i={k}={v}" for k, v in {**FAST, "prompt": "a red fox", "seed": 5}.items()]
    predict = subprocess.run([kiln, "predict", "test.images.klein", *args, "-o", str(out)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert predict.returncode == 0, predict.stderr
    assert Image.open(out).size == (48, 32)


@pytest.fixture(scope="module")
def klein_server(kiln_serve):
    return kiln_serve(
        name="flux2",
        models=[{"name": MODEL, "source": str(KLEIN_BASE), "max_queue": 8, "concurrency": 1,
                 "execution_timeout": "5m"}],
        env={"KILN_LORA_DIRS": str(LORA_DIR)},
    )


@pytest.fixture(scope="module")
def klein_endpoint(klein_server):
    server = klein_server
    saved = (runpod.api_key, runpod.endpoint_url_base)
    runpod.api_key = API_KEY
    runpod.endpoint_url_base = f"{server.base_url}/v2"
    try:
        yield runpod.Endpoint(MODEL)
    finally:
        runpod.api_key, runpod.endpoint_url_base = saved


def decode(image: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["image_base64"])))


def test_runpod_sdk_with_the_handlers_preset_and_lora(klein_endpoint):
    plain = klein_endpoint.run_sync({"input": {**FAST, "prompt": "a red fox", "seed": 3}}, timeout=300)
    assert plain["status"] == "success" and plain["seed"] == 3, plain
    assert decode(plain["image"]).size == (48, 32)
    styled = klein_endpoint.run_sync({"input": {**FAST, "prompt": "a red fox", "seed": 3,
                                                "lora_path": "aitk.safetensors", "lora_scale": 0.8,
                                                "output_format": "jpeg"}}, timeout=300)
    assert styled["status"] == "success", styled
    image = decode(styled["image"])
    assert image.format == "JPEG" and image.size == (48, 32)
    report = styled["loras"][0]
    assert report["format"] == "ai-toolkit/BFL" and report["unmatched_modules"] == [], report
    again = klein_endpoint.run_sync({"input": {**FAST, "prompt": "a red fox", "seed": 3,
                                               "lora_path": "aitk.safetensors", "lora_scale": 0.8}},
                                    timeout=300)
    assert again["image"]["image_base64"] != plain["image"]["image_base64"], "the LoRA must change the image"


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"width": 50}, "width does not meet the constraints."),
        ({"negative_prompt": "blur"}, "Unexpected input. negative_prompt is not a valid input option."),
        ({"lora_path": "../tiny-klein/transformer/diffusion_pytorch_model.safetensors"}, "lora_path"),
    ],
    ids=["width-50", "no-negative-prompt", "lora-outside-folders"],
)
def test_runpod_bad_input_fails_the_job_naming_the_field(klein_server, extra, expected):
    r = requests.post(f"{klein_server.base_url}/v2/{MODEL}/runsync?wait=60000",
                      json={"input": {**FAST, "prompt": "x", **extra}},
                      headers=klein_server.auth_headers, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "FAILED", body
    assert expected in body["error"], body
