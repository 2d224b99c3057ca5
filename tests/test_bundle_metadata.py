"""Bundle metadata, logging config, model card and the Model Zoo checks (``cipa_bundle.zoo``).

The Zoo's CI runs ``verify_metadata`` (schema download + jsonschema) and ``verify_net_in_out`` (random input through
``network_def``); both run here offline and on the CPU, at the tiny network configuration.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cipa_bundle.errors import CipaInputError
from cipa_bundle.zoo import SCHEMA_NAME, local_schema_path, verify_metadata_offline, verify_net_in_out_cpu

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
META = CONFIGS / "metadata.json"
TOP_META = REPO_ROOT / "metadata.json"
README = REPO_ROOT / "docs" / "README.md"

#: The tiny network used by every forward pass here: 128 px, width 30, one block per stage.
TINY = {"img_size": 128, "network_width": 30, "encoder_depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]}
TINY_META = {
    "_meta_#network_data_format#inputs#image#spatial_shape": [128, 128],
    "_meta_#network_data_format#outputs#pred#spatial_shape": [128, 128],
}


def _meta() -> dict:
    return json.loads(META.read_text(encoding="utf-8"))


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails, so 'offline' is proven rather than assumed."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline check")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------------------- the two metadata files
def test_top_level_metadata_is_the_same_document() -> None:
    assert TOP_META.read_bytes() == META.read_bytes()
    if TOP_META.is_symlink():
        # A relative target keeps the link valid in any clone; git stores it as a symlink (mode 120000).
        target = os.readlink(TOP_META)
        assert not os.path.isabs(target), target
        assert (REPO_ROOT / target).resolve() == META.resolve()


def test_bundle_json_files_are_zoo_pretty_formatted() -> None:
    """The Zoo's pre-commit ``pretty-format-json --autofix --no-sort-keys --indent=4`` would leave them unchanged."""
    files = sorted(CONFIGS.glob("*.json")) + sorted((REPO_ROOT / "cipa_bundle" / "schemas").glob("*.json"))
    assert META in files and len(files) >= 2
    unformatted = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        # pre-commit-hooks' formatter: json.dumps(indent=4, ensure_ascii=True), key order kept, one final newline.
        if text != json.dumps(json.loads(text), indent=4) + "\n":
            unformatted.append(path.name)
    assert not unformatted, f"not 4-space pretty-printed JSON: {unformatted}"


def test_metadata_describes_the_network_contract() -> None:
    meta = _meta()
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["channel_def"]) == (2, {"0": "CT", "1": "PET"})
    assert image["spatial_shape"] == [512, 512] and image["value_range"] == [-1.6, 1.6]
    # One sigmoid channel; channel_def gives the label values of the thresholded mask (0 background, 1 tumour),
    # which is how MONAI Label reads it (issue 4 wrote {"0": "tumor"}, which MONAI Label turns into tumor = 0).
    assert (pred["num_channels"], pred["channel_def"]) == (1, {"0": "background", "1": "tumor"})
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert post["channel_def"] == pred["channel_def"]
    assert pred["spatial_shape"] == image["spatial_shape"] and pred["dtype"] == image["dtype"] == "float32"
    assert "logit" in meta["pred_classes"] and "sigmoid" in meta["pred_classes"]
    assert meta["version"] in meta["changelog"]
    assert "not" in meta["intended_use"] and "diagnos" in meta["intended_use"]
    assert any("2503.17261" in ref for ref in meta["references"])
    # The input range is what NormalizeCIPAInput produces from [0, 1]: the one place that owns those constants.
    from cipa_bundle.preprocessing.transforms import CIPA_INPUT_SCALE, CIPA_INPUT_SHIFT

    assert image["value_range"] == [CIPA_INPUT_SHIFT, CIPA_INPUT_SHIFT + CIPA_INPUT_SCALE]


def test_metadata_versions_match_the_environment() -> None:
    import monai
    import numpy
    import torch

    meta = _meta()

    def minor(version: str) -> str:
        return ".".join(version.split("+")[0].split(".")[:2])

    assert minor(meta["monai_version"]) == minor(monai.__version__)
    assert minor(meta["pytorch_version"]) == minor(torch.__version__)
    assert int(meta["numpy_version"].split(".")[0]) == int(numpy.__version__.split(".")[0])
    # The Zoo's CI pip-installs name==version for each entry: every name must be a real, installed distribution.
    for name in meta["required_packages_version"]:
        assert importlib.metadata.version(name), name


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_configs_agree_with_metadata_on_the_slice_size(config: str) -> None:
    doc = json.loads((CONFIGS / config).read_text(encoding="utf-8"))
    shape = _meta()["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert doc["img_size"] == shape[0] == shape[1]


# --------------------------------------------------------------------------------------------------- verify_metadata
def test_local_schema_is_the_published_copy(shared_reference: Path) -> None:
    assert local_schema_path().read_bytes() == (shared_reference / SCHEMA_NAME).read_bytes()
    assert _meta()["schema"].endswith("/" + SCHEMA_NAME)


@pytest.mark.parametrize("meta_file", [META, TOP_META], ids=["configs", "top_level"])
def test_verify_metadata_passes_offline(meta_file: Path, no_network: None) -> None:
    assert verify_metadata_offline(meta_file)["version"] == _meta()["version"]


def test_verify_metadata_documented_command_needs_no_download(no_network: None) -> None:
    """The model card's ``python -m monai.bundle verify_metadata --filepath <shipped schema>``, called in-process:
    with the network refused it still passes, because the schema file already exists, and the copy is untouched."""
    from monai.bundle import verify_metadata

    before = local_schema_path().read_bytes()
    verify_metadata(meta_file=str(META), filepath=str(local_schema_path()))
    assert local_schema_path().read_bytes() == before


REQUIRED = json.loads(local_schema_path().read_text(encoding="utf-8"))["required"]


@pytest.mark.parametrize("field", REQUIRED)
def test_verify_metadata_fails_without_a_required_field(field: str, tmp_path: Path, no_network: None) -> None:
    meta = _meta()
    del meta[field]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta, indent=4))
    with pytest.raises(CipaInputError, match=re.escape(field)) as err:
        verify_metadata_offline(broken)
    assert str(broken) in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "0.2.0"}, "changelog"),
        ({"schema": "https://example.invalid/meta_schema_20220324.json"}, "meta_schema_20220324.json"),
        ({"network_data_format": {"inputs": {}}}, "outputs"),
        ({"network_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {}}}, "'format' is a required"),
        ({"references": "not a list"}, "array"),
    ],
    ids=["version_not_in_changelog", "other_schema", "no_outputs", "incomplete_tensor", "wrong_type"],
)
def test_verify_metadata_rejects_inconsistent_metadata(change: dict, message: str, tmp_path: Path) -> None:
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({**_meta(), **change}, indent=4))
    with pytest.raises(CipaInputError, match=re.escape(message)):
        verify_metadata_offline(broken)


def test_verify_metadata_names_a_missing_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match="not found"):
        verify_metadata_offline(tmp_path / "absent.json")
    bad = tmp_path / "metadata.json"
    bad.write_text('{"version": "0.1.0",')
    with pytest.raises(CipaInputError, match="not valid JSON"):
        verify_metadata_offline(bad)


# ------------------------------------------------------------------------------------------------- verify_net_in_out
def test_verify_net_in_out_on_cpu_at_the_tiny_configuration() -> None:
    result = verify_net_in_out_cpu(REPO_ROOT, **TINY, **TINY_META)
    assert result["input_shape"] == [1, 2, 128, 128]
    assert result["output_shape"] == [1, 1, 128, 128]
    assert result["output_dtype"] == "float32"


def test_verify_net_in_out_through_monai_cli(tmp_path: Path) -> None:
    """The Zoo's command line, launched from another folder with the bundle root on PYTHONPATH."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
           "--meta_file", str(META), "--config_file", str(CONFIGS / "inference.json"), "--device", "cpu",
           "--bundle_root", str(REPO_ROOT)]
    for key, value in {**TINY, **TINY_META}.items():
        cmd += [f"--{key}", json.dumps(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data shape of network is verified with no error" in done.stdout + done.stderr


def _mini_bundle(root: Path) -> Path:
    """A bundle whose inference config holds only ``network_def`` (the ids train.json and inference.json use)."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_bytes(META.read_bytes())
    config = {**TINY, "network_def": {"_target_": "cipa_bundle.networks.CIPA", "img_size": "@img_size",
                                      "dims": "@network_width", "depths": "@encoder_depths",
                                      "decoder_depths": "@decoder_depths"}}
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    return root


def test_verify_net_in_out_rejects_a_wrong_channel_count(tmp_path: Path) -> None:
    bundle = _mini_bundle(tmp_path / "bundle")
    with pytest.raises(CipaInputError, match="output channel number"):
        verify_net_in_out_cpu(bundle, **TINY_META, **{"_meta_#network_data_format#outputs#pred#num_channels": 2})


def test_verify_net_in_out_checks_the_spatial_shape_monai_ignores(tmp_path: Path) -> None:
    bundle = _mini_bundle(tmp_path / "bundle")
    wrong = {**TINY_META, "_meta_#network_data_format#outputs#pred#spatial_shape": [64, 64]}
    with pytest.raises(CipaInputError, match=r"expects \[64, 64\]"):
        verify_net_in_out_cpu(bundle, **wrong)


def test_verify_net_in_out_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match="inference.json: config file not found"):
        verify_net_in_out_cpu(tmp_path)


# ------------------------------------------------------------------------------------------------------ logging.conf
@pytest.fixture()
def restore_logging() -> object:
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    yield
    for handler in root.handlers[:]:
        if handler not in saved[1]:
            root.removeHandler(handler)
    for handler in saved[1]:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(saved[0])


def test_logging_conf_is_accepted_by_monai(tmp_path: Path, restore_logging: object) -> None:
    from monai.bundle import ConfigWorkflow

    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "empty.json"
    config.write_text("{}")
    ConfigWorkflow(config_file=str(config), meta_file=str(META), logging_file=str(CONFIGS / "logging.conf"),
                   workflow_type=None)
    root = logging.getLogger()
    assert root.level == logging.INFO
    console = [h for h in root.handlers if type(h) is logging.StreamHandler and h.stream is sys.stdout]
    assert len(console) == 1 and console[0].formatter is not None
    assert "%(levelname)s" in console[0].formatter._fmt


def test_monai_really_screens_logging_files(tmp_path: Path, restore_logging: object) -> None:
    """The acceptance above means something: the same file with a non-logging class is refused."""
    from monai.bundle import ConfigWorkflow

    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "empty.json"
    config.write_text("{}")
    tampered = tmp_path / "logging.conf"
    tampered.write_text((CONFIGS / "logging.conf").read_text().replace("class=StreamHandler", "class=os.system"))
    with pytest.raises(ValueError, match="refusing to apply logging config"):
        ConfigWorkflow(config_file=str(config), meta_file=str(META), logging_file=str(tampered), workflow_type=None)


# ------------------------------------------------------------------------------------------ large files and the card
def test_large_files_lists_the_weights() -> None:
    doc = yaml.safe_load((REPO_ROOT / "large_files.yml").read_text(encoding="utf-8"))
    entries = {entry["path"]: entry for entry in doc["large_files"]}
    assert "models/model.pt" in entries
    for path, entry in entries.items():
        assert not os.path.isabs(path) and ".." not in Path(path).parts
        assert entry["url"].startswith("https://")
        assert entry.get("hash_type", "md5") in {"md5", "sha1", "sha256", "sha512"}


def _cli_verbs() -> list[str]:
    from cipa_bundle.cli import Commands

    return [name for name, _ in inspect.getmembers(Commands, inspect.isfunction) if not name.startswith("_")]


def test_model_card_names_every_workflow_command() -> None:
    card = README.read_text(encoding="utf-8")
    required = [
        "python -m monai.bundle run training --config_file configs/train.json",
        "--config_file configs/inference.json",
        "\"['configs/train.json','configs/evaluate.json']\"",
        "torchrun --standalone --nnodes=1 --nproc_per_node=",
        "\"['configs/train.json','configs/multi_gpu_train.json']\"",
        "\"['configs/train.json','configs/demo.json']\"",
        "verify_metadata",
        "verify_net_in_out",
    ]
    missing = [command for command in required if command not in card]
    # Every config the bundle ships and every CLI verb is documented, including ones added after this test.
    missing += [f"configs/{p.name}" for p in sorted(CONFIGS.glob("*.json")) if f"configs/{p.name}" not in card]
    for verb in _cli_verbs():
        if f"cipa-bundle {verb.replace('_', '-')}" not in card and f"cipa-bundle {verb}" not in card:
            missing.append(f"cipa-bundle {verb.replace('_', '-')}")
    assert not missing, f"docs/README.md does not mention: {missing}"


def test_model_card_has_the_zoo_sections_and_paper_numbers() -> None:
    card = README.read_text(encoding="utf-8")
    headings = {line.lstrip("#").strip().lower() for line in card.splitlines() if line.startswith("#")}
    for section in ["authors", "tags", "model description", "data", "preprocessing", "training", "metrics",
                    "performance", "limitations", "citation", "references"]:
        assert any(h.startswith(section) for h in headings), section
    for number in ["63.81", "77.91", "89.01", "17.74"]:  # the paper's PCLT20K test scores (anchors, table 1)
        assert number in card
    assert "no trained weights" in card.lower()
    assert (REPO_ROOT / "docs" / "data_license.txt").stat().st_size > 0
