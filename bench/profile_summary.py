"""Where a Kiln benchmark's CPU time goes: runs a command under `perf record`
(the cpu-clock software event, which works inside VMs without hardware
counters) and sums the samples' self time by kind of work.

Used by the `--profile` option of bench/flux_vs_diffusers.py and
bench/sdxl_vs_diffusers.py; needs `perf` (Debian's linux-perf). The GEMMs
inside the fused attention count as GEMM, its softmax as attention.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# First match wins; patterns are searched in the demangled symbol name.
CATEGORIES = [
    ("GEMM", r"gemm_f32|gemm_f16|gemm_common|private_gemm|gemm::gemm|\bgemm\b"),
    ("bf16 GEMM (vdpbf16ps)", r"bf16_gemm"),
    ("convolution (direct kernel)", r"conv_direct::tile|conv_direct::pair_row"),
    ("attention (softmax)", r"softmax|fused_attention|paged_attention"),
    ("norms", r"group_norm|normalise_group|layer_norm|rms_norm|LayerNorm|RmsNorm"),
    ("activations", r"activation::|map_slice|silu|gelu"),
    ("convolution copies (im2col, planes)", r"Im2colConv|fill_columns|conv::|conv_direct|conv_nhwc|conv_im2col"),
    ("copies and fills", r"memmove|memcpy|memset|copy_strided|copy2d|Tensor::cat|clear_page"),
    ("element-wise (candle)", r"binary_map|unary_map|Map1|Map2|affine|cpu_backend"),
    ("page faults and allocation", r"page_fault|handle_mm_fault|anonymous_page|malloc|free|mmap|munmap|memcg"),
    ("threads (spin, sleep, sync)", r"rayon|Barrier|sched|futex|spin|yield|backtrace|switch|syscall|softirq"),
]


def available() -> bool:
    return shutil.which("perf") is not None


def record(command: list[str]) -> tuple[str, dict[str, float]]:
    """Run `command` under perf; returns its stdout and the share (%) per category."""
    with tempfile.TemporaryDirectory(prefix="kiln-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        done = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-o", str(data), "--",
                               *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"perf record failed:\n{done.stderr}")
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "--stdio"],
                                capture_output=True, text=True, check=True).stdout
    return done.stdout, categorise(report)


def categorise(report: str) -> dict[str, float]:
    shares = {name: 0.0 for name, _ in CATEGORIES}
    shares["other"] = 0.0
    line = re.compile(r"^\s*([\d.]+)%\s+\[[.k]\]\s+(.*)$")
    for text in report.splitlines():
        match = line.match(text)
        if not match:
            continue
        share, symbol = float(match.group(1)), match.group(2)
        for name, pattern in CATEGORIES:
            if re.search(pattern, symbol):
                shares[name] += share
                break
        else:
            shares["other"] += share
    return shares


def print_summary(title: str, shares: dict[str, float]) -> None:
    print(f"where kiln's time goes ({title}; perf cpu-clock samples, self time):")
    for name, share in sorted(shares.items(), key=lambda item: -item[1]):
        if share >= 0.5:
            print(f"  {share:5.1f}%  {name}")
