"""Shared pytest fixtures and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared_reference() -> Path | None:
    """The project's read-only reference notes (golden fixture, official key table), which are never copied in.

    Looked up from ``$CIPA_SHARED_REFERENCE``, beside the checkout, and at the workplace's fixed location, so a fresh
    clone in a temporary folder still finds them.
    """
    candidates = [os.environ.get("CIPA_SHARED_REFERENCE"), REPO_ROOT.parent / "shared" / "reference", "/work/shared/reference"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cipa_official_state_dict.tsv").is_file():
            return Path(candidate)
    return None


SHARED_REFERENCE = _find_shared_reference()

# Two cores in CI: keep torch from oversubscribing when pytest runs several numba/torch kernels.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if SHARED_REFERENCE is None:
        pytest.skip("reference fixtures not found (set CIPA_SHARED_REFERENCE to the shared/reference folder)")
    return SHARED_REFERENCE
