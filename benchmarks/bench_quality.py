"""Quality on real tumours: CIPA, a U-Net and two SUV thresholds, cross-validated by patient on real PET-CT.

Data: the 8 Soft-tissue-Sarcoma patients of ``../shared/real/sts`` (TCIA via the IBSI validation set, CC BY 3.0;
credited in docs/README.md): GE Discovery ST CT and FDG PET, cropped 5 cm around the tumour, with the expert's gross
tumour volume as an RTSTRUCT. They are limb sarcomas, not lung tumours: the anatomy and the uptake are real, the
organ is not.

What runs, all through the bundle's own code:

1. **convert** each study with ``--label_rtstruct CT/mask/RS.dcm --ct_window=-160,240``: SUV, PET onto the CT grid,
   the fused ``image.nii.gz`` (CT in the soft-tissue window: the bundle's lung window leaves a limb sarcoma's CT
   blank; ``--ct_window -1200 -200`` gives the lung-window run) and the GTV rasterised as ``label.nii.gz``.
2. **4-fold cross-validation by patient**: each fold holds 2 patients out for testing; of the other 6, one is the
   validation patient (best-epoch selection) and 5 train. No slice of a test patient is ever trained or validated on.
3. **Methods.**
   - ``cipa``: ``configs/train.json`` + ``configs/demo.json`` (the demo size: 128 x 128 input, width 30, depths
     1-1-1-1), run by ``python -m monai.bundle run training``;
   - ``unet``: the same + ``configs/unet_baseline.json``, a 2-D DynUNet configured as nnU-Net would (3 x 3
     kernels, 5 stride-2 stages, instance norm, leaky ReLU) with its filters scaled to a CPU budget: the same recipe,
     transforms, loss and inferer, only ``network_def`` differs;
   - ``suv_2.5`` and ``suv_41pct_max``: :class:`cipa_bundle.inference.threshold.SUVThreshold` on the PET in SUV on the
     CT grid, components overlapping the body kept. No training.

   Trained methods predict with ``configs/inference.json`` (``python -m monai.bundle run``), with the same overlays.
4. **Metrics** from :func:`cipa_bundle.metrics.evaluate_folder` over the 8 held-out predictions of each method:
   per-case 3-D Dice and HD95 (mm), FP and FN volumes (ml), and the paper's pooled 2-D IoU and F1.
5. **Outputs** (``--out``): ``quality.md`` (the tables), ``quality.json``, per-method ``metrics.csv`` and
   ``summary.json``, and ``--figure``: one held-out patient, one panel per method (PET on CT, truth in cyan,
   prediction in green).

Usage::

    python benchmarks/bench_quality.py                         # the full run (about 40 minutes on 2 CPU cores)
    python benchmarks/bench_quality.py --resume                # keep finished training runs, predict again
    python benchmarks/bench_quality.py --resume --weights best # the same models, best-validation-epoch weights
    python benchmarks/bench_quality.py --resume --methods cipa unet \
        --inference_override '{"inferer#overlap": 0.5, "inferer#mode": "gaussian"}'  # other inference tiles
    python benchmarks/bench_quality.py --epochs 1 --folds 1 --patients STS_002 STS_003 STS_004 STS_005

Paste ``quality.md`` into docs/performance.md ("Quality on real data") with the machine and the time it took.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cipa_bundle.preprocessing.transforms import DEFAULT_CT_WINDOW_HU, SOFT_TISSUE_CT_WINDOW_HU

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAINED = {
    "cipa": [CONFIGS / "train.json", CONFIGS / "demo.json"],
    "unet": [CONFIGS / "train.json", CONFIGS / "demo.json", CONFIGS / "unet_baseline.json"],
}
THRESHOLDS = ("suv_2.5", "suv_41pct_max")
METHODS = (*TRAINED, *THRESHOLDS)

__all__ = ["main", "patient_folds", "threshold_predict", "trained_predict", "train_method"]


# ----------------------------------------------------------------------------------------------- data and folds
def find_patients(data: Path, names: list[str] | None) -> list[str]:
    """The patients under ``data`` that have a CT, a PET and the CT's RTSTRUCT (``names`` picks some)."""
    def usable(p: Path) -> bool:
        return (p / "CT" / "image").is_dir() and (p / "PET" / "image").is_dir() and (p / "CT" / "mask" / "RS.dcm").is_file()

    found = sorted(p.name for p in data.iterdir() if usable(p)) if data.is_dir() else []
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            raise SystemExit(f"bench_quality: patients {missing} not found under {data} (found {found})")
        found = [p for p in found if p in names]
    if len(found) < 2:
        raise SystemExit(f"bench_quality: {data} holds {len(found)} usable patients; expected at least 2 "
                         "(CT/image, PET/image, CT/mask/RS.dcm each)")
    return found


def convert_patients(data: Path, patients: list[str], work: Path,
                     ct_window_hu: tuple[float, float] | None = None) -> dict[str, Path]:
    """Convert each study with its RTSTRUCT label (kept between runs: a finished folder has provenance.json).

    ``ct_window_hu`` is ``convert``'s CT window for the image's CT channel (default: the bundle's lung window).
    """
    from cipa_bundle.preprocessing.convert import convert_study

    window = tuple(ct_window_hu) if ct_window_hu is not None else DEFAULT_CT_WINDOW_HU
    root = work / ("converted" if window == DEFAULT_CT_WINDOW_HU else f"converted_ct{window[0]:g}_{window[1]:g}")
    folders = {}
    for patient in patients:
        out = root / patient
        if not (out / "provenance.json").is_file() or not (out / "label.nii.gz").is_file():
            study = data / patient
            convert_study(study, out, progress=False, label_rtstruct=study / "CT" / "mask" / "RS.dcm",
                          ct_window_hu=window)
        folders[patient] = out
    return folders


def patient_folds(patients: list[str], n_folds: int) -> list[dict[str, list[str]]]:
    """Cross-validation folds by patient: ``{"test", "validation", "training"}`` lists, test sets disjoint.

    The patients are dealt round-robin into ``n_folds`` test groups (in the given order); fold ``f``'s validation
    patient is the ``f``-th (cyclically) of the patients left, so that it changes between folds; the rest train.
    """
    groups = [patients[f::n_folds] for f in range(n_folds)] if n_folds >= 1 else []
    if not groups or any(not g or len(patients) - len(g) < 2 for g in groups):
        raise ValueError(f"{n_folds} folds of {len(patients)} patients: every fold needs a test patient, a validation "
                         "patient and a training patient")
    folds = []
    for f, test in enumerate(groups):
        rest = [p for p in patients if p not in test]
        validation = rest[f % len(rest)]
        folds.append({"test": test, "validation": [validation], "training": [p for p in rest if p != validation]})
    return folds


def write_datalist(path: Path, fold: dict[str, list[str]], converted: dict[str, Path]) -> Path:
    """A decathlon datalist of absolute ``image``/``label`` paths for the fold's training and validation patients."""
    def items(names: list[str]) -> list[dict[str, str]]:
        return [{"image": str(converted[p] / "image.nii.gz"), "label": str(converted[p] / "label.nii.gz")}
                for p in names]

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": items(fold["training"]), "validation": items(fold["validation"])},
                               indent=2))
    return path


# ----------------------------------------------------------------------------------------------- methods
def _bundle(args: list[str], log: Path) -> float:
    """Run ``python -m monai.bundle ARGS`` in the repository, output to ``log``; wall seconds, or exit on failure."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, stdout=fh,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"bench_quality: monai.bundle {' '.join(args[:2])} failed (see {log}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def _config_list(files: list[Path]) -> str:
    return "[" + ",".join(repr(str(f)) for f in files) + "]"


def train_method(method: str, fold_dir: Path, datalist: Path, epochs: int, extra: dict[str, Any]) -> tuple[Path, float]:
    """Train ``method`` with the bundle's training workflow; ``(best checkpoint, seconds)``.

    The run leaves ``models/model.pt`` (the epoch with the best validation IoU) and
    ``models/latest_checkpoint_epoch=<epochs>.pt`` (the last epoch's weights, with the optimizer state), see
    :func:`weights`.
    """
    overrides = {"datalist": str(datalist), "dataset_dir": str(datalist.parent), "synthesize_if_missing": False,
                 "ckpt_dir": str(fold_dir / "models"), "output_dir": str(fold_dir / "train_logs"), "epochs": epochs,
                 **extra}
    args = ["run", "training", "--config_file", _config_list(TRAINED[method]), "--bundle_root", str(REPO)]
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    seconds = _bundle(args, fold_dir / "train.log")
    return fold_dir / "models" / "model.pt", seconds


def weights(fold_dir: Path, epochs: int, which: str) -> Path:
    """The checkpoint a trained method predicts with: ``"best"`` (``model.pt``, chosen by validation IoU) or
    ``"final"`` (the last epoch's, as nnU-Net does: one validation patient is too few to choose an epoch by)."""
    path = fold_dir / "models" / ("model.pt" if which == "best" else f"latest_checkpoint_epoch={epochs}.pt")
    if not path.is_file():
        raise SystemExit(f"bench_quality: {path} missing; expected the {which} weights of a finished training run")
    return path


def trained_predict(method: str, checkpoint: Path, converted: dict[str, Path], test: list[str], out: Path,
                    extra: dict[str, Any]) -> float:
    """Predict the ``test`` patients with ``configs/inference.json`` (+ the method's overlays); seconds.

    Writes ``out/<patient>/mask.nii.gz`` on the CT grid (the workflow inverts its own preprocessing).
    """
    inputs = out.parent / f".inputs_{out.name}"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for patient in test:
        (inputs / patient).mkdir()
        os.symlink(converted[patient] / "image.nii.gz", inputs / patient / "image.nii.gz")
    overlays = [f for f in TRAINED[method] if f.name not in ("train.json", "demo.json")]
    demo = json.loads((CONFIGS / "demo.json").read_text())
    arch = {k: demo[k] for k in ("img_size", "network_width", "encoder_depths", "decoder_depths")}
    overrides = {"dataset_dir": str(inputs), "output_dir": str(out), "checkpoint": str(checkpoint), **arch, **extra}
    args = ["run", "--config_file", _config_list([CONFIGS / "inference.json", *overlays]), "--bundle_root", str(REPO)]
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    seconds = _bundle(args, out.parent / f"predict_{out.name}.log")
    shutil.rmtree(inputs)
    return seconds


def threshold_predict(method: str, converted: dict[str, Path], patients: list[str], out: Path) -> float:
    """Segment each patient by the SUV threshold ``method`` into ``out/<patient>/mask.nii.gz``; seconds."""
    import nibabel as nib
    from monai.transforms import LoadImage

    from cipa_bundle.inference.postprocess import BodyMask
    from cipa_bundle.inference.threshold import SUV_THRESHOLD_METHODS, SUVThreshold
    from cipa_bundle.io.nifti import save_nifti
    from cipa_bundle.io.volume import Volume

    start = time.perf_counter()
    threshold = SUVThreshold(**SUV_THRESHOLD_METHODS[method])
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    for patient in patients:
        image = loader(str(converted[patient] / "image.nii.gz"))  # (2, I, J, K): windowed CT, scaled PET
        suv = loader(str(converted[patient] / "suv_ct.nii.gz"))  # (1, I, J, K): SUV on the CT grid
        body = BodyMask()(image)
        mask = np.asarray(threshold(suv, body))[0]
        save_nifti(Volume(mask.astype(np.uint8), nib.load(converted[patient] / "ct.nii.gz").affine),
                   out / patient / "mask.nii.gz")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- report
def parameter_count(method: str) -> int:
    """Trainable parameters of a trained method's network at the benchmark's configuration."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in TRAINED[method]])
    return sum(p.numel() for p in parser.get_parsed_content("network_def").parameters() if p.requires_grad)


def overlay_figure(converted: dict[str, Path], patient: str, predictions: dict[str, Path], path: Path) -> Path:
    """One panel per method for ``patient``: PET on CT at the truth's largest slice, truth cyan, prediction green."""
    import nibabel as nib
    from PIL import Image, ImageDraw, ImageFont

    from cipa_bundle.io.volume import Volume
    from cipa_bundle.report import render_axial_overlay, write_png

    def volume(p: Path) -> Volume:
        img = nib.load(p)
        return Volume(np.asarray(img.dataobj), img.affine)

    folder = converted[patient]
    ct, suv, truth = volume(folder / "ct.nii.gz"), volume(folder / "suv_ct.nii.gz"), volume(folder / "label.nii.gz")
    panels = []
    for method, root in predictions.items():
        rgb, _ = render_axial_overlay(ct, suv, volume(root / patient / "mask.nii.gz"), reference=truth,
                                      ct_window=(40.0, 400.0))
        panel = Image.fromarray(rgb)
        ImageDraw.Draw(panel).text((8, 6), method, fill=(255, 255, 255), font=ImageFont.load_default(size=28))
        panels.append(panel)
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    figure = Image.new("RGB", (width, max(p.height for p in panels)), (0, 0, 0))
    x = 0
    for panel in panels:
        figure.paste(panel, (x, 0))
        x += panel.width + 4
    return write_png(np.asarray(figure), path)


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real = os.environ.get("CIPA_SHARED_REAL") or str(REPO.parent / "shared" / "real")
    parser.add_argument("--data", type=Path, default=Path(real) / "sts",
                        help="the STS patients (default: $CIPA_SHARED_REAL/sts, else ../shared/real/sts)")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench_quality")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "quality_overlay.png")
    parser.add_argument("--patients", nargs="*", default=None, help="a subset of the patients (default: all)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the training runs of an earlier run with the same settings in --out (and predict)")
    parser.add_argument("--weights", choices=("final", "best"), default="final",
                        help="predict with the last epoch's weights (default, as nnU-Net) or the best validation epoch's")
    parser.add_argument("--override", type=json.loads, default={},
                        help='more training/inference config ids as JSON, e.g. \'{"network_width": 24}\'')
    parser.add_argument("--inference_override", type=json.loads, default={},
                        help="config ids for prediction only, kept out of the training settings (so --resume keeps the "
                             'models), e.g. \'{"inferer#overlap": 0.5, "inferer#mode": "gaussian"}\' to check how much the '
                             "masks depend on where the sliding window's tiles fall")
    parser.add_argument("--ct_window", type=float, nargs=2, default=list(SOFT_TISSUE_CT_WINDOW_HU),
                        metavar=("LOW_HU", "HIGH_HU"),
                        help="convert's CT window for the CT channel of the trained methods (default: soft tissue, "
                             "-160 240; -1200 -200 is the bundle's lung window)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    patients = find_patients(args.data, args.patients)
    converted = convert_patients(args.data, patients, out, tuple(args.ct_window))
    folds = patient_folds(patients, args.folds)
    tested = [p for fold in folds for p in fold["test"]]
    timing: dict[str, dict[str, float]] = {m: {"train_s": 0.0, "predict_s": 0.0} for m in args.methods}
    predictions = {m: out / "predictions" / m for m in args.methods}

    for f, fold in enumerate(folds):
        fold_root = out / f"fold{f}"
        datalist = write_datalist(fold_root / "datalist.json", fold, converted)
        for method in args.methods:
            if method in TRAINED:
                # A finished training run records its settings and time last; --resume keeps it and predicts again.
                fold_dir, record = fold_root / method, fold_root / f"{method}.train.json"
                settings = {"fold": fold, "epochs": args.epochs, "override": args.override}
                if tuple(args.ct_window) != DEFAULT_CT_WINDOW_HU:  # lung-window runs keep their earlier records
                    settings["ct_window"] = args.ct_window
                if args.resume and record.is_file() and json.loads(record.read_text())["settings"] == settings:
                    train_s = json.loads(record.read_text())["train_s"]
                else:
                    shutil.rmtree(fold_dir, ignore_errors=True)
                    fold_dir.mkdir(parents=True)
                    _, train_s = train_method(method, fold_dir, datalist, args.epochs, args.override)
                    record.write_text(json.dumps({"settings": settings, "train_s": train_s}, indent=2))
                timing[method]["train_s"] += train_s
                timing[method]["predict_s"] += trained_predict(
                    method, weights(fold_dir, args.epochs, args.weights), converted, fold["test"], predictions[method],
                    {**args.override, **args.inference_override})
            else:
                timing[method]["predict_s"] += threshold_predict(method, converted, fold["test"], predictions[method])
            print(f"fold {f + 1}/{len(folds)} {method}: done ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)

    from cipa_bundle.metrics import evaluate_folder

    gt_root = out / "truth"
    shutil.rmtree(gt_root, ignore_errors=True)
    for patient in tested:
        (gt_root / patient).mkdir(parents=True)
        os.symlink(converted[patient] / "label.nii.gz", gt_root / patient / "label.nii.gz")
    slices = {p: int(json.loads((converted[p] / "provenance.json").read_text())["ct"]["shape"][2]) for p in tested}
    results: dict[str, Any] = {"patients": tested, "folds": folds, "epochs": args.epochs, "weights": args.weights,
                               "ct_window_hu": list(args.ct_window), "inference_override": args.inference_override,
                               "methods": {}}
    for method in args.methods:
        summary = evaluate_folder(predictions[method], gt_root, out / "metrics" / method,
                                  pred_name="mask.nii.gz", gt_name="label.nii.gz")
        with open(out / "metrics" / method / "metrics.csv") as fh:
            rows = {row["case"]: row for row in csv.DictReader(fh)}
        results["methods"][method] = {
            "dice": {p: float(rows[p]["dice"]) for p in tested},
            # An empty prediction has no surface: HD95 is undefined (an empty CSV cell).
            "hd95_mm": {p: float(rows[p]["hd95_mm"] or "nan") for p in tested},
            "summary": summary,
            **timing[method],
            "predict_s_per_slice": timing[method]["predict_s"] / sum(slices.values()),
            "parameters": parameter_count(method) if method in TRAINED else 0,
        }

    figure_patient = tested[0]
    overlay_figure(converted, figure_patient, predictions, args.figure)
    results["figure"] = {"path": str(args.figure), "patient": figure_patient}
    results["wall_s"] = time.perf_counter() - started

    lines = [f"Held-out 3-D Dice per patient ({len(folds)}-fold cross-validation by patient, {args.epochs} epochs "
             f"for the trained methods, {args.weights} weights"
             + (f", prediction overrides {json.dumps(args.inference_override)}" if args.inference_override else "")
             + "):", "",
             "| patient | " + " | ".join(args.methods) + " |", "|---|" + "---:|" * len(args.methods)]
    for p in tested:
        lines.append(f"| {p} | " + " | ".join(_fmt(results["methods"][m]["dice"][p]) for m in args.methods) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{_fmt(results['methods'][m]['summary']['per_case_mean']['dice'])}**" for m in args.methods) + " |")
    lines += ["", "| method | mean Dice | mean HD95 (mm) | pooled 2-D IoU | pooled 2-D F1 | mean FPV (ml) | mean FNV (ml) "
              "| parameters | training (s, all folds) | prediction (CPU s per slice) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in args.methods:
        r = results["methods"][m]
        case, paper = r["summary"]["per_case_mean"], r["summary"]["paper_2d"]
        lines.append(
            f"| {m} | {_fmt(case['dice'])} | {_fmt(case['hd95_mm'], 1)} | {_fmt(paper['iou'])} | {_fmt(paper['dice'])} "
            f"| {_fmt(case['fp_volume_ml'], 1)} | {_fmt(case['fn_volume_ml'], 1)} | {r['parameters']:,} "
            f"| {r['train_s']:.0f} | {r['predict_s_per_slice']:.3f} |"
        )
    lines += ["", f"Total wall time {results['wall_s'] / 60:.1f} min; figure: {args.figure} ({figure_patient})."]
    table = "\n".join(lines)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
