"""Benchmark one training step of the paper's configuration: peak memory and step time at batch 4, with and without
activation checkpointing, on the CPU (and on CUDA, with AMP, when a GPU is present).

Each row runs in a fresh process, as the training workflow does: the memory pre-flight first
(:class:`cipa_bundle.workflows.TrainingMemoryPreflight`, whose estimate is printed beside the measurement), then, if
the estimate fits the memory available, ``--steps`` real AdamW steps of DiceCE on random data. A row whose estimate
does not fit is reported as such and not run: the pre-flight exists so that nothing is left to the OOM killer.

Peak memory is the process's peak resident set (``ru_maxrss``) on the CPU and ``torch.cuda.max_memory_allocated`` on
CUDA. Freed memory is retained as in the training workflow
(``cipa_bundle.runtime.retain_freed_memory_for_training``).

Usage::

    python benchmarks/bench_train.py                          # 512 x 512, width 96, depths 2-2-9-2 / 4-4-4-4, batch 4
    python benchmarks/bench_train.py --img-size 128 --dims 30 --depths 1 1 1 1 --decoder-depths 1 1 1 1   # quick look

Prints a Markdown table; paste it into docs/performance.md ("Training at the paper's size") with the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def _one_row(args: argparse.Namespace) -> dict:
    """Child process: pre-flight, then the real steps if they fit."""
    from monai.losses import DiceCELoss

    from cipa_bundle.networks import CIPA, param_groups
    from cipa_bundle.runtime import retain_freed_memory_for_training
    from cipa_bundle.workflows.preflight import GIB, TrainingMemoryPreflight

    retain_freed_memory_for_training()  # as the training workflow does
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = CIPA(
        img_size=args.img_size,
        dims=args.dims,
        depths=args.depths,
        decoder_depths=args.decoder_depths,
        use_checkpoint=args.use_checkpoint,
    ).to(device)
    loss_function = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)
    optimizer = torch.optim.AdamW(param_groups(network, 0.01), lr=6e-5)
    amp = device.type == "cuda"
    shape = (2, args.img_size, args.img_size)
    estimate = TrainingMemoryPreflight(network, loss_function, args.batch, shape, device, optimizer, amp).estimate()
    row = {
        "device": str(device),
        "use_checkpoint": args.use_checkpoint,
        "estimate_gib": estimate.needed_bytes() / GIB,
        "available_gib": estimate.limit_bytes / GIB,
        "probe_s": estimate.probe_seconds,
        "fits": estimate.fits,
        "step_s": [],
    }
    if not estimate.fits:
        return row
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(args.batch, *shape, device=device)
    y = (torch.rand(args.batch, 1, args.img_size, args.img_size, device=device) > 0.9).float()
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_function(network(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["step_s"].append(time.perf_counter() - start)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    else:
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--dims", type=int, default=96)
    parser.add_argument("--depths", type=int, nargs=4, default=[2, 2, 9, 2])
    parser.add_argument("--decoder-depths", type=int, nargs=4, default=[4, 4, 4, 4])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="real steps per row (the first includes warm-up)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--use-checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.use_checkpoint = bool(args.use_checkpoint)
        print("ROW " + json.dumps(_one_row(args)), flush=True)
        return

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    common = [
        "--img-size", str(args.img_size), "--dims", str(args.dims), "--batch", str(args.batch),
        "--steps", str(args.steps), "--depths", *map(str, args.depths), "--decoder-depths", *map(str, args.decoder_depths),
    ]
    rows = []
    for device in devices:
        for use_checkpoint in (0, 1):
            command = [sys.executable, __file__, "--child", "1", "--device", device,
                       "--use-checkpoint", str(use_checkpoint), *common]
            started = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("ROW ")]
            if result.returncode != 0 or not lines:
                row = {"device": device, "use_checkpoint": bool(use_checkpoint), "error": result.stderr[-500:]}
            else:
                row = json.loads(lines[-1][4:])
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
            print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)

    print(
        f"CIPA img_size={args.img_size} dims={args.dims} depths={args.depths} decoder_depths={args.decoder_depths}, "
        f"batch {args.batch}, AdamW + DiceCE; CUDA rows under AMP"
    )
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print()
    print("| device | use_checkpoint | pre-flight estimate, GiB | available, GiB | peak, GiB | step s (first, then) "
          "| probe s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['device']} | {row['use_checkpoint']} | failed: {row['error'].splitlines()[-1:]} |||||")
            continue
        steps = ", ".join(f"{s:.1f}" if s >= 1 else f"{s:.3f}" for s in row["step_s"]) or "not run: does not fit"
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-"
        print(f"| {row['device']} | {row['use_checkpoint']} | {row['estimate_gib']:.2f} | {row['available_gib']:.1f} "
              f"| {peak} | {steps} | {row['probe_s']:.1f} |")


if __name__ == "__main__":
    main()
