"""Benchmark ``cipa-bundle convert`` on a clinical-size synthetic PET-CT study, without and with rigid refinement.

The study is the project's phantom at ``size="clinical"`` (CT 512 x 512 x 150 at 0.98 x 0.98 x 2 mm, PET
128 x 128 x 85 at 4 mm, Siemens BQML), written with a PET displacement of (4, -3, 6) mm so that the rigid run has
real work to do. Each conversion runs as a fresh ``python -m cipa_bundle convert`` process, so the figures include
interpreter start-up, imports and ITK's lazy loading of its registration modules, as a user would see them.

Usage::

    python benchmarks/bench_convert.py [--work DIR] [--threads N] [--repeat R]

Prints a Markdown table (targets: <= 30 s without and <= 90 s with refinement, on 2 cores). CPU s is the
subprocess's user + system time over all threads: unlike wall time it hardly grows when other processes share the
cores, so it bounds what an idle 2-core machine needs from above (when ITK uses both cores, wall < CPU).
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

SHIFT_MM = (4.0, -3.0, 6.0)
TARGET_S = {"none": 30.0, "rigid": 90.0}


def _convert(study: Path, out: Path, register: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (s, all threads) of one ``cipa-bundle convert`` subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cipa_bundle", "convert", str(study), str(out), "--register", register],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    """Generate the study, time the conversions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for ITK and torch (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the minimum is reported")
    args = parser.parse_args(argv)

    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        from cipa_bundle.synthetic.phantom import make_phantom_case

        start = time.perf_counter()
        study = make_phantom_case(work, "bench_clinical", seed=0, shift=SHIFT_MM, vendor="siemens", size="clinical")
        generate_s = time.perf_counter() - start

        rows = []
        load = os.getloadavg()
        for register in ("none", "rigid"):
            out = work / f"out_{register}"
            times = [_convert(study, out, register, env) for _ in range(max(1, args.repeat))]
            wall, cpu = min(times)
            record = json.loads((out / "provenance.json").read_text())
            reg = record["registration"]
            detail = "identity (same frame of reference)"
            if register == "rigid":
                t = reg["translation_mm"]
                detail = (f"t = ({t[0]:.2f}, {t[1]:.2f}, {t[2]:.2f}) mm vs true {SHIFT_MM}, "
                          f"rotation {reg['rotation_deg']:.2f} deg, {'applied' if reg['applied'] else 'rejected'}; "
                          f"registration itself {reg['elapsed_s']:.1f} s")
            rows.append((register, wall, cpu, TARGET_S[register], detail))

        ct = record["ct"]["shape"]
        pet = record["pet"]["shape"]
        print(f"clinical phantom: CT {ct[0]}x{ct[1]}x{ct[2]}, PET {pet[0]}x{pet[1]}x{pet[2]}; "
              f"generated in {generate_s:.1f} s; {args.threads} threads; "
              f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; best of {max(1, args.repeat)}")
        print()
        print("| convert --register | wall s | CPU s | target s | result |")
        print("|---|---|---|---|---|")
        for register, wall, cpu, target, detail in rows:
            print(f"| {register} | {wall:.1f} | {cpu:.1f} | <= {target:.0f} | {detail} |")


if __name__ == "__main__":
    main()
