"""Benchmark ``cipa-bundle predict`` on a clinical-size synthetic PET-CT study: DICOM in, DICOM SEG out.

The study is the project's phantom at ``size="clinical"`` (CT 512 x 512 x 150 at 0.98 x 0.98 x 2 mm, PET
128 x 128 x 85 at 4 mm). The model is the paper's default CIPA (512 x 512 input, width 96, depths 2-2-9-2 /
4-4-4-4) with random weights saved to a temporary checkpoint: the timing of a forward pass does not depend on the
weights, and post-processing is left at its defaults. ``predict`` runs as a fresh ``python -m cipa_bundle predict``
process, so the total includes interpreter start-up and imports, as a user would see them.

Per-stage timings come from the run's ``report.json``:

* ``prepare``: DICOM -> SUV -> PET resampled onto the CT -> fused ``image.nii.gz`` (``convert``);
* ``inference``: the bundle workflow (load, orient, normalise, network, sigmoid, invert, threshold,
  post-process, save the mask), of which ``network`` is the time inside the slice inferer;
* ``outputs``: DICOM SEG, the two PNG figures, lesion statistics.

Usage::

    python benchmarks/bench_predict.py [--work DIR] [--size clinical|small] [--img-size 512] [--width 96]
                                       [--encoder-depths 2,2,9,2] [--decoder-depths 4,4,4,4]
                                       [--sw-batch-size 4] [--device cpu] [--threads 2]

A reduced network (e.g. ``--width 30 --encoder-depths 1,1,1,1 --decoder-depths 1,1,1,1``) separates the cost of
everything around the network from the network itself on a slow or shared machine.

Prints a Markdown table (target: <= 120 s in total on 2 cores for the clinical study with the 512 model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

TARGET_S = 120.0


def main(argv: list[str] | None = None) -> None:
    """Generate the study and the checkpoint, run ``predict`` once and print the stage table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--size", default="clinical", choices=("clinical", "whole_body", "small"), help="phantom size")
    parser.add_argument("--img-size", type=int, default=512, help="network input size (default 512, the paper's)")
    parser.add_argument("--width", type=int, default=96, help="network width (default 96, the paper's)")
    parser.add_argument("--encoder-depths", default="2,2,9,2", help="VSS blocks per encoder stage (paper: 2,2,9,2)")
    parser.add_argument("--decoder-depths", default="4,4,4,4", help="CVSS blocks per decoder stage (paper: 4,4,4,4)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="slices per network call")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, numba and ITK (default 2)")
    args = parser.parse_args(argv)

    import torch

    from cipa_bundle.data.phantom import make_phantom_case
    from cipa_bundle.networks import CIPA

    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads,
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        start = time.perf_counter()
        study = make_phantom_case(work, f"bench_{args.size}", seed=0, size=args.size)
        generate_s = time.perf_counter() - start

        torch.manual_seed(0)
        checkpoint = work / "random_weights.pt"
        depths = [int(d) for d in args.encoder_depths.split(",")]
        decoder_depths = [int(d) for d in args.decoder_depths.split(",")]
        torch.save(CIPA(img_size=args.img_size, dims=args.width, depths=depths,
                        decoder_depths=decoder_depths).state_dict(), checkpoint)

        out = work / "predict_out"
        command = [sys.executable, "-m", "cipa_bundle", "predict", str(study / "dicom"), str(out),
                   "--checkpoint", str(checkpoint), "--sw_batch_size", str(args.sw_batch_size),
                   "--device", args.device]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        total_s = time.perf_counter() - start

        report = json.loads((out / "report.json").read_text())
        timings, inference = report["timings_s"], report["inference"]
        ct_shape = json.loads((study / "truth.json").read_text())["ct"]["shape"]
        seg_mb = (out / "seg.dcm").stat().st_size / 1e6

    network_s = inference["network_s"]
    rows = [
        ("prepare (convert: DICOM -> SUV -> fused NIfTI)", timings["prepare"]),
        ("inference workflow, network only", network_s),
        ("inference workflow, load + pre/post-processing + save", timings["inference"] - network_s),
        ("outputs (DICOM SEG, PNGs, lesion statistics)", timings["outputs"]),
        ("start-up, imports, checkpoint and report", total_s - sum(timings.values())),
    ]
    per_slice = network_s / max(1, inference["slices_run"])
    print(f"{args.size} phantom: CT {ct_shape[0]}x{ct_shape[1]}x{ct_shape[2]} (generated in {generate_s:.1f} s); "
          f"model img_size {args.img_size}, width {args.width}, depths {args.encoder_depths} / "
          f"{args.decoder_depths}, random weights; device {report['device']}; "
          f"{args.threads} threads; sw_batch_size {args.sw_batch_size}; load average {os.getloadavg()[0]:.1f}")
    print(f"slices run {inference['slices_run']} of {inference['slices']} ({per_slice:.2f} s per slice); "
          f"SEG {seg_mb:.1f} MB; {report['tumor_count']} components in the mask")
    print()
    print("| stage | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **total (wall)** | **{total_s:.1f}** (target <= {TARGET_S:.0f}) |")


if __name__ == "__main__":
    main()
