"""Drive the CIPA bundle through MONAI Label's own bundle tasks, inside the MONAI Label environment.

This script is not collected by pytest. ``tests/test_monailabel.py`` runs it with the interpreter named by
``CIPA_MONAILABEL_PYTHON`` (the separate ``.venv-label``: monailabel 0.8.5 needs torch 2.14.1, torchvision 0.29.1 and
numpy < 2, which the main environment does not have), and asserts on the JSON report it writes. Nothing of MONAI
Label is stubbed: the real ``BundleInferTask`` / ``BundleTrainTask`` (and, when its app layer imports, the real
``monaibundle`` sample app with its ``LocalDatastore``) run on a tiny copy of the bundle and on phantom studies that
``cipa-bundle convert --studies_dir`` wrote.

Usage::

    python tests/monailabel_driver.py --bundle APP/model/NAME --studies STUDIES --work WORK --out report.json

``--bundle`` must sit at ``<app>/model/<name>``, the place the ``monaibundle`` app looks for local bundles. The
report holds one section per step; a step that fails records its traceback and the script exits with status 1 after
writing the report, so the test shows MONAI Label's own error.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# MONAI Label reads BUNDLE_DOWNLOAD_SRC once, when monailabel.config is imported. Anything but "monaihosting" makes
# the monaibundle app take bundles from <app>/model/ instead of asking the online Model Zoo first (no network here).
os.environ.setdefault("BUNDLE_DOWNLOAD_SRC", "ngc")


class RestoredLog(logging.Handler):
    """Collects the paths of MONAI's ``CheckpointLoader`` messages ("Restored all variables from <path>").

    Attached to the ``ignite`` logger, where a loader attached to the trainer logs (through ``engine.logger``): the
    root logger's handlers are replaced when ``monai.bundle.run`` applies the bundle's ``logging.conf``.
    """

    PREFIX = "Restored all variables from "

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.paths: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.paths.append(os.path.basename(message[len(self.PREFIX) :].strip()))


class StudiesDatastore:
    """The one ``Datastore`` method ``BundleTrainTask`` calls: ``datalist()`` -> ``[{"image", "label"}]``.

    Built like MONAI Label's ``LocalDatastore`` lists a studies folder: the top-level ``*.nii.gz`` images that have a
    final label at ``labels/final/<same name>``.
    """

    def __init__(self, studies: Path) -> None:
        self.studies = studies

    def datalist(self) -> list[dict[str, str]]:
        items = []
        for image in sorted(glob.glob(str(self.studies / "*.nii.gz"))):
            label = self.studies / "labels" / "final" / os.path.basename(image)
            if label.is_file():
                items.append({"image": os.path.realpath(image), "label": os.path.realpath(label)})
        return items


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _models(bundle: Path) -> dict[str, str]:
    """``{file name: sha256}`` of everything in the bundle's ``models/``."""
    return {p.name: _sha256(p) for p in sorted((bundle / "models").glob("*")) if p.is_file()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("monailabel", "monai", "torch", "torchvision", "numpy", "pydicom", "pytorch-ignite"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def step_infer(bundle: Path, image: Path, work: Path) -> dict[str, Any]:
    """``BundleInferTask(bundle, conf={})`` on one fused image, as the monaibundle app builds and calls it."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(bundle), conf={})
    out: dict[str, Any] = {"valid": task.is_valid(), "labels": dict(task.labels or {}),
                           "dimension": task.dimension, "type": str(task.type)}
    start = time.perf_counter()
    label_file, params = task({"image": str(image), "device": "cpu"})
    out["seconds"] = time.perf_counter() - start
    mask = work / "monailabel_mask.nii.gz"
    shutil.move(label_file, mask)  # MONAI Label leaves the result in a temporary file for the server to send
    out["label_file"] = str(mask)
    out["label_names"] = params.get("label_names")
    # Which copy of the code ran: MONAI Label puts the bundle folder first on sys.path, so it must be the bundle's.
    out["cipa_bundle_file"] = sys.modules["cipa_bundle"].__file__
    return out


def step_bundle_run(bundle: Path, image: Path, work: Path) -> dict[str, Any]:
    """The bundle's own inference workflow on the same image, same weights, same environment: the reference mask."""
    import monai.bundle

    output_dir = work / "bundle_run"
    monai.bundle.run(
        run_id="run",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        datalist=[{"image": str(image)}],
        output_dir=str(output_dir),
        device="$torch.device('cpu')",  # MONAI Label was asked for the CPU too
    )
    masks = sorted(output_dir.glob("*/mask.nii.gz"))
    return {"masks": [str(m) for m in masks]}


def step_checkpoint_loader(bundle: Path) -> dict[str, Any]:
    """The ``CheckpointLoader`` that ``BundleTrainTask`` prepends to ``train#handlers``, applied to ``@network``.

    ``strict=False`` would silently skip keys in another format, so this compares every tensor after loading.
    """
    import torch
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monailabel.tasks.train.bundle import BundleTrainTask

    task = BundleTrainTask(str(bundle), conf={})
    handlers: list[dict[str, Any]] = []
    task._load_checkpoint(str(bundle / "models" / "model.pt"), True, handlers)  # exactly what __call__ builds
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "cpu"
    parser["train#handlers"] = handlers
    torch.manual_seed(12345)  # a different random init from the checkpoint's
    network = parser.get_parsed_content("network")
    loader = parser.get_parsed_content("train#handlers")[0]
    saved = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    before = network.state_dict()
    differed = any(not torch.equal(before[k], saved[k]) for k in saved if k in before)
    loader(Engine(lambda engine, batch: None))
    after = network.state_dict()
    return {
        "loader_config": handlers[0] if handlers else None,
        "checkpoint_keys": len(saved),
        "network_keys": len(after),
        "same_keys": sorted(saved) == sorted(after),
        "differed_before": differed,
        "all_equal_after": all(torch.equal(after[k], saved[k]) for k in saved if k in after),
    }


def step_train(bundle: Path, studies: Path, max_epochs: int) -> dict[str, Any]:
    """One ``BundleTrainTask`` request on CPU, single process, with the default ``pretrained`` (model.pt) on."""
    from monailabel.tasks.train.bundle import BundleTrainTask

    before = _models(bundle)
    datastore = StudiesDatastore(studies)
    task = BundleTrainTask(str(bundle), conf={})
    restored = RestoredLog()
    logging.getLogger("ignite").addHandler(restored)
    start = time.perf_counter()
    try:
        task(
            {"model": bundle.name, "max_epochs": max_epochs, "device": "cpu", "multi_gpu": False, "val_split": 0.34},
            datastore,
        )
    finally:
        logging.getLogger("ignite").removeHandler(restored)
    return {
        "valid": task.is_valid(),
        "seconds": time.perf_counter() - start,
        "datalist": datastore.datalist(),
        "models_before": before,
        "models_after": _models(bundle),
        "trainer_restored_from": restored.paths,
        "first_train_handler": task.bundle_config.get("train#handlers")[0],
    }


def step_app(bundle: Path, studies: Path, work: Path, image_id: str) -> dict[str, Any]:
    """The ``monaibundle`` sample app shipped in the monailabel wheel, built headlessly on ``<app>/model/<name>``."""
    try:
        import monailabel.interfaces.app  # noqa: F401  (the app layer; it imports pydicom-seg)
    except ImportError as err:
        return {"skipped": f"monailabel's app layer does not import here ({type(err).__name__}: {err})"}
    source = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not (source / "main.py").is_file():
        return {"skipped": f"the monaibundle sample app is not installed at {source}"}
    app_dir = bundle.parent.parent
    for name in ("main.py", "__init__.py", "lib"):
        target = app_dir / name
        if (source / name).is_dir():
            shutil.copytree(source / name, target, dirs_exist_ok=True)
        elif (source / name).is_file():
            shutil.copyfile(source / name, target)
    spec = importlib.util.spec_from_file_location("monaibundle_main", app_dir / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    conf = {"models": bundle.name, "sam2": "false", "preload": "false"}
    app = module.MyApp(str(app_dir), str(studies), conf)
    info = app.info()
    result = app.infer({"model": bundle.name, "image": image_id, "device": "cpu"})
    mask = work / "app_mask.nii.gz"
    shutil.move(result["file"], mask)
    return {
        "app_dir": str(app_dir),
        "conf": conf,
        "models": {k: {"type": str(v.get("type")), "labels": v.get("labels")} for k, v in info["models"].items()},
        "trainers": sorted(info.get("trainers", {})),
        "datastore_datalist": app.datastore().datalist(),
        "label_file": str(mask),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle folder, <app>/model/<name>")
    parser.add_argument("--studies", type=Path, required=True, help="the MONAI Label studies folder")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for results")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, force=True)
    args.work.mkdir(parents=True, exist_ok=True)
    bundle, studies = args.bundle.resolve(), args.studies.resolve()
    image = sorted(studies.glob("*.nii.gz"))[0]
    report: dict[str, Any] = {"versions": _versions(), "image": str(image), "timings_s": {}}
    steps = [
        ("infer", lambda: step_infer(bundle, image, args.work)),
        ("bundle_run", lambda: step_bundle_run(bundle, image, args.work)),
        ("app", lambda: step_app(bundle, studies, args.work, image.name[: -len(".nii.gz")])),
        ("checkpoint_loader", lambda: step_checkpoint_loader(bundle)),
        # Two epochs, then a request for fewer: the second must start from models/model.pt, not the finished run.
        ("train_2_epochs", lambda: step_train(bundle, studies, 2)),
        ("train_1_epoch_after", lambda: step_train(bundle, studies, 1)),
    ]
    status = 0
    for name, step in steps:
        start = time.perf_counter()
        try:
            report[name] = step()
        except Exception:  # report MONAI Label's own error to the test, then go on with independent steps
            report[name] = {"error": traceback.format_exc()}
            status = 1
        report["timings_s"][name] = round(time.perf_counter() - start, 2)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
