"""Deterministic synthetic PET-CT thorax studies with exactly known truth.

Every structure is an analytic shape in DICOM patient coordinates (LPS, millimetres: ``+x`` = patient left,
``+y`` = posterior, ``+z`` = superior), so the truth does not depend on any grid:

* body (elliptic cylinder), right and left lungs (ellipsoids), liver (its dome shapes the right lung base),
  mediastinum (elliptic cylinder), vertebral bodies (stacked cylinders), heart (FDG-avid myocardium around a
  blood-pool chamber);
* lung tumours of varied radius with a uniform SUV between 3 and 15 (``SUVmax == SUVmean`` when noise and blur are
  off). The first tumour of every case leans on the mediastinum and has the mediastinum's HU, so only PET shows
  its medial border (low CT contrast);
* FDG-avid false-positive traps outside the lungs: a hot mediastinal lymph node (CT-invisible) and a paravertebral
  brown-fat focus.

Both images are voxel averages of the analytic anatomy (partial volume at edges, computed on a ~1 mm sub-voxel
lattice; a voxel wholly inside one structure holds exactly that structure's value). The CT is written as int16 HU
with RescaleSlope 1 and RescaleIntercept -1024, plus a PixelPaddingValue outside the reconstruction circle, slices
numbered head to feet. The PET lies on a coarser grid with a different (longer) z-extent, is optionally blurred by
a Gaussian PSF (FWHM in mm) and given noise whose variance is proportional to the SUV, and is written per vendor:

=========  =======  ===============================================================================================
vendor     Units    decay reference time the converter must find (the timing pitfall this vendor exercises)
=========  =======  ===============================================================================================
siemens    BQML     SeriesTime (= first bed's AcquisitionTime; later beds are acquired later, FrameReferenceTime
                    set per bed); injection in RadiopharmaceuticalStartDateTime and StartTime.
ge         BQML     GE private (0009,100D) ``GEMS_PETD_01`` scan datetime, because SeriesTime is 35 min after
                    acquisition (a post-processed series); injection as StartTime only; FrameReferenceTime 0.
philips    CNTS     none: SUV = counts x (7053,1000) SUV scale factor; (7053,1009) activity-concentration factor
                    also written (ACSF x SUVbw factor == SUVSF up to DS rounding).
=========  =======  ===============================================================================================

``truth.json`` records ``suv_factor`` (SUV per rescaled PET pixel unit), computed here from the *written* tag
values with the QIBA formula (``W[g] / (D_inj 2^(-dt/T_half))``), so a converter can be checked against it without
trusting its own code. The PET pixel values are ``SUV_true / suv_factor``; per-slice slopes map each slice maximum to
32767, so the stored quantisation error is below 0.1 % of any structure's SUV.

``shift=(dx, dy, dz)`` (LPS mm) moves the PET *content* by ``+shift`` as a patient movement between CT and PET
would: the PET value at point ``p`` is the activity of the anatomy at ``p - shift``. Rigid registration of PET onto
CT (fixed = CT) should therefore find the LPS translation ``+shift``.

The same arguments always give the same bytes: all randomness comes from ``numpy.random.default_rng((seed, case))``,
UIDs are derived from the case id and seed, and dates are fixed.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import GaussianSmooth
from pydicom.dataset import Dataset
from pydicom.valuerep import DSfloat, format_number_as_ds
from tqdm import tqdm

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import save_json, save_nifti
from cipa_bundle.io.volume import Volume
from cipa_bundle.synthetic.anatomy import SIZES, Ellipsoid, Grid, PhantomAnatomy, PhantomSize, build_anatomy
from cipa_bundle.synthetic.dicom_writer import derive_uid, format_dt, format_tm, pet_header, write_image_series

__all__ = [
    "VENDORS",
    "make_phantom_case",
    "make_phantom_dataset",
    "parse_shift",
]

Vendor = Literal["siemens", "ge", "philips"]
VENDORS: tuple[str, ...] = ("siemens", "ge", "philips")

F18_HALF_LIFE_S = 6586.2
_PET_NOISE_SD_AT_SUV1 = 0.10  # relative SD at SUV 1; variance proportional to the mean, like counting noise
_CT_NOISE_SD_HU = 12.0
_CT_PADDING_STORED = -2000  # stored value outside the reconstruction circle (HU -3024 with intercept -1024)


# --------------------------------------------------------------------------------------------------- rendering
def _render_labels(anatomy: PhantomAnatomy, grid: Grid, shift: Sequence[float] = (0.0, 0.0, 0.0),
                   desc: str | None = None) -> np.ndarray:
    """``(I, J, K)`` int16 labels at the voxel centres of ``grid``, for content displaced by ``shift`` (LPS mm)."""
    x, y, z = grid.axes()
    x, y, z = x - shift[0], y - shift[1], z - shift[2]
    out = np.empty(grid.shape, dtype=np.int16)
    chunk = max(1, int(2_000_000 // (grid.shape[0] * grid.shape[1])))
    starts = range(0, grid.shape[2], chunk)
    for k0 in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 4, leave=False):
        zk = z[k0:k0 + chunk]
        out[:, :, k0:k0 + chunk] = anatomy.labels(x[:, None, None], y[None, :, None], zk[None, None, :])
    return out


def _subvoxel_offsets(spacing: Sequence[float], step_mm: float = 1.0) -> np.ndarray:
    """``(M, 3)`` offsets (mm) of a regular sub-sample lattice filling one voxel, about ``step_mm`` apart."""
    counts = [max(1, int(math.ceil(float(d) / step_mm))) for d in spacing]
    axes = [((np.arange(n) + 0.5) / n - 0.5) * float(d) for n, d in zip(counts, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels whose 3x3x3 neighbourhood holds more than one label (every voxel a planar edge crosses is caught)."""
    high, low = labels.copy(), labels.copy()
    for axis in range(3):
        for arr, op in ((high, np.maximum), (low, np.minimum)):
            pad = np.pad(arr, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
            n = arr.shape[axis]
            op(np.take(pad, range(0, n), axis=axis), np.take(pad, range(2, n + 2), axis=axis), out=arr)
            op(arr, np.take(pad, range(1, n + 1), axis=axis), out=arr)
    return high != low


def _render_values(anatomy: PhantomAnatomy, grid: Grid, table: np.ndarray, labels: np.ndarray,
                   shift: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-averaged ``table[label]`` (float64 ``(I, J, K)``): the partial-volume image of the analytic anatomy.

    Voxels away from any edge take their centre's value exactly; voxels on an edge average ``table`` over a ~1 mm
    sub-sample lattice. Without this, edges would snap to the voxel grid and two grids of different phase (CT and
    PET) would disagree by up to a voxel, which no registration could undo.
    """
    values = table[labels]
    edge = np.argwhere(_boundary(labels))
    if edge.size == 0:
        return values
    offsets = _subvoxel_offsets(grid.spacing)
    origin = np.asarray(grid.origin) - np.asarray(shift, dtype=np.float64)
    per_batch = max(1, 2_000_000 // len(offsets))
    for start in range(0, len(edge), per_batch):
        ijk = edge[start:start + per_batch]
        centres = origin + ijk * np.asarray(grid.spacing)
        sub = anatomy.labels_at((centres[:, None, :] + offsets[None]).reshape(-1, 3)).reshape(len(ijk), -1)
        values[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = table[sub].mean(axis=1)
    return values


def _first_inside(anatomy: PhantomAnatomy, label: int, candidates: np.ndarray, centre: np.ndarray,
                  lattice: Any) -> list[float] | None:
    """The candidate nearest ``centre`` whose ``lattice(candidates) -> (points (n, m, 3), valid (n,))`` points all
    carry ``label``; ``None`` if there is none (the nearest 16384 candidates are tried)."""
    if len(candidates) == 0:
        return None
    order = np.argsort(np.linalg.norm(candidates - centre, axis=1), kind="stable")[:16384]
    for start in range(0, len(order), 256):
        cand = candidates[order[start:start + 256]]
        points, valid = lattice(cand)
        sub_labels = anatomy.labels_at(points.reshape(-1, 3)).reshape(len(cand), -1)
        ok = valid & np.all(sub_labels == label, axis=1)
        if ok.any():
            return [float(v) for v in cand[int(np.argmax(ok))]]
    return None


def _probes(anatomy: PhantomAnatomy, label: int, ct_labels: np.ndarray, pet_labels: np.ndarray, ct: Grid,
            pet: Grid, centre: np.ndarray) -> dict[str, list[float] | None]:
    """Points (LPS mm) where the noise-free, unblurred, unshifted phantom holds structure ``label``'s exact values.

    "Inside" is checked on the same sub-voxel lattice :func:`_render_values` averages over, so:

    * ``ct_probe_lps_mm``: a CT voxel centre whose whole voxel is inside: the HU there is exact;
    * ``pet_probe_lps_mm``: a PET voxel centre whose whole voxel is inside: the native-grid SUV there is exact;
    * ``probe_lps_mm``: a CT voxel centre whose voxel *and* enclosing 2x2x2 block of PET voxels are inside: HU and
      the SUV resampled (trilinearly) onto the CT grid are both exact there. ``None`` for structures too small to
      hold a 2x2x2 PET block (about 10.5 mm radius with a 4 mm PET).

    Each is the candidate nearest ``centre``.
    """
    ct_sp, ct_or = np.asarray(ct.spacing), np.asarray(ct.origin)
    pet_sp, pet_or, pet_n = np.asarray(pet.spacing), np.asarray(pet.origin), np.asarray(pet.shape)
    ct_sub, pet_sub = _subvoxel_offsets(ct.spacing), _subvoxel_offsets(pet.spacing)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    block_sub = (corners[:, None, :] * pet_sp + pet_sub[None]).reshape(-1, 3)
    ct_cand = ct_or + np.argwhere(ct_labels == label) * ct_sp
    pet_cand = pet_or + np.argwhere(pet_labels == label) * pet_sp

    def own_voxel(offsets: np.ndarray):
        return lambda cand: (cand[:, None, :] + offsets[None], np.ones(len(cand), dtype=bool))

    def with_pet_block(cand: np.ndarray):
        base = np.floor((cand - pet_or) / pet_sp)
        valid = np.all((base >= 0) & (base + 1 <= pet_n - 1), axis=1)
        points = np.concatenate([(base * pet_sp + pet_or)[:, None, :] + block_sub[None],
                                 cand[:, None, :] + ct_sub[None]], axis=1)
        return points, valid

    return {
        "probe_lps_mm": _first_inside(anatomy, label, ct_cand, centre, with_pet_block),
        "ct_probe_lps_mm": _first_inside(anatomy, label, ct_cand, centre, own_voxel(ct_sub)),
        "pet_probe_lps_mm": _first_inside(anatomy, label, pet_cand, centre, own_voxel(pet_sub)),
    }


def _gaussian_blur(values: np.ndarray, spacing: Sequence[float], fwhm_mm: float) -> np.ndarray:
    """Blur ``(I, J, K)`` values with an isotropic Gaussian PSF of ``fwhm_mm`` (MONAI's separable erf kernel)."""

    sigma_mm = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    smooth = GaussianSmooth(sigma=[sigma_mm / float(d) for d in spacing])
    out = smooth(torch.as_tensor(values[None], dtype=torch.float64))
    return np.asarray(out[0], dtype=np.float64)


# --------------------------------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class _Timing:
    """Decay-relevant times and amounts of one case (all written to the PET header)."""

    injection: _dt.datetime
    scan_start: _dt.datetime
    weight_kg: float
    height_m: float
    sex: str
    dose_bq: float
    half_life_s: float


def _draw_timing(rng: np.random.Generator) -> _Timing:
    day = _dt.datetime(2024, 3, 15, 8, 0, 0)
    injection = day + _dt.timedelta(seconds=int(rng.integers(0, 3 * 3600)))
    uptake = int(rng.integers(50 * 60, 75 * 60))
    sex = "M" if rng.random() < 0.5 else "F"
    return _Timing(
        injection=injection,
        scan_start=injection + _dt.timedelta(seconds=uptake),
        weight_kg=float(np.round(rng.uniform(55.0, 95.0), 1)),
        height_m=float(np.round(rng.uniform(1.55, 1.90), 2)),
        sex=sex,
        dose_bq=float(np.round(rng.uniform(250e6, 400e6), -5)),
        half_life_s=F18_HALF_LIFE_S,
    )


def _suv_bw_factor(timing: _Timing) -> tuple[float, float]:
    """QIBA SUVbw factor ``W[g] / (D_inj 2^(-dt/T_half))`` (g/Bq) and dt (s), from the values as written in DS."""

    weight = float(DSfloat(timing.weight_kg, auto_format=True))
    dose = float(DSfloat(timing.dose_bq, auto_format=True))
    half_life = float(DSfloat(timing.half_life_s, auto_format=True))
    decay_s = (timing.scan_start - timing.injection).total_seconds()
    return weight * 1000.0 / (dose * 2.0 ** (-decay_s / half_life)), decay_s


def _frame_average_offset_s(duration_s: float, half_life_s: float) -> float:
    """Time after frame start at which the decaying count rate equals its frame average (s)."""
    lam = math.log(2.0) / half_life_s
    return math.log(lam * duration_s / (1.0 - math.exp(-lam * duration_s))) / lam


def _write_dicom(case_dir: Path, case_id: str, seed: int, vendor: str, size: PhantomSize, timing: _Timing,
                 hu: np.ndarray, pet_values: np.ndarray, pet_units: str,
                 philips_factors: tuple[str, str] | None, pet_bed_jitter_mm: float = 0.0) -> dict[str, str]:
    """Write the CT and PET series; returns their SeriesInstanceUIDs and the shared FrameOfReferenceUID."""


    uid_seed = f"cipa-phantom/{seed}/{case_id}"
    manufacturer = {"siemens": ("SIEMENS", "Biograph mCT"), "ge": ("GE MEDICAL SYSTEMS", "Discovery MI"),
                    "philips": ("Philips Medical Systems", "Vereos")}[vendor]
    ct_time = timing.scan_start - _dt.timedelta(minutes=3)
    common = {"Manufacturer": manufacturer[0], "ManufacturerModelName": manufacturer[1],
              "PatientSex": timing.sex, "PatientAge": "061Y"}

    # CT: stored int16, slope 1, intercept -1024; padding outside the reconstruction circle as many scanners do.
    x, y, _ = size.ct.axes()
    fov_radius = 0.5 * min(size.ct.shape[0] * size.ct.spacing[0], size.ct.shape[1] * size.ct.spacing[1])
    outside = (x[:, None] ** 2 + y[None, :] ** 2) > fov_radius**2
    ct_values = hu.copy()
    ct_values[outside] = _CT_PADDING_STORED - 1024.0
    ct_header = dict(common, PixelPaddingValue=_CT_PADDING_STORED, ConvolutionKernel="B30f")

    def ct_slice(k: int, ds: Dataset) -> None:
        # Scanners number slices head to feet; readers must sort on position, not InstanceNumber.
        ds.InstanceNumber = size.ct.shape[2] - k

    ct_files = write_image_series(
        ct_values, size.ct.affine, case_dir / "dicom" / "ct", "CT", uid_seed=uid_seed, series_number=1,
        series_datetime=ct_time, header=ct_header, per_slice=ct_slice,
    )

    # PET header: units, injection, and the vendor's timing conventions.
    header = pet_header(
        weight_kg=timing.weight_kg, dose_bq=timing.dose_bq, half_life_s=timing.half_life_s,
        injection=timing.injection, injection_time_only=vendor != "siemens", units=pet_units,
        decay_correction="START", height_m=timing.height_m, sex=timing.sex,
        corrected_image=("NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"),
    )
    for key, value in common.items():
        setattr(header, key, value)
    series_time = timing.scan_start + (_dt.timedelta(minutes=35) if vendor == "ge" else _dt.timedelta(0))
    header.SeriesDate, header.SeriesTime = series_time.strftime("%Y%m%d"), format_tm(series_time)
    header.StudyDate, header.StudyTime = ct_time.strftime("%Y%m%d"), format_tm(ct_time)
    if vendor == "ge":
        header.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", format_dt(timing.scan_start))
    if philips_factors is not None:
        block = header.private_block(0x7053, "Philips PET Private Group", create=True)
        block.add_new(0x00, "DS", philips_factors[0])
        block.add_new(0x09, "DS", philips_factors[1])

    z_pet = size.pet.axes()[2]
    duration = size.frame_duration_s
    n_beds = int((z_pet[-1] - z_pet[0]) // size.bed_length_mm) + 1
    bed_offsets = np.random.default_rng((int(seed), 7)).uniform(-1.0, 1.0, n_beds) * float(pet_bed_jitter_mm)
    t_avg = _frame_average_offset_s(duration, timing.half_life_s)

    def pet_slice(k: int, ds: Dataset) -> None:
        # Beds are acquired head to feet; each bed starts one frame duration after the previous one.
        bed = int((z_pet[-1] - z_pet[k]) // size.bed_length_mm)
        bed_start = timing.scan_start + _dt.timedelta(seconds=0 if vendor == "philips" else bed * duration)
        ds.AcquisitionDate, ds.AcquisitionTime = bed_start.strftime("%Y%m%d"), format_tm(bed_start)
        ds.ActualFrameDuration = duration * 1000
        offset_s = (bed_start - timing.scan_start).total_seconds() + t_avg
        ds.FrameReferenceTime = 0 if vendor == "ge" else round(offset_s * 1000.0, 3)
        ds.DecayFactor = round(2.0 ** (offset_s / timing.half_life_s), 6)
        ds.InstanceNumber = size.pet.shape[2] - k
        ds.ImageIndex = size.pet.shape[2] - k
        if pet_bed_jitter_mm:
            # The bed's own start, off the ideal grid, then the scanner's rounding to 0.01 mm.
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, round(z + float(bed_offsets[bed]), 2)]

    pet_files = write_image_series(
        pet_values, size.pet.affine, case_dir / "dicom" / "pet", "PT", uid_seed=uid_seed, series_number=2,
        series_datetime=timing.scan_start, header=header, per_slice=pet_slice,
    )
    del ct_files, pet_files
    return {
        "ct_series_uid": derive_uid(uid_seed, "CT", "1", "series"),
        "pet_series_uid": derive_uid(uid_seed, "PT", "2", "series"),
        "frame_of_reference_uid": derive_uid(uid_seed, "frame-of-reference"),
    }


# --------------------------------------------------------------------------------------------------- public API
def parse_shift(shift: Sequence[float] | str) -> np.ndarray:
    """``(3,)`` float64 shift (mm) from ``"dx,dy,dz"`` or a 3-sequence.

    Raises:
        CipaInputError: not three finite numbers.
    """
    try:
        values = [float(v) for v in shift.split(",")] if isinstance(shift, str) else [float(v) for v in shift]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise CipaInputError(f"phantom: shift={shift!r} must be three finite numbers 'dx,dy,dz' in mm")
    return np.asarray(values, dtype=np.float64)


def make_phantom_case(
    out_dir: str | Path,
    case_id: str = "phantom_000",
    seed: int = 0,
    shift: Sequence[float] | str = (0.0, 0.0, 0.0),
    vendor: str = "siemens",
    size: str = "small",
    noise: bool = True,
    blur: bool = True,
    case_index: int = 0,
    pet_bed_jitter_mm: float = 0.0,
) -> Path:
    """Write one synthetic PET-CT study with its ground truth.

    Layout::

        <out_dir>/<case_id>/dicom/ct/CT_*.dcm      CT series (HU = stored - 1024)
        <out_dir>/<case_id>/dicom/pet/PT_*.dcm     PET series (BQML, or CNTS for philips)
        <out_dir>/<case_id>/label.nii.gz           uint8 tumour mask (1 = any tumour, sampled at CT voxel centres)
        <out_dir>/<case_id>/truth.json             structures (HU, SUV, probe point), tumours, shift, SUV factor

    Args:
        out_dir: parent folder (created if missing).
        case_id: folder name and part of every UID.
        seed: random seed; with ``case_index`` it fixes the tumours, patient weight, dose, times and noise.
        shift: ``(dx, dy, dz)`` (or ``"dx,dy,dz"``) LPS mm displacement of the PET content relative to the CT
            (patient motion).
        vendor: ``"siemens"``, ``"ge"`` or ``"philips"`` (see the module docstring).
        size: ``"small"`` (CT 64x64x32 at 3x3x4 mm, PET 56x56x40 at 4 mm), ``"clinical"`` (a thorax: CT
            512x512x150 at 0.98x0.98x2 mm, PET 128x128x85 at 4 mm) or ``"whole_body"`` (skull to mid-thigh with
            brain, kidney, bowel and bladder uptake: CT 512x512x350 at 0.98x0.98x3 mm, PET 128x128x263 at 4 mm).
        noise: add PET noise (variance proportional to the SUV) and CT noise (12 HU SD). Off: values are exact.
        blur: blur the PET with a Gaussian PSF (``SIZES[size].pet_fwhm_mm`` FWHM).
        case_index: index of the case within a dataset (second component of the RNG seed).
        pet_bed_jitter_mm: write the PET's slice positions as multi-bed scanners do: each bed
            (``SIZES[size].bed_length_mm`` long) computes its positions from its own start, which is off the ideal
            grid by up to this much (seeded), and rounds them to 0.01 mm. The pixel data stay those of the ideal
            grid, so the SUV at each slice is the analytic truth to within the jitter. 0 (default): the exact grid.

    Returns:
        The case folder.

    Raises:
        CipaInputError: unknown vendor or size, or a shift that is not three finite numbers.
    """
    if vendor not in VENDORS:
        raise CipaInputError(f"phantom: vendor={vendor!r} is not supported; expected one of {', '.join(VENDORS)}")
    if size not in SIZES:
        raise CipaInputError(f"phantom: size={size!r} is not supported; expected one of {', '.join(SIZES)}")
    shift_arr = parse_shift(shift)
    final_dir = Path(out_dir) / case_id
    # The case is built in a hidden sibling folder and renamed into place, so a failure never leaves half a study
    # (DICOM readers skip hidden folders).
    case_dir = final_dir.with_name(f".{case_id}.tmp{os.getpid()}")
    shutil.rmtree(case_dir, ignore_errors=True)
    try:
        _write_case(case_dir, case_id, seed, case_index, shift_arr, vendor, size, noise, blur, pet_bed_jitter_mm)
        if final_dir.exists():
            old = final_dir.with_name(f".{case_id}.old{os.getpid()}")
            os.replace(final_dir, old)
            os.replace(case_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(case_dir, final_dir)
    except BaseException:
        shutil.rmtree(case_dir, ignore_errors=True)
        raise
    return final_dir


def _write_case(case_dir: Path, case_id: str, seed: int, case_index: int, shift_arr: np.ndarray, vendor: str,
                size: str, noise: bool, blur: bool, pet_bed_jitter_mm: float = 0.0) -> None:
    """Everything :func:`make_phantom_case` writes, into ``case_dir``."""

    spec = SIZES[size]
    rng = np.random.default_rng((int(seed), int(case_index)))
    anatomy = build_anatomy(rng, spec)
    timing = _draw_timing(rng)
    noise_rng = np.random.default_rng((int(seed), int(case_index), 1))

    ct_labels = _render_labels(anatomy, spec.ct, desc="phantom CT")
    hu = np.rint(_render_values(anatomy, spec.ct, anatomy.table("hu"), ct_labels))
    if noise:
        hu = hu + np.rint(noise_rng.normal(0.0, _CT_NOISE_SD_HU, hu.shape))
    hu = np.clip(hu, -1024.0, 3071.0)

    pet_labels = _render_labels(anatomy, spec.pet, shift_arr, desc="phantom PET")
    suv = _render_values(anatomy, spec.pet, anatomy.table("suv"), pet_labels, shift_arr)
    if blur:
        suv = _gaussian_blur(suv, spec.pet.spacing, spec.pet_fwhm_mm)
    if noise:
        suv = np.clip(suv + noise_rng.normal(0.0, 1.0, suv.shape) * _PET_NOISE_SD_AT_SUV1 * np.sqrt(suv), 0.0, None)

    factor_bw, decay_s = _suv_bw_factor(timing)
    philips_factors = None
    if vendor == "philips":

        # The scanner's counts-to-Bq/ml factor; any positive value works, the SUV path uses only (7053,1000).
        acsf = format_number_as_ds(1.75)
        suvsf = format_number_as_ds(float(acsf) * factor_bw)
        philips_factors = (suvsf, acsf)
        suv_factor, units, path = float(suvsf), "CNTS", "philips_suv_scale_factor"
    else:
        suv_factor, units = factor_bw, "BQML"
        path = "ge_private_scan_datetime" if vendor == "ge" else "series_time"
    uids = _write_dicom(case_dir, case_id, seed, vendor, spec, timing, hu, suv / suv_factor, units, philips_factors,
                        pet_bed_jitter_mm)

    tumour_mask = np.zeros(spec.ct.shape, dtype=np.uint8)
    voxel_ml = float(np.prod(spec.ct.spacing)) / 1000.0
    for tumour in anatomy.tumours:
        mask = ct_labels == anatomy.index(tumour["name"])
        tumour_mask[mask] = 1
        tumour["volume_ml_voxels"] = float(mask.sum()) * voxel_ml
    save_nifti(Volume(tumour_mask, spec.ct.affine), case_dir / "label.nii.gz")

    structures = []
    pet_labels_unshifted = pet_labels if not shift_arr.any() else _render_labels(anatomy, spec.pet)
    for label, structure in enumerate(anatomy.structures, start=1):
        first = structure.shapes[0]
        centre = np.array(first.centre if isinstance(first, Ellipsoid) else (*first.centre_xy, 0.0))
        probes = _probes(anatomy, label, ct_labels, pet_labels_unshifted, spec.ct, spec.pet, centre)
        if probes["ct_probe_lps_mm"] is None or probes["pet_probe_lps_mm"] is None:
            raise RuntimeError(f"phantom structure {structure.name} is thinner than one voxel")  # design guard
        structures.append({"name": structure.name, "kind": structure.kind, "hu": structure.hu,
                           "suv": structure.suv, **probes})
    truth = {
        "case_id": case_id,
        "seed": int(seed),
        "case_index": int(case_index),
        "size": size,
        "vendor": vendor,
        "pet_bed_jitter_mm": float(pet_bed_jitter_mm),
        "noise": bool(noise),
        "blur": bool(blur),
        "pet_fwhm_mm": spec.pet_fwhm_mm if blur else 0.0,
        "shift_lps_mm": [float(v) for v in shift_arr],
        "coordinates": "LPS mm (DICOM patient space); RAS = (-x, -y, z)",
        "probe_note": "with noise, blur and shift off: ct_probe = CT voxel wholly inside (exact HU); pet_probe = "
                      "PET voxel wholly inside (exact native SUV); probe = CT voxel whose voxel and enclosing 2x2x2 "
                      "PET block are inside (exact HU and exact SUV on the CT grid), null if the structure is "
                      "too small",
        "suv_factor": suv_factor,
        "suv_factor_unit": "SUVbw per rescaled PET pixel value (g/ml per Bq/ml for BQML; per count for CNTS)",
        "suv_factor_path": path,
        "suv_bw_factor_bqml": factor_bw,
        "units": units,
        "decay_time_s": decay_s,
        "injection_datetime": timing.injection.isoformat(),
        "scan_start_datetime": timing.scan_start.isoformat(),
        "patient_weight_kg": timing.weight_kg,
        "patient_size_m": timing.height_m,
        "patient_sex": timing.sex,
        "injected_dose_bq": timing.dose_bq,
        "half_life_s": timing.half_life_s,
        "ct": spec.ct.to_dict(),
        "pet": spec.pet.to_dict(),
        "air_hu": -1000.0,
        "structures": structures,
        "tumours": anatomy.tumours,
        **uids,
    }
    save_json(truth, case_dir / "truth.json")


def make_phantom_dataset(
    out_dir: str | Path,
    cases: int = 1,
    seed: int = 0,
    shift: Sequence[float] | str = (0.0, 0.0, 0.0),
    vendor: str = "siemens",
    size: str = "small",
    noise: bool = True,
    blur: bool = True,
) -> list[Path]:
    """Write ``cases`` phantom studies ``phantom_000``, ``phantom_001``... under ``out_dir``.

    Args:
        out_dir: parent folder.
        cases: number of studies (>= 1); case ``n`` uses the random stream ``(seed, n)``.
        seed, shift, vendor, size, noise, blur: as in :func:`make_phantom_case`.

    Returns:
        The case folders, in order.
    """
    if int(cases) < 1:
        raise CipaInputError(f"phantom: cases={cases!r} must be a positive integer")
    return [
        make_phantom_case(out_dir, f"phantom_{n:03d}", seed=seed, shift=shift, vendor=vendor, size=size,
                          noise=noise, blur=blur, case_index=n)
        for n in tqdm(range(int(cases)), desc="phantom cases", disable=int(cases) < 2)
    ]
