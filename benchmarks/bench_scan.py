"""Time the selective scan at CIPA's real shapes, per backend and against mambapy's Blelloch pscan.

Shapes: one 4-direction scan call of each encoder stage for a 512x512 input at batch 1 (d = 4 x d_inner, G = 4,
N = 16), and the decoder's stage-0 scan (N = 4). For each backend it reports the forward time (no autograd, as in
inference), the forward+backward time (``y.backward(g)`` for a fixed random output gradient ``g``, as a training step
hands the scan; no loss is computed, so only the scan is timed), and the peak RSS of the process.
Every (backend, shape) pair runs in its own subprocess so that peak RSS belongs to that pair alone. Times are the best
of at least ``--repeat`` runs after one untimed warm-up (which also absorbs numba's first compilation; with ``--quick``
only numba gets the warm-up). As in ``timeit``'s autorange, a measurement repeats until its runs add up to
``--min-time`` seconds (at most 100 runs, or ``--repeat`` if more): a pause of the machine (other processes, the
hypervisor) costs a 50 ms call a large fraction of its time and a 5 s call almost none, so short calls need more runs
for their best to be representative. The table gives each measurement's number of runs (forward / forward+backward).

Usage::

    python benchmarks/bench_scan.py            # full run, writes the "Selective scan" section of docs/performance.md
    python benchmarks/bench_scan.py --quick    # one repetition
    python benchmarks/bench_scan.py --with-reference --no-write

mambapy (``pip install mambapy``) is optional; without it its rows are skipped. The sequential ``reference`` backend
is left out unless asked for: it is the tests' oracle, and at L = 16384 it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "performance.md"
SECTION = "## Selective scan"

# (label, channels d, length L, d_state N); G = 4 directions throughout.
SHAPES = [
    ("encoder stage 0", 768, 16384, 16),
    ("encoder stage 1", 1536, 4096, 16),
    ("encoder stage 2", 3072, 1024, 16),
    ("encoder stage 3", 6144, 256, 16),
    ("decoder stage 0", 768, 16384, 4),
]
GROUPS = 4


# --------------------------------------------------------------------------------------------------------------------
# Worker: one (implementation, shape) in a fresh process
# --------------------------------------------------------------------------------------------------------------------
def _inputs(channels: int, length: int, nstate: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    dt = torch.empty(1, channels, length).uniform_(1e-3, 0.1, generator=gen)
    return {
        "u": torch.randn(1, channels, length, generator=gen),
        "delta": torch.log(torch.expm1(dt)),
        "A": -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(channels, 1),
        "B": torch.randn(1, GROUPS, nstate, length, generator=gen),
        "C": torch.randn(1, GROUPS, nstate, length, generator=gen),
        "D": torch.ones(channels),
        "delta_bias": torch.zeros(channels),
    }


def _mambapy_scan(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """The same function as ``selective_scan``, computed with mambapy's parallel (Blelloch) scan."""
    import torch
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    batch, channels, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    dt_t, u_t = dt.transpose(1, 2), u.transpose(1, 2)  # (b, L, d)
    per_group = channels // groups

    def by_channel(M: torch.Tensor) -> torch.Tensor:  # (b, G, N, L) -> (b, L, d, N), shared within a group
        M = M.permute(0, 3, 1, 2).unsqueeze(3).expand(batch, length, groups, per_group, nstate)
        return M.reshape(batch, length, channels, nstate)

    delta_a = torch.exp(dt_t.unsqueeze(-1) * A)
    delta_b_u = (dt_t * u_t).unsqueeze(-1) * by_channel(B)
    hs = pscan(delta_a, delta_b_u)
    y = (hs * by_channel(C)).sum(-1).transpose(1, 2)
    return y + D[:, None] * u


MAX_RUNS = 100


def _worker(impl: str, shape_index: int, repeat: int, threads: int, min_time: float) -> dict:
    import torch

    # One untimed call first; with a single repetition (--quick) only where there is a compilation to absorb.
    warm_up = repeat > 1 or impl == "numba"
    if threads != torch.get_num_threads():
        # Only when asked: an explicit set_num_threads was seen to slow small torch ops down on a busy machine.
        torch.set_num_threads(threads)
    _, channels, length, nstate = SHAPES[shape_index]
    inputs = _inputs(channels, length, nstate)
    if impl == "mambapy":
        scan = _mambapy_scan
    else:
        from functools import partial

        from cipa_bundle.networks.scan import selective_scan

        scan = partial(selective_scan, backend=impl)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]

    def forward() -> None:
        with torch.no_grad():
            scan(*args, True)

    # A loss such as y.square().mean() would add two full-size passes (~0.3 CPU s at stage 0) that are not the scan.
    grad_out = torch.randn(1, channels, length, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        leaves = [a.detach().requires_grad_() for a in args]
        scan(*leaves, True).backward(grad_out)

    result = {}
    for name, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        if warm_up:
            fn()  # numba compiles or loads its cache here
        times: list[tuple[float, float]] = []
        while len(times) < repeat or (sum(t for t, _ in times) < min_time and len(times) < MAX_RUNS):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        # CPU seconds (all threads) are reported too: unlike wall time they hardly change when other processes
        # share the cores, so their ratios stay comparable on a busy machine.
        result[name], result[name + "_cpu"] = min(times)
        result[name + "_runs"] = len(times)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
def _machine() -> dict[str, str]:
    import torch

    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or model
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = "not installed"
    try:
        from importlib.metadata import version

        mambapy_version = version("mambapy")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        mambapy_version = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "torch": torch.__version__,
        "numba": numba_version,
        "mambapy": mambapy_version,
        "python": platform.python_version(),
    }


def _run_worker(impl: str, shape_index: int, repeat: int, threads: int, min_time: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(shape_index), str(repeat), str(threads), str(min_time)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 30 min"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": tail[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _implementations(with_reference: bool) -> list[str]:
    from cipa_bundle.networks.scan import available_backends

    impls = [b for b in available_backends() if b != "cuda" and (with_reference or b != "reference")]
    try:
        import mambapy.pscan  # noqa: F401

        impls.append("mambapy")
    except ImportError:
        print("mambapy is not installed (pip install mambapy): its rows are skipped", file=sys.stderr)
    return impls


def _format(
    results: dict, impls: list[str], machine: dict, threads: int, repeat: int, min_time: float, load: str, quick: bool
) -> str:
    runs = f"best of {repeat}"
    if min_time > 0:
        runs = f"best of at least {repeat} runs, and of as many as fill {min_time:g} s"
    lines = [
        f"{SECTION}",
        "",
        f"`python benchmarks/bench_scan.py{' --quick' if quick else ''}` (float32, batch 1, G = 4, softplus on;",
        f"one scan call = the 4 directions; {threads} threads; load average at start {load};",
        f"{runs}).",
        "Forward runs without autograd; forward+backward is `y.backward(g)` for a fixed random `g`. Peak RSS is the whole",
        "process's (torch itself is about 0.3 GB). CPU s is the process's CPU time over all threads for the same run:",
        "unlike wall time it hardly grows when other processes share the cores.",
        "",
        "| shape | d | L | N | backend | forward ms | forward+backward ms | fwd+bwd CPU s | peak RSS MB "
        "| runs (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, (label, channels, length, nstate) in enumerate(SHAPES):
        for impl in impls:
            r = results.get((impl, index))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} | {channels} | {length} | {nstate} | {impl} | failed: {r['error']} | | | | |")
                continue
            lines.append(
                f"| {label} | {channels} | {length} | {nstate} | {impl} | {r['fwd'] * 1e3:,.0f} | "
                f"{r['fwdbwd'] * 1e3:,.0f} | {r['fwdbwd_cpu']:,.2f} | {r['peak_rss_mb']:,.0f} | "
                f"{r['fwd_runs']} / {r['fwdbwd_runs']} |"
            )
    if "numba" in impls and "mambapy" in impls:
        lines += ["", "Speed-up of numba over mambapy, measured in the same run (target: 30x forward+backward):", ""]
        lines += ["| shape | forward | forward+backward | forward+backward, CPU time |", "|---|---|---|---|"]
        for index, (label, *_rest) in enumerate(SHAPES):
            fast, slow = results.get(("numba", index)), results.get(("mambapy", index))
            if fast and slow and "error" not in fast and "error" not in slow:
                lines.append(
                    f"| {label} | {slow['fwd'] / fast['fwd']:.1f}x | {slow['fwdbwd'] / fast['fwdbwd']:.1f}x | "
                    f"{slow['fwdbwd_cpu'] / fast['fwdbwd_cpu']:.1f}x |"
                )
    lines += [
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _header(machine: dict) -> str:
    return (
        "# Performance\n\n"
        "Measured figures for this package, each section written by the benchmark script it names.\n\n"
        f"Machine of the last run: `nproc` = {machine['nproc']}, `lscpu` model name: {machine['cpu']}, "
        f"torch {machine['torch']}, numba {machine['numba']}, Python {machine['python']}.\n"
        "Other processes may share the CPU: compare figures from one run, not across runs.\n\n"
    )


def _write_section(section: str, machine: dict) -> None:
    """Replace (or append) the "Selective scan" section of docs/performance.md, atomically."""
    text = DOC.read_text() if DOC.exists() else _header(machine)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=DOC.parent, prefix=".performance-", suffix=".md")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, DOC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="least number of timed runs (best is reported)")
    parser.add_argument(
        "--min-time", type=float, default=2.0, help="repeat each measurement until its runs add up to this (seconds)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--with-reference", action="store_true", help="also time the sequential reference loop")
    parser.add_argument("--backends", help="comma-separated subset to run, e.g. numba,mambapy (default: all)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO_ROOT)}")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, shape_index, repeat, threads, min_time = args.worker
        print(json.dumps(_worker(impl, int(shape_index), int(repeat), int(threads), float(min_time))))
        return 0

    repeat = 1 if args.quick else args.repeat
    min_time = 0.0 if args.quick else args.min_time
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    machine = _machine()
    impls = _implementations(args.with_reference)
    if args.backends:
        impls = [i for i in impls if i in args.backends.split(",")]
    results: dict = {}
    for index, (label, channels, length, nstate) in enumerate(SHAPES):
        for impl in impls:
            r = _run_worker(impl, index, repeat, args.threads, min_time)
            results[(impl, index)] = r
            shown = r.get("error") or (
                f"fwd {r['fwd'] * 1e3:8.0f} ms  fwd+bwd {r['fwdbwd'] * 1e3:8.0f} ms ({r['fwdbwd_cpu']:7.2f} CPU s)  "
                f"peak {r['peak_rss_mb']:6.0f} MB"
            )
            print(f"{label:16s} d={channels:<5d} L={length:<6d} N={nstate:<3d} {impl:10s} {shown}", flush=True)
    section = _format(results, impls, machine, args.threads, repeat, min_time, load, args.quick)
    print()
    print(section)
    if not args.no_write:
        _write_section(section, machine)
        print(f"wrote the '{SECTION[3:]}' section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
