#!/usr/bin/env python3
"""Benchmark: Kiln vs diffusers on the same mid-size random FLUX pipeline.

Builds a random FLUX.1-dev-shaped pipeline (transformer hidden 768 = 6 heads x
128, 2 double + 4 single blocks, RoPE axes (16, 56, 56); small CLIP/T5 with the
tokenizers of fixtures/flux/tiny-dev; a 4-level 16-channel VAE), saves it in the
diffusers layout, then times, in separate processes so peak memory is each
side's own:
  * one transformer forward at 256x256 and 512x512 (256 / 1024 image tokens,
    64 text tokens), median of --runs after a warm-up;
  * one whole generation (4 steps, text encoding, VAE decode) at the same sizes.
Prints both sides and the Kiln/diffusers time ratio (lower is better), with the
CPU's model. `--head-dims 64,128` builds the model with 128-wide heads (6 of
them) and with 64-wide heads (12, same hidden width); `--text-tokens 16,256`
times each T5 length; `--profile` adds a summary of where Kiln's time goes
(perf samples by kind: GEMM, attention, norms, copies; see profile_summary.py).

On a GPU machine (kiln built with `--features cuda`): `--device cuda --dtype bf16`
runs both sides there, each timed call ending with the device's queue drained,
and reports peak GPU memory (nvidia-smi's memory.used, CUDA context included, for
both). `--config flux1-width` uses FLUX.1's real widths (hidden 3072 = 24 x 128,
4096-wide T5 states, 768-wide pooled CLIP, FLUX.1's VAE) with 4 double + 8 single
blocks instead of 19 + 38, so a block costs what it costs in FLUX.1 [dev].
`--offload` times only whole generations with model CPU offload on both sides
(diffusers' enable_model_cpu_offload; kiln's `offload = "model"`), for the peak
GPU memory it saves and the time it costs.

Setup (not part of CI; torch's CUDA wheel is the only one on PyPI, it runs on CPU):
    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install torch diffusers transformers safetensors sentencepiece
    cargo build --release -p kiln
Run:
    /tmp/bench-venv/bin/python bench/flux_vs_diffusers.py [--runs 3] [--sizes 256,512] [--lora-rank 16]
        [--head-dims 64,128] [--text-tokens 16,256] [--profile]
        [--device cuda --dtype bf16 --config flux1-width --sizes 512,1024]
--lora-rank R also times the forward with a random rank-R LoRA on every linear
layer, at runtime and fused, on both sides (diffusers needs `pip install peft`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import profile_summary

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "fixtures" / "flux" / "tiny-dev"
TEXT_TOKENS = 64
HEAD_DIM = 128
# RoPE axes per head width (they must add up to it): FLUX.1's for 128, halved for 64.
ROPE_AXES = {128: (16, 56, 56), 64: (8, 28, 28)}
STEPS = 4
TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
CONFIGS = {
    # transformer blocks/heads/widths, CLIP width, T5 sizes, VAE channels and layers per block
    "mid": {"double": 2, "single": 4, "heads": 6, "joint": 256, "pooled": 128, "clip": 128,
            "t5": (256, 32, 512, 8), "vae": ((32, 64, 128, 128), 1)},
    "flux1-width": {"double": 4, "single": 8, "heads": 24, "joint": 4096, "pooled": 768, "clip": 768,
                    "t5": (4096, 64, 10240, 64), "vae": ((128, 256, 512, 512), 2)},
}


def synchronizer(device: str):
    """What drains the device's queue, so a timing covers asynchronous GPU work."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return lambda: None


class GpuMemory:
    """Peak GPU memory used while a block runs, sampled from nvidia-smi every 50 ms
    (MiB, the CUDA context included); None on the CPU."""

    def __init__(self, device: str):
        self.device, self.peak_mib, self._monitor = device, None, None

    def __enter__(self):
        if self.device.startswith("cuda"):
            self._monitor = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *_):
        if self._monitor:
            self._monitor.terminate()
            out, _ = self._monitor.communicate()
            self.peak_mib = max((float(line) for line in out.split() if line.strip()), default=None)


def build(folder: Path, config: str, dtype: str, head_dim: int = HEAD_DIM) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    c = CONFIGS[config]
    torch.manual_seed(0)
    # The same hidden width at either head width: 64-wide heads are twice as many.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=c["double"], num_single_layers=c["single"],
        attention_head_dim=head_dim, num_attention_heads=c["heads"] * 128 // head_dim,
        joint_attention_dim=c["joint"], pooled_projection_dim=c["pooled"], guidance_embeds=True,
        axes_dims_rope=ROPE_AXES[head_dim],
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=698, hidden_size=c["clip"], intermediate_size=2 * c["clip"], num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=696,
        eos_token_id=697, projection_dim=c["clip"],
    ))
    d_model, d_kv, d_ff, t5_heads = c["t5"]
    t5 = T5EncoderModel(T5Config(
        vocab_size=300, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=2, num_heads=t5_heads,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    ))
    channels, layers = c["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=channels, layers_per_block=layers,
        latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():
        for model in (transformer, clip, t5, vae):
            for name, p in model.named_parameters():
                if p.ndim == 1 and ("norm" in name or "scale" in name):
                    p.copy_(1.0 + 0.02 * torch.randn_like(p))
                else:
                    p.copy_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(TINY / "scheduler")
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(TINY / "tokenizer"),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(TINY / "tokenizer_2"), transformer=transformer,
    )
    pipe.to(getattr(torch, TORCH_DTYPES[dtype])).save_pretrained(folder, safe_serialization=True)


def median_time(fn, runs: int, sync=lambda: None) -> float:
    fn()
    sync()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def add_random_lora(transformer, rank: int) -> None:
    """A random rank-`rank` PEFT LoRA (alpha = rank) on every linear layer."""
    import torch
    from peft import LoraConfig

    names = set()
    for n, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in n:
            # After an earlier adapter was deleted, peft's wrappers hold the layer as base_layer.
            names.add(n.removesuffix(".base_layer"))
    names = sorted(names)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), adapter_name="bench")
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn_like(p))


def diffusers_worker(folder: Path, sizes: list[int], runs: int, lora_rank: int = 0, device: str = "cpu",
                     dtype: str = "f32", offload: bool = False, text_tokens: int = TEXT_TOKENS) -> dict:
    import torch
    from diffusers import FluxPipeline

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch_dtype)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    sync = synchronizer(device)
    transformer = pipe.transformer
    cfg = transformer.config
    results = []
    for size in sizes:
        tokens = (size // 16) ** 2
        on_device = {"device": device, "dtype": torch_dtype}
        img = torch.randn(1, tokens, cfg.in_channels).to(**on_device)
        txt = torch.randn(1, text_tokens, cfg.joint_attention_dim).to(**on_device)
        pooled = torch.randn(1, cfg.pooled_projection_dim).to(**on_device)
        grid = size // 16
        img_ids = torch.zeros(grid, grid, 3)
        img_ids[..., 1] = torch.arange(grid)[:, None]
        img_ids[..., 2] = torch.arange(grid)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(device)
        txt_ids = torch.zeros(text_tokens, 3).to(device)
        t = torch.tensor([0.5]).to(**on_device)
        g = torch.tensor([3.5]).to(**on_device)

        def forward():
            with torch.no_grad():
                transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                            img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)

        def generate():
            pipe("a photo of a cat", height=size, width=size, num_inference_steps=STEPS, guidance_scale=3.5,
                 max_sequence_length=text_tokens, generator=torch.Generator("cpu").manual_seed(0), output_type="np")

        if offload:
            results.append({"size": size, "generate_s": median_time(generate, runs, sync)})
            continue
        row = {"size": size, "forward_s": median_time(forward, runs, sync),
               "generate_s": median_time(generate, runs, sync)}
        if lora_rank:
            add_random_lora(transformer, lora_rank)
            runtime_s = median_time(forward, runs, sync)
            transformer.fuse_lora(adapter_names=["bench"])
            fused_s = median_time(forward, runs, sync)
            transformer.unfuse_lora()
            transformer.delete_adapters("bench")
            row["lora"] = {"rank": lora_rank, "runtime_forward_s": runtime_s, "fused_forward_s": fused_s,
                           "runtime_vs_none": runtime_s / row["forward_s"], "fused_vs_none": fused_s / row["forward_s"]}
        results.append(row)
    return {"results": results, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (kiln built with --features cuda)")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="f32")


def run_kiln(arguments: list[str]) -> str:
    """Run the kiln binary; its stderr is shown when it fails."""
    done = subprocess.run([str(kiln_binary()), *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kiln {' '.join(arguments[:2])} failed:\n{done.stderr}")
    return done.stdout


def report_gpu_memory(kiln: dict, kiln_gpu: GpuMemory, diffusers: dict, diffusers_gpu: GpuMemory) -> None:
    if kiln_gpu.peak_mib is not None and diffusers_gpu.peak_mib is not None:
        kiln["peak_gpu_mib"], diffusers["peak_gpu_mib"] = kiln_gpu.peak_mib, diffusers_gpu.peak_mib
        print(f"peak GPU memory (nvidia-smi): kiln {kiln_gpu.peak_mib:.0f} MiB, "
              f"diffusers {diffusers_gpu.peak_mib:.0f} MiB")


def kiln_binary() -> Path:
    override = os.environ.get("KILN_BIN")
    if override:
        return Path(override)
    for candidate in (REPO / "target/release/kiln", REPO / "target/debug/kiln"):
        if candidate.exists():
            if "debug" in str(candidate):
                print("warning: using a debug build of kiln", file=sys.stderr)
            return candidate
    sys.exit("build kiln first: cargo build --release -p kiln")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--head-dims", default=str(HEAD_DIM),
                        help="attention head widths to build (64 and/or 128; the hidden width stays the same)")
    parser.add_argument("--text-tokens", default=str(TEXT_TOKENS), help="T5 sequence lengths to time (16 to 512)")
    parser.add_argument("--profile", action="store_true",
                        help="also summarise where kiln's time goes (perf, one extra kiln run per config)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="also time the forward with a random LoRA of this rank on every linear (needs peft)")
    add_placement_arguments(parser)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--offload", action="store_true", help="whole generations with model CPU offload only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker == "diffusers":
        print(json.dumps(diffusers_worker(args.model, sizes, args.runs, args.lora_rank, args.device, args.dtype,
                                          args.offload, int(args.text_tokens))))
        return
    if args.profile and not profile_summary.available():
        sys.exit("--profile needs perf (Debian's linux-perf)")
    records = []
    for head_dim in (int(h) for h in args.head_dims.split(",")):
        for text_tokens in (int(t) for t in args.text_tokens.split(",")):
            records.append(compare(args, head_dim, text_tokens))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


def compare(args: argparse.Namespace, head_dim: int, text_tokens: int) -> dict:
    """Both sides on one model (head width) and text length; prints the table."""
    folder = Path(tempfile.mkdtemp(prefix="kiln-flux-bench-"))
    placement = ["--device", args.device, "--dtype", args.dtype] + (["--offload"] if args.offload else [])
    kiln_command = ["bench", "flux", "--model", str(folder), "--sizes", args.sizes, "--runs", str(args.runs),
                    "--steps", str(STEPS), "--max-sequence-length", str(text_tokens),
                    "--lora-rank", str(args.lora_rank), *placement]
    shares = None
    try:
        build(folder, args.config, args.dtype, head_dim)
        with GpuMemory(args.device) as diffusers_gpu:
            diffusers = json.loads(subprocess.run(
                [sys.executable, __file__, "--worker", "diffusers", "--model", str(folder), "--sizes", args.sizes,
                 "--runs", str(args.runs), "--lora-rank", str(args.lora_rank), "--text-tokens", str(text_tokens),
                 *placement], check=True, stdout=subprocess.PIPE, text=True).stdout)
        with GpuMemory(args.device) as kiln_gpu:
            kiln = json.loads(run_kiln(kiln_command))
        if args.profile:
            _, shares = profile_summary.record([str(kiln_binary()), *kiln_command])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    c = CONFIGS[args.config]
    heads = c["heads"] * 128 // head_dim
    print(f"FLUX {args.config} (hidden {128 * c['heads']} = {heads} heads x {head_dim}, {c['double']}+{c['single']} "
          f"blocks) on {args.device} in {args.dtype}{', model CPU offload' if args.offload else ''}, "
          f"{text_tokens} text tokens, {STEPS}-step generations, median of {args.runs}, "
          f"torch threads {diffusers['torch_threads']}, CPU {cpu_model()}")
    print(f"{'size':>5} | {'stage':>10} | {'kiln s':>8} | {'diffusers s':>11} | {'ratio':>6}")
    for ours, theirs in zip(kiln["results"], diffusers["results"]):
        for stage in ("generate_s",) if args.offload else ("forward_s", "generate_s"):
            ratio = ours[stage] / theirs[stage]
            print(f"{ours['size']:>5} | {stage[:-2]:>10} | {ours[stage]:>8.3f} | {theirs[stage]:>11.3f} | {ratio:>5.2f}x")
    if args.lora_rank:
        print(f"LoRA rank {args.lora_rank} on every linear, transformer forward:")
        print(f"{'size':>5} | {'mode':>8} | {'kiln s':>8} | {'vs none':>7} | {'diffusers s':>11} | {'vs none':>7} | {'kiln/diffusers':>14}")
        for ours, theirs in zip(kiln["results"], diffusers["results"]):
            for mode in ("runtime", "fused"):
                k, d = ours["lora"][f"{mode}_forward_s"], theirs["lora"][f"{mode}_forward_s"]
                print(f"{ours['size']:>5} | {mode:>8} | {k:>8.3f} | {ours['lora'][f'{mode}_vs_none']:>6.2f}x | "
                      f"{d:>11.3f} | {theirs['lora'][f'{mode}_vs_none']:>6.2f}x | {k / d:>13.2f}x")
    print(f"peak RSS: kiln {kiln['peak_rss_mib']:.0f} MiB, diffusers {diffusers['peak_rss_mib']:.0f} MiB")
    report_gpu_memory(kiln, kiln_gpu, diffusers, diffusers_gpu)
    if shares:
        profile_summary.print_summary("forward and generation, every size", shares)
    print()
    return {"head_dim": head_dim, "text_tokens": text_tokens, "cpu": cpu_model(), "kiln": kiln,
            "diffusers": diffusers, "kiln_profile": shares}


def cpu_model() -> str:
    """The CPU's model name and vector extensions from /proc/cpuinfo (benchmarks name the machine)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    extensions = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"]
    extensions += [name for flag, name in (("avx512_bf16", "BF16"), ("amx_tile", "AMX")) if flag in flags]
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {'+'.join(extensions)})")


if __name__ == "__main__":
    main()
