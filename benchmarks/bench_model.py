"""Benchmark the CIPA network on the CPU: (b) forward at 512x512, batch 1, against a dense matmul job of the same
arithmetic measured in the same run, with peak memory; (c) forward + backward at batch 2.

The network's arithmetic is fvcore's count, 74.32 G at 512x512 without the scans. fvcore counts one fused
multiply-add as one "FLOP", so the yardstick performs 74.32 G multiply-adds (148.6 G floating-point operations).

Usage::

    python benchmarks/bench_model.py                 # the paper's configuration
    python benchmarks/bench_model.py --img-size 256 --dims 30 --skip-backward   # quicker look

Prints a Markdown table; paste it into docs/performance.md ("Network") with the machine description.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from cipa_bundle.networks import CIPA
from cipa_bundle.runtime import retain_freed_memory

#: fvcore's count for the default model at 512x512 without the scans (cipa_architecture.md section 9), in billions of
#: multiply-adds: fvcore counts one fused multiply-add as one FLOP (its FlopCountAnalysis documentation says so).
FVCORE_GMACS = 74.32


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _dense_matmul_seconds(gmacs: float, size: int = 2048) -> float:
    """Time square fp32 matmuls adding up to ``gmacs`` billion multiply-adds (n^3 each): the dense-compute yardstick."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    count = max(1, round(gmacs * 1e9 / size**3))
    start = time.perf_counter()
    for _ in range(count):
        torch.mm(a, b)
    # Scaled to exactly ``gmacs``: a whole number of products overshoots or falls short by up to half of one.
    return (time.perf_counter() - start) * gmacs * 1e9 / (count * size**3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--dims", type=int, default=96)
    parser.add_argument("--skip-backward", action="store_true")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's defaults instead of the CLI's retain_freed_memory()"
    )
    args = parser.parse_args()
    # As `cipa-bundle` and the training workflow do (cipa_bundle.runtime).
    retained = False if args.default_malloc else retain_freed_memory()

    torch.manual_seed(0)
    model = CIPA(img_size=args.img_size, dims=args.dims)
    params = sum(p.numel() for p in model.parameters())
    gmacs = FVCORE_GMACS * (args.img_size / 512) ** 2 * (args.dims / 96) ** 2
    rows = []

    model.eval()
    x = torch.randn(1, 2, args.img_size, args.img_size)
    with torch.no_grad():
        model(x)  # JIT-compiles the scan kernels (cached on disk afterwards)
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    dense = _dense_matmul_seconds(gmacs)
    rows.append(("(b) forward, batch 1", forward, dense, _peak_rss_gb()))

    if not args.skip_backward:
        model.train()
        x2 = torch.randn(2, 2, args.img_size, args.img_size)
        start = time.perf_counter()
        model(x2).float().square().mean().backward()
        rows.append(("(c) forward + backward, batch 2", time.perf_counter() - start, None, _peak_rss_gb()))

    print(
        f"CIPA img_size={args.img_size} dims={args.dims}: {params:,} parameters, "
        f"~{gmacs:.1f} G multiply-adds without scans"
    )
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"freed memory retained (cipa_bundle.runtime.retain_freed_memory): {retained}")
    print()
    print("| run | seconds | dense matmuls of the same multiply-adds, s | ratio | peak RSS GB |")
    print("|---|---|---|---|---|")
    for name, seconds, reference, rss in rows:
        ratio = f"{seconds / reference:.1f}x" if reference else "-"
        reference_text = f"{reference:.2f}" if reference else "-"
        print(f"| {name} | {seconds:.2f} | {reference_text} | {ratio} | {rss:.2f} |")


if __name__ == "__main__":
    main()
