"""Lesion statistics, overlay/MIP figures and report.json, against hand-computed numbers.

The main phantom is two boxes on a grid of 1 x 1.25 x 2 mm voxels (2.5 mm^3 = 0.0025 ml each) with an SUV that is
linear in the voxel index, SUV = 1 + 0.1 i + 0.2 j + 0.5 k, so each box's SUVmean is the SUV at its centre and its
SUVmax the SUV at its far corner; every expected number below is worked out by hand in the comments.
"""

from __future__ import annotations

import json
from collections import deque
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cipa_bundle
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.volume import Volume
from cipa_bundle.report import (
    AXIAL_PNG,
    CORONAL_MIP_PNG,
    MIN_DISPLAY_PIXELS,
    build_report,
    label_lesions,
    lesion_statistics,
    max_extent_axial_slice,
    render_axial_overlay,
    render_coronal_mip,
    write_overlays,
    write_report,
)

SHAPE = (40, 32, 24)
# i runs to the patient's left (RAS x decreases), j posterior, k superior: the usual DICOM axial storage.
AFFINE = np.array([[-1.0, 0, 0, 100.0], [0, -1.25, 0, 50.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
BOX_A = (slice(2, 22), slice(3, 19), slice(4, 14))  # 20 x 16 x 10 = 3200 voxels
BOX_B = (slice(30, 38), slice(22, 30), slice(15, 20))  # 8 x 8 x 5 = 320 voxels


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[BOX_A] = 1
    mask[BOX_B] = 1
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    suv = 1.0 + 0.1 * i + 0.2 * j + 0.5 * k
    return mask, suv.astype(np.float32)


# --------------------------------------------------------------------------------------------- components
def _bfs_components(mask: np.ndarray) -> list[frozenset]:
    """Reference labelling: breadth-first flood fill over the 26 neighbours, one voxel at a time."""
    seen = np.zeros(mask.shape, dtype=bool)
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), set()
        while queue:
            voxel = queue.popleft()
            members.add(tuple(int(v) for v in voxel))
            for off in offsets:
                nb = tuple(v + o for v, o in zip(voxel, off))
                if all(0 <= n < s for n, s in zip(nb, mask.shape)) and mask[nb] and not seen[nb]:
                    seen[nb] = True
                    queue.append(nb)
        components.append(frozenset(members))
    return components


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_flood_fill(seed: int) -> None:
    mask = np.random.default_rng(seed).random((8, 9, 10)) < 0.25
    labels, n = label_lesions(mask)
    expected = _bfs_components(mask)
    assert n == len(expected)
    got = [frozenset(tuple(int(v) for v in p) for p in zip(*np.nonzero(labels == m))) for m in range(1, n + 1)]
    assert set(got) == set(expected)
    sizes = [len(c) for c in got]
    assert sizes == sorted(sizes, reverse=True)  # label 1 is the largest


def test_corner_contact_joins_and_a_gap_separates() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touch at a corner only: one lesion with 26-connectivity
    mask[3, 3, 3] = True  # one empty voxel away from (1, 1, 1): a second lesion
    labels, n = label_lesions(mask)
    assert n == 2
    assert labels[0, 0, 0] == labels[1, 1, 1] == 1 and labels[3, 3, 3] == 2
    assert label_lesions(np.zeros((3, 3, 3)))[1] == 0


# --------------------------------------------------------------------------------------------- statistics
def test_two_boxes_volume_suv_centroid() -> None:
    mask, suv = _phantom()
    lesions = lesion_statistics(Volume(mask, AFFINE), Volume(suv, AFFINE))
    assert [lesion.index for lesion in lesions] == [1, 2]
    a, b = lesions
    # Voxel volume 1 * 1.25 * 2 = 2.5 mm^3: A = 3200 * 2.5 = 8000 mm^3 = 8 ml, B = 320 * 2.5 = 800 mm^3 = 0.8 ml.
    assert (a.voxel_count, b.voxel_count) == (3200, 320)
    assert a.volume_ml == pytest.approx(8.0, rel=1e-12)
    assert b.volume_ml == pytest.approx(0.8, rel=1e-12)
    # A: index centre (11.5, 10.5, 8.5) -> SUVmean 1 + 1.15 + 2.1 + 4.25 = 8.5; far corner (21, 18, 13) -> 13.2.
    assert a.suv_mean == pytest.approx(8.5, rel=1e-6)
    assert a.suv_max == pytest.approx(13.2, rel=1e-6)
    assert a.tlg == pytest.approx(8.5 * 8.0, rel=1e-6)
    # B: centre (33.5, 25.5, 17) -> 1 + 3.35 + 5.1 + 8.5 = 17.95; corner (37, 29, 19) -> 1 + 3.7 + 5.8 + 9.5 = 20.
    assert b.suv_mean == pytest.approx(17.95, rel=1e-6)
    assert b.suv_max == pytest.approx(20.0, rel=1e-6)
    # RAS centroid: x = 100 - i, y = 50 - 1.25 j, z = -30 + 2 k.
    assert a.centroid_ras_mm == pytest.approx((88.5, 36.875, -13.0))
    assert b.centroid_ras_mm == pytest.approx((66.5, 18.125, 4.0))
    assert a.bbox_ijk == ((2, 3, 4), (21, 18, 13))
    assert b.bbox_ijk == ((30, 22, 15), (37, 29, 19))


def test_statistics_without_suv_and_grid_mismatch() -> None:
    mask, suv = _phantom()
    (a, b) = lesion_statistics(Volume(mask, AFFINE))
    assert a.suv_max is None and a.suv_mean is None and a.tlg is None and b.volume_ml == pytest.approx(0.8)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(CipaInputError, match="suv is not on the mask's grid .*affines differ"):
        lesion_statistics(Volume(mask, AFFINE), Volume(suv, shifted))
    with pytest.raises(CipaInputError, match="suv is not on the mask's grid .*spatial shape"):
        lesion_statistics(Volume(mask, AFFINE), Volume(suv[:-1], AFFINE))
    assert lesion_statistics(Volume(np.zeros(SHAPE, np.uint8), AFFINE)) == []


# --------------------------------------------------------------------------------------------- orientation
def _flip_axis(array: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with ``axis`` reversed: new index n' = N - 1 - n."""
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = array.shape[axis] - 1
    return np.flip(array, axis=axis).copy(), affine @ flip


def _swap_axes(array: np.ndarray, affine: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with voxel axes ``a`` and ``b`` exchanged."""
    perm = np.eye(4)
    perm[[a, b]] = perm[[b, a]]
    return np.swapaxes(array, a, b).copy(), affine @ perm


def _storage_variants(*arrays: np.ndarray) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Several voxel orders of one physical scene: ``name -> (arrays, affine)``."""
    variants = {"standard": (list(arrays), AFFINE)}
    flipped, aff = [], AFFINE
    for arr in arrays:  # i to the patient's right, j anterior, k towards the feet
        out, aff = arr, AFFINE
        for axis in range(3):
            out, aff = _flip_axis(out, aff, axis)
        flipped.append(out)
    variants["all_flipped"] = (flipped, aff)
    swapped = []
    for arr in arrays:  # the axial axis stored second: (i, k, j)
        out, aff = _swap_axes(arr, AFFINE, 1, 2)
        swapped.append(out)
    variants["axial_axis_second"] = (swapped, aff)
    return variants


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT with a gradient (so any flip changes the picture), PET with a hot box, mask = that box.

    The box is at small i (patient right, since x = 100 - i), small j (anterior) and high k (superior).
    """
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    ct = (-1000.0 + 20.0 * i + 7.0 * j + 3.0 * k).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:9, 4:10, 15:20] = 1
    mask[3:12, 4:12, 17] = 1  # slice k = 17 has the largest extent: 9 x 8 = 72 voxels vs 36 on the others
    pet = (1.0 + 0.05 * i).astype(np.float32)
    pet[mask == 1] = 12.0
    return ct, pet, mask


def test_max_extent_slice_in_each_storage_order() -> None:
    ct, pet, mask = _scene()
    assert max_extent_axial_slice(Volume(mask, AFFINE)) == 17
    variants = _storage_variants(mask)
    (flipped,), aff = variants["all_flipped"]
    assert max_extent_axial_slice(Volume(flipped, aff)) == SHAPE[2] - 1 - 17
    (swapped,), aff = variants["axial_axis_second"]
    assert max_extent_axial_slice(Volume(swapped, aff)) == 17  # now an index along voxel axis 1


def _mask_pixels(rgb: np.ndarray, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(np.all(rgb == np.array(colour, dtype=np.uint8), axis=-1))
    assert rows.size > 0, f"no {colour} contour drawn"
    return rows, cols


def test_figures_follow_radiological_orientation_whatever_the_storage_order() -> None:
    ct, pet, mask = _scene()
    images = {}
    for name, ((ct_v, pet_v, mask_v), aff) in _storage_variants(ct, pet, mask).items():
        axial, index = render_axial_overlay(Volume(ct_v, aff), Volume(pet_v, aff), Volume(mask_v, aff), pixel_mm=1.0)
        mip = render_coronal_mip(Volume(pet_v, aff), Volume(mask_v, aff), pixel_mm=1.0)
        images[name] = (axial, mip)
    for name in images:  # the same physical scene must give the same pictures
        np.testing.assert_array_equal(images[name][0], images["standard"][0], err_msg=name)
        np.testing.assert_array_equal(images[name][1], images["standard"][1], err_msg=name)

    axial, mip = images["standard"]
    # Axial: 40 columns at 1 mm, 32 rows at 1.25 mm -> 40 x 40 square-mm pixels.
    assert axial.shape == (40, 40, 3)
    rows, cols = _mask_pixels(axial, (0, 255, 0))
    assert cols.max() < 20, "a lesion on the patient's right must appear on the image's left"
    assert rows.max() < 20, "an anterior lesion must appear in the upper half"
    # CT gradient +20 HU per i (towards patient left): brighter to the image's right, away from the lesion.
    assert axial[30, 35].astype(int).sum() > axial[30, 1].astype(int).sum()
    # Coronal MIP: 40 columns at 1 mm, 24 slices at 2 mm -> 40 wide, 48 high.
    assert mip.shape == (48, 40, 3)
    rows, cols = _mask_pixels(mip, (255, 0, 0))
    assert cols.max() < 20, "patient right on the image's left"
    assert rows.max() < 24, "a superior lesion must appear in the upper half (head up)"


def test_default_figures_are_enlarged_to_a_readable_size() -> None:
    ct, pet, mask = _scene()
    volumes = Volume(ct, AFFINE), Volume(pet, AFFINE), Volume(mask, AFFINE)
    native, _ = render_axial_overlay(*volumes, pixel_mm=1.0)
    enlarged, _ = render_axial_overlay(*volumes)
    assert native.shape == (40, 40, 3) and enlarged.shape == (MIN_DISPLAY_PIXELS, MIN_DISPLAY_PIXELS, 3)
    # The contour lands on the same anatomy: its bounding box scales by 512 / 40 (within a native pixel).
    scale = MIN_DISPLAY_PIXELS / 40
    (r0, c0), (r1, c1) = (_mask_pixels(img, (0, 255, 0)) for img in (native, enlarged))
    for small, large in ((r0, r1), (c0, c1)):
        assert abs(large.min() - small.min() * scale) <= scale and abs(large.max() - (small.max() + 1) * scale) <= scale
    # An explicit pixel size is used as given; a volume already 512 or more voxels across keeps its resolution.
    assert render_coronal_mip(Volume(pet, AFFINE), Volume(mask, AFFINE), pixel_mm=0.05).shape[:2] == (960, 800)
    wide = np.zeros((600, 4, 10), dtype=np.float32)
    assert render_coronal_mip(Volume(wide, AFFINE), Volume(wide, AFFINE)).shape[:2] == (20, 600)


def test_write_overlays_and_report(tmp_path: Path) -> None:
    mask, suv = _phantom()
    ct = np.full(SHAPE, -800.0, dtype=np.float32)
    ct[mask == 1] = 20.0
    paths = write_overlays(tmp_path, Volume(ct, AFFINE), Volume(suv, AFFINE), Volume(mask, AFFINE))
    # Box A covers k = 4..13 with 320 voxels per slice, box B k = 15..19 with 64: the first of A's slices wins.
    assert paths["axial_slice_index"] == 4
    with Image.open(paths["axial"]) as image:
        # 40 mm x 40 mm shown with at least MIN_DISPLAY_PIXELS (512) on the long side.
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (512, 512))
    with Image.open(paths["coronal_mip"]) as image:
        # 40 mm wide, 48 mm high: 512 / 48 px per mm -> 426.7 -> 427 px wide.
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (427, 512))
    assert {p.name for p in tmp_path.iterdir()} == {AXIAL_PNG, CORONAL_MIP_PNG}

    lesions = lesion_statistics(Volume(mask, AFFINE), Volume(suv, AFFINE))
    provenance = {"kind": "bw", "factor": np.float64(2.5e-4), "reference_time": "SeriesTime"}
    out = write_report(
        tmp_path,
        lesions,
        device="cpu",
        timings={"inference": 1.5, "outputs": 0.25},
        suv_provenance=provenance,
        voxel_volume_ml=0.0025,
        extra={"inputs": {"ct": tmp_path / "ct"}},
    )
    assert out == tmp_path / "report.json"
    assert {p.name for p in tmp_path.iterdir()} == {AXIAL_PNG, CORONAL_MIP_PNG, "report.json"}
    report = json.loads(out.read_text())
    assert report["versions"]["cipa_bundle"] == cipa_bundle.__version__
    assert report["versions"]["numpy"] == np.__version__
    assert report["versions"]["monai"] == version("monai")
    assert report["versions"]["torch"] == version("torch")
    assert report["device"] == "cpu"
    assert report["timings_s"] == {"inference": 1.5, "outputs": 0.25}
    assert report["suv_provenance"] == {"kind": "bw", "factor": 2.5e-4, "reference_time": "SeriesTime"}
    assert report["tumor_count"] == 2
    assert report["total_volume_ml"] == pytest.approx(8.8)
    assert report["total_lesion_glycolysis"] == pytest.approx(8.5 * 8.0 + 17.95 * 0.8, rel=1e-6)
    assert report["inputs"] == {"ct": str(tmp_path / "ct")}
    first = report["lesions"][0]
    assert first["volume_ml"] == pytest.approx(8.0) and first["suv_max"] == pytest.approx(13.2, rel=1e-6)
    assert first["centroid_ras_mm"] == pytest.approx([88.5, 36.875, -13.0])


def test_report_refuses_bad_timings_and_key_clashes() -> None:
    with pytest.raises(ValueError, match="timings"):
        build_report([], device="cpu", timings={"inference": float("nan")})
    with pytest.raises(ValueError, match="overwrite"):
        build_report([], device="cpu", timings={}, extra={"lesions": []})
    empty = build_report([], device="cpu", timings={})
    assert empty["tumor_count"] == 0 and empty["total_volume_ml"] == 0.0 and empty["lesions"] == []
