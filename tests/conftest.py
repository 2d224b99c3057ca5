"""Shared pytest fixtures and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared(name: str, marker: str) -> Path | None:
    """``shared/<name>``, read in place and never copied: found from ``$CIPA_SHARED_<NAME>`` or beside the checkout
    (``../shared/<name>``), by ``marker`` inside. ``.ci/run`` sets the variables for a clone elsewhere.

    ``reference`` holds the read-only notes (golden fixture, official key table); ``real`` the 8 real PET-CT patients
    (CC BY 3.0; see its README).
    """
    candidates = [os.environ.get(f"CIPA_SHARED_{name.upper()}"), REPO_ROOT.parent / "shared" / name]
    for candidate in candidates:
        if candidate and (Path(candidate) / marker).exists():
            return Path(candidate)
    return None


SHARED_REFERENCE = _find_shared("reference", "cipa_official_state_dict.tsv")
SHARED_REAL = _find_shared("real", "sts")

# Two cores in CI: keep torch from oversubscribing when pytest runs several numba/torch kernels.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if SHARED_REFERENCE is None:
        pytest.skip("reference fixtures not found (set CIPA_SHARED_REFERENCE to the shared/reference folder)")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def shared_real() -> Path:
    if SHARED_REAL is None:
        pytest.skip("real PET-CT data not found: ../shared/real (or $CIPA_SHARED_REAL) holds the STS patients")
    return SHARED_REAL
