#!/usr/bin/env python3
"""Benchmark: Kiln's graph runtime vs onnxruntime on the same ONNX files.

Exports (with torch.onnx, dynamo exporter, opset 18) two CNN and two
transformer-encoder configurations of the fixture architectures in
fixtures/graph/generate.py, at benchmark sizes, then times each at batch 1 and
32 in onnxruntime (CPU provider, intra-op threads = --threads) and in
`kiln bench graph` (RAYON_NUM_THREADS = --threads), alternating for --rounds
rounds in this one invocation (each side keeps its fastest round's median, as
the VM's neighbours make single rounds noisy), and prints median latency,
items/s and the Kiln/onnxruntime latency ratio per model and batch.

Example (see bench/README.md):
    /tmp/graphvenv/bin/python bench/graph_vs_onnxruntime.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "fixtures" / "graph"))
from generate import Cnn, Encoder, export_dynamo, randomize_norms  # noqa: E402

warnings.filterwarnings("ignore")

# name, builder, example inputs, dynamic shapes, input maker(batch), kiln --dim
CONFIGS = {
    "cnn-32x64px": dict(kind="cnn", width=32, size=64),
    "cnn-64x32px": dict(kind="cnn", width=64, size=32),
    "encoder-d256-s128": dict(kind="encoder", dim=256, heads=4, seq=128),
    "encoder-d128-s64": dict(kind="encoder", dim=128, heads=2, seq=64),
}


def kiln_bin() -> Path:
    for profile in ("release", "debug"):
        p = REPO_ROOT / "target" / profile / "kiln"
        if p.is_file():
            return p
    raise SystemExit("build kiln first: cargo build --release -p kiln")


def export(name: str, cfg: dict, out: Path) -> tuple[Path, callable, list[str]]:
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    if cfg["kind"] == "cnn":
        model = Cnn(cfg["width"], 10).eval()
        randomize_norms(model, gen)
        x = torch.randn(2, 3, cfg["size"], cfg["size"])
        data = export_dynamo(model, (x,), ["image"], ["log_probs"], [{0: torch.export.Dim("batch", min=1, max=1024)}], 18)

        def inputs(batch: int) -> dict:
            return {"image": rng.standard_normal((batch, 3, cfg["size"], cfg["size"])).astype(np.float32)}

        dims: list[str] = []
    else:
        model = Encoder(cfg["dim"], cfg["heads"]).eval()
        randomize_norms(model, gen)
        x = torch.randn(2, 5, cfg["dim"])
        mask = torch.ones(2, 5, dtype=torch.int64)
        b = torch.export.Dim("batch", min=1, max=512)
        s = torch.export.Dim("seq", min=2, max=1024)
        data = export_dynamo(model, (x, mask), ["hidden", "mask"], ["encoded"], [{0: b, 1: s}, {0: b, 1: s}], 18)

        def inputs(batch: int) -> dict:
            return {
                "hidden": rng.standard_normal((batch, cfg["seq"], cfg["dim"])).astype(np.float32),
                "mask": np.ones((batch, cfg["seq"]), np.int64),
            }

        dims = [f"seq={cfg['seq']}"]
    path = out / f"{name}.onnx"
    path.write_bytes(data)
    return path, inputs, dims


def time_ort(path: Path, inputs, batches: list[int], runs: int, warmup: int, threads: int) -> dict[int, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    medians = {}
    for batch in batches:
        feeds = inputs(batch)
        for _ in range(warmup):
            sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t)
        medians[batch] = statistics.median(times)
    return medians


def time_kiln(path: Path, dims: list[str], batches: list[int], runs: int, warmup: int, threads: int) -> dict:
    cmd = [str(kiln_bin()), "bench", "graph", "--model", str(path), "--batch", ",".join(map(str, batches)),
           "--runs", str(runs), "--warmup", str(warmup)]
    if dims:
        cmd += ["--dim", ",".join(dims)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate onnxruntime and Kiln this many times; each keeps its fastest round (VM noise)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    print(f"CPU: {cpu}; threads {args.threads}; onnxruntime {ort.__version__}; torch {torch.__version__}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, inputs, dims = export(name, CONFIGS[name], Path(tmp))
            ort_medians: dict[int, float] = {}
            kiln = None
            for _ in range(args.rounds):
                for b, t in time_ort(path, inputs, batches, args.runs, args.warmup, args.threads).items():
                    ort_medians[b] = min(t, ort_medians.get(b, t))
                round_result = time_kiln(path, dims, batches, args.runs, args.warmup, args.threads)
                if kiln is None:
                    kiln = round_result
                else:
                    for best, new in zip(kiln["results"], round_result["results"]):
                        if new["median_s"] < best["median_s"]:
                            best.update(new)
            for result in kiln["results"]:
                b = result["batch"]
                rows.append({
                    "model": name,
                    "batch": b,
                    "ort_ms": ort_medians[b] * 1e3,
                    "kiln_ms": result["median_s"] * 1e3,
                    "ratio": result["median_s"] / ort_medians[b],
                    "kiln_items_per_s": result["items_per_s"],
                    "ort_items_per_s": b / ort_medians[b],
                    "nodes": f'{kiln["compile"]["nodes_before"]}->{kiln["compile"]["nodes_after"]}',
                })
                print(f"{name}: batch {b}: kiln {rows[-1]['kiln_ms']:.2f} ms, ort {rows[-1]['ort_ms']:.2f} ms", file=sys.stderr)
    print(f"\n| model | batch | onnxruntime ms | Kiln ms | Kiln / ort | Kiln items/s | nodes (compiled) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['ort_ms']:.2f} | {r['kiln_ms']:.2f} | {r['ratio']:.2f}× | {r['kiln_items_per_s']:.0f} | {r['nodes']} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
