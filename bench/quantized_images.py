#!/usr/bin/env python3
"""Benchmark: Kiln's quantized image models (int8, q8_0, q4_k) against the
same model dense, on the random mid-size pipelines of bench/flux_vs_diffusers.py
(FLUX: hidden 768 = 6 x 128, 2 double + 4 single blocks, 64 text tokens) and
bench/sdxl_vs_diffusers.py (SDXL: UNet widths 160/320/640). Each quantization
runs in its own `kiln bench flux|sdxl` process (so peak RSS is its own) and
reports:
  * FLUX: transformer forward and whole 4-step generation time; SDXL: one UNet
    step with CFG (batch 2); each with its ratio to dense (dense runs first and
    last, the faster of the two is the baseline, both are printed);
  * the final image's PSNR against the dense image (same seed; FLUX 4 steps,
    SDXL 4 Euler steps);
  * the resident bytes of the loaded pipeline (weights as stored) and peak RSS.
Targets from issue 17: int8 and q8_0 >= 35 dB PSNR on FLUX at 256^2, 4 steps;
time <= 1.15x dense on CPU.

Run (after `cargo build --release -p kiln`, in the venv of flux_vs_diffusers.py):
    python bench/quantized_images.py [--family flux|sdxl|both] [--runs 3] [--sizes 256,512]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_vs_diffusers as flux  # noqa: E402
import sdxl_vs_diffusers as sdxl  # noqa: E402

KINDS = ["none", "int8", "q8_0", "q4_k"]


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def run_family(family: str, sizes: str, runs: int, work: Path) -> dict:
    from safetensors.numpy import load_file

    folder = work / family
    results = {}
    if family == "flux":
        flux.build(folder, "mid", "f32")
        extra = ["--steps", str(flux.STEPS), "--max-sequence-length", str(flux.TEXT_TOKENS)]
    else:
        sdxl.build(folder, "mid", "f32")
        extra = []
    # Dense runs first and again last: the baseline is the faster of the two,
    # and their spread shows the machine's noise.
    for run, kind in enumerate(KINDS + ["none"]):
        images = work / f"{family}-{kind}-{run}"
        result = json.loads(flux.run_kiln(
            ["bench", family, "--model", str(folder), "--sizes", sizes, "--runs", str(runs), *extra,
             "--quantize", kind, "--save-images", str(images)]))
        for row in result["results"]:
            row["image"] = load_file(str(images / f"{family}-{row['size']}.safetensors"))["image"]
        if kind == "none" and kind in results:
            results["none_again"] = result
        else:
            results[kind] = result
    return results


def report(family: str, results: dict, runs: int) -> None:
    timed = ["forward_s", "generate_s"] if family == "flux" else ["unet_step_s"]
    first, again = results["none"]["results"], results["none_again"]["results"]
    for a, b in zip(first, again):
        spread = ", ".join(f"{name} {a[name]:.3f}/{b[name]:.3f}" for name in timed)
        print(f"dense {family} {a['size']}: first/last run {spread}")
    dense = {"results": [{**a, **{name: min(a[name], b[name]) for name in timed}} for a, b in zip(first, again)]}
    if family == "flux":
        c = flux.CONFIGS["mid"]
        print(f"\nFLUX mid (hidden {128 * c['heads']}, {c['double']}+{c['single']} blocks), {flux.TEXT_TOKENS} text "
              f"tokens, {flux.STEPS}-step generations, median of {runs}; ratios against Kiln dense f32")
    else:
        print(f"\nSDXL mid (UNet {sdxl.CONFIGS['mid']['unet']}), one UNet step with CFG (batch 2), image from 4 "
              f"Euler steps, median of {runs}; ratios against Kiln dense f32")
    header = " | ".join(f"{name:>11} | {'x dense':>7}" for name in timed)
    print(f"{'kind':>5} | {'size':>4} | {header} | {'PSNR dB':>7} | {'resident MiB':>12} | {'peak RSS MiB':>12}")
    for kind in KINDS:
        rows = dense["results"] if kind == "none" else results[kind]["results"]
        for row, base in zip(rows, dense["results"]):
            times = " | ".join(f"{row[name]:>11.3f} | {row[name] / base[name]:>6.2f}x" for name in timed)
            print(f"{kind:>5} | {row['size']:>4} | {times} | {psnr(row['image'], base['image']):>7.1f}"
                  f" | {results[kind]['resident_bytes'] / 2**20:>12.1f} | {results[kind]['peak_rss_mib']:>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["flux", "sdxl", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    families = ["flux", "sdxl"] if args.family == "both" else [args.family]
    work = Path(tempfile.mkdtemp(prefix="kiln-quant-bench-"))
    everything = {}
    try:
        for family in families:
            everything[family] = run_family(family, args.sizes, args.runs, work)
            report(family, everything[family], args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        for results in everything.values():
            for result in results.values():
                for row in result["results"]:
                    row.pop("image")
        args.json.write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
