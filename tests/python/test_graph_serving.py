"""ONNX models served by a real `kiln serve` (issue 15): the official
tritonclient (JSON and binary tensors) and MLflow's scoring client against the
CNN and transformer-encoder fixtures, checked against onnxruntime's outputs
recorded by fixtures/graph/generate.py; bad inputs get KServe/MLflow errors;
and `kiln models register --from model.onnx`, `models show`, `predict`.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException

from conftest import REPO_ROOT, kiln_bin

MODELS = REPO_ROOT / "fixtures" / "graph" / "models"
# onnxruntime vs Kiln on the same f32 weights: differently ordered sums.
ATOL = 1e-5


def cases(name: str) -> list[dict[str, dict[str, np.ndarray]]]:
    tensors = load_file(str(MODELS / f"{name}.cases.safetensors"))
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        case, kind, tensor = key.split(".", 2)
        entry = out.setdefault(int(case[4:]), {"in": {}, "out": {}})
        entry["in" if kind.startswith("in") else "out"][tensor] = value
    return [out[i] for i in sorted(out)]


@pytest.fixture(scope="module")
def graph_server(kiln_serve):
    # No API keys: MLflow's scoring client sends no credentials.
    return kiln_serve(
        name="graph",
        api_keys=[],
        models=[
            {"name": "cnn", "source": str(MODELS / "cnn.onnx"), "max_queue": 8},
            {"name": "encoder", "source": str(MODELS / "encoder.onnx"), "max_queue": 8},
        ],
    )


@pytest.fixture
def triton(graph_server):
    client = httpclient.InferenceServerClient(url=graph_server.hostport, concurrency=1)
    yield client
    client.close()


def test_metadata_reports_the_onnx_signature(triton):
    meta = triton.get_model_metadata("encoder")
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"hidden": ("FP32", [-1, -1, 32]), "mask": ("INT64", [-1, -1])}
    assert meta["outputs"] == [{"name": "encoded", "datatype": "FP32", "shape": [-1, -1, 32]}]
    assert meta["platform"] == "kiln/graph"


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_runs_the_encoder_like_onnxruntime(triton, binary):
    for case in cases("encoder"):
        hidden, mask = case["in"]["hidden"], case["in"]["mask"]
        inputs = [httpclient.InferInput("hidden", list(hidden.shape), "FP32"),
                  httpclient.InferInput("mask", list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(hidden, binary_data=binary)
        inputs[1].set_data_from_numpy(mask, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("encoded", binary_data=binary)]
        result = triton.infer("encoder", inputs, outputs=outputs)
        encoded = result.as_numpy("encoded")
        assert encoded.shape == case["out"]["encoded"].shape
        np.testing.assert_allclose(encoded, case["out"]["encoded"], rtol=0, atol=ATOL)


def test_tritonclient_runs_the_cnn_at_two_batch_sizes(triton):
    for case in cases("cnn"):
        image = case["in"]["image"]
        inp = httpclient.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image, binary_data=True)
        result = triton.infer("cnn", [inp])
        np.testing.assert_allclose(result.as_numpy("log_probs"), case["out"]["log_probs"], rtol=0, atol=ATOL)


def test_wrong_dtype_shape_and_missing_inputs_are_400s_naming_them(graph_server, triton):
    hidden = np.zeros((1, 3, 31), np.float32)
    inp = httpclient.InferInput("hidden", list(hidden.shape), "FP32")
    inp.set_data_from_numpy(hidden)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("encoder", [inp])
    message = str(caught.value)
    assert "dimension 2 is 31, expected 32" in message and "mask" in message, message
    # FP64 for an FP32 input.
    body = {"inputs": [{"name": "image", "datatype": "FP64", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}
    r = requests.post(f"{graph_server.base_url}/v2/models/cnn/infer", json=body, timeout=30)
    assert r.status_code == 400 and "FP64" in r.json()["error"] and "image" in r.json()["error"], r.text


def test_mlflow_client_scores_the_default_model(graph_server):
    # /invocations scores the first model served: the CNN.
    client = ScoringServerClient(graph_server.host, graph_server.port)
    case = cases("cnn")[1]
    # A numpy array goes out as MLflow's tensor input `{"inputs": [nested]}`
    # (the client's dict-of-arrays path is broken in mlflow 3.17: it iterates
    # the dict's keys as pairs; the dict form is checked with requests below).
    predictions = client.invoke(case["in"]["image"]).get_predictions()
    got = np.asarray(predictions, dtype=np.float32)
    np.testing.assert_allclose(got, case["out"]["log_probs"], rtol=0, atol=ATOL)


def test_mlflow_named_tensor_inputs_score_the_encoder(graph_server):
    case = cases("encoder")[0]
    body = {"inputs": {k: v.tolist() for k, v in case["in"].items()}}
    r = requests.post(f"{graph_server.base_url}/models/encoder/invocations", json=body, timeout=30)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["predictions"], dtype=np.float32)
    np.testing.assert_allclose(got, case["out"]["encoded"], rtol=0, atol=ATOL)


def test_mlflow_errors_are_400_with_mlflow_error_codes(graph_server):
    body = {"inputs": {"image": [[[1.0, 2.0], [3.0]]]}}
    r = requests.post(f"{graph_server.base_url}/invocations", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] == "BAD_REQUEST" and "ragged" in r.json()["message"], r.text


def test_register_show_and_predict_an_onnx_file(tmp_path):
    env = dict(os.environ, KILN_HOME=str(tmp_path / "home"))
    kiln = str(kiln_bin())
    run = lambda *args: subprocess.run([kiln, *args], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    registered = run("models", "register", "main.demo.mlp", "--from", str(MODELS / "mlp_deep.onnx"))
    assert registered.returncode == 0, registered.stderr
    assert "detected a graph model" in registered.stderr
    shown = run("models", "show", "main.demo.mlp")
    assert shown.returncode == 0 and "graph" in shown.stdout, shown.stdout + shown.stderr
    case = cases("mlp_deep")[1]
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"inputs": {"features": case["in"]["features"].tolist()}}))
    predicted = run("predict", "models:/main.demo.mlp/1", "--data", str(data))
    assert predicted.returncode == 0, predicted.stderr
    probs = np.asarray(json.loads(predicted.stdout)["probs"], dtype=np.float32)
    np.testing.assert_allclose(probs, case["out"]["probs"], rtol=0, atol=ATOL)

    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes((MODELS / "mlp.onnx").read_bytes()[:500])
    refused = run("models", "register", "main.demo.broken", "--from", str(garbage))
    assert refused.returncode != 0 and "malformed" in refused.stderr, refused.stderr
