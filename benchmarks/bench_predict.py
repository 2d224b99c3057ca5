"""Benchmark ``cipa-bundle predict`` at the paper's defaults on synthetic clinical studies: DICOM in, DICOM SEG out.

Two phantom studies (``--sizes``): ``clinical``, a chest (CT 512 x 512 x 150 at 0.98 x 0.98 x 2 mm, PET
128 x 128 x 85 at 4 mm), and ``whole_body``, skull to mid-thigh (CT 512 x 512 x 350 at 3 mm, PET 128 x 128 x 263 at
4 mm) with brain, kidney, bowel and bladder uptake. The model is the paper's default CIPA (512 x 512 input, width 96,
depths 2-2-9-2 / 4-4-4-4) with random weights saved to a temporary checkpoint: the time of a forward pass does not
depend on the weights. ``predict`` runs as a fresh ``python -m cipa_bundle predict`` process, so the total includes
interpreter start-up and imports, as a user would see them; its peak RSS is the child's ``ru_maxrss``.

Per-stage timings come from the run's ``report.json``:

* ``prepare``: DICOM -> SUV -> PET resampled onto the CT -> fused ``image.nii.gz`` (``convert``);
* ``inference``: the bundle workflow (load, orient, normalise, network, sigmoid, invert, threshold,
  post-process, save the mask), of which ``network`` is the time inside the slice inferer, which runs only the
  lungs' axial range plus 2 cm (``report.json``'s ``slices_run`` of ``slices``);
* ``outputs``: DICOM SEG, the two PNG figures, lesion statistics.

The one-slice forward time is measured in this process first (a batch of ``--sw-batch-size`` slices, divided by
it, after a warm-up), and the target is checked against it: wall time <= 1.25 x (slices run x one-slice forward) +
prepare + outputs.

Usage::

    python benchmarks/bench_predict.py                          # both studies, the paper's network, CPU
    python benchmarks/bench_predict.py --sizes clinical --width 30 --encoder-depths 1,1,1,1 --decoder-depths 1,1,1,1

Prints a Markdown table; paste it into docs/performance.md ("Prediction") with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

#: Wall time allowed per study: this factor times the network's own time, plus what the CPU-side stages take.
TARGET_FACTOR = 1.25


def _forward_seconds_per_slice(network, img_size: int, batch: int, device: str) -> float:  # noqa: ANN001
    """Median of three timed forwards of ``batch`` slices, after a warm-up, divided by ``batch``."""
    import statistics

    import torch

    x = torch.randn(batch, 2, img_size, img_size, device=device)
    times = []
    with torch.no_grad():
        network(x)
        for _ in range(3):
            start = time.perf_counter()
            network(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main(argv: list[str] | None = None) -> None:
    """Generate each study and the checkpoint, time the forward, run ``predict`` once per study, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--sizes", nargs="+", default=["clinical", "whole_body"],
                        choices=("clinical", "whole_body", "small"), help="phantom sizes, one study each")
    parser.add_argument("--img-size", type=int, default=512, help="network input size (default 512, the paper's)")
    parser.add_argument("--width", type=int, default=96, help="network width (default 96, the paper's)")
    parser.add_argument("--encoder-depths", default="2,2,9,2", help="VSS blocks per encoder stage (paper: 2,2,9,2)")
    parser.add_argument("--decoder-depths", default="4,4,4,4", help="CVSS blocks per decoder stage (paper: 4,4,4,4)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="slices per network call")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, numba and ITK (default 2)")
    args = parser.parse_args(argv)

    import torch

    from cipa_bundle.synthetic.phantom import make_phantom_case
    from cipa_bundle.networks import CIPA
    from cipa_bundle.runtime import retain_freed_memory

    retain_freed_memory()  # as the predict process does (cipa_bundle.runtime)
    torch.set_num_threads(args.threads)
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads,
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads)
    depths = [int(d) for d in args.encoder_depths.split(",")]
    decoder_depths = [int(d) for d in args.decoder_depths.split(",")]
    columns: dict[str, dict[str, float]] = {}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        network = CIPA(img_size=args.img_size, dims=args.width, depths=depths, decoder_depths=decoder_depths)
        checkpoint = work / "random_weights.pt"
        torch.save(network.state_dict(), checkpoint)
        per_slice = _forward_seconds_per_slice(network.eval().to(args.device), args.img_size, args.sw_batch_size,
                                               args.device)
        del network

        for size in args.sizes:
            start = time.perf_counter()
            study = make_phantom_case(work, f"bench_{size}", seed=0, size=size)
            generate_s = time.perf_counter() - start
            out = work / f"predict_{size}"
            command = [sys.executable, "-m", "cipa_bundle", "predict", str(study / "dicom"), str(out),
                       "--checkpoint", str(checkpoint), "--sw_batch_size", str(args.sw_batch_size),
                       "--device", args.device]
            start = time.perf_counter()
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            total_s = time.perf_counter() - start
            # The largest resident set of any child so far: the predict processes run one after another and grow.
            peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2

            report = json.loads((out / "report.json").read_text())
            timings, inference = report["timings_s"], report["inference"]
            ct_shape = json.loads((study / "truth.json").read_text())["ct"]["shape"]
            network_s = inference["network_s"]
            target = TARGET_FACTOR * inference["slices_run"] * per_slice + timings["prepare"] + timings["outputs"]
            columns[size] = {
                "prepare": timings["prepare"],
                "network": network_s,
                "workflow": timings["inference"] - network_s,
                "outputs": timings["outputs"],
                "startup": total_s - sum(timings.values()),
                "total": total_s,
                "target": target,
                "slices_run": inference["slices_run"],
                "slices": inference["slices"],
                "peak_gb": peak_gb,
                "network_per_slice": network_s / max(1, inference["slices_run"]),
            }
            notes.append(f"{size}: CT {ct_shape[0]}x{ct_shape[1]}x{ct_shape[2]} generated in {generate_s:.0f} s; "
                         f"selection {inference.get('selection')}, lung slices {inference.get('lung_slices')}; "
                         f"{report['tumor_count']} components in the mask")

    print(f"model img_size {args.img_size}, width {args.width}, depths {args.encoder_depths} / {args.decoder_depths}, "
          f"random weights; device {args.device}; {args.threads} threads; sw_batch_size {args.sw_batch_size}; "
          f"one-slice forward {per_slice:.2f} s (batch of {args.sw_batch_size}, this process); "
          f"load average {os.getloadavg()[0]:.1f}")
    for note in notes:
        print(f"- {note}")
    print()
    sizes = list(columns)
    print("| stage | " + " | ".join(sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    rows = [
        ("prepare (convert: DICOM -> SUV -> fused NIfTI), s", "prepare", "{:.1f}"),
        ("network (inside the slice inferer), s", "network", "{:.1f}"),
        ("inference workflow without the network, s", "workflow", "{:.1f}"),
        ("outputs (DICOM SEG, PNGs, lesion statistics), s", "outputs", "{:.1f}"),
        ("start-up, imports, checkpoint and report, s", "startup", "{:.1f}"),
    ]
    for name, key, fmt in rows:
        print(f"| {name} | " + " | ".join(fmt.format(columns[s][key]) for s in sizes) + " |")
    print("| slices run / slices | " + " | ".join(f"{columns[s]['slices_run']} / {columns[s]['slices']}"
                                                 for s in sizes) + " |")
    print("| network s per slice run (vs the one-slice forward) | " + " | ".join(
        f"{columns[s]['network_per_slice']:.2f} ({columns[s]['network_per_slice'] / per_slice:.2f}x)" for s in sizes)
        + " |")
    print("| peak RSS of predict, GB | " + " | ".join(f"{columns[s]['peak_gb']:.2f}" for s in sizes) + " |")
    print("| **total (wall), s** | " + " | ".join(f"**{columns[s]['total']:.0f}** ({columns[s]['total'] / 60:.1f} min)"
                                                  for s in sizes) + " |")
    print(f"| target: {TARGET_FACTOR} x slices run x forward + prepare + outputs, s | " + " | ".join(
        f"{columns[s]['target']:.0f} ({'met' if columns[s]['total'] <= columns[s]['target'] else 'NOT met'})"
        for s in sizes) + " |")


if __name__ == "__main__":
    main()
