"""Zoo-style bundle archive: one zip that unpacks into a folder named after the bundle and runs from there.

The MONAI bundle specification asks that a zipped bundle unzip into a folder named after the bundle. This archive
holds what ``python -m monai.bundle run`` needs in that folder, and nothing from development (tests, benchmarks,
caches, training checkpoints)::

    petct_lung_tumor_segmentation/
        LICENSE  README.md  large_files.yml  metadata.json  pyproject.toml
        configs/   every config, metadata.json and logging.conf
        docs/      README.md (the model card), its pages, data_license.txt, figures
        models/    model.pt / model.ts / model.onnx where present; otherwise empty (large_files.yml says where from)
        cipa_bundle/   the Python package the configs name as ``cipa_bundle.*``

Configs refer to custom code as ``cipa_bundle.*`` rather than the Zoo's conventional ``scripts.*``; with the package
at the bundle root, running from that folder (``python -m`` puts it on ``sys.path``) or with ``PYTHONPATH`` set to
it resolves the code without installing anything. ``pyproject.toml`` is included so ``pip install .`` also works.

Entries are written in sorted order with a fixed timestamp, so packaging the same files twice gives the same bytes.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cipa_bundle.errors import CipaInputError
from cipa_bundle.zoo import verify_metadata_offline

__all__ = ["BUNDLE_NAME", "WEIGHT_FILES", "bundle_files", "package_bundle"]

#: Folder name of the unpacked bundle: ``<modality>_<region>_<task>`` as the Model Zoo names bundles; it contains
#: "segmentation", which MONAI Label reads as the task type.
BUNDLE_NAME = "petct_lung_tumor_segmentation"

#: Weight files shipped from ``models/`` when present. Training checkpoints (``latest_checkpoint_epoch=*.pt``) hold
#: optimizer state, are several times larger and are not part of a released bundle.
WEIGHT_FILES = ("model.pt", "model.ts", "model.onnx")

_ROOT_FILES = ("LICENSE", "README.md", "large_files.yml", "metadata.json", "pyproject.toml")
_REQUIRED = ("LICENSE", "configs/metadata.json")
_FOLDERS = ("configs", "docs", "cipa_bundle")
# Byte code and numba's on-disk JIT caches are machine-specific; they are rebuilt on first use.
_SKIPPED_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc", ".tmp")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Zip cannot store dates before 1980; a fixed date makes the archive reproducible.
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def _walk(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder`` (symlinks followed), skipping caches, hidden and temporary entries."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file() and path.suffix not in _SKIPPED_SUFFIXES:
            yield path


def bundle_files(bundle_root: str | os.PathLike[str], include_weights: bool = True) -> dict[str, Path]:
    """The files the archive holds: ``{path inside the bundle folder (POSIX): source file}``.

    Args:
        bundle_root: the bundle folder (holding ``configs/`` and ``cipa_bundle/``).
        include_weights: ship :data:`WEIGHT_FILES` found in ``models/``.

    Raises:
        CipaInputError: a required file (``LICENSE``, ``configs/metadata.json``) or the ``cipa_bundle`` package is
            missing from ``bundle_root``.
    """
    root = Path(bundle_root)
    for required in (*_REQUIRED, "cipa_bundle/__init__.py"):
        if not (root / required).is_file():
            raise CipaInputError(
                f"{root / required}: not found; expected a bundle root holding {', '.join(_REQUIRED)} and the "
                "cipa_bundle package (pass the bundle folder as bundle_root)"
            )
    files: dict[str, Path] = {}
    for name in _ROOT_FILES:
        if (root / name).is_file():  # metadata.json may be a symlink to configs/: the archive gets a plain copy
            files[name] = root / name
    for folder in _FOLDERS:
        for path in _walk(root / folder):
            files[path.relative_to(root).as_posix()] = path
    if include_weights:
        for name in WEIGHT_FILES:
            if (root / "models" / name).is_file():
                files[f"models/{name}"] = root / "models" / name
    return dict(sorted(files.items()))


def _add(archive: zipfile.ZipFile, arcname: str, data: bytes | None) -> None:
    """One entry with a fixed date; ``data=None`` adds a directory entry (so an empty ``models/`` survives)."""
    info = zipfile.ZipInfo(arcname, date_time=_FIXED_DATE)
    if data is None:
        info.external_attr = (0o40755 << 16) | 0x10  # a directory, for both unix and DOS readers
        archive.writestr(info, b"")
    else:
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, data)


def package_bundle(
    out: str | os.PathLike[str],
    bundle_root: str | os.PathLike[str] | None = None,
    name: str | None = None,
    include_weights: bool = True,
    verify: bool = True,
) -> Path:
    """Write the bundle as a zip archive that unpacks into ``<name>/``.

    Args:
        out: the ``.zip`` to write; its folder is created if needed. Written to a temporary name beside it and
            renamed, so an interrupted run leaves no partial archive.
        bundle_root: the bundle folder; default: the checkout this package was loaded from (the parent of the
            ``cipa_bundle`` folder).
        name: the top-level folder inside the archive; default :data:`BUNDLE_NAME`.
        include_weights: ship ``models/model.pt`` (and ``model.ts`` / ``model.onnx``) where present. Without them
            ``models/`` is empty and ``large_files.yml`` tells ``monai.bundle download_large_files`` where the
            weights come from.
        verify: validate ``configs/metadata.json`` against the shipped schema first (offline), so no archive is
            made from metadata the Model Zoo would reject.

    Returns:
        The archive's path.

    Raises:
        CipaInputError: ``out`` is not a ``.zip``, ``name`` is not a plain folder name, a required file is missing,
            or the metadata fails validation.
    """
    root = Path(bundle_root) if bundle_root is not None else Path(__file__).resolve().parent.parent
    target = Path(out)
    name = BUNDLE_NAME if name is None else name
    if target.suffix.lower() != ".zip":
        raise CipaInputError(f"output {target}: extension {target.suffix or '(none)'!r}, expected '.zip'")
    if not _NAME_PATTERN.fullmatch(name):
        raise CipaInputError(
            f"bundle name {name!r}: expected a plain folder name (letters, digits, '_', '.', '-'), e.g. {BUNDLE_NAME}"
        )
    files = bundle_files(root, include_weights=include_weights)
    if verify:
        verify_metadata_offline(root / "configs" / "metadata.json")

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w") as archive:
            _add(archive, f"{name}/", None)
            _add(archive, f"{name}/models/", None)
            for arcname, source in files.items():
                _add(archive, f"{name}/{arcname}", source.read_bytes())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; an archive is meant to be shared
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
