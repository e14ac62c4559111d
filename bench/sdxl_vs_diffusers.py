#!/usr/bin/env python3
"""Benchmark: Kiln vs diffusers on the same mid-size random SDXL pipeline.

Builds a random SDXL-shaped pipeline (UNet 160/320/640 channels, 2 layers per
block, 1/2/2 transformer layers with 2048-wide text context and SDXL's 2816-wide
added conditioning; 2-layer text encoders at CLIP-L / bigG widths with the
tokenizers of fixtures/sdxl/tiny-sdxl; a 64/128/256/256 VAE), saves it in the
diffusers layout, then times, in separate processes so peak memory is each
side's own: one UNet step with classifier-free guidance (batch 2) and one VAE
decode, at each size, median of --runs after a warm-up. Prints both sides and
the Kiln/diffusers time ratio (lower is better).

Setup: the venv of bench/flux_vs_diffusers.py; `cargo build --release -p kiln`.
Run:
    /tmp/bench-venv/bin/python bench/sdxl_vs_diffusers.py [--runs 3] [--sizes 256,512] [--profile]
        [--device cuda --dtype bf16 --config sdxl-width --sizes 1024]
`--device`/`--dtype` as in bench/flux_vs_diffusers.py (both VAEs decode in f32 as
SDXL's VAE config asks). `--config sdxl-width` is SDXL's real UNet (320/640/1280
channels, 1/2/10 transformer layers) and VAE (128/256/512/512).
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

import profile_summary
from flux_vs_diffusers import (TORCH_DTYPES, GpuMemory, add_placement_arguments, cpu_model, kiln_binary, median_time,
                               report_gpu_memory, run_kiln, synchronizer)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "fixtures" / "sdxl" / "tiny-sdxl"
CONFIGS = {
    # UNet channels, transformer layers per block, attention head dims; VAE channels
    "mid": {"unet": (160, 320, 640), "layers": (1, 2, 2), "heads": (2, 5, 10), "vae": (64, 128, 256, 256)},
    "sdxl-width": {"unet": (320, 640, 1280), "layers": (1, 2, 10), "heads": (5, 10, 20),
                   "vae": (128, 256, 512, 512)},
}


def build(folder: Path, config: str, dtype: str) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(TINY / "tokenizer_2")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")

    def clip(width: int, heads: int, act: str, cls):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=77,
                                  hidden_act=act, projection_dim=1280, eos_token_id=eos, bos_token_id=eos - 1))

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=CONFIGS[config]["unet"], layers_per_block=2,
        transformer_layers_per_block=CONFIGS[config]["layers"], attention_head_dim=CONFIGS[config]["heads"],
        cross_attention_dim=2048, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=CONFIGS[config]["vae"], layers_per_block=2,
        latent_channels=4, norm_num_groups=32, scaling_factor=0.13025,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(768, 12, "quick_gelu", CLIPTextModel),
        text_encoder_2=clip(1280, 20, "gelu", CLIPTextModelWithProjection), tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(TINY / "scheduler"),
    )
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.copy_(1.0 + 0.02 * torch.randn_like(p))
                else:
                    p.copy_(0.02 * torch.randn_like(p))
    pipe.to(getattr(torch, TORCH_DTYPES[dtype])).save_pretrained(folder, safe_serialization=True)


def diffusers_worker(folder: Path, sizes: list[int], runs: int, device: str, dtype: str) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch_dtype).to(device)
    pipe.vae.to(torch.float32)  # SDXL's VAE config has force_upcast: the pipeline decodes in f32
    sync = synchronizer(device)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat")
    context = torch.cat([negative, embeds])
    text_embeds = torch.cat([negative_pooled, pooled])
    results = []
    for size in sizes:
        sample = torch.randn(2, 4, size // 8, size // 8).to(device=device, dtype=torch_dtype)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2).to(device=device, dtype=torch_dtype)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        timestep = torch.tensor(500.0, device=device)

        def unet():
            with torch.no_grad():
                pipe.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added)

        def vae():
            with torch.no_grad():
                pipe.vae.decode(sample[:1].float())

        results.append({"size": size, "unet_step_s": median_time(unet, runs, sync),
                        "vae_decode_s": median_time(vae, runs, sync)})
    return {"results": results, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true",
                        help="also summarise where kiln's time goes (perf, one extra kiln run)")
    add_placement_arguments(parser)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker == "diffusers":
        print(json.dumps(diffusers_worker(args.model, sizes, args.runs, args.device, args.dtype)))
        return
    if args.profile and not profile_summary.available():
        sys.exit("--profile needs perf (Debian's linux-perf)")
    folder = Path(tempfile.mkdtemp(prefix="kiln-sdxl-bench-"))
    placement = ["--device", args.device, "--dtype", args.dtype]
    kiln_command = ["bench", "sdxl", "--model", str(folder), "--sizes", args.sizes, "--runs", str(args.runs),
                    *placement]
    shares = None
    try:
        build(folder, args.config, args.dtype)
        with GpuMemory(args.device) as diffusers_gpu:
            diffusers = json.loads(subprocess.run(
                [sys.executable, __file__, "--worker", "diffusers", "--model", str(folder), "--sizes", args.sizes,
                 "--runs", str(args.runs), *placement], check=True, stdout=subprocess.PIPE, text=True).stdout)
        with GpuMemory(args.device) as kiln_gpu:
            kiln = json.loads(run_kiln(kiln_command))
        if args.profile:
            _, shares = profile_summary.record([str(kiln_binary()), *kiln_command])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    unet = "/".join(map(str, CONFIGS[args.config]["unet"]))
    print(f"SDXL {args.config} UNet ({unet}, 2048-wide context) on {args.device} in {args.dtype}, CFG batch 2, "
          f"median of {args.runs}, torch threads {diffusers['torch_threads']}, CPU {cpu_model()}")
    print(f"{'size':>5} | {'stage':>11} | {'kiln s':>8} | {'diffusers s':>11} | {'ratio':>6}")
    for ours, theirs in zip(kiln["results"], diffusers["results"]):
        for stage in ("unet_step_s", "vae_decode_s"):
            ratio = ours[stage] / theirs[stage]
            print(f"{ours['size']:>5} | {stage[:-2]:>11} | {ours[stage]:>8.3f} | {theirs[stage]:>11.3f} | {ratio:>5.2f}x")
    print(f"peak RSS: kiln {kiln['peak_rss_mib']:.0f} MiB, diffusers {diffusers['peak_rss_mib']:.0f} MiB")
    report_gpu_memory(kiln, kiln_gpu, diffusers, diffusers_gpu)
    if shares:
        profile_summary.print_summary("UNet steps and VAE decodes, every size", shares)
    if args.json:
        args.json.write_text(json.dumps({"kiln": kiln, "diffusers": diffusers, "cpu": cpu_model(),
                                         "kiln_profile": shares}, indent=2))


if __name__ == "__main__":
    main()
