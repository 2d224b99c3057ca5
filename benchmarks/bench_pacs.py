"""Benchmark the PACS loop: ``cipa-bundle predict-studies --store`` against a real Orthanc on this machine.

An Orthanc server (the one the tests start, ``tests/orthanc.py``: loopback, its own storage) receives phantom studies
by STOW-RS. Then ``predict-studies`` runs as a fresh process, as a user would run it, over all of them: QIDO-RS to
find each study's series, WADO-RS to fetch them, the ordinary ``predict``, and STOW-RS of the DICOM SEG back into the
study, confirmed by QIDO-RS. Two workloads:

* ``demo``: ``--studies`` small phantom studies (CT 64 x 64 x 32) with the demo's network size (128 x 128, width 30,
  one block per stage). The figure is studies per hour.
* ``paper``: one clinical chest phantom (CT 512 x 512 x 150 at 2 mm, PET 128 x 128 x 85) with the paper's network
  (512 x 512, width 96, depths 2-2-9-2 / 4-4-4-4). The figure is the wall time of that one study.

Weights are random (saved to a temporary checkpoint): the time of a forward pass does not depend on them. The split
into fetch, predict and store comes from the batch's ``summary.csv``.

Usage::

    python benchmarks/bench_pacs.py                     # both workloads (the paper study takes ~8 min on 2 cores)
    python benchmarks/bench_pacs.py --workloads demo --studies 4

Prints a Markdown table; paste it into docs/performance.md ("PACS loop") with the machine description.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.orthanc: the same server set-up as the tests, not a second copy

__all__ = ["main"]

NETWORKS = {
    "demo": {"img_size": 128, "dims": 30, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]},
    "paper": {"img_size": 512, "dims": 96, "depths": [2, 2, 9, 2], "decoder_depths": [4, 4, 4, 4]},
}
PHANTOM_SIZE = {"demo": "small", "paper": "clinical"}


def _run_batch(server, work: Path, name: str, cases: list[Path], checkpoint: Path, env: dict[str, str]) -> dict:
    """Store ``cases`` in the server, run ``predict-studies --store`` over them, return the batch's figures."""
    uids = sorted({uid for case in cases for uid in server.upload(sorted((case / "dicom").rglob("*.dcm")))})
    study_list = work / f"{name}_studies.txt"
    study_list.write_text("\n".join(uids) + "\n")
    out = work / f"{name}_batch"
    command = [sys.executable, "-m", "cipa_bundle", "predict-studies", server.dicomweb, str(out), "--studies",
               str(study_list), "--checkpoint", str(checkpoint), "--store"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((out / "summary.csv").open()))
    if any(row["status"] != "done" for row in rows):
        raise RuntimeError(f"{name}: a study failed: {rows}")
    seconds = [float(row["seconds"]) for row in rows]
    return {
        "studies": len(rows),
        "wall": wall,
        "per_study": statistics.mean(seconds),
        "fetch": statistics.mean(float(row["fetch_seconds"]) for row in rows),
        "store": statistics.mean(float(row["store_seconds"]) for row in rows),
        "startup": wall - sum(seconds),
        "per_hour": 3600 * len(rows) / wall,
        "stored": sum(int(row["stored"]) for row in rows),
        "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["demo", "paper"], choices=tuple(NETWORKS))
    parser.add_argument("--studies", type=int, default=6, help="phantom studies in the demo workload (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, numba and ITK (default 2)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    from cipa_bundle.synthetic.phantom import make_phantom_dataset
    from cipa_bundle.io.dicomweb import ENV_PASSWORD, ENV_TOKEN, ENV_USER
    from cipa_bundle.networks import CIPA
    from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc_available

    if not orthanc_available():
        raise SystemExit("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb")
    threads = str(args.threads)
    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    env.update({ENV_USER: USER, ENV_PASSWORD: PASSWORD, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads,
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        server = OrthancServer(work / "orthanc").start()
        try:
            for name in args.workloads:
                torch.manual_seed(0)
                checkpoint = work / f"{name}_random_weights.pt"
                torch.save(CIPA(**NETWORKS[name]).state_dict(), checkpoint)
                count = args.studies if name == "demo" else 1
                cases = make_phantom_dataset(work / f"{name}_phantoms", count, seed=21, size=PHANTOM_SIZE[name])
                results[name] = _run_batch(server, work, name, cases, checkpoint, env)
        finally:
            server.stop()

    print(f"Orthanc 1.10 (Debian) on loopback; predict-studies --store as a fresh process; {args.threads} threads; "
          f"random weights; load average {os.getloadavg()[0]:.1f}")
    names = list(results)
    described = {"demo": "demo size (128, width 30), small phantom", "paper": "paper size (512, width 96), chest CT"}
    print()
    print("| | " + " | ".join(described[n] for n in names) + " |")
    print("|---|" + "---|" * len(names))
    rows = [
        ("studies", "studies", "{:.0f}"),
        ("fetch (QIDO-RS + WADO-RS), s per study", "fetch", "{:.2f}"),
        ("store (STOW-RS + QIDO-RS check), s per study", "store", "{:.2f}"),
        ("whole study (fetch + predict + store), s", "per_study", "{:.1f}"),
        ("process start-up and batch bookkeeping, s", "startup", "{:.1f}"),
        ("objects stored and found again", "stored", "{:.0f}"),
        ("peak RSS, GB (largest child so far)", "peak_gb", "{:.2f}"),
        ("**wall, s**", "wall", "**{:.0f}**"),
        ("**studies per hour**", "per_hour", "**{:.0f}**"),
    ]
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |")


if __name__ == "__main__":
    main()
