"""The embedded synthetic dataset: what ``train.json`` trains on when the user has no data of their own.

On first use, phantom PET-CT DICOM studies are generated (``cipa_bundle.synthetic.phantom``), converted exactly as a
clinical study would be (``cipa-bundle convert``), and listed in a per-slice datalist; later runs reuse the cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock

from cipa_bundle.data.datalist import build_studies_datalist, write_datalist
from cipa_bundle.data.slices import expand_datalist_slices
from cipa_bundle.errors import CipaInputError
from cipa_bundle.preprocessing.convert import convert_study
from cipa_bundle.synthetic.phantom import make_phantom_dataset

__all__ = ["prepare_datalist", "build_synthetic_dataset"]


def build_synthetic_dataset(
    dataset_dir: str | os.PathLike[str],
    cases: int = 8,
    seed: int = 0,
    size: str = "small",
    val_fraction: float = 0.25,
    tumour_free_fraction: float = 0.2,
    held_out: int = 1,
) -> Path:
    """Generate, convert and list ``cases`` phantom studies in ``dataset_dir``; return the datalist path.

    Layout: ``dicom/phantom_NNN`` (DICOM studies with ``label.nii.gz`` and ``truth.json``), ``phantom_NNN/``
    (``convert`` outputs plus ``label.nii.gz``) and ``datalist.json`` (per-slice ``training`` / ``validation``, whole
    volumes in ``testing``). The last ``held_out`` cases go to ``testing`` and are never trained or validated on.
    The folder is built under a temporary name and renamed, so an interrupted first run leaves no half dataset.
    """
    final = Path(dataset_dir)
    if cases < 2 + held_out:
        raise CipaInputError(f"synthetic dataset: cases={cases}; expected at least {2 + held_out} (train, val, test)")
    building = final.with_name(final.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    studies = make_phantom_dataset(building / "dicom", cases=cases, seed=seed, size=size)
    for study in studies:
        convert_study(study, building / study.name, progress=False)
        shutil.copyfile(study / "label.nii.gz", building / study.name / "label.nii.gz")
    test_list = building / "test_cases.txt"
    test_list.write_text("".join(f"{s.name}\n" for s in studies[len(studies) - held_out :]))
    doc = build_studies_datalist(building, val_fraction=val_fraction, seed=seed, test_list=test_list)
    doc = expand_datalist_slices(doc, tumour_free_fraction=tumour_free_fraction, seed=seed, base_dir=building)
    write_datalist(doc, building / "datalist.json")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(building, final)
    return final / "datalist.json"


def prepare_datalist(
    datalist: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    synthesize_if_missing: bool = True,
    cases: int = 8,
    seed: int = 0,
    size: str = "small",
) -> str:
    """The datalist the bundle trains on: ``datalist`` if it exists, else the synthetic dataset built in ``dataset_dir``.

    Args:
        datalist: a decathlon-style JSON (``cipa-bundle datalist ...`` writes one for PCLT20K, studies or autoPET).
        dataset_dir: the dataset root; when the datalist is missing and synthesis is allowed, the phantom dataset is
            built here, so this folder must not exist yet or already hold a synthetic dataset.
        synthesize_if_missing: build the synthetic dataset instead of failing.
        cases, seed, size: passed to :func:`build_synthetic_dataset`.

    Raises:
        CipaInputError: the datalist is missing and synthesis is off, or ``dataset_dir`` holds other data.
    """
    path = Path(datalist)
    if path.is_file():
        return str(path)
    root = Path(dataset_dir)
    if not synthesize_if_missing:
        raise CipaInputError(f"datalist {path} not found; build one with `cipa-bundle datalist SOURCE {root} {path}`")
    root.parent.mkdir(parents=True, exist_ok=True)
    # The ranks of a multi-GPU run (and any two runs sharing the cache) all get here on a fresh clone: one builds
    # while the others wait for its lock and then reuse the result. Without it they wrote into one building folder
    # at once and failed on each other's half-written files.
    with FileLock(root.parent / f".{root.name}.lock"):
        if path.is_file():
            return str(path)
        return _synthesize(path, root, cases=cases, seed=seed, size=size)


def _synthesize(path: Path, root: Path, cases: int, seed: int, size: str) -> str:
    """Build the synthetic dataset in ``root``, an empty or missing folder, and return its datalist, ``path``."""
    if root.exists() and any(root.iterdir()):
        raise CipaInputError(
            f"datalist {path} not found and dataset_dir {root} is not empty; refusing to write the synthetic dataset "
            "into it. Build a datalist with `cipa-bundle datalist` or choose an empty dataset_dir."
        )
    if root.exists():
        root.rmdir()
    built = build_synthetic_dataset(root, cases=cases, seed=seed, size=size)
    if built.resolve() != path.resolve():
        raise CipaInputError(f"synthetic datalist written to {built}, but the config expects it at {path}")
    return str(built)
