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


def _find_shared_real() -> Path | None:
    """The 8 real PET-CT patients (``shared/real``, CC BY 3.0; see its README), read in place and never copied."""
    candidates = [os.environ.get("CIPA_SHARED_REAL"), REPO_ROOT.parent / "shared" / "real", "/work/shared/real"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "sts").is_dir():
            return Path(candidate)
    return None


SHARED_REAL = _find_shared_real()

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
