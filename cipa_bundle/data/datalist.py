"""Datalist builders: a dataset folder -> MONAI decathlon-style JSON for the bundle's workflows.

The JSON has ``training``, ``validation`` and ``testing`` lists of items whose paths are relative to the dataset
root (POSIX separators), so ``monai.data.load_decathlon_datalist(path, data_list_key=..., base_dir=dataset_dir)``
resolves them, plus metadata (``name``, ``modality``, ``labels``, counts, the seed, the validation patients).

Sources:

* ``pclt20k``: ``<root>/<patient>/<id>_CT.png``, ``_PET.png``, ``_mask.png`` with ``<root>/train.txt`` and
  ``<root>/test.txt`` (one id per line; the patient is ``id.split("_")[0]``). Items:
  ``{"ct", "pet", "label"}``, loaded by :class:`cipa_bundle.data.slices.LoadPCLT20Kd`.
* ``studies``: folders written by ``cipa-bundle convert`` (``image.nii.gz``, 2 channels [CT, PET] on the CT grid)
  with a label NIfTI on the same grid. Items: ``{"image", "label"}``.
* ``autopet``: the autoPET NIfTI release, ``<case>/CTres.nii.gz``, ``SUV.nii.gz``, ``SEG.nii.gz`` on one grid.
  Items: ``{"ct", "pet", "label"}`` (HU and SUV, windowed later by the preprocessing transforms).

For 3-D sources a case is any folder (searched recursively) holding the image file; its patient is the first
folder below the root, so ``<root>/<patient>/<study>/...`` keeps all studies of a patient together.

**Splits are by patient.** The validation patients are a seeded fraction of the training patients (for PCLT20K,
of the patients in ``train.txt``: the official code selects models on the test list, which this never does).
The test list is ``test.txt`` for PCLT20K and an optional ``test_list`` file of case or patient ids otherwise.

Paths are checked lexically against the root (``..`` or absolute entries are refused), not through symlinks, so a
dataset root that links to data stored elsewhere still works.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cipa_bundle.data.slices import expand_datalist_slices
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import nifti_header, require_3d_mask, require_same_grid, save_json
from cipa_bundle.preprocessing.convert import recorded_ct_window

__all__ = [
    "SOURCES",
    "read_id_list",
    "split_patients",
    "build_pclt20k_datalist",
    "build_studies_datalist",
    "build_autopet_datalist",
    "write_datalist",
    "build_datalist",
]

SOURCES = ("pclt20k", "studies", "autopet")


_COMMON_META = {
    "modality": {"0": "CT", "1": "PET"},
    "labels": {"0": "background", "1": "tumor"},
}


# ---------------------------------------------------------------------------------------------------- helpers
def _inside(root: Path, rel: str, case: str) -> str:
    """``rel`` normalised to a POSIX path inside ``root``; refuses absolute paths and ``..`` escapes."""
    norm = os.path.normpath(rel).replace(os.sep, "/")
    if os.path.isabs(rel) or PurePosixPath(norm).is_absolute() or norm == ".." or norm.startswith("../"):
        raise CipaInputError(f"case {case}: entry {rel!r} points outside the dataset root {root}")
    return norm


def _require_file(root: Path, rel: str, case: str, what: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise CipaInputError(f"case {case}: {what} {path} is missing")
    return path


def read_id_list(path: str | os.PathLike[str]) -> list[str]:
    """Item ids of a PCLT20K-style list file, one per line.

    Lines are stripped of surrounding whitespace (``\\n``, ``\\r\\n``, spaces) and blank lines are skipped. The
    official loader instead drops the last character of every line, which silently truncates the last id when
    the file does not end in a newline; this reader does not depend on that. Duplicates are dropped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CipaInputError(f"id list {path} is missing; expected one item id per line")
    ids: list[str] = []
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        item = line.strip()
        if not item:
            continue
        if item in seen:
            warnings.warn(f"{path}: id {item!r} is listed more than once; using it once", stacklevel=2)
            continue
        seen.add(item)
        ids.append(item)
    if not ids:
        raise CipaInputError(f"id list {path} holds no ids; expected one item id per line")
    return ids


def split_patients(patients: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split patient ids into ``(training, validation)`` lists (both sorted).

    ``round(val_fraction * n)`` patients go to validation, at least one when ``val_fraction > 0`` and at least one
    always stays in training. The choice depends only on ``seed`` and the set of ids (sorted first).
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise CipaInputError(f"val_fraction is {val_fraction}; expected a value in [0, 1)")
    unique = sorted(set(patients))
    if val_fraction == 0:
        return unique, []
    if len(unique) < 2:
        raise CipaInputError(
            f"a validation split needs at least 2 training patients, found {len(unique)}; use val_fraction=0"
        )
    n_val = min(max(int(round(float(val_fraction) * len(unique))), 1), len(unique) - 1)
    order = np.random.default_rng(int(seed)).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    chosen = set(val)
    return [p for p in unique if p not in chosen], val


def _document(
    name: str,
    description: str,
    dims: str,
    seed: int,
    val_fraction: float,
    val_patients: list[str],
    training: list[dict],
    validation: list[dict],
    testing: list[dict],
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "tensorImageSize": dims,
        **_COMMON_META,
        "numTraining": len(training),
        "numValidation": len(validation),
        "numTest": len(testing),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "validation_patients": val_patients,
        "training": training,
        "validation": validation,
        "testing": testing,
    }


# ---------------------------------------------------------------------------------------------------- PCLT20K
def build_pclt20k_datalist(
    root: str | os.PathLike[str], val_fraction: float = 0.2, seed: int = 0, check_sizes: bool = True
) -> dict[str, Any]:
    """Datalist for the PCLT20K PNG layout (see the module docstring).

    Args:
        root: the dataset folder holding ``train.txt``, ``test.txt`` and one folder per patient.
        val_fraction: share of the ``train.txt`` patients moved to ``validation``.
        seed: seeds the validation patients.
        check_sizes: compare the CT, PET and mask sizes of every item (PNG headers only).

    Returns:
        The datalist document; items are ``{"ct": ..., "pet": ..., "label": ...}`` relative paths.
    """
    root = Path(root)
    train_ids, test_ids = read_id_list(root / "train.txt"), read_id_list(root / "test.txt")

    def item(item_id: str) -> dict[str, str]:
        patient = item_id.split("_")[0]
        entry = {
            key: _inside(root, f"{patient}/{item_id}_{suffix}.png", item_id)
            for key, suffix in (("ct", "CT"), ("pet", "PET"), ("label", "mask"))
        }
        paths = {key: _require_file(root, rel, item_id, f"{key} PNG") for key, rel in entry.items()}
        if check_sizes:
            _check_png_sizes(item_id, paths)
        return entry

    train_patients = {i.split("_")[0] for i in train_ids}
    overlap = sorted(train_patients & {i.split("_")[0] for i in test_ids})
    if overlap:
        warnings.warn(
            f"{root}: {len(overlap)} patient(s) appear in both train.txt and test.txt (e.g. {overlap[:3]}); "
            "the test set is not patient-disjoint",
            stacklevel=2,
        )
    _, val_patients = split_patients(sorted(train_patients), val_fraction, seed)
    val_set = set(val_patients)
    training = [item(i) for i in train_ids if i.split("_")[0] not in val_set]
    validation = [item(i) for i in train_ids if i.split("_")[0] in val_set]
    testing = [item(i) for i in test_ids]
    return _document(
        "PCLT20K",
        "PET-CT lung tumour PNG slices (channel 0 = CT, 1 = PET)",
        "2D",
        seed,
        val_fraction,
        val_patients,
        training,
        validation,
        testing,
    )


def _check_png_sizes(item_id: str, paths: dict[str, Path]) -> None:
    from PIL import Image

    sizes = {}
    for key, path in paths.items():
        try:
            with Image.open(path) as im:  # reads the header only
                sizes[key] = im.size
        except OSError as err:
            raise CipaInputError(f"case {item_id}: cannot read {key} PNG {path}: {err}") from err
    if len(set(sizes.values())) != 1:
        found = ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items())
        raise CipaInputError(f"case {item_id}: image sizes differ ({found}); expected CT, PET and mask of one size")


# ---------------------------------------------------------------------------------------------------- 3-D
def _find_cases(root: Path, marker: str) -> list[str]:
    """Case folders (relative POSIX paths) under ``root`` holding a file called ``marker``; hidden folders skipped."""
    if not root.is_dir():
        raise CipaInputError(f"dataset root {root} is not a folder")
    cases = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if marker in filenames:
            rel = Path(dirpath).relative_to(root).as_posix()
            if rel == ".":
                raise CipaInputError(f"{root / marker} sits in the dataset root; expected one folder per case")
            cases.append(rel)
    if not cases:
        raise CipaInputError(f"no {marker} found under {root}; expected <root>/<case>/{marker}")
    return sorted(cases)


def _split_3d(
    root: Path, cases: list[str], val_fraction: float, seed: int, test_list: str | os.PathLike[str] | None
) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(training, validation, testing, validation_patients)`` case lists, split by patient."""
    patient = {c: c.split("/")[0] for c in cases}
    test: set[str] = set()
    if test_list is not None:
        wanted = read_id_list(test_list)
        known = set(cases) | set(patient.values())
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise CipaInputError(f"test list {test_list}: ids {unknown[:5]} match no case or patient under {root}")
        test = {c for c in cases if c in wanted or patient[c] in wanted}
        # Keep a patient's other studies out of training too, so the test set stays patient-disjoint.
        test_patients = {patient[c] for c in test}
        test = {c for c in cases if patient[c] in test_patients}
    remaining = [c for c in cases if c not in test]
    if not remaining:
        raise CipaInputError(f"every case under {root} is in the test list {test_list}; nothing left to train on")
    _, val_patients = split_patients([patient[c] for c in remaining], val_fraction, seed)
    val = set(val_patients)
    training = [c for c in remaining if patient[c] not in val]
    validation = [c for c in remaining if patient[c] in val]
    return training, validation, sorted(test), val_patients


def _document_3d(
    name: str,
    description: str,
    root: Path,
    cases: list[str],
    item: Callable[[str], dict[str, str]],
    val_fraction: float,
    seed: int,
    test_list: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The datalist document of a 3-D source: the by-patient split of ``cases``, each case made into ``item(case)``."""
    training, validation, testing, val_patients = _split_3d(root, cases, val_fraction, seed, test_list)
    return _document(
        name,
        description,
        "3D",
        seed,
        val_fraction,
        val_patients,
        [item(c) for c in training],
        [item(c) for c in validation],
        [item(c) for c in testing],
    )


def _ct_window_of(image: Path) -> tuple[float, float] | None:
    """The CT window ``convert`` recorded beside ``image`` (``provenance.json``), or None where there is no record."""
    record = image.parent / "provenance.json"
    if not record.is_file():
        return None
    try:
        provenance = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise CipaInputError(f"{record}: not readable JSON with image.ct_window_hu ({err})") from err
    return recorded_ct_window(provenance)


def build_studies_datalist(
    root: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    label_name: str = "label.nii.gz",
    image_name: str = "image.nii.gz",
    test_list: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Datalist for ``convert`` output folders: ``<case>/image.nii.gz`` (I, J, K, 2) plus ``<case>/<label_name>``.

    Args:
        root: dataset folder, searched recursively for ``image_name``.
        val_fraction, seed: the by-patient validation split.
        label_name: the label file, relative to each case folder (it may point elsewhere inside the root).
        image_name: the fused image file in each case folder.
        test_list: optional file of case or patient ids (one per line) that go to ``testing``.

    Returns:
        The datalist document; items are ``{"image": ..., "label": ...}`` relative paths.
    """
    root = Path(root)
    cases = _find_cases(root, image_name)
    windows: dict[tuple[float, float], str] = {}

    def item(case: str) -> dict[str, str]:
        entry = {
            "image": _inside(root, f"{case}/{image_name}", case),
            "label": _inside(root, f"{case}/{label_name}", case),
        }
        image = _require_file(root, entry["image"], case, "image")
        window = _ct_window_of(image)
        if window is not None:
            windows.setdefault(window, case)
            if len(windows) > 1:
                (first, first_case), (other, other_case) = list(windows.items())[:2]
                raise CipaInputError(
                    f"case {other_case}: image {image} was converted with CT window {list(other)} HU, case "
                    f"{first_case} with {list(first)} HU (provenance.json, image.ct_window_hu); expected one window "
                    "for a whole training set: convert the studies again with the same --ct_window"
                )
        label = _require_file(root, entry["label"], case, "label")
        (ishape, iaff), (lshape, laff) = nifti_header(image, case), nifti_header(label, case)
        channels = ishape[3:] if len(ishape) == 4 else ishape[4:] if len(ishape) == 5 and ishape[3] == 1 else None
        if channels != (2,):
            raise CipaInputError(
                f"case {case}: image {image} has shape {ishape}; expected (I, J, K, 2) with channels [CT, PET] "
                "as written by cipa-bundle convert"
            )
        require_3d_mask(case, label, lshape)
        require_same_grid(case, (image, ishape, iaff), (label, lshape, laff))
        return entry

    return _document_3d(
        "studies", "converted PET-CT studies: image.nii.gz = [CT, PET] on the CT grid",
        root, cases, item, val_fraction, seed, test_list,
    )


def build_autopet_datalist(
    root: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    test_list: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Datalist for the autoPET NIfTI layout: ``<case>/CTres.nii.gz`` (HU), ``SUV.nii.gz``, ``SEG.nii.gz``.

    Args:
        root: dataset folder (e.g. ``FDG-PET-CT-Lesions``), searched recursively for ``CTres.nii.gz``; with the
            release's ``<patient>/<study>/`` layout, the studies of one patient share a split.
        val_fraction, seed, test_list: as for :func:`build_studies_datalist`.

    Returns:
        The datalist document; items are ``{"ct": ..., "pet": ..., "label": ...}`` relative paths.
    """
    root = Path(root)
    cases = _find_cases(root, "CTres.nii.gz")

    def item(case: str) -> dict[str, str]:
        names = {"ct": "CTres.nii.gz", "pet": "SUV.nii.gz", "label": "SEG.nii.gz"}
        entry = {key: _inside(root, f"{case}/{name}", case) for key, name in names.items()}
        files = {key: _require_file(root, entry[key], case, f"{key} {name}") for key, name in names.items()}
        headers = {key: (path, *nifti_header(path, case)) for key, path in files.items()}
        for key in ("ct", "pet"):
            if len(headers[key][1]) != 3:
                raise CipaInputError(f"case {case}: {files[key]} has shape {headers[key][1]}; expected (I, J, K)")
        require_3d_mask(case, files["label"], headers["label"][1])
        require_same_grid(case, headers["ct"], headers["pet"])
        require_same_grid(case, headers["ct"], headers["label"])
        return entry

    return _document_3d(
        "autoPET", "autoPET FDG PET-CT: CTres (HU) and SUV on the PET grid, SEG tumour mask",
        root, cases, item, val_fraction, seed, test_list,
    )


# ---------------------------------------------------------------------------------------------------- writing
def write_datalist(doc: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write a datalist document as JSON, atomically (temporary name in the same folder, then rename)."""
    return save_json(doc, out)


def build_datalist(
    source: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    label_name: str = "label.nii.gz",
    test_list: str | os.PathLike[str] | None = None,
    slices: bool = False,
    tumour_free_fraction: float = 0.1,
) -> Path:
    """Build the datalist of ``root`` for ``source`` (one of :data:`SOURCES`) and write it to ``out``.

    Args:
        source: ``"pclt20k"``, ``"studies"`` or ``"autopet"``.
        root: the dataset folder; item paths are relative to it.
        out: the JSON file to write.
        val_fraction, seed: the by-patient validation split.
        label_name: label file of each study folder (``studies`` only).
        test_list: file of case or patient ids for ``testing`` (3-D sources; PCLT20K uses its ``test.txt``).
        slices: for 3-D sources, expand ``training`` and ``validation`` into per-axial-slice items (every tumour
            slice plus ``tumour_free_fraction`` of the others, see ``cipa_bundle.data.slices``); ``testing`` keeps
            whole volumes for 3-D evaluation.
        tumour_free_fraction: share of tumour-free slices kept when ``slices`` is set.

    Returns:
        The path written.
    """
    source = str(source).lower()
    if source == "pclt20k":
        if slices:
            raise CipaInputError("slices applies to 3-D sources (studies, autopet); PCLT20K items are already slices")
        if test_list is not None:
            raise CipaInputError("test_list applies to 3-D sources; PCLT20K uses <root>/test.txt")
        doc = build_pclt20k_datalist(root, val_fraction, seed)
    elif source == "studies":
        doc = build_studies_datalist(root, val_fraction, seed, label_name=label_name, test_list=test_list)
    elif source == "autopet":
        doc = build_autopet_datalist(root, val_fraction, seed, test_list=test_list)
    else:
        raise CipaInputError(f"datalist source is {source!r}; expected one of {', '.join(SOURCES)}")
    if slices:
        doc = expand_datalist_slices(doc, tumour_free_fraction, seed, ("training", "validation"), base_dir=root)
        doc["tensorImageSize"] = "2D slices of 3D"
    return write_datalist(doc, out)
