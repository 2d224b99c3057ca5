"""``convert`` and ``predict`` on three DICOM input variants, with real files written by the project's own writers.

1. **Different grids**: CT with 2.0 mm slices, PET with 3.27 mm slices over a shorter z range and a coarser (4.07 mm)
   in-plane spacing. The SUV on the CT grid is checked against a trilinear interpolation computed here, from the
   PET grid as the phantom defined it (not from any affine the converter produced), and against the phantom's truth.
2. **Oblique acquisition**: CT and PET ImageOrientationPatient rotated 15 degrees about the patient's left-right
   axis, slices stacked along the normal (no gantry tilt). The study is rendered here from the phantom's analytic
   anatomy at the voxel centres of the rotated grids, so every expected value (HU, SUV, SUV on the CT grid, the
   physical place of each mask voxel) is known without the code under test.
3. **Compressed transfer syntaxes**: RLE Lossless and JPEG-LS Lossless (pydicom's encoders), JPEG 2000 Lossless and
   JPEG Lossless Process 14 SV1, the usual lossless syntax of PACS exports (encoded by the GDCM inside ITK's wheel,
   since pydicom has no encoder for them); each compressed copy of a study must convert to the same NIfTI bytes as
   the original. A syntax without an installed decoder (HTJ2K) must be refused naming the file, the tag and the
   missing package.

``predict`` runs the bundle's own inference workflow. The tiny random CIPA of ``test_inference`` takes minutes per
study on two CPU cores and its masks mean nothing, so the workflow runs an *oracle* network instead, through the
workflow's ordinary ``network_def``/``checkpoint`` overrides: a 1x1 convolution loaded from a real checkpoint whose
logit is ``100 * (x_pet - t)``, i.e. "SUV on the CT grid above 2.5". Its correct mask is known analytically, so the
mask and the DICOM SEG can be checked for their physical place (the tiny CIPA checkpoint is still what ``predict``
reads the architecture from).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.uid
import pytest
import torch

from cipa_bundle.synthetic.anatomy import SIZES, _centred_grid, build_anatomy
from cipa_bundle.synthetic.phantom import make_phantom_case
from cipa_bundle.io.dicom import UnsupportedImageError
from cipa_bundle.synthetic.dicom_writer import pet_header, write_image_series
from cipa_bundle.io.volume import LPS_TO_RAS
from cipa_bundle.preprocessing.convert import convert_study
from tests.test_convert import _copy_series
from tests.test_inference import NO_POSTPROCESSING, tiny_checkpoint  # noqa: F401 - fixture, used by name

#: SUV threshold of the oracle network.
ORACLE_SUV = 2.5
#: The oracle: one 1x1 convolution over [CT, PET] channels (the workflow feeds ``v * 3.2 - 1.6``, v = SUV / 10).
ORACLE_NET = {"_target_": "torch.nn.Conv2d", "in_channels": 2, "out_channels": 1, "kernel_size": 1}
NIFTI_OUTPUTS = ("ct", "suv", "suv_ct", "image")


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def oracle_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conv = torch.nn.Conv2d(2, 1, 1)
    threshold = ORACLE_SUV / 10.0 * 3.2 - 1.6
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 1, 0, 0] = 100.0
        conv.bias.fill_(-100.0 * threshold)
    path = tmp_path_factory.mktemp("oracle") / "oracle.pt"
    torch.save(conv.state_dict(), path)
    return path


def _predict_oracle(study: Path, out: Path, tiny: Path, oracle: Path, **kwargs) -> dict[str, Path]:  # noqa: ANN003
    from cipa_bundle.inference.predict import predict

    overrides = {**NO_POSTPROCESSING, "network_def": ORACLE_NET, "checkpoint": str(oracle)}
    return predict(study, out, tiny, overrides=overrides, device="cpu", progress=False, **kwargs)


def _trilinear(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``volume`` at continuous voxel indices ``(..., 3)``: trilinear, 0 beyond half a voxel outside the grid, and
    the edge voxels' values within that half-voxel border (the field of view of a grid of voxel centres)."""
    n = np.array(volume.shape)
    inside = np.all((index >= -0.5) & (index <= n - 0.5), axis=-1)
    index = np.clip(index, 0, n - 1)
    base = np.minimum(np.floor(index).astype(int), n - 2)
    frac = index - base
    out = np.zeros(index.shape[:-1])
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([frac[..., a] if corner[a] else 1 - frac[..., a] for a in range(3)], axis=0)
        out += weight * volume[base[..., 0] + corner[0], base[..., 1] + corner[1], base[..., 2] + corner[2]]
    return np.where(inside, out, 0.0)


def _voxel_lps(lps_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``(I, J, K, 3)`` LPS mm of every voxel centre of a grid given by its voxel-to-LPS matrix."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ lps_affine[:3, :3].T + lps_affine[:3, 3]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b))


def _half_max_centroid(points: np.ndarray, values: np.ndarray, centre: np.ndarray, radius: float,
                       level: float) -> np.ndarray:
    """Centroid (LPS mm) of the points within ``radius + 6`` mm of ``centre`` whose value exceeds ``level``."""
    near = np.linalg.norm(points - centre, axis=-1) <= radius + 6.0
    return points[near & (values > level)].mean(axis=0)


def _seg_points(seg_path: Path) -> np.ndarray:
    """LPS mm of every set pixel of a DICOM SEG, from the SEG's own plane geometry (position per frame, shared
    orientation and pixel spacing), without the CT or any NIfTI affine."""
    seg = pydicom.dcmread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    d_row, d_col = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    points = []
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ipp = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        rows, cols = np.nonzero(frame)
        points.append(ipp + cols[:, None] * d_col * iop[:3] + rows[:, None] * d_row * iop[3:])
    return np.concatenate(points)


def _nifti_points(path: Path) -> np.ndarray:
    """LPS mm of every non-zero voxel of a NIfTI mask (its own affine)."""
    img = nib.load(path)
    ras = nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0))
    return ras * [-1.0, -1.0, 1.0]


def _max_nearest_mm(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (mm) from a point of ``a`` to its nearest point of ``b`` (equal sets give 0)."""
    worst = 0.0
    for start in range(0, len(a), 512):
        d = np.linalg.norm(a[start:start + 512, None, :] - b[None, :, :], axis=-1)
        worst = max(worst, float(d.min(axis=1).max()))
    return worst


# --------------------------------------------------------------------------------------------- 1. different grids
#: CT 64 x 64 x 70 at 3 x 3 x 2 mm (z -69..69); PET 52 x 52 x 30 at 4.07 x 4.07 x 3.27 mm, z -59.4..35.4: shorter
#: than the CT at both ends, coarser in-plane, and no voxel centre shared with the CT.
#: The "small" phantom with these two grids.
GRID_SIZE = dataclasses.replace(
    SIZES["small"],
    name="test_variant_grids",
    ct=_centred_grid((64, 64, 70), (3.0, 3.0, 2.0), (0.0, 0.0, 0.0)),
    pet=_centred_grid((52, 52, 30), (4.07, 4.07, 3.27), (0.7, -1.1, -12.0)),
)


def _grid_lps(grid) -> np.ndarray:  # noqa: ANN001
    """Voxel-to-LPS matrix of an axis-aligned phantom grid, built here from its spacing and origin."""
    lps = np.eye(4)
    lps[:3, :3] = np.diag(grid.spacing)
    lps[:3, 3] = grid.origin
    return lps


@pytest.fixture(scope="module")
def grid_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, Path]]:
    root = tmp_path_factory.mktemp("grids")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SIZES, GRID_SIZE.name, GRID_SIZE)
        case = make_phantom_case(root, "grids", seed=5, size=GRID_SIZE.name, noise=False, blur=False)
    converted = convert_study(case / "dicom", root / "converted", progress=False)
    return case, json.loads((case / "truth.json").read_text()), converted


def test_pet_on_a_coarser_shorter_grid_is_resampled_at_ct_positions(grid_case) -> None:  # noqa: ANN001
    case, truth, out = grid_case
    ct_img, suv_img, suv_ct_img = (nib.load(out[k]) for k in ("ct", "suv", "suv_ct"))
    ct_lps, pet_lps = _grid_lps(GRID_SIZE.ct), _grid_lps(GRID_SIZE.pet)
    assert ct_img.shape == suv_ct_img.shape == GRID_SIZE.ct.shape and suv_img.shape == GRID_SIZE.pet.shape
    np.testing.assert_allclose(ct_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-4)
    np.testing.assert_allclose(suv_ct_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-4)
    np.testing.assert_allclose(suv_img.affine, LPS_TO_RAS @ pet_lps, atol=1e-4)  # DS rounding of 4.07 / 3.27

    # Every CT voxel centre, as a continuous PET index through the PET grid's own definition.
    ct_points = _voxel_lps(ct_lps, GRID_SIZE.ct.shape)
    pet_index = np.linalg.solve(pet_lps, np.concatenate([ct_points, np.ones((*ct_points.shape[:3], 1))],
                                                        axis=-1).reshape(-1, 4).T).T[:, :3]
    pet_index = pet_index.reshape(*ct_points.shape[:3], 3)
    suv = np.asarray(suv_img.dataobj, dtype=np.float64)
    suv_ct = np.asarray(suv_ct_img.dataobj, dtype=np.float64)
    expected = _trilinear(suv, pet_index)
    assert np.abs(suv_ct - expected).max() < 1e-4  # measured 5e-7 (float32)

    # The PET covers CT slices 4..53 only (z -61..37 mm): the slices beyond its field of view are exactly 0.
    z = ct_points[0, 0, :, 2]
    covered = (z >= GRID_SIZE.pet.axes()[2][0] - 3.27 / 2) & (z <= GRID_SIZE.pet.axes()[2][-1] + 3.27 / 2)
    assert covered.sum() == 50 and not covered[:4].any() and not covered[54:].any()
    assert not suv_ct[..., ~covered].any() and (suv_ct[..., covered] > 0).any(axis=(0, 1)).all()

    # Against the truth: exact HU and SUV at the phantom's probes, and each tumour where the phantom put it.
    ct = np.asarray(ct_img.dataobj)
    for structure in truth["structures"]:
        if structure["probe_lps_mm"] is not None:
            x, y, zz = structure["probe_lps_mm"]
            ijk = tuple(int(v) for v in np.rint(np.linalg.solve(ct_lps, [x, y, zz, 1.0])[:3]))
            assert ct[ijk] == structure["hu"], structure["name"]
            assert suv_ct[ijk] == pytest.approx(structure["suv"], rel=5e-3), structure["name"]
    flat_points, flat_suv = ct_points.reshape(-1, 3), suv_ct.reshape(-1)
    for tumour in truth["tumours"]:
        centre = np.array(tumour["centre_lps_mm"])
        centroid = _half_max_centroid(flat_points, flat_suv, centre, tumour["radius_mm"], 0.5 * tumour["suv_max"])
        assert np.linalg.norm(centroid - centre) < 0.75, (tumour["name"], centroid - centre)  # measured <= 0.3 mm


def test_predict_on_different_grids_puts_mask_and_seg_on_the_ct(  # noqa: ANN001
    grid_case, tiny_checkpoint, oracle_checkpoint, tmp_path: Path
) -> None:
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.io.seg import read_dicom_seg_mask

    case, truth, converted = grid_case
    written = _predict_oracle(case / "dicom", tmp_path / "pred", tiny_checkpoint, oracle_checkpoint)
    mask_img = nib.load(written["mask"])
    mask = np.asarray(mask_img.dataobj).astype(bool)
    ct_affine = nib.load(converted["ct"]).affine
    assert mask.shape == GRID_SIZE.ct.shape and np.allclose(mask_img.affine, ct_affine, atol=1e-5)
    # The oracle thresholds the SUV on the CT grid: the mask is exactly that, voxel for voxel.
    suv_ct = np.asarray(nib.load(converted["suv_ct"]).dataobj)
    assert np.array_equal(mask, suv_ct > ORACLE_SUV)
    # ... and the truth's hot structures at the CT voxel centres (SUV > 2.5: myocardium, node, brown fat, tumours),
    # within the PET's field of view. The analytic anatomy is the one the case was drawn from (make_phantom_case
    # draws it first from the (seed, 0) stream).
    anatomy = build_anatomy(np.random.default_rng((5, 0)), GRID_SIZE)
    assert [t["centre_lps_mm"] for t in anatomy.tumours] == [t["centre_lps_mm"] for t in truth["tumours"]]
    points = _voxel_lps(_grid_lps(GRID_SIZE.ct), mask.shape)
    hot = anatomy.table("suv")[anatomy.labels_at(points.reshape(-1, 3))].reshape(mask.shape) > ORACLE_SUV
    hot[..., :4] = hot[..., 54:] = False  # outside the PET
    dice = _dice(mask, hot)
    assert dice > 0.85, dice  # measured 0.868 (partial volume and the PET's 4 mm voxels blur the edges)

    # The SEG references the CT slices and reads back as the mask; its own plane geometry puts every set pixel on
    # a mask voxel centre.
    ct = read_series(case / "dicom" / "ct", modality="CT")
    assert np.array_equal(read_dicom_seg_mask(written["seg"], ct.datasets), mask.astype(np.uint8))
    seg_points, mask_points = _seg_points(written["seg"]), _nifti_points(written["mask"])
    assert len(seg_points) == len(mask_points) == mask.sum()
    assert _max_nearest_mm(seg_points, mask_points) < 1e-3
    for tumour in truth["tumours"]:
        centre = np.array(tumour["centre_lps_mm"])
        near = np.linalg.norm(seg_points - centre, axis=1) <= tumour["radius_mm"] + 6
        assert np.linalg.norm(seg_points[near].mean(axis=0) - centre) < 1.0, tumour["name"]  # measured <= 0.6 mm


# --------------------------------------------------------------------------------------------- 2. oblique
OBLIQUE_DEG = 15.0
#: CT 64 x 64 x 40 at 3 x 3 x 3.5 mm and PET 48 x 48 x 36 at 4.5 x 4.5 x 4.25 mm, both rotated about the patient's
#: left-right axis: rows along +x, columns and the slice normal turned in the y-z plane.
OBLIQUE_CT = ((64, 64, 40), (3.0, 3.0, 3.5), (0.0, 0.0, 0.0))
OBLIQUE_PET = ((48, 48, 36), (4.5, 4.5, 4.25), (0.7, -1.1, -2.3))
OBLIQUE_SEED = 8


def _oblique_lps(shape, spacing, centre, degrees: float = OBLIQUE_DEG) -> np.ndarray:  # noqa: ANN001
    """Voxel-to-LPS matrix of a grid rotated ``degrees`` about x, centred on ``centre``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # columns: row, column, normal directions
    lps = np.eye(4)
    lps[:3, :3] = rotation * np.asarray(spacing)
    lps[:3, 3] = np.asarray(centre) - lps[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return lps


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An oblique PET-CT study rendered from the phantom anatomy at the voxel centres (no partial volume)."""
    root = tmp_path_factory.mktemp("oblique")
    anatomy = build_anatomy(np.random.default_rng((OBLIQUE_SEED, 0)), SIZES["small"])
    ct_lps, pet_lps = _oblique_lps(*OBLIQUE_CT), _oblique_lps(*OBLIQUE_PET)
    for tumour in anatomy.tumours:  # design guard: every tumour lies wholly inside both oblique grids
        for lps, shape in ((ct_lps, OBLIQUE_CT[0]), (pet_lps, OBLIQUE_PET[0])):
            index = np.linalg.solve(lps, [*tumour["centre_lps_mm"], 1.0])[:3]
            margin = tumour["radius_mm"] / np.linalg.norm(lps[:3, :3], axis=0) + 1
            assert np.all(index - margin >= 0) and np.all(index + margin <= np.asarray(shape) - 1), tumour
    ct_labels = anatomy.labels_at(_voxel_lps(ct_lps, OBLIQUE_CT[0]).reshape(-1, 3)).reshape(OBLIQUE_CT[0])
    pet_labels = anatomy.labels_at(_voxel_lps(pet_lps, OBLIQUE_PET[0]).reshape(-1, 3)).reshape(OBLIQUE_PET[0])
    hu, pet_suv = anatomy.table("hu")[ct_labels], anatomy.table("suv")[pet_labels]
    # pet_header's defaults: 70 kg, 370 MBq F-18 injected at 09:00; the series (decay reference) starts at 10:00.
    header = pet_header()
    decay_s = (dt.datetime(2024, 1, 1, 10, 0, 0) - dt.datetime(2024, 1, 1, 9, 0, 0)).total_seconds()
    bqml_per_suv = 3.7e8 * 2.0 ** (-decay_s / 6586.2) / 70000.0
    study = root / "study"
    seed = "cipa-test/oblique"
    write_image_series(hu, LPS_TO_RAS @ ct_lps, study / "ct", "CT", uid_seed=seed,
                       series_datetime=dt.datetime(2024, 1, 1, 9, 57, 0))
    write_image_series(pet_suv * bqml_per_suv, LPS_TO_RAS @ pet_lps, study / "pet", "PT", uid_seed=seed,
                       series_datetime=dt.datetime(2024, 1, 1, 10, 0, 0), header=header)
    converted = convert_study(study, root / "converted", progress=False)
    # The SUV the CT grid should get: the analytic PET values interpolated here at each CT voxel centre's PET index.
    ct_points = _voxel_lps(ct_lps, OBLIQUE_CT[0])
    homogeneous = np.concatenate([ct_points, np.ones((*ct_points.shape[:3], 1))], axis=-1)
    suv_ct = _trilinear(pet_suv, (homogeneous @ np.linalg.inv(pet_lps).T)[..., :3])
    return {"study": study, "anatomy": anatomy, "ct_lps": ct_lps, "pet_lps": pet_lps, "hu": hu,
            "pet_suv": pet_suv, "ct_points": ct_points, "suv_ct": suv_ct, "converted": converted}


def test_oblique_study_converts_with_its_oblique_affine(oblique_case) -> None:  # noqa: ANN001
    out, ct_lps, pet_lps = oblique_case["converted"], oblique_case["ct_lps"], oblique_case["pet_lps"]
    ct_img, suv_img, suv_ct_img, image_img = (nib.load(out[k]) for k in NIFTI_OUTPUTS)
    # Accepted, with the rotation in the affine (not snapped to the nearest axes).
    np.testing.assert_allclose(ct_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-5)
    np.testing.assert_allclose(suv_ct_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-5)
    np.testing.assert_allclose(image_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-5)
    np.testing.assert_allclose(suv_img.affine, LPS_TO_RAS @ pet_lps, atol=1e-5)
    # Every voxel holds the anatomy's value at the physical point the affine names: any misplacement would move
    # the edges of the 20 structures by at least one voxel somewhere.
    assert np.array_equal(np.asarray(ct_img.dataobj), oblique_case["hu"])
    suv = np.asarray(suv_img.dataobj, dtype=np.float64)
    assert np.abs(suv - oblique_case["pet_suv"]).max() < 1e-3  # per-slice slope quantisation of 15 / 32767
    # SUV on the CT grid against the analytic PET interpolated here (oblique_case["suv_ct"]).
    suv_ct = np.asarray(suv_ct_img.dataobj, dtype=np.float64)
    assert np.abs(suv_ct - oblique_case["suv_ct"]).max() < 2e-3  # measured 2.0e-4: the PET quantisation only
    ct_points = oblique_case["ct_points"]
    for tumour in oblique_case["anatomy"].tumours:
        centre = np.array(tumour["centre_lps_mm"])
        centroid = _half_max_centroid(ct_points.reshape(-1, 3), suv_ct.reshape(-1), centre, tumour["radius_mm"],
                                      0.5 * tumour["suv_max"])
        # measured <= 0.85 mm: the PET is sampled at 4.5 mm voxel centres without partial volume
        assert np.linalg.norm(centroid - centre) < 1.5, (tumour["name"], centroid - centre)


def test_oblique_predict_mask_and_seg_land_at_the_right_place(  # noqa: ANN001
    oblique_case, tiny_checkpoint, oracle_checkpoint, tmp_path: Path
) -> None:
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.io.seg import read_dicom_seg_mask

    study, ct_lps, anatomy = oblique_case["study"], oblique_case["ct_lps"], oblique_case["anatomy"]
    written = _predict_oracle(study, tmp_path / "pred", tiny_checkpoint, oracle_checkpoint)
    mask_img = nib.load(written["mask"])
    mask = np.asarray(mask_img.dataobj).astype(bool)
    np.testing.assert_allclose(mask_img.affine, LPS_TO_RAS @ ct_lps, atol=1e-5)
    suv_ct = np.asarray(nib.load(oblique_case["converted"]["suv_ct"]).dataobj)
    assert np.array_equal(mask, suv_ct > ORACLE_SUV)  # the workflow's reorientation undone exactly
    # The mask computed here from the anatomy alone: exact wherever the expected SUV is not within 1e-3 of 2.5.
    expected = oblique_case["suv_ct"]
    clear = np.abs(expected - ORACLE_SUV) > 1e-3
    assert np.array_equal(mask[clear], expected[clear] > ORACLE_SUV) and clear.mean() > 0.999
    # Against the analytic hot region at the CT voxel centres (the PET's 4.5 mm sampling blurs the edges).
    points = oblique_case["ct_points"]
    hot = anatomy.table("suv")[anatomy.labels_at(points.reshape(-1, 3))].reshape(mask.shape) > ORACLE_SUV
    assert _dice(mask, hot) > 0.85, _dice(mask, hot)  # measured 0.885
    # The SEG: same mask through its CT references, and the same physical points through its own geometry.
    ct = read_series(study / "ct", modality="CT")
    assert np.array_equal(read_dicom_seg_mask(written["seg"], ct.datasets), mask.astype(np.uint8))
    seg = pydicom.dcmread(written["seg"])
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop], np.concatenate([ct_lps[:3, 0] / 3.0, ct_lps[:3, 1] / 3.0]),
                               atol=1e-6)
    seg_points = _seg_points(written["seg"])
    expected_points = points[mask]
    assert len(seg_points) == len(expected_points)
    assert _max_nearest_mm(seg_points, expected_points) < 1e-3
    for tumour in anatomy.tumours:
        centre = np.array(tumour["centre_lps_mm"])
        near = np.linalg.norm(seg_points - centre, axis=1) <= tumour["radius_mm"] + 6
        # measured <= 1.1 mm, the same bias as the mask computed here: 4.5 mm PET voxels without partial volume
        assert np.linalg.norm(seg_points[near].mean(axis=0) - centre) < 1.5, tumour["name"]


# --------------------------------------------------------------------------------------------- 3. compressed
def _gdcm_encoded(ds: pydicom.Dataset, compressor: str) -> pydicom.Dataset:
    """``ds`` with its pixels encoded by the GDCM in ITK's wheel (``"JPEG2000"``: JPEG 2000 Lossless, ``"JPEG"``:
    JPEG Lossless Process 14 SV1), the encapsulated fragments moved into ``ds`` unchanged."""
    import itk

    stored = np.ascontiguousarray(ds.pixel_array)
    image = itk.image_from_array(stored)
    io = itk.GDCMImageIO.New()
    io.SetCompressor(compressor)
    io.UseCompressionOn()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "encoded.dcm")
        writer = itk.ImageFileWriter[type(image)].New(Input=image, FileName=path, ImageIO=io)
        writer.SetUseCompression(True)
        writer.Update()
        encoded = pydicom.dcmread(path)
    assert (encoded.Rows, encoded.Columns, encoded.BitsStored, encoded.PixelRepresentation) == (
        ds.Rows, ds.Columns, ds.BitsStored, ds.PixelRepresentation)
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


_ENCODERS = {
    "rle": (pydicom.uid.RLELossless, lambda ds: ds.compress(pydicom.uid.RLELossless)),
    "jpegls": (pydicom.uid.JPEGLSLossless, lambda ds: ds.compress(pydicom.uid.JPEGLSLossless)),
    "j2k": (pydicom.uid.JPEG2000Lossless, lambda ds: _gdcm_encoded(ds, "JPEG2000")),
    "jpeg_lossless": (pydicom.uid.JPEGLosslessSV1, lambda ds: _gdcm_encoded(ds, "JPEG")),
}


def _compressed_copy(source: Path, target: Path, encode) -> None:  # noqa: ANN001
    """The CT and PET series of ``source`` (a phantom study's ``dicom`` folder) as new series under ``target``."""
    for series in ("ct", "pet"):
        _copy_series(source / series, target / series, f"{target.name}/{series}", encode)


@pytest.fixture(scope="module")
def plain_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A noisy phantom study (every stored value varies, padding included) and its conversion."""
    root = tmp_path_factory.mktemp("plain")
    case = make_phantom_case(root, "plain", seed=21, noise=True, blur=False)
    return case / "dicom", convert_study(case / "dicom", root / "converted", progress=False)


@pytest.mark.parametrize("syntax", sorted(_ENCODERS))
def test_compressed_copy_converts_to_identical_nifti(plain_case, syntax: str, tmp_path: Path) -> None:  # noqa: ANN001
    study, reference = plain_case
    uid, encode = _ENCODERS[syntax]
    copy = tmp_path / syntax
    _compressed_copy(study, copy, encode)
    files = sorted(copy.rglob("*.dcm"))
    assert len(files) == 72 and {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
                                 for f in files} == {uid}
    # Every one of these decodes with this package's dependencies (python-gdcm for JPEG Lossless; pydicom, pyjpegls,
    # Pillow or python-gdcm for the others).
    out = convert_study(copy, tmp_path / "out", progress=False)
    for key in NIFTI_OUTPUTS:
        assert gzip.decompress(out[key].read_bytes()) == gzip.decompress(reference[key].read_bytes()), key


def test_predict_on_a_study_with_mixed_compression(  # noqa: ANN001
    plain_case, tiny_checkpoint, oracle_checkpoint, tmp_path: Path
) -> None:
    """CT slices in turn RLE, JPEG-LS and uncompressed, PET in JPEG-LS: the same mask and SEG frames as the original."""
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.io.seg import read_dicom_seg_mask

    study, _ = plain_case
    mixed = tmp_path / "mixed"
    counter = iter(range(10**6))

    def ct_encode(ds: pydicom.Dataset) -> None:
        n = next(counter) % 3
        if n < 2:
            ds.compress((pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless)[n])

    _copy_series(study / "ct", mixed / "ct", "mixed/ct", ct_encode)
    _copy_series(study / "pet", mixed / "pet", "mixed/pet", lambda ds: ds.compress(pydicom.uid.JPEGLSLossless))
    reference = _predict_oracle(study, tmp_path / "reference", tiny_checkpoint, oracle_checkpoint)
    written = _predict_oracle(mixed, tmp_path / "mixed_out", tiny_checkpoint, oracle_checkpoint)
    mask = np.asarray(nib.load(written["mask"]).dataobj)
    assert mask.any() and np.array_equal(mask, np.asarray(nib.load(reference["mask"]).dataobj))
    ct = read_series(mixed / "ct", modality="CT")
    assert np.array_equal(read_dicom_seg_mask(written["seg"], ct.datasets), mask)
    assert _max_nearest_mm(_seg_points(written["seg"]), _seg_points(reference["seg"])) < 1e-6


def test_a_transfer_syntax_without_decoder_names_the_file_and_what_is_missing(  # noqa: ANN001
    plain_case, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pydicom.pixels import get_decoder

    from cipa_bundle.cli import main

    # HTJ2K has no decoder among this package's dependencies (pydicom needs pylibjpeg-openjpeg for it). The files
    # carry a JPEG 2000 codestream labelled HTJ2K: nothing is decoded, the missing decoder is found first.
    syntax = pydicom.uid.HTJ2KLossless
    if get_decoder(syntax).is_available:
        pytest.skip("an HTJ2K decoder (pylibjpeg-openjpeg) is installed here")

    def relabelled(ds: pydicom.Dataset) -> None:
        _gdcm_encoded(ds, "JPEG2000")
        ds.file_meta.TransferSyntaxUID = syntax

    study, _ = plain_case
    copy = tmp_path / "htj2k"
    _compressed_copy(study, copy, relabelled)
    assert pydicom.dcmread(copy / "ct" / "CT_0000.dcm").file_meta.TransferSyntaxUID == syntax
    out = tmp_path / "out"
    with pytest.raises(UnsupportedImageError) as info:
        convert_study(copy, out, progress=False)
    message = str(info.value)
    assert message.startswith(f"{copy / 'ct' / 'CT_0000.dcm'}: PixelData (7FE0,0010) cannot be decoded")
    assert "High-Throughput JPEG 2000" in message and "pylibjpeg-openjpeg" in message
    assert not out.exists()
    # The command line: exit code 2 and the same message on one line.
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(copy), str(out)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cipa-bundle: error:")]
    assert len(lines) == 1 and "CT_0000.dcm: PixelData (7FE0,0010)" in lines[0] and "pylibjpeg-openjpeg" in lines[0]
    assert not out.exists()
