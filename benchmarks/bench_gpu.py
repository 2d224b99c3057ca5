"""CUDA figures: mamba-ssm's fused scan kernel against the project's pure-PyTorch path, on one GPU.

What it measures (every number from this one process, so ratios are comparable):

1. **Agreement** of each available CUDA backend with the float64 sequential reference (float32 inputs, random
   shapes, grouped B/C), forward and gradients, and of the whole CIPA model's logits between backends.
2. **Scan** at the four encoder stage shapes of a 512x512 input and the decoder's N = 4 shape (batch 1): forward,
   and forward + backward of ``y.square().mean()``.
3. **Network** at the paper's configuration, 512x512: forward at batch 1 in fp32 and under bf16 autocast; a training
   step (forward + backward, AMP bf16) at batch 4, the paper's per-GPU batch; peak GPU memory of each.

Usage (needs a CUDA device; mamba-ssm optional, its rows are skipped without it)::

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --repeat 10 --skip-network

Prints Markdown tables; paste them into docs/performance.md ("GPU") with the machine description.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch

from bench_scan import GROUPS, SHAPES  # the same real shapes as the CPU benchmark (benchmarks/ is on sys.path)
from cipa_bundle.networks import CIPA
from cipa_bundle.networks.scan import dispatch
from cipa_bundle.networks.scan.reference import selective_scan_reference



def _cuda_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time in seconds of ``fn`` over ``repeat`` runs after one warm-up, with the GPU synchronised."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _scan_inputs(
    batch: int, d: int, length: int, n: int, groups: int, device: torch.device, softplus: bool = True
) -> dict[str, torch.Tensor]:
    """Inputs in the ranges of a freshly initialised Mamba block: the step actually used lies in [1e-3, 0.1]."""
    g = torch.Generator(device="cpu").manual_seed(d * 7 + length + n)
    step = torch.empty(batch, d, length).uniform_(1e-3, 0.1, generator=g)
    delta_bias = 0.1 * torch.randn(d, generator=g)
    pre = torch.log(torch.expm1(step)) if softplus else step
    a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(d, n) + 0.1 * torch.randn(d, n, generator=g)
    tensors = {
        "u": torch.randn(batch, d, length, generator=g),
        "delta": pre - delta_bias[:, None],
        "A": -torch.exp(a_log),
        "B": torch.randn(batch, groups, n, length, generator=g),
        "C": torch.randn(batch, groups, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "delta_bias": delta_bias,
    }
    return {k: v.to(device) for k, v in tensors.items()}


AGREEMENT_CASES = [  # (batch, d, L, N, G, softplus)
    (2, 64, 300, 16, 4, True),
    (1, 48, 257, 4, 2, False),
    (1, 48, 257, 4, 2, True),
    (1, 12, 257, 4, 2, False),
    (1, 48, 257, 16, 2, False),
    (1, 48, 64, 4, 2, False),
    (1, 48, 257, 4, 1, False),
]


def check_agreement(backends: list[str], device: torch.device) -> list[str]:
    """Errors of each backend against the float64 reference: output (relative to its max) and each input gradient."""
    rows = []
    for batch, d, length, n, groups, softplus in AGREEMENT_CASES:
        inputs = _scan_inputs(batch, d, length, n, groups, device, softplus)
        ref_in = {k: v.double().cpu().requires_grad_(True) for k, v in inputs.items()}
        ref = selective_scan_reference(**ref_in, delta_softplus=softplus)
        ref.square().sum().backward()
        for name in backends:
            got_in = {k: v.float().clone().requires_grad_(True) for k, v in inputs.items()}
            got = dispatch.selective_scan(**got_in, delta_softplus=softplus, backend=name)
            got.square().sum().backward()
            out_err = ((got.double().cpu() - ref.detach()).abs().max() / ref.abs().max()).item()
            grad_errs = ", ".join(
                f"{k} {((got_in[k].grad.double().cpu() - ref_in[k].grad).abs().max() / ref_in[k].grad.abs().max()).item():.1e}"
                for k in inputs
            )
            rows.append(f"| {name} | b={batch} d={d} L={length} N={n} G={groups} softplus={softplus} | {out_err:.1e} | {grad_errs} |")
    return rows


def bench_scan(backends: list[str], device: torch.device, repeat: int) -> list[str]:
    rows = []
    for label, d, length, n in SHAPES:
        inputs = _scan_inputs(1, d, length, n, GROUPS, device)
        cells = []
        for name in backends:

            def forward(name: str = name) -> torch.Tensor:
                with torch.no_grad():
                    return dispatch.selective_scan(**inputs, delta_softplus=True, backend=name)

            def train(name: str = name) -> None:
                leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
                dispatch.selective_scan(**leaves, delta_softplus=True, backend=name).square().mean().backward()

            cells.append((_cuda_time(forward, repeat), _cuda_time(train, repeat)))
        text = " | ".join(f"{f * 1e3:.2f} | {t * 1e3:.2f}" for f, t in cells)
        rows.append(f"| {label} (d={d}, L={length}, N={n}) | {text} |")
    return rows


def _measured(fn: Callable[[], object], repeat: int) -> str:
    """``"<ms> ms (<peak GiB> GiB)"`` for ``fn``, or ``"out of memory"``."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = _cuda_time(fn, repeat)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    return f"{seconds * 1e3:.1f} ms ({torch.cuda.max_memory_allocated() / 1024**3:.1f} GiB)"


def bench_network(backends: list[str], device: torch.device, repeat: int) -> tuple[list[str], list[str]]:
    """Forward (batch 1, fp32 and bf16 autocast) and AMP training steps (batch 1 and 4) of the paper's CIPA at 512x512."""
    torch.manual_seed(0)
    model = CIPA().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows, agreement = [], []
    logits = {}
    x1 = torch.randn(1, 2, 512, 512, device=device, generator=torch.Generator(device).manual_seed(1))
    model.eval()
    with torch.no_grad():  # before any training step changes the weights
        for name in backends:
            os.environ[dispatch.BACKEND_ENV_VAR] = name
            logits[name] = model(x1).float()
    for name in backends:
        os.environ[dispatch.BACKEND_ENV_VAR] = name
        model.eval()
        with torch.no_grad():

            def forward() -> torch.Tensor:
                return model(x1)

            def forward_bf16() -> torch.Tensor:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(x1)

            cells = [_measured(forward, repeat), _measured(forward_bf16, repeat)]
        model.train()
        for batch in (1, 4):
            x = torch.randn(batch, 2, 512, 512, device=device)
            target = (torch.rand(batch, 1, 512, 512, device=device) > 0.9).float()

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
                loss.backward()
                optimizer.step()

            cells.append(_measured(step, max(1, repeat // 2)))
            del x, target
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    os.environ.pop(dispatch.BACKEND_ENV_VAR, None)
    first = backends[0]
    for name in backends[1:]:
        err = (logits[name] - logits[first]).abs().max().item()
        agreement.append(
            f"| logits {name} vs {first} (fp32, 512x512, same weights) | {err:.2e} "
            f"(largest logit {logits[first].abs().max().item():.1f}) |"
        )
    return rows, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-network", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    device = torch.device("cuda")
    backends = [b for b in ("cuda", "torch") if dispatch._unavailable_reason(b, device, torch.float32) is None]
    missing = dispatch.cuda_unavailable_reason(device, torch.float32)
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"{platform.python_version()}; backends: {', '.join(backends)}" + (f" (cuda: {missing})" if missing else ""))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    print("\n| backend | case | rel error of y vs float64 reference | rel error of each gradient |\n|---|---|---|---|")
    print("\n".join(check_agreement(backends, device)))

    head = " | ".join(f"{b} fwd ms | {b} fwd+bwd ms" for b in backends)
    print(f"\n| scan shape (batch 1, G=4) | {head} |\n|---|" + "---|" * (2 * len(backends)))
    print("\n".join(bench_scan(backends, device, args.repeat)))

    if not args.skip_network:
        print('\nnetwork rows as they finish:', flush=True)
        rows, agreement = bench_network(backends, device, args.repeat)
        print("\n| scan backend | forward fp32, batch 1 | forward bf16 autocast, batch 1 | train step AMP, batch 1 | "
              "train step AMP, batch 4 |\n|---|---|---|---|---|")
        print("\n".join(rows))
        if agreement:
            print("\n| check | value |\n|---|---|")
            print("\n".join(agreement))


if __name__ == "__main__":
    main()
