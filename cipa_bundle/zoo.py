"""MONAI Model Zoo checks that run offline and on a CPU: metadata against its schema, and the network's I/O.

The Zoo's CI (``ci/verify_bundle.py``) runs two checks this module reproduces without network access or a GPU:

* ``monai.bundle.verify_metadata`` downloads the JSON schema named by the metadata's ``schema`` URL and validates
  the metadata with ``jsonschema``. MONAI's downloader skips the download when the target file already exists, so
  :func:`verify_metadata_offline` hands it the schema copy shipped in ``cipa_bundle/schemas/`` as that target. No
  md5 is pinned: the copy is the file published on the MONAI website, whose bytes differ from the GitHub release
  asset that MONAI's own tests hash. The shell equivalent is::

      python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\
          --filepath cipa_bundle/schemas/meta_schema_20240725.json

* ``monai.bundle.verify_net_in_out`` builds ``network_def`` from the inference config, feeds it random input of the
  metadata's ``(1, num_channels, *spatial_shape)`` and checks the output's channel count and dtype.
  :func:`verify_net_in_out_cpu` runs it on the CPU with the bundle root importable (as the Zoo's CI arranges), and
  additionally checks the output's spatial shape, which MONAI does not.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from cipa_bundle.errors import CipaInputError

__all__ = ["SCHEMA_NAME", "local_schema_path", "verify_metadata_offline", "verify_net_in_out_cpu"]

#: The metadata schema this bundle is written against (``schema`` in ``configs/metadata.json``).
SCHEMA_NAME = "meta_schema_20240725.json"


def local_schema_path(name: str = SCHEMA_NAME) -> Path:
    """Path of the schema copy shipped as package data (``cipa_bundle/schemas/<name>``).

    Raises:
        CipaInputError: the package has no copy of that schema (only :data:`SCHEMA_NAME` ships).
    """
    path = Path(__file__).resolve().parent / "schemas" / name
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise CipaInputError(f"{path}: no local copy of the metadata schema {name!r}; shipped schemas: {shipped}")
    return path


def _load_metadata(meta_file: Path) -> dict[str, Any]:
    """The metadata JSON as a dict, with errors that name the file."""
    if not meta_file.is_file():
        raise CipaInputError(f"{meta_file}: metadata file not found (expected a bundle's configs/metadata.json)")
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CipaInputError(f"{meta_file}: not valid JSON ({err}); expected a bundle metadata object") from err
    if not isinstance(metadata, dict):
        raise CipaInputError(f"{meta_file}: top level is {type(metadata).__name__}, expected a JSON object")
    return metadata


def verify_metadata_offline(meta_file: str | Path, schema_file: str | Path | None = None) -> dict[str, Any]:
    """Validate a bundle's metadata with ``monai.bundle.verify_metadata`` against a local schema, without network.

    Besides the JSON-schema validation, two rules the Zoo's CI applies outside the schema are checked: ``version``
    is a key of ``changelog``, and the ``schema`` URL names the same schema file as the local copy (validating a
    ``meta_schema_20220324`` document against the 20240725 schema would prove nothing).

    Args:
        meta_file: the ``metadata.json`` to check.
        schema_file: the schema to validate against; default: the copy shipped in ``cipa_bundle/schemas`` whose
            name is the basename of the metadata's ``schema`` URL.

    Returns:
        The validated metadata.

    Raises:
        CipaInputError: the file is missing or not a JSON object, ``schema``, ``version`` or ``changelog`` is
            missing or inconsistent, or the schema validation fails (the message names the failing field).
    """
    from monai.bundle import verify_metadata

    meta_path = Path(meta_file)
    metadata = _load_metadata(meta_path)
    url = metadata.get("schema")
    if not isinstance(url, str) or not url:
        raise CipaInputError(f"{meta_path}: key 'schema' is {url!r}, expected the URL of the metadata schema")
    schema_name = PurePosixPath(urlparse(url).path).name
    if schema_file is None:
        schema_path = local_schema_path(schema_name)
    else:
        schema_path = Path(schema_file)
        if not schema_path.is_file():
            raise CipaInputError(f"{schema_path}: schema file not found")
        if schema_path.name != schema_name:
            raise CipaInputError(
                f"{meta_path}: key 'schema' names {schema_name!r}, but the schema given is {schema_path.name!r}"
            )
    version = metadata.get("version")
    changelog = metadata.get("changelog")
    if not isinstance(changelog, Mapping) or version not in changelog:
        found = sorted(changelog) if isinstance(changelog, Mapping) else changelog
        raise CipaInputError(
            f"{meta_path}: key 'version' is {version!r} but 'changelog' has {found!r}; the Model Zoo requires the "
            "version to be a key of changelog"
        )
    try:
        # The schema file already exists, so MONAI's download_url returns before touching the network; no hash is
        # passed because the website copy's md5 differs from the release asset's.
        verify_metadata(meta_file=str(meta_path), filepath=str(schema_path))
    except ValueError as err:
        raise CipaInputError(f"{meta_path}: fails {schema_path.name}: {_describe(err)}") from err
    return metadata


def _describe(err: ValueError) -> str:
    """MONAI's one-line validation message, plus the failing key and, for ``anyOf``, the closest sub-error.

    MONAI keeps only the text before "Failed validating", which for a malformed tensor entry is just "... is not
    valid under any of the given schemas"; the jsonschema error it chains says where and why.
    """
    from jsonschema.exceptions import ValidationError, best_match

    text = str(err).split("\n\nFailed validating")[0].strip()
    cause = err.__cause__
    if isinstance(cause, ValidationError):
        if cause.absolute_path:
            text += f" (at key '{'#'.join(str(p) for p in cause.absolute_path)}')"
        # The branches of an anyOf whose type does not match (a tensor dict is "not of type 'number'") say nothing;
        # what remains is the branch the author meant, e.g. "'format' is a required property".
        relevant = [e for e in cause.context or [] if e.validator != "type"]
        closest = best_match(relevant) if relevant else None
        if closest is not None and closest.message not in text:
            text += f": {closest.message}"
    return text


@contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` for the duration, as the Zoo's CI does with the bundle folder."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _as_int_shape(shape: Any) -> tuple[int, ...] | None:
    """``spatial_shape`` as ints, or None when it uses MONAI's symbolic forms (``"16*n"``, ``"*"``)."""
    if isinstance(shape, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        return tuple(shape)
    return None


def verify_net_in_out_cpu(
    bundle_root: str | Path,
    config_file: str | Path | None = None,
    meta_file: str | Path | None = None,
    net_id: str = "network_def",
    **override: Any,
) -> dict[str, Any]:
    """Run ``monai.bundle.verify_net_in_out`` on the CPU, then check the output's spatial shape too.

    The bundle root goes on ``sys.path`` while the check runs, so ``cipa_bundle.*`` targets resolve whether or not
    the package is pip-installed. The network is built twice (once by MONAI, once here for the spatial check), so
    at the default 512x512 size expect two CPU forward passes.

    Args:
        bundle_root: the bundle folder (holding ``configs/``).
        config_file: config defining ``net_id``; default ``<bundle_root>/configs/inference.json``.
        meta_file: default ``<bundle_root>/configs/metadata.json``.
        net_id: id of the network component.
        override: config overrides, as on MONAI's command line, e.g. ``img_size=128`` or
            ``**{"_meta_#network_data_format#inputs#image#spatial_shape": [128, 128]}``. ``bundle_root``
            defaults to the given folder.

    Returns:
        ``{"net_id", "device", "input_shape", "output_shape", "output_dtype", "seconds"}`` (shapes include the batch
        and channel axes; ``seconds`` is the wall time of MONAI's check).

    Raises:
        CipaInputError: a file is missing, the config lacks ``net_id``, or the network's output disagrees with the
            metadata (channels, dtype or spatial shape).
    """
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    root = Path(bundle_root).resolve()
    config_path = Path(config_file) if config_file is not None else root / "configs" / "inference.json"
    meta_path = Path(meta_file) if meta_file is not None else root / "configs" / "metadata.json"
    for path, what in ((config_path, "config"), (meta_path, "metadata")):
        if not path.is_file():
            raise CipaInputError(f"{path}: {what} file not found (bundle root {root})")
    override = {"bundle_root": str(root), **override}

    with _on_sys_path(root):
        start = time.perf_counter()
        try:
            verify_net_in_out(
                net_id=net_id, meta_file=str(meta_path), config_file=str(config_path), device="cpu", **override
            )
        except (KeyError, ValueError) as err:
            raise CipaInputError(f"{config_path} with {meta_path.name}: verify_net_in_out failed: {err}") from err
        seconds = time.perf_counter() - start

        # MONAI checks channels and dtype only; a network that silently resizes would pass, so check the shape.
        parser = ConfigParser()
        parser.read_config(f=str(config_path))
        parser.read_meta(f=str(meta_path))
        for key, value in override.items():
            parser[key] = value
        fmt = parser.get("_meta_#network_data_format")
        inputs, outputs = fmt["inputs"]["image"], fmt["outputs"]["pred"]
        in_shape, out_shape = _as_int_shape(inputs["spatial_shape"]), _as_int_shape(outputs["spatial_shape"])
        if in_shape is None or out_shape is None:
            raise CipaInputError(
                f"{meta_path}: key 'network_data_format' has spatial_shape {inputs['spatial_shape']} -> "
                f"{outputs['spatial_shape']}; this check needs integer shapes"
            )
        net = parser.get_parsed_content(net_id).to("cpu").eval()
        x = torch.rand(1, int(inputs["num_channels"]), *in_shape)
        with torch.no_grad():
            y = net(x)
    if tuple(y.shape[2:]) != out_shape:
        raise CipaInputError(
            f"{config_path}: {net_id} maps input {tuple(x.shape)} to {tuple(y.shape)}, but {meta_path.name} key "
            f"'network_data_format#outputs#pred#spatial_shape' expects {list(out_shape)}"
        )
    return {
        "net_id": net_id,
        "device": "cpu",
        "input_shape": list(x.shape),
        "output_shape": list(y.shape),
        "output_dtype": str(y.dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
    }
