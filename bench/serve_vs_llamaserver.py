#!/usr/bin/env python3
"""Benchmark: `kiln serve` vs llama.cpp's `llama-server` under concurrent load, on one GGUF file.

Both servers serve the same GGUF (the random Llama models of bench/llm_vs_llamacpp.py: 60m and 0.5b,
F32 and Q8_0, built with transformers and llama.cpp's convert_hf_to_gguf.py into --work) on 127.0.0.1,
one at a time, each with --threads threads. `kiln bench serve` (Kiln's load generator, the same client
for both) sends --num-prompts streamed /v1/completions requests of --input-len random token ids each
(exact lengths), asking for --output-len tokens greedily with EOS ignored, at each --concurrency level
(all requests queued at once, at most C in flight), and reports output throughput, TTFT, TPOT and ITL.
Before any level, one request warms each server up. Every level draws its own prompts (seed + level
index), so neither server's prefix cache can serve one level from another's prompts.

Server settings (each its own continuous batching, sized for the largest level):
  * kiln:         `kiln serve --config` with the GGUF as one model, `max_batch_size` = the largest level,
                  `max_queue` above --num-prompts, the default KV budget and prefix caching (the prompts
                  are random, so nothing is shared).
  * llama-server: `-np <largest level> -c <slots * (input + output + 16)> -t/-tb --threads
                  --cont-batching`; its prompt cache shares nothing here either.
A level's row also gives Kiln's throughput relative to its own single-stream throughput (concurrency 1).

Setup (not part of CI):
    python3 -m venv /tmp/llmvenv && /tmp/llmvenv/bin/pip install torch==2.15.0 transformers==5.24.0 \\
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0
    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp
    cd /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \\
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server -j 2
    cargo build --release -p kiln
Run:
    /tmp/llmvenv/bin/python bench/serve_vs_llamaserver.py \\
        --llama-cpp-src /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        [--configs 60m,0.5b] [--formats gguf-q8_0,gguf-f32] [--concurrency 1,4,16,64] \\
        [--input-len 128] [--output-len 64] [--num-prompts 64] [--servers kiln,llama-server] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVERS = ["kiln", "llama-server"]


def load_model_builder():
    """bench/llm_vs_llamacpp.py's model building (same random models, same conversion)."""
    spec = importlib.util.spec_from_file_location("llm_vs_llamacpp", REPO / "bench" / "llm_vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url} not ready after {timeout:.0f} s")


def start_kiln(args, gguf: Path, slots: int, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = work / "kiln.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[[models]]\nname = "bench"\nsource = "{gguf}"\n'
        f"max_queue = {args.num_prompts * 2}\nconfig = {{ max_batch_size = {slots} }}\n"
    )
    env = {**os.environ, "KILN_HOME": str(work / "home"), "RAYON_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([str(args.kiln), "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "kiln.log", "w"))
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/v2/health/ready", proc, 300)
    return proc, base


def start_llama_server(args, gguf: Path, slots: int, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    context = slots * (args.input_len + args.output_len + 16)
    cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(context), "-t", str(args.threads), "-tb", str(args.threads),
           "--cont-batching", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "llama-server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/health", proc, 300)
    return proc, base


def bench(args, base: str, concurrency: int, num_prompts: int, label: str, work: Path, seed: int) -> dict:
    out = work / f"{label}.json"
    cmd = [str(args.kiln), "bench", "serve", "--base-url", base, "--model", "bench", "--prompt-ids",
           "--vocab-size", "32000", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--seed", str(seed), "--json", str(out),
           "--label", label]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        sys.exit(f"kiln bench serve failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    if result.get("failed", 0):
        sys.exit(f"{label}: {result['failed']} requests failed: {result.get('errors', [])[:3]}")
    return result


def run_server(args, server: str, gguf: Path, work: Path) -> list[dict]:
    levels = [int(c) for c in args.concurrency.split(",")]
    slots = max(levels)
    start = start_kiln if server == "kiln" else start_llama_server
    proc, base = start(args, gguf, slots, work)
    rows = []
    try:
        # Each level has prompts of its own (another seed): both servers keep
        # earlier prompts' blocks, and a repeated prompt would be a cache hit.
        bench(args, base, 1, 1, f"{server}-warmup", work, args.seed + 1000)
        for i, c in enumerate(levels):
            n = max(args.num_prompts, c)
            log(f"  {server} concurrency {c}: {n} requests")
            r = bench(args, base, c, n, f"{server}-c{c}", work, args.seed + i)
            rows.append({"server": server, "concurrency": c, "requests": n,
                         "output_tok_s": r["output_throughput"], "request_s": r["request_throughput"],
                         "ttft_ms_median": r["median_ttft_ms"], "ttft_ms_p99": r["p99_ttft_ms"],
                         "tpot_ms_median": r["median_tpot_ms"], "itl_ms_p99": r["p99_itl_ms"]})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="60m")
    parser.add_argument("--formats", default="gguf-q8_0")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--kiln", type=Path, default=Path(os.environ.get("KILN_BIN", REPO / "target/release/kiln")))
    parser.add_argument("--llama-server", type=Path,
                        default=Path("/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"))
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp tree with convert_hf_to_gguf.py")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-llm-bench"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per load level")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    builder = load_model_builder()
    results = []
    for config in args.configs.split(","):
        paths = builder.build_models(args.work, config, args.llama_cpp_src, args.threads,
                                     args.formats.split(","))
        for fmt in args.formats.split(","):
            gguf = paths[fmt]
            for server in args.servers.split(","):
                log(f"{config} {fmt}: {server}")
                with tempfile.TemporaryDirectory(prefix=f"serve-bench-{server}-") as tmp:
                    for row in run_server(args, server, gguf, Path(tmp)):
                        results.append({"config": config, "format": fmt, **row})

    print(f"\nCPU: {cpu_name()}, {args.threads} threads; input {args.input_len}, output {args.output_len} tokens\n")
    print("| model | server | concurrency | output tok/s | vs own c=1 | vs llama-server | TTFT p50 / p99 ms "
          "| TPOT p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        own1 = next(x["output_tok_s"] for x in results if x["config"] == r["config"] and
                    x["format"] == r["format"] and x["server"] == r["server"] and x["concurrency"] == 1) \
            if any(x["concurrency"] == 1 for x in results) else None
        peer = next((x["output_tok_s"] for x in results if x["config"] == r["config"] and
                     x["format"] == r["format"] and x["server"] == "llama-server" and
                     x["concurrency"] == r["concurrency"]), None)
        vs_own = f"{r['output_tok_s'] / own1:.2f}x" if own1 else "-"
        vs_peer = f"{r['output_tok_s'] / peer:.2f}x" if peer and r["server"] == "kiln" else "-"
        print(f"| {r['config']} {r['format']} | {r['server']} | {r['concurrency']} | {r['output_tok_s']:.0f} "
              f"| {vs_own} | {vs_peer} | {r['ttft_ms_median']:.0f} / {r['ttft_ms_p99']:.0f} "
              f"| {r['tpot_ms_median']:.1f} | {r['itl_ms_p99']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads,
                                         "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {
                                             "kiln": str(args.kiln), "llama_server": str(args.llama_server),
                                             "llama_cpp_src": str(args.llama_cpp_src), "work": str(args.work),
                                             "json": str(args.json)},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
