"""The lung-range inferer on the whole-body phantom: tumours at the apex, at the base beside the liver dome and in the
mediastinum are never skipped; air outside the lungs (trachea, gastric bubble, bowel gas) does not count as lung."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cipa_bundle.synthetic.anatomy import SIZES, Ellipsoid, Grid, Structure, build_anatomy
from cipa_bundle.inference.lung_range import LungSliceInferer, lung_slices
from cipa_bundle.preprocessing.transforms import NormalizeCIPAInput, WindowCT

#: The whole-body phantom's z-range and slice spacing (3 mm, 350 slices) on a coarse in-plane grid for speed.
WHOLE_BODY = SIZES["whole_body"]
GRID = Grid((96, 96, WHOLE_BODY.ct.shape[2]), (5.2, 5.2, 3.0), (-247.0, -247.0, WHOLE_BODY.ct.origin[2]))

#: Tumours where a lung finder could miss them (LPS mm; lungs span z -115..145, the liver dome tops at z = -100).
TUMOURS = {
    # Above the right lung's apex (z = 145), as a superior sulcus tumour reaches.
    "apex": Ellipsoid((-78.0, 5.0, 150.0), (12.0, 12.0, 12.0)),
    # Right base, posterior, sitting on the liver dome and reaching below the lowest aerated slice.
    "base": Ellipsoid((-95.0, 45.0, -112.0), (14.0, 14.0, 14.0)),
    # Subcarinal / hilar, inside the mediastinum.
    "mediastinum": Ellipsoid((0.0, -5.0, 20.0), (15.0, 15.0, 15.0)),
}


@pytest.fixture(scope="module")
def whole_body() -> tuple[MetaTensor, np.ndarray, dict[str, int]]:
    """Network input ``(1, 2, X, Y, Z)`` of the whole-body anatomy with the three tumours, its labels, label ids."""
    anatomy = build_anatomy(np.random.default_rng(0), WHOLE_BODY)
    anatomy.structures = [s for s in anatomy.structures if s.kind != "tumour"] + [
        Structure(f"tumour_{name}", "tumour", (shape,), 30.0, 8.0) for name, shape in TUMOURS.items()
    ]
    x, y, z = GRID.axes()
    labels = anatomy.labels(x[:, None, None], y[None, :, None], z[None, None, :])
    hu = anatomy.table("hu")[labels]
    ct = NormalizeCIPAInput()(WindowCT()(torch.as_tensor(hu[None], dtype=torch.float32)))
    image = torch.cat([ct, torch.zeros_like(ct)])[None]  # PET plays no part in the slice choice
    ids = {name: anatomy.index(f"tumour_{name}") for name in TUMOURS}
    return MetaTensor(image, affine=torch.diag(torch.tensor([*GRID.spacing, 1.0], dtype=torch.float64))), labels, ids


def _zeros(batch: torch.Tensor) -> torch.Tensor:
    return torch.zeros(batch.shape[0], 1, *batch.shape[2:])


def test_tumours_at_the_apex_the_base_and_the_mediastinum_are_run_and_far_slices_are_not(whole_body) -> None:
    image, labels, ids = whole_body
    inferer = LungSliceInferer(roi_size=(96, 96), sw_batch_size=32)
    out = inferer(image, _zeros)
    stats = inferer.last_stats
    assert stats["selection"] == "lung" and stats["slices"] == GRID.shape[2]
    run = np.flatnonzero(out[0, 0].amax(dim=(0, 1)).numpy() == 0)  # skipped slices hold the background logit
    assert len(run) == stats["slices_run"] and np.all(np.diff(run) == 1)
    for name, label in ids.items():
        tumour_slices = np.flatnonzero((labels == label).any(axis=(0, 1)))
        assert tumour_slices.size > 0 and np.isin(tumour_slices, run).all(), name
    # The range is the lungs (z -115..145 mm) plus 20 mm each way, on the 3 mm grid: nothing of the head or pelvis.
    z = GRID.axes()[2]
    first_lung, last_lung = stats["lung_slices"]
    assert z[first_lung] == pytest.approx(-115.0, abs=6.0) and z[last_lung] == pytest.approx(145.0, abs=3.0)
    assert z[run[0]] <= z[first_lung] - 20.0 and z[run[-1]] >= z[last_lung] + 20.0
    assert z[run[0]] > -165.0 and z[run[-1]] < 195.0
    assert stats["slices_run"] < 0.4 * stats["slices"]


def test_air_outside_the_lungs_is_not_lung(whole_body) -> None:
    image, labels, _ = whole_body
    threshold = LungSliceInferer(roi_size=(96, 96)).network_threshold
    ct = image[0, 0].numpy()
    z = GRID.axes()[2]
    below_lungs = z < -125.0  # abdomen and pelvis: a gastric bubble and bowel gas, no lung
    assert lung_slices(ct[:, :, below_lungs], GRID.spacing, threshold=threshold).size == 0
    above_lungs = z > 160.0  # neck and head: the trachea, no lung
    assert lung_slices(ct[:, :, above_lungs], GRID.spacing, threshold=threshold).size == 0
    # ...while a lower bar lets the 50 ml gastric bubble count: the threshold is what keeps it out.
    assert lung_slices(ct[:, :, below_lungs], GRID.spacing, threshold=threshold, min_lung_ml=20.0).size > 0


def test_without_lungs_or_with_all_slices_every_body_slice_runs(whole_body) -> None:
    image, _, _ = whole_body
    z = GRID.axes()[2]
    abdomen = image[..., z < -125.0]
    inferer = LungSliceInferer(roi_size=(96, 96), sw_batch_size=64)
    inferer(abdomen, _zeros)
    body_only = LungSliceInferer(roi_size=(96, 96), sw_batch_size=64, lung_only=False)
    first, stop = body_only.body_range(abdomen)
    assert inferer.last_stats["selection"] in ("body", "all") and inferer.last_stats["slices_run"] == stop - first
    body_only(image, _zeros)
    assert body_only.last_stats["selection"] in ("body", "all")
    assert body_only.last_stats["slices_run"] == np.subtract(*body_only.body_range(image)[::-1])
    assert body_only.last_stats["slices_run"] > 0.9 * GRID.shape[2]
