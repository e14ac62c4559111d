#!/usr/bin/env python3
"""Benchmark: Kiln vs llama.cpp, Modular MAX and transformers on one LLM's weights, one stream, CPU.

Builds random-init LlamaForCausalLM models (float32, std 0.02, vocab 32000 with a byte-level BPE
tokenizer of exactly 32000 ids trained offline on a generated corpus) in two sizes:
  * 60m:  hidden 512,  intermediate 1536, 8 layers,  8 heads / 4 kv heads  (~58M parameters)
  * 0.5b: hidden 1024, intermediate 4864, 24 layers, 16 heads / 8 kv heads (~0.5B parameters)
saves each with save_pretrained (the "folder", f32 safetensors), converts it with llama.cpp's own
convert_hf_to_gguf.py to F32 and Q8_0 GGUF, and quantizes the F32 GGUF to Q4_K_M with
llama_cpp.llama_model_quantize.  Models go to --work (default /tmp/kiln-llm-bench) and are reused.

Then, one engine at a time, each in its own process (nothing else runs while one is timed):
  * kiln:         `kiln bench llm` on the folder and on each GGUF;
  * llama.cpp:    llama-cpp-python on each GGUF (n_threads = n_threads_batch = --threads);
  * transformers: the folder in f32, torch.set_num_threads(--threads), a manual greedy loop with the KV
                  cache (one forward over the prompt, then one forward per token);
  * max:          `max serve --devices cpu` on the folder (and on the Q4_K_M GGUF, MAX's only GGUF
                  encoding here besides F32), one streamed /v1/completions request per run with the
                  prompt as token ids, temperature 0, ignore_eos.
Every engine gets the same prompt, the ids [1 + (i*7919) % (vocab-2) for i in range(N)], generates exactly
M tokens greedily with EOS ignored, runs once to warm up and then --runs times; medians are reported.
As in `kiln bench llm`: time to first token (TTFT) = prefill + picking the first token, prefill tok/s =
N / TTFT, decode tok/s = (M-1) / (time from the first to the last token).  MAX's numbers are seen through
its HTTP server (a streamed request on 127.0.0.1), the others in-process.

Setup (not part of CI; llama-cpp-python builds llama.cpp from source, ~14 min on 2 cores):
    python3 -m venv /tmp/llmvenv
    /tmp/llmvenv/bin/pip install torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 \\
        numpy==2.4.6 gguf==0.19.0
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llmvenv/bin/pip install llama-cpp-python==0.3.36
    python3 -m venv /tmp/maxvenv && /tmp/maxvenv/bin/pip install modular==26.6.0   # optional, ~2 GB
    cargo build --release -p kiln
The converter comes from the llama-cpp-python sdist of the installed version (`pip download --no-deps
--no-binary llama-cpp-python llama-cpp-python==<version>`, done by the script into --work), or
--llama-cpp-src DIR (a llama.cpp tree with convert_hf_to_gguf.py, conversion/ and gguf-py/).
Run:
    /tmp/llmvenv/bin/python bench/llm_vs_llamacpp.py --runs 3 [--configs 60m,0.5b] [--prompt-tokens 128]
        [--gen-tokens 64] [--engines kiln,llama.cpp,transformers,max] [--max-bin /tmp/maxvenv/bin/max]
        [--json out.json]
    /tmp/llmvenv/bin/python bench/llm_vs_llamacpp.py --update --json out.json --configs 0.5b --engines llama.cpp
--update re-measures only the selected rows and replaces them in the --json file.  Before each engine the
script waits for the CPUs to be idle, and measures again when other processes took over 10% of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32000
CONFIGS = {
    "60m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4),
    "0.5b": dict(hidden_size=1024, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8),
}
FORMATS = ["folder-f32", "gguf-f32", "gguf-q8_0", "gguf-q4_k_m"]
ENGINES = ["kiln", "llama.cpp", "transformers", "max"]
ENGINE_FORMATS = {  # which formats each engine runs
    "kiln": FORMATS,
    "llama.cpp": ["gguf-f32", "gguf-q8_0", "gguf-q4_k_m"],
    "transformers": ["folder-f32"],
    "max": ["folder-f32", "gguf-q4_k_m"],  # MAX's GGUF encodings: q4_k, q4_0, q6_k (no q8_0)
}
WEIGHT_STD = 0.02
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer regex: what llama.cpp's tokenizer.ggml.pre "llama-bpe" implements
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def prompt_ids(n: int, vocab: int = VOCAB) -> list[int]:
    """The prompt `kiln bench llm` uses: ids spread over the vocabulary."""
    return [1 + (i * 7919) % (vocab - 2) for i in range(n)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE of exactly VOCAB ids (EOS = 0, BOS = 1), trained on a generated corpus."""
    import random

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]

    def corpus():
        r = random.Random(1)
        for _ in range(20000):
            yield " ".join(r.choice(words) for _ in range(40)) + ". 12 345, 6789!"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(EOS, special=True, normalized=False),
                        AddedToken(BOS, special=True, normalized=False)],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(BOS) == 1
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=2048,
                            clean_up_tokenization_spaces=False).save_pretrained(folder)


def build_folder(folder: Path, config: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=0, tie_word_embeddings=False, **CONFIGS[config])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + WEIGHT_STD * torch.randn_like(p))
            else:
                p.copy_(WEIGHT_STD * torch.randn_like(p))
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    (folder / "bench_params.json").write_text(json.dumps({"parameters": n}))


def llama_cpp_source(work: Path, given: Path | None) -> Path:
    """A llama.cpp tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    if given:
        return given
    import llama_cpp

    src = work / f"llama.cpp-{llama_cpp.__version__}"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    log(f"fetching the llama-cpp-python {llama_cpp.__version__} sdist for convert_hf_to_gguf.py")
    dl = work / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                    f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(dl)], check=True,
                   stdout=subprocess.DEVNULL)
    archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"] and (
                    parts[3] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")):
                member.name = "/".join(parts[3:])
                tar.extract(member, src, filter="data")
    shutil.rmtree(dl)
    return src


CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src + "/gguf-py"); sys.path.insert(0, src)
import conversion.base, conversion.llama
# The tokenizer is trained here, so its pre-tokenizer hash is unknown to the converter; it uses the
# Llama 3 regex, i.e. llama.cpp's "llama-bpe".  LlamaModel.set_vocab tries sentencepiece and LlamaHfVocab
# before the GPT-2-style BPE path Llama 3 takes; go there directly (no sentencepiece install needed).
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
conversion.llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""

QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def checked(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} ... failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def model_paths(work: Path, config: str) -> dict[str, Path]:
    base = work / config
    return {"folder-f32": base / "hf", "gguf-f32": base / "model-f32.gguf", "gguf-q8_0": base / "model-q8_0.gguf",
            "gguf-q4_k_m": base / "model-q4_k_m.gguf"}


def build_models(work: Path, config: str, src: Path | None, threads: int,
                 formats: list[str] = FORMATS) -> dict[str, Path]:
    """The folder, then whichever of the GGUF files in `formats` are missing."""
    paths = model_paths(work, config)
    folder = paths["folder-f32"]
    if not (folder / "bench_params.json").exists():
        log(f"building the {config} model in {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        build_folder(folder, config)
    for fmt, outtype in (("gguf-f32", "f32"), ("gguf-q8_0", "q8_0")):
        if fmt in formats and not paths[fmt].exists():
            tree = llama_cpp_source(work, src)
            log(f"convert_hf_to_gguf.py --outtype {outtype} -> {paths[fmt]}")
            tmp = paths[fmt].with_suffix(".tmp")
            checked([sys.executable, "-c", CONVERT, str(tree), str(folder), "--outtype", outtype,
                     "--outfile", str(tmp)])
            tmp.rename(paths[fmt])
    if "gguf-q4_k_m" in formats and not paths["gguf-q4_k_m"].exists():
        log(f"llama_model_quantize Q4_K_M -> {paths['gguf-q4_k_m']}")
        tmp = paths["gguf-q4_k_m"].with_suffix(".tmp")
        checked([sys.executable, "-c", QUANTIZE, str(paths["gguf-f32"]), str(tmp), str(threads)])
        tmp.rename(paths["gguf-q4_k_m"])
    return paths


# ----------------------------------------------------------------------------------------------
# engines (each in its own process; every worker prints one JSON object)
# ----------------------------------------------------------------------------------------------

def summarize(firsts: list[float], per_tokens: list[float], n: int, extra: dict) -> dict:
    first, per_token = statistics.median(firsts), statistics.median(per_tokens)
    return {"time_to_first_token_s": first, "prefill_tokens_per_s": n / first, "decode_tokens_per_s": 1 / per_token,
            "ttft_runs_s": firsts, "decode_s_per_token_runs": per_tokens,
            "peak_rss_mib": peak_rss_mib(), **extra}


def peak_rss_mib(pid: str = "self") -> float | None:
    """VmHWM, as `kiln bench llm` reports it (ru_maxrss would carry over the parent's peak across exec)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def llama_cpp_worker(path: Path, n: int, m: int, runs: int, threads: int) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=n + m + 64, n_batch=max(512, n), n_ubatch=max(512, n),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - started
    vocab = llm.n_vocab()
    ids = prompt_ids(n, vocab)

    def greedy() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))))

    def one_run() -> tuple[float, float, list[int]]:
        llm.reset()  # n_tokens = 0; eval() then drops the KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = greedy()
        first = time.perf_counter() - t0
        out = [tok]
        for _ in range(m - 1):
            llm.eval([tok])
            tok = greedy()
            out.append(tok)
        total = time.perf_counter() - t0
        return first, (total - first) / max(m - 1, 1), out

    one_run()
    firsts, per_tokens = [], []
    for _ in range(runs):
        first, per_token, out = one_run()
        firsts.append(first)
        per_tokens.append(per_token)
    assert len(out) == m
    return summarize(firsts, per_tokens, n, {"load_s": load_s, "generated_head": out[:8],
                                              "flash_attn": False, "kv_cache": "f16 (llama.cpp default)"})


def transformers_worker(folder: Path, n: int, m: int, runs: int, threads: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    ids = torch.tensor([prompt_ids(n, model.config.vocab_size)])

    @torch.inference_mode()
    def one_run() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter() - t0
        past, toks = out.past_key_values, [int(tok)]
        for _ in range(m - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(tok))
        total = time.perf_counter() - t0
        return first, (total - first) / max(m - 1, 1), toks

    one_run()
    firsts, per_tokens = [], []
    for _ in range(runs):
        first, per_token, toks = one_run()
        firsts.append(first)
        per_tokens.append(per_token)
    return summarize(firsts, per_tokens, n, {
        "load_s": load_s, "generated_head": toks[:8], "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "cpu_capability": torch.backends.cpu.get_cpu_capability()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_stream(port: int, ids: list[int], m: int, model_name: str) -> tuple[float, float, int]:
    """One streamed completion; seconds to the first chunk, to the last chunk, and completion tokens."""
    body = json.dumps({"model": model_name, "prompt": ids, "max_tokens": m, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            if event.get("choices"):
                now = time.perf_counter() - t0
                first = now if first is None else first
                last = now
                chunks += 1
    if first is None:
        raise RuntimeError("MAX streamed no tokens")
    return first, last, usage if usage is not None else chunks


def scheduler_steps(log_path: Path) -> tuple[list[float], list[float]]:
    """Seconds of each context-encoding (prefill) and token-generation step, as MAX's scheduler logs them
    (MAX_SERVE_SCHEDULER_STATS_LOG_INTERVAL_S=0 logs every batch): the model's own time, without HTTP."""
    import re

    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    ce, tg = [], []
    for line in log_path.read_text(errors="replace").splitlines():
        hit = re.search(r"Executed (CE|TG) batch .*?Execution: ([0-9.]+)(us|ms|s)\b", line)
        if hit:
            (ce if hit[1] == "CE" else tg).append(float(hit[2]) * scale[hit[3]])
    return ce, tg


def max_worker(max_bin: str, fmt: str, path: Path, folder: Path, n: int, m: int, runs: int, log_path: Path) -> dict:
    port = free_port()
    cmd = [max_bin, "serve", "--devices", "cpu", "--port", str(port), "--max-batch-size", "1",
           "--max-length", str(max(512, n + m + 64)), "--no-enable-prefix-caching"]
    if fmt == "folder-f32":
        cmd += ["--model-path", str(folder), "--quantization-encoding", "float32"]
    else:
        cmd += ["--model-path", str(folder), "--weight-path", str(path), "--quantization-encoding", "q4_k"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MAX_SERVE_DISABLE_TELEMETRY="1",
               MAX_SERVE_SCHEDULER_STATS_LOG_INTERVAL_S="0")
    started = time.perf_counter()
    with open(log_path, "w") as logf:
        server = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"max serve exited with {server.returncode}: " + log_path.read_text()[-1500:])
            if time.perf_counter() - started > 900:
                raise RuntimeError("max serve not ready after 900 s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    model_name = json.load(resp)["data"][0]["id"]
                break
            except Exception:
                time.sleep(1)
        load_s = time.perf_counter() - started
        ids = prompt_ids(n)
        max_stream(port, ids, m, model_name)
        # the server's workers are not this process's children, so account for them here
        t0, (busy0, own0), server0 = time.perf_counter(), cpu_seconds(), session_cpu_seconds(server.pid)
        firsts, per_tokens, counts = [], [], []
        for _ in range(runs):
            first, last, count = max_stream(port, ids, m, model_name)
            firsts.append(first)
            per_tokens.append((last - first) / max(count - 1, 1))
            counts.append(count)
        (busy1, own1), server1 = cpu_seconds(), session_cpu_seconds(server.pid)
        other = (busy1 - busy0) - (own1 - own0) - (server1 - server0)
        other_share = max(0.0, other) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
        if any(c != m for c in counts):
            raise RuntimeError(f"MAX generated {counts} tokens, not {m}")
        time.sleep(0.5)  # let the scheduler flush its last log line
        ce, tg = scheduler_steps(log_path)
        ce, tg = ce[-runs:], tg[-runs * (m - 1):]  # the timed runs, not the warm-up
        steps = {"server_prefill_tokens_per_s": n / statistics.median(ce) if ce else None,
                  "server_decode_tokens_per_s": 1 / statistics.median(tg) if tg else None}
        out = summarize(firsts, per_tokens, n, {"load_s": load_s, "server_cmd": cmd, **steps,
                                                "other_cpu_share_timed": other_share})
        # this process is only the HTTP client; the server's processes peak at different times, so the sum of
        # their peaks is an upper bound
        out["peak_rss_mib"] = sum(filter(None, (peak_rss_mib(p) for p in session_pids(server.pid))))
        out["peak_rss_note"] = "sum of VmHWM over the max serve processes"
        return out
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


def run_worker(args_list: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-1500:] or f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_kiln(kiln: Path, path: Path, n: int, m: int, runs: int, timeout: float) -> dict:
    cmd = [str(kiln), "bench", "llm", "--model", str(path), "--prompt-tokens", str(n), "--gen-tokens", str(m),
           "--runs", str(runs)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-1500:] or f"exit {done.returncode}")
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------------------------
# environment and report
# ----------------------------------------------------------------------------------------------

def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model_name": model, "logical_cpus": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx")), "platform": platform.platform()}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds of this process and its reaped children)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy, own


def session_pids(sid: int) -> list[str]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    return pids


def session_cpu_seconds(sid: int) -> float:
    """CPU seconds used so far by the live processes of session `sid` (and their reaped children)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields[0] is the state (field 3 of stat); the session id is field 6
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def background_cpu(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` while this script waits: what else is running."""
    def sample():
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def binary_id(path: Path) -> dict:
    import hashlib

    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))}


def versions(kiln: Path, max_bin: str | None) -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "gguf", "llama_cpp_python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import llama_cpp
        out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # noqa: BLE001
        pass
    out["kiln"] = subprocess.run([str(kiln), "--version"], capture_output=True, text=True).stdout.strip()
    out["kiln_binary"] = binary_id(kiln)
    if max_bin:
        try:
            out["max"] = subprocess.run([max_bin, "--version"], capture_output=True, text=True,
                                        timeout=120).stdout.strip().splitlines()[-1]
        except Exception as e:  # noqa: BLE001
            out["max"] = f"unavailable ({e})"
    return out


def fmt_num(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def print_table(results: list[dict], configs: list[str], metric: str, title: str) -> None:
    cell = {(r["config"], r["format"], r["engine"]): r.get(metric) for r in results}
    print(f"\n{title}")
    head = (f"{'config':>6} | {'format':>11} | {'kiln':>8} | {'llama.cpp':>9} | {'transformers':>12} | {'max':>8} | "
            f"{'kiln/llama.cpp':>14} | {'kiln/transformers':>17} | {'kiln/max':>8}")
    print(head)
    print("-" * len(head))
    for c in configs:
        for f in FORMATS:
            k, l, t, x = (cell.get((c, f, e)) for e in ENGINES)
            if all(v is None for v in (k, l, t, x)):
                continue
            print(f"{c:>6} | {f:>11} | {fmt_num(k):>8} | {fmt_num(l):>9} | {fmt_num(t):>12} | {fmt_num(x):>8} | "
                  f"{ratio(k, l):>14} | {ratio(k, t):>17} | {ratio(k, x):>8}")


def measure(args, engine: str, config: str, fmt: str, paths: dict[str, Path], max_bin: str | None) -> dict:
    """One engine on one model file, with how busy the other processes kept the CPUs."""
    n, m = args.prompt_tokens, args.gen_tokens
    row = {"config": config, "format": fmt, "engine": engine}
    busy, waited = background_cpu(), time.perf_counter()
    while busy > 0.15 and time.perf_counter() - waited < args.quiet_wait:
        busy = background_cpu(5.0)
    row["other_cpu_busy_before"] = busy
    log(f"[{config} {fmt}] {engine} ..." + (f" (warning: the CPUs were {busy:.0%} busy just before; "
                                             "something else is running)" if busy > 0.15 else ""))
    started, (busy0, own0) = time.perf_counter(), cpu_seconds()
    try:
        path = paths[fmt]
        worker_args = ["--prompt-tokens", str(n), "--gen-tokens", str(m), "--runs", str(args.runs),
                       "--threads", str(args.threads), "--model", str(path)]
        if engine == "kiln":
            row["kiln_binary"] = binary_id(args.kiln)
            row.update(run_kiln(args.kiln, path, n, m, args.runs, args.timeout))
        elif engine in ("llama.cpp", "transformers"):
            row.update(run_worker(["--worker", engine, *worker_args], args.timeout))
        elif engine == "max":
            if not max_bin:
                raise RuntimeError("no `max` CLI (pip install modular)")
            row.update(max_worker(max_bin, fmt, path, paths["folder-f32"], n, m, args.runs,
                                  args.work / f"max-{config}-{fmt}.log"))
    except Exception as e:  # noqa: BLE001
        row["error"] = str(e)
        log(f"  failed: {str(e)[-600:]}")
    row["wall_s"] = time.perf_counter() - started
    busy1, own1 = cpu_seconds()
    # CPU time used meanwhile by processes that are not this benchmark, as a share of all CPUs
    row["other_cpu_share_during"] = row.pop("other_cpu_share_timed", None)  # MAX: over its timed requests
    if row["other_cpu_share_during"] is None:
        row["other_cpu_share_during"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (
            row["wall_s"] * (os.cpu_count() or 1))
    if row["other_cpu_share_during"] > 0.1:
        log(f"  warning: other processes used {row['other_cpu_share_during']:.0%} of the CPUs meanwhile")
    if "decode_tokens_per_s" in row:
        log(f"  prefill {row['prefill_tokens_per_s']:.1f} tok/s, decode {row['decode_tokens_per_s']:.2f} "
            f"tok/s ({row['wall_s']:.0f} s)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--configs", default="60m,0.5b")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for llama.cpp and torch (kiln uses rayon's default: all cores)")
    parser.add_argument("--kiln", type=Path, default=Path(os.environ.get("KILN_BIN", REPO / "target/release/kiln")))
    parser.add_argument("--max-bin", default=None,
                        help="the `max` CLI (default: /tmp/maxvenv/bin/max if present, else `max` on PATH)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-llm-bench"))
    parser.add_argument("--llama-cpp-src", type=Path, help="llama.cpp tree with convert_hf_to_gguf.py")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="seconds to wait, before each engine, for other processes to leave the CPUs idle")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure an engine again (up to this many times) when other processes used over 10%% "
                             "of the CPUs during its run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update", action="store_true",
                        help="measure only the selected rows again and replace them in --json FILE; the tables show "
                             "every row of the file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, m = args.prompt_tokens, args.gen_tokens
    if args.worker == "llama.cpp":
        print(json.dumps(llama_cpp_worker(args.model, n, m, args.runs, args.threads)))
        return
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(args.model, n, m, args.runs, args.threads)))
        return

    configs = args.configs.split(",")
    formats = args.formats.split(",")
    engines = args.engines.split(",")
    if not args.kiln.exists():
        sys.exit(f"no kiln binary at {args.kiln}: cargo build --release -p kiln")
    max_bin = args.max_bin
    if "max" in engines and max_bin is None:
        max_bin = "/tmp/maxvenv/bin/max" if Path("/tmp/maxvenv/bin/max").exists() else shutil.which("max")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_info(), "versions": versions(args.kiln, max_bin if "max" in engines else None),
              "settings": {"prompt_tokens": n, "gen_tokens": m, "runs": args.runs, "threads": args.threads,
                           "prompt": f"[1 + (i*7919) % (vocab-2) for i in range({n})]", "work": str(args.work)},
              "models": {}, "results": []}
    if args.update:
        if not args.json or not args.json.exists():
            sys.exit("--update needs --json FILE from an earlier run")
        previous = json.loads(args.json.read_text())
        if previous["settings"]["prompt_tokens"] != n or previous["settings"]["gen_tokens"] != m:
            sys.exit(f"{args.json} was measured with other --prompt-tokens / --gen-tokens")
        report["models"] = previous["models"]
        report["results"] = previous["results"]
        report["versions"]["earlier"] = previous["versions"]
    log(f"CPU: {report['cpu']['model_name']}, {report['cpu']['logical_cpus']} CPUs, "
        f"AVX-512: {' '.join(report['cpu']['avx512']) or 'no'}, AMX: {' '.join(report['cpu']['amx']) or 'no'}")
    for config in configs:
        paths = build_models(args.work, config, args.llama_cpp_src, args.threads)
        params = json.loads((paths["folder-f32"] / "bench_params.json").read_text())["parameters"]
        files = {f: [paths[f]] if paths[f].is_file() else list(paths[f].glob("*.safetensors")) for f in FORMATS}
        report["models"][config] = {"parameters": params, **CONFIGS[config], "files_mib": {
            f: round(sum(p.stat().st_size for p in ps) / 2**20, 1) for f, ps in files.items()}}
        for fmt in formats:
            for engine in engines:
                if fmt not in ENGINE_FORMATS[engine]:
                    continue
                for attempt in range(1 + args.retries):
                    row = measure(args, engine, config, fmt, paths, max_bin)
                    row["attempt"] = attempt + 1
                    if "error" in row or row["other_cpu_share_during"] <= 0.1:
                        break
                    if attempt < args.retries:
                        log("  measuring again: other processes shared the CPUs")
                report["results"] = [r for r in report["results"]
                                     if (r["config"], r["format"], r["engine"]) != (config, fmt, engine)] + [row]
                if args.json:  # keep what is done so far
                    args.json.write_text(json.dumps(report, indent=2))

    if binary_id(args.kiln)["sha256"] != report["versions"]["kiln_binary"]["sha256"]:
        report["versions"]["kiln_binary_changed_during_run"] = binary_id(args.kiln)
        log(f"warning: {args.kiln} was rebuilt during the run; its rows may mix two builds")
    cpu = report["cpu"]
    print(f"\nCPU: {cpu['model_name']} ({cpu['logical_cpus']} CPUs; AVX-512: {'yes' if cpu['avx512'] else 'no'}; "
          f"AMX: {'yes' if cpu['amx'] else 'no'}); threads: llama.cpp/torch {args.threads}, kiln rayon default")
    v = report["versions"]
    print("versions: " + ", ".join(f"{k} {v[k]}" for k in ("kiln", "llama_cpp_python", "torch", "transformers", "max")
                                   if k in v))
    configs = [c for c in CONFIGS if c in report["models"]]
    for c in configs:
        mdl = report["models"][c]
        print(f"model {c}: {mdl['parameters'] / 1e6:.0f}M parameters, files (MiB) " +
              ", ".join(f"{f} {s}" for f, s in mdl["files_mib"].items()))
    print(f"prompt {n} tokens, {m} generated (greedy, EOS ignored), median of {args.runs} runs after a warm-up")
    print_table(report["results"], configs, "decode_tokens_per_s", "decode tok/s (higher is better)")
    print_table(report["results"], configs, "prefill_tokens_per_s", "prefill tok/s = prompt / TTFT (higher is better)")
    print_table(report["results"], configs, "peak_rss_mib",
                "peak RSS MiB (VmHWM; MAX: sum over its processes; lower is better)")
    for r in report["results"]:
        if r["engine"] == "max" and r.get("server_decode_tokens_per_s"):
            print(f"MAX {r['config']} {r['format']}: its scheduler logs {r['server_prefill_tokens_per_s']:.1f} "
                  f"prefill tok/s, {r['server_decode_tokens_per_s']:.1f} decode tok/s (model steps only, no HTTP); "
                  f"server start incl. graph compile {r['load_s']:.0f} s")
    failed = [r for r in report["results"] if "error" in r]
    for r in failed:
        print(f"failed: {r['config']} {r['format']} {r['engine']}: {r['error'].splitlines()[-1][:300]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
