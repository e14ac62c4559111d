#!/usr/bin/env python3
"""Benchmark: Kiln vs diffusers on the same random FLUX.2-klein-shaped pipeline.

Builds a random step-distilled klein pipeline and saves it in the diffusers
layout, then times, in separate processes so peak memory is each side's own:
  * one transformer forward at each size (64 text tokens), median of --runs
    after a warm-up;
  * one whole 4-step generation (Qwen3 text encoding, denoising, VAE decode).
Prints both sides and the Kiln/diffusers time ratio (lower is better).

Configs (--config), so a tuned shape cannot hide a slow one:
  mid         hidden 768 = 6 heads x 128, 2 double + 4 single blocks (klein's head size)
  small-heads hidden 768 = 12 heads x 64, same blocks (64-wide heads)
Both: RoPE axes summing to the head size over 4 axes, theta 2000, mlp_ratio 3,
a 28-layer Qwen3 (hidden 256, so layers 9/18/27 exist) with the tokenizer of
fixtures/llm/tiny-qwen3, and a 4-level 32-latent-channel AutoencoderKLFlux2.

Setup (not part of CI):
    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install torch diffusers transformers safetensors
    cargo build --release -p kiln
Run:
    /tmp/bench-venv/bin/python bench/flux2_vs_diffusers.py [--runs 3] [--sizes 256,512] [--config mid]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_vs_diffusers import (  # noqa: E402
    TORCH_DTYPES, add_placement_arguments, median_time, run_kiln, synchronizer,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "fixtures" / "llm" / "tiny-qwen3"
TEXT_TOKENS = 64
STEPS = 4
CONFIGS = {
    "mid": {"heads": 6, "head_dim": 128, "double": 2, "single": 4},
    "small-heads": {"heads": 12, "head_dim": 64, "double": 2, "single": 4},
}


def build(folder: Path, config: str, dtype: str) -> None:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    c = CONFIGS[config]
    torch.manual_seed(0)
    qwen = json.loads((TOKENIZER / "config.json").read_text())
    qwen.update(hidden_size=256, intermediate_size=768, num_hidden_layers=28, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, layer_types=["full_attention"] * 28, max_window_layers=28)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**qwen))
    axis = c["head_dim"] // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=c["double"], num_single_layers=c["single"],
        attention_head_dim=c["head_dim"], num_attention_heads=c["heads"], joint_attention_dim=3 * 256,
        mlp_ratio=3.0, axes_dims_rope=(axis,) * 4, rope_theta=2000, guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
        latent_channels=32, norm_num_groups=32,
    )
    with torch.no_grad():
        for model in (transformer, text_encoder, vae):
            for name, p in model.named_parameters():
                if p.ndim == 1 and ("norm" in name or "scale" in name):
                    p.copy_(1.0 + 0.02 * torch.randn_like(p))
                else:
                    p.copy_(0.02 * torch.randn_like(p))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=AutoTokenizer.from_pretrained(TOKENIZER), transformer=transformer,
                              is_distilled=True)
    pipe.to(getattr(torch, TORCH_DTYPES[dtype])).save_pretrained(folder, safe_serialization=True)


def diffusers_worker(folder: Path, sizes: list[int], runs: int, device: str, dtype: str) -> dict:
    import torch
    from diffusers import Flux2KleinPipeline

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync = synchronizer(device)
    transformer = pipe.transformer
    cfg = transformer.config
    results = []
    for size in sizes:
        grid = size // 16
        on_device = {"device": device, "dtype": torch_dtype}
        img = torch.randn(1, grid * grid, cfg.in_channels).to(**on_device)
        txt = torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim).to(**on_device)
        img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, grid, grid)).to(device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, TEXT_TOKENS, 1)).to(device)
        t = torch.tensor([0.5]).to(**on_device)

        def forward():
            with torch.no_grad():
                transformer(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=img_ids,
                            txt_ids=txt_ids, return_dict=False)

        def generate():
            pipe(prompt="a photo of a cat", height=size, width=size, num_inference_steps=STEPS,
                 max_sequence_length=TEXT_TOKENS, generator=torch.Generator("cpu").manual_seed(0), output_type="np")

        results.append({"size": size, "forward_s": median_time(forward, runs, sync),
                        "generate_s": median_time(generate, runs, sync)})
    return {"results": results, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    add_placement_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker == "diffusers":
        print(json.dumps(diffusers_worker(args.model, sizes, args.runs, args.device, args.dtype)))
        return
    folder = Path(tempfile.mkdtemp(prefix="kiln-flux2-bench-"))
    placement = ["--device", args.device, "--dtype", args.dtype]
    try:
        build(folder, args.config, args.dtype)
        diffusers = json.loads(subprocess.run(
            [sys.executable, __file__, "--worker", "diffusers", "--model", str(folder), "--sizes", args.sizes,
             "--runs", str(args.runs), *placement],
            check=True, stdout=subprocess.PIPE, text=True).stdout)
        kiln = json.loads(run_kiln(
            ["bench", "flux2", "--model", str(folder), "--sizes", args.sizes, "--runs", str(args.runs),
             "--steps", str(STEPS), "--max-sequence-length", str(TEXT_TOKENS), *placement]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    c = CONFIGS[args.config]
    print(f"FLUX.2-klein {args.config} (hidden {c['heads'] * c['head_dim']} = {c['heads']} x {c['head_dim']}, "
          f"{c['double']}+{c['single']} blocks) on {args.device} in {args.dtype}, {TEXT_TOKENS} text tokens, "
          f"{STEPS}-step generations, median of {args.runs}, torch threads {diffusers['torch_threads']}")
    print(f"{'size':>5} | {'stage':>10} | {'kiln s':>8} | {'diffusers s':>11} | {'ratio':>6}")
    for ours, theirs in zip(kiln["results"], diffusers["results"]):
        for stage in ("forward_s", "generate_s"):
            ratio = ours[stage] / theirs[stage]
            print(f"{ours['size']:>5} | {stage[:-2]:>10} | {ours[stage]:>8.3f} | {theirs[stage]:>11.3f} | {ratio:>5.2f}x")
        stages = ours["stages"]
        print(f"{'':>5} | kiln stages: text {stages['text_s']:.3f} s, denoise {stages['denoise_s']:.3f} s, "
              f"VAE {stages['vae_s']:.3f} s")
    print(f"peak RSS: kiln {kiln['peak_rss_mib']:.0f} MiB, diffusers {diffusers['peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"kiln": kiln, "diffusers": diffusers}, indent=2))


if __name__ == "__main__":
    main()
