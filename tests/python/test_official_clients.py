"""Official Python clients against a real `kiln serve`.

Proves that unmodified client libraries work against Kiln:
  * MLflow's own scoring-server client (mlflow.pyfunc.scoring_server.client),
  * NVIDIA Triton's KServe-v2 HTTP client (tritonclient.http), JSON and binary
    tensor extension,
plus a few raw-HTTP checks of the rest of the serving contract (KServe v1,
SageMaker, CSV, content types).

Run:  pip install -r tests/python/requirements.txt && cargo build && pytest tests/python -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import tritonclient.http as httpclient
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from tritonclient.utils import InferenceServerException

COLUMNS = ["driver_age", "vehicle_power", "region", "urban", "exposure"]
# Numeric predictors are declared as doubles (integers widen to them safely, as
# MLflow's signature enforcement allows); categorical text is BYTES.
DATATYPES = {
    "driver_age": "FP64",
    "vehicle_power": "FP64",
    "region": "BYTES",
    "urban": "FP64",
    "exposure": "FP64",
}
NUMPY_DTYPES = {"INT64": np.int64, "FP64": np.float64, "BYTES": np.object_}
REPO_ROOT = Path(__file__).resolve().parents[2]
CLAIMS_CSV = REPO_ROOT / "crates" / "kiln" / "data" / "claims.csv"
STATSMODELS_REFERENCE = REPO_ROOT / "fixtures" / "glm" / "claims_poisson" / "expected.json"


def sample_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "driver_age": np.array([23, 45, 67], dtype=np.int64),
            "vehicle_power": np.array([6, 9, 12], dtype=np.int64),
            "region": ["north", "central", "coastal"],
            "urban": np.array([1, 0, 1], dtype=np.int64),
            "exposure": np.array([1.0, 0.5, 0.25], dtype=np.float64),
        }
    )


def approx(expected):
    return pytest.approx(expected, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- MLflow client


@pytest.fixture(scope="session")
def mlflow_client(kiln_server) -> ScoringServerClient:
    client = ScoringServerClient(kiln_server.host, kiln_server.port)
    client.wait_server_ready(timeout=30)  # polls GET /ping
    return client


@pytest.fixture(scope="session")
def reference_predictions(mlflow_client) -> np.ndarray:
    """Mean predictions for sample_frame() through the MLflow path."""
    resp = mlflow_client.invoke(sample_frame())
    return resp.get_predictions(predictions_format="ndarray", dtype=np.float64)


def test_mlflow_client_predicts(mlflow_client):
    resp = mlflow_client.invoke(sample_frame())
    assert isinstance(resp["predictions"], list)
    preds = resp.get_predictions(predictions_format="ndarray", dtype=np.float64)
    assert preds.shape == (3,)
    assert np.all(np.isfinite(preds)), preds
    assert np.all(preds > 0), preds
    # The dataframe form that MLflow users get back must work too.
    df = resp.get_predictions()
    assert len(df) == 3


def test_mlflow_client_linear_predictor(mlflow_client, reference_predictions):
    resp = mlflow_client.invoke(sample_frame(), params={"which": "linear"})
    linear = resp.get_predictions(predictions_format="ndarray", dtype=np.float64)
    assert linear.shape == (3,)
    assert list(linear) == approx([math.log(m) for m in reference_predictions])


def test_mlflow_client_matches_statsmodels_reference(mlflow_client):
    """The default model is the statsmodels fit of claims.csv (fixtures/glm/claims_poisson)."""
    if not (CLAIMS_CSV.is_file() and STATSMODELS_REFERENCE.is_file()):
        pytest.skip("claims.csv or the statsmodels reference fixture is missing")
    expected = json.loads(STATSMODELS_REFERENCE.read_text())["predict"]
    rows = pd.read_csv(CLAIMS_CSV).head(expected["n_rows"])[COLUMNS]
    mean = mlflow_client.invoke(rows).get_predictions("ndarray", dtype=np.float64)
    linear = mlflow_client.invoke(rows, params={"which": "linear"}).get_predictions(
        "ndarray", dtype=np.float64
    )
    assert list(mean) == pytest.approx(expected["mean"], rel=1e-6)
    assert list(linear) == pytest.approx(expected["linear"], rel=1e-6)


def test_mlflow_client_missing_column_is_400(mlflow_client):
    df = sample_frame().drop(columns=["urban"])
    with pytest.raises(Exception) as excinfo:
        mlflow_client.invoke(df)
    msg = str(excinfo.value)
    # ScoringServerClient: "Invocation failed (error code 400, response: <body>)"
    assert "error code 400" in msg, msg
    assert "urban" in msg, msg
    body = msg.split("response: ", 1)[1].rsplit(")", 1)[0]
    err = json.loads(body)
    # What `mlflow models serve` answers for a column its schema requires.
    assert err["error_code"] == "INVALID_PARAMETER_VALUE", err
    assert "urban" in err["message"], err


# ------------------------------------------------------------ tritonclient.http


@pytest.fixture(scope="session")
def triton(kiln_server):
    client = httpclient.InferenceServerClient(url=kiln_server.hostport)
    yield client
    client.close()


def triton_inputs(df: pd.DataFrame, binary: bool, two_d: bool = False):
    inputs = []
    for col in df.columns:
        dtype = DATATYPES[col]
        arr = np.asarray(df[col].to_list(), dtype=NUMPY_DTYPES[dtype])
        if two_d:
            arr = arr.reshape(-1, 1)
        inp = httpclient.InferInput(col, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs


def test_triton_health(triton, kiln_server):
    assert triton.is_server_live()  # GET /v2/health/live
    assert triton.is_server_ready()  # GET /v2/health/ready
    assert triton.is_model_ready(kiln_server.model)  # GET /v2/models/{m}/ready
    assert not triton.is_model_ready("no.such.model")


def test_triton_server_metadata(triton):
    meta = triton.get_server_metadata()  # GET /v2
    assert "name" in meta and "version" in meta, meta


def test_triton_model_metadata(triton, kiln_server):
    meta = triton.get_model_metadata(kiln_server.model)  # GET /v2/models/{m}
    assert meta["name"] == kiln_server.model
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert sorted(inputs) == sorted(COLUMNS), meta
    for name, dtype in DATATYPES.items():
        assert inputs[name]["datatype"] == dtype, inputs[name]
        assert inputs[name]["shape"] == [-1], inputs[name]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["predictions"]["datatype"] == "FP64", meta


@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["out-binary", "out-json"])
def test_triton_infer(triton, kiln_server, reference_predictions, binary_in, binary_out):
    result = triton.infer(
        kiln_server.model,
        triton_inputs(sample_frame(), binary=binary_in),
        outputs=[httpclient.InferRequestedOutput("predictions", binary_data=binary_out)],
    )
    out = result.get_output("predictions")
    assert out is not None, result.get_response()
    assert out["datatype"] == "FP64"
    assert out["shape"] == [3]
    if binary_out:
        assert out["parameters"]["binary_data_size"] == 3 * 8, out
        assert "data" not in out
    else:
        assert "data" in out, out
    preds = result.as_numpy("predictions")
    assert preds.dtype == np.float64
    assert list(preds) == approx(list(reference_predictions))


def test_triton_infer_default_outputs(triton, kiln_server, reference_predictions):
    """No outputs requested: the client sets parameters.binary_data_output=true."""
    result = triton.infer(kiln_server.model, triton_inputs(sample_frame(), binary=True))
    preds = result.as_numpy("predictions")
    assert preds is not None, result.get_response()
    assert list(preds.reshape(-1)) == approx(list(reference_predictions))


def test_triton_infer_column_vectors(triton, kiln_server, reference_predictions):
    """Inputs shaped [n, 1] (what many v2 clients send) are accepted too."""
    result = triton.infer(
        kiln_server.model,
        triton_inputs(sample_frame(), binary=False, two_d=True),
        outputs=[httpclient.InferRequestedOutput("predictions", binary_data=False)],
    )
    preds = result.as_numpy("predictions")
    assert list(preds.reshape(-1)) == approx(list(reference_predictions))


@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
def test_triton_missing_column_is_400(triton, kiln_server, binary_in):
    df = sample_frame().drop(columns=["urban"])
    with pytest.raises(InferenceServerException) as excinfo:
        triton.infer(
            kiln_server.model,
            triton_inputs(df, binary=binary_in),
            outputs=[httpclient.InferRequestedOutput("predictions", binary_data=False)],
        )
    e = excinfo.value
    assert e.status() == "400", str(e)
    # tritonclient reads the message from a JSON body {"error": "..."}; if the
    # body has another shape it says so instead of giving the server's message.
    assert not e.message().startswith("an exception occurred in the client"), str(e)
    assert "urban" in e.message(), str(e)


# --------------------------------------------- rest of the contract (raw HTTP)


def test_ping(kiln_server):
    assert requests.get(kiln_server.base_url + "/ping", timeout=10).status_code == 200


@pytest.mark.parametrize("key", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_invocations_json_formats(kiln_server, reference_predictions, key):
    df = sample_frame()
    if key == "dataframe_split":
        payload = {key: df.to_dict(orient="split")}
    elif key == "inputs":
        payload = {key: {c: df[c].to_list() for c in df.columns}}
    else:
        payload = {key: df.to_dict(orient="records")}
    r = requests.post(kiln_server.base_url + "/invocations", json=payload, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == approx(list(reference_predictions))


def test_invocations_csv(kiln_server, reference_predictions):
    body = sample_frame().to_csv(index=False)
    r = requests.post(
        kiln_server.base_url + "/invocations",
        data=body,
        headers={"Content-Type": "text/csv"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == approx(list(reference_predictions))


def test_invocations_unsupported_content_type_is_415(kiln_server):
    r = requests.post(
        kiln_server.base_url + "/invocations",
        data=b"hello",
        headers={"Content-Type": "application/x-unknown"},
        timeout=30,
    )
    assert r.status_code == 415, r.text


def test_sagemaker_custom_attributes_echoed(kiln_server, reference_predictions):
    attrs = "trace_id=abc123,variant=blue"
    r = requests.post(
        kiln_server.base_url + "/invocations",
        json={"dataframe_split": sample_frame().to_dict(orient="split")},
        headers={"X-Amzn-SageMaker-Custom-Attributes": attrs},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.headers.get("X-Amzn-SageMaker-Custom-Attributes") == attrs
    assert r.json()["predictions"] == approx(list(reference_predictions))


def test_kserve_v1_predict(kiln_server, reference_predictions):
    r = requests.post(
        f"{kiln_server.base_url}/v1/models/{kiln_server.model}:predict",
        json={"instances": sample_frame().to_dict(orient="records")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == approx(list(reference_predictions))


# ------------------------------------------- mlflow.deployments, Databricks


def databricks_client(monkeypatch, tmp_path, url: str, token: str):
    """The Databricks deployments client pointed at `url`, as a Databricks
    user's test would hold it (no ~/.databrickscfg interfering)."""
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATABRICKS_HOST", url)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    # A refused call must fail, not be retried for minutes.
    monkeypatch.setenv("MLFLOW_DEPLOYMENT_PREDICT_TOTAL_TIMEOUT", "120")
    return get_deploy_client("databricks")


def test_databricks_deployments_client_predicts(monkeypatch, tmp_path, kiln_server,
                                                reference_predictions):
    client = databricks_client(monkeypatch, tmp_path, f"http://{kiln_server.host}:{kiln_server.port}", "x")
    endpoints = client.list_endpoints()
    assert [e["name"] for e in endpoints] == [kiln_server.model], endpoints
    assert endpoints[0]["state"]["ready"] == "READY", endpoints
    assert client.get_endpoint(kiln_server.model)["name"] == kiln_server.model
    frame = sample_frame()
    reply = client.predict(endpoint=kiln_server.model,
                           inputs={"dataframe_split": frame.to_dict(orient="split")})
    assert reply["predictions"] == pytest.approx(list(reference_predictions), rel=1e-9)
    with pytest.raises(requests.HTTPError) as missing:
        client.predict(endpoint="no.such.model", inputs={"dataframe_split": frame.to_dict(orient="split")})
    assert "404" in str(missing.value) and "RESOURCE_DOES_NOT_EXIST" in str(missing.value)


def test_databricks_client_sends_its_token_as_an_api_key(monkeypatch, tmp_path, flux_server):
    from conftest import API_KEY

    client = databricks_client(monkeypatch, tmp_path, flux_server.base_url, API_KEY)
    assert [e["name"] for e in client.list_endpoints()] == ["flux-schnell"]
    wrong = databricks_client(monkeypatch, tmp_path, flux_server.base_url, "wrong-key")
    with pytest.raises(Exception) as refused:
        wrong.list_endpoints()
    # (The SDK rewraps Kiln's 401 in its own exception; the reason survives.)
    assert "a valid API key is required" in str(refused.value), refused.value
