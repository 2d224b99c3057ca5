"""Real PET-CT studies through ``convert``: the 8 Soft-tissue-Sarcoma patients of ``../shared/real`` (TCIA, via the
IBSI validation set, CC BY 3.0; credited in docs/README.md), checked against the reference files MIRP wrote.

The PET there is already SUVbw (Units GML), so reading it is the whole SUV path for these files; a GE Discovery ST
CT with 3.27 mm slices. Tests skip with a reason when the data folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cipa_bundle.preprocessing.convert import convert_study

PATIENTS = [f"STS_{n:03d}" for n in range(2, 10)]


@pytest.mark.parametrize("patient", PATIENTS)
def test_real_study_converts_to_the_reference_suv_and_ct_grid(patient: str, shared_real: Path, tmp_path: Path) -> None:
    study = shared_real / "sts" / patient
    if not study.is_dir():
        pytest.skip(f"{study} is absent")
    paths = convert_study(study, tmp_path / "out", progress=False)

    # The PET read as SUV equals MIRP's SUV image voxel for voxel (float32 rounding of the stored values x slope).
    suv, reference = nib.load(paths["suv"]), nib.load(study / "nifti" / "PET_image.nii.gz")
    assert suv.shape == reference.shape
    np.testing.assert_allclose(suv.affine, reference.affine, atol=1e-3, rtol=0)
    ours, theirs = np.asarray(suv.dataobj, dtype=np.float64), np.asarray(reference.dataobj, dtype=np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5 * float(np.abs(theirs).max()))

    # The CT lands on the grid of the expert contour's voxel mask (MIRP rasterised it on the CT grid).
    ct, mask = nib.load(paths["ct"]), nib.load(study / "nifti" / "CT_mask.nii.gz")
    assert ct.shape == mask.shape[:3]
    np.testing.assert_allclose(ct.affine, mask.affine, atol=1e-3, rtol=0)
    provenance = json.loads(Path(paths["provenance"]).read_text())
    assert provenance["pet"]["slice_position_max_deviation_mm"] < 0.01  # MIRP re-wrote exact positions
