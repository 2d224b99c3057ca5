"""The phantom's anatomy: analytic shapes in DICOM patient coordinates (LPS mm), the CT and PET grids of each
phantom size, and the random draw of one case's organs and tumours.

Nothing here touches voxels or files: :mod:`cipa_bundle.synthetic.phantom` rasterises this anatomy and writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cipa_bundle.io.volume import LPS_TO_RAS

__all__ = [
    "AXIAL_DIRECTION",
    "Ellipsoid",
    "EllipticCylinder",
    "Grid",
    "PhantomAnatomy",
    "PhantomSize",
    "SIZES",
    "Structure",
    "build_anatomy",
]

#: Axial slices, head-first supine: i along +x (patient left), j along +y (posterior), k along +z (superior).
AXIAL_DIRECTION = np.eye(3)


# --------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid: ``sum(((p - centre) / semi_axes)**2) <= 1`` (LPS mm)."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask for broadcastable coordinate arrays ``x``, ``y``, ``z`` (mm)."""
        (cx, cy, cz), (a, b, c) = self.centre, self.semi_axes
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0

    def z_range(self) -> tuple[float, float]:
        """Inclusive z interval (mm) outside which the shape is empty."""
        return self.centre[2] - self.semi_axes[2], self.centre[2] + self.semi_axes[2]


@dataclass(frozen=True)
class EllipticCylinder:
    """Elliptic cylinder along z: ``((x-cx)/a)**2 + ((y-cy)/b)**2 <= 1`` and ``z0 <= z <= z1`` (LPS mm)."""

    centre_xy: tuple[float, float]
    semi_xy: tuple[float, float]
    z0: float = -math.inf
    z1: float = math.inf

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask for broadcastable coordinate arrays ``x``, ``y``, ``z`` (mm)."""
        (cx, cy), (a, b) = self.centre_xy, self.semi_xy
        inside = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        return inside & (z >= self.z0) & (z <= self.z1)

    def z_range(self) -> tuple[float, float]:
        """Inclusive z interval (mm) outside which the shape is empty."""
        return self.z0, self.z1


Shape = Ellipsoid | EllipticCylinder


@dataclass(frozen=True)
class Structure:
    """One labelled tissue: the union of ``shapes`` minus whatever later structures paint over it.

    Args:
        name: unique name (``"lung_right"``, ``"tumour_1"``...).
        kind: ``"anatomy"``, ``"tumour"`` or ``"trap"`` (FDG-avid but not tumour).
        shapes: analytic shapes whose union is the structure.
        hu: CT number (HU) inside.
        suv: true body-weight SUV (g/ml) inside.
    """
    name: str
    kind: str
    shapes: tuple[Shape, ...]
    hu: float
    suv: float

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the union of the shapes."""
        mask = self.shapes[0].contains(x, y, z)
        for shape in self.shapes[1:]:
            mask = mask | shape.contains(x, y, z)
        return mask


@dataclass
class PhantomAnatomy:
    """Ordered structures (later ones paint over earlier ones) plus tumour metadata.

    Label ``0`` is air (HU -1000, SUV 0); label ``n`` is ``structures[n - 1]``.
    """
    structures: list[Structure]
    tumours: list[dict[str, Any]] = field(default_factory=list)

    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """int16 label of every point of the broadcast of ``x``, ``y``, ``z`` (LPS mm)."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = np.zeros(shape, dtype=np.int16)
        for index, structure in enumerate(self.structures, start=1):
            out[np.broadcast_to(structure.contains(x, y, z), shape)] = index
        return out

    def labels_at(self, points: np.ndarray) -> np.ndarray:
        """Labels of ``(N, 3)`` LPS points."""
        points = np.asarray(points, dtype=np.float64)
        return self.labels(points[:, 0], points[:, 1], points[:, 2])

    def index(self, name: str) -> int:
        """Label value of the structure called ``name``."""
        for i, structure in enumerate(self.structures, start=1):
            if structure.name == name:
                return i
        raise KeyError(name)

    def table(self, attribute: str) -> np.ndarray:
        """Lookup table ``label -> hu`` or ``label -> suv`` (float64, index 0 = air)."""
        air = {"hu": -1000.0, "suv": 0.0}[attribute]
        return np.array([air] + [float(getattr(s, attribute)) for s in self.structures], dtype=np.float64)


# --------------------------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Grid:
    """An axial voxel grid in LPS: voxel ``(i, j, k)`` centre = ``origin + (i, j, k) * spacing``.

    Args:
        shape: ``(I, J, K)`` voxels.
        spacing: ``(dx, dy, dz)`` mm.
        origin: LPS mm of voxel ``(0, 0, 0)``'s centre (the first slice's ImagePositionPatient).
    """
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along x ``(I,)``, y ``(J,)`` and z ``(K,)`` in LPS mm."""
        return tuple(  # type: ignore[return-value]
            self.origin[d] + self.spacing[d] * np.arange(self.shape[d], dtype=np.float64) for d in range(3)
        )

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel-index to RAS mm matrix (the :class:`Volume` convention)."""
        lps = np.eye(4)
        lps[:3, :3] = AXIAL_DIRECTION * np.asarray(self.spacing)
        lps[:3, 3] = self.origin
        return LPS_TO_RAS @ lps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready geometry."""
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "affine_ras": self.affine.tolist(),
        }


def _centred_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre: Sequence[float]) -> Grid:
    origin = tuple(float(centre[d]) - 0.5 * (shape[d] - 1) * spacing[d] for d in range(3))
    return Grid(shape, spacing, origin)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PhantomSize:
    """Grid and anatomy scale of one phantom size.

    Args:
        name: ``"small"``, ``"clinical"`` or ``"whole_body"``.
        ct: CT grid.
        pet: PET grid (coarser, different z-extent, not aligned with CT voxel centres).
        body_scale: anatomy scale (1 = an adult thorax, 330 x 230 mm).
        tumour_radius_mm: ``(min, max)`` tumour radius; the minimum keeps a 2x2x2 block of PET voxels inside
            every tumour so the noise-free SUV survives trilinear resampling exactly.
        tumour_count: ``(min, max)`` tumours per case.
        pet_fwhm_mm: PSF full width at half maximum when ``blur=True``.
        bed_length_mm: axial length of one PET bed position (sets the per-bed AcquisitionTime).
        frame_duration_s: acquisition time per bed.
        whole_body: skull vertex to mid-thigh (head, neck, abdomen, pelvis and thighs around the thorax, with
            their physiological FDG uptake) instead of a thorax of unbounded length.
    """
    name: str
    ct: Grid
    pet: Grid
    body_scale: float
    tumour_radius_mm: tuple[float, float]
    tumour_count: tuple[int, int]
    pet_fwhm_mm: float
    bed_length_mm: float
    frame_duration_s: int
    whole_body: bool = False


SIZES: dict[str, PhantomSize] = {
    # 64x64x32 CT at 3x3x4 mm (192 x 192 x 128 mm) and a 56x56x40 PET at 4 mm: a half-scale thorax.
    # The PET covers the CT with >= 12 mm to spare on every side, as the PET of a hybrid scan usually does.
    "small": PhantomSize(
        name="small",
        ct=_centred_grid((64, 64, 32), (3.0, 3.0, 4.0), (0.0, 0.0, 0.0)),
        pet=_centred_grid((56, 56, 40), (4.0, 4.0, 4.0), (0.7, -1.1, -2.3)),
        body_scale=0.5,
        tumour_radius_mm=(7.5, 13.0),
        tumour_count=(2, 3),
        pet_fwhm_mm=6.0,
        bed_length_mm=60.0,
        frame_duration_s=120,
    ),
    # 512x512x150 CT at 0.977x0.977x2 mm (500 mm field of view) and a 128x128x85 PET at 4 mm (clinical).
    "clinical": PhantomSize(
        name="clinical",
        ct=_centred_grid((512, 512, 150), (0.9765625, 0.9765625, 2.0), (0.0, 0.0, 0.0)),
        pet=_centred_grid((128, 128, 85), (4.0, 4.0, 4.0), (1.3, -0.7, -2.1)),
        body_scale=1.0,
        tumour_radius_mm=(7.5, 22.0),
        tumour_count=(3, 5),
        pet_fwhm_mm=6.0,
        bed_length_mm=160.0,
        frame_duration_s=150,
    ),
    # Skull vertex to mid-thigh as in an FDG PET-CT for lung cancer (or autoPET): 512x512x350 CT at
    # 0.977x0.977x3 mm (1050 mm) and a 128x128x263 PET at 4 mm. The lungs fill 260 mm of it.
    "whole_body": PhantomSize(
        name="whole_body",
        ct=_centred_grid((512, 512, 350), (0.9765625, 0.9765625, 3.0), (0.0, 0.0, -113.5)),
        pet=_centred_grid((128, 128, 263), (4.0, 4.0, 4.0), (1.3, -0.7, -113.6)),
        body_scale=1.0,
        tumour_radius_mm=(7.5, 22.0),
        tumour_count=(3, 5),
        pet_fwhm_mm=6.0,
        bed_length_mm=160.0,
        frame_duration_s=150,
        whole_body=True,
    ),
}


# --------------------------------------------------------------------------------------------------- anatomy
#: CT numbers (HU) and true SUVbw (g/ml) of each tissue; tumour SUVs are drawn per case.
_HU = {
    "body": 20.0, "lung": -850.0, "liver": 55.0, "mediastinum": 40.0, "bone": 400.0, "myocardium": 45.0,
    "blood": 40.0, "node": 40.0, "brown_fat": -60.0, "tumour": 30.0,
    # whole_body only
    "skull": 700.0, "brain": 35.0, "kidney": 30.0, "bladder": 10.0, "bowel": 25.0, "air": -1000.0,
}
#: Physiological FDG uptake at about 60 min (typical SUVmean of adult studies): grey-matter-dominated brain 7-9,
#: renal parenchyma 2-4, urine in the bladder 10-40 and beyond, bowel 1.5-2.5.
_SUV = {
    "body": 0.7, "lung": 0.4, "liver": 2.2, "mediastinum": 1.5, "bone": 1.3, "myocardium": 6.0, "blood": 1.8,
    "node": 5.5, "brown_fat": 4.0,
    "skull": 1.0, "brain": 8.0, "kidney": 3.5, "bladder": 25.0, "bowel": 2.0, "air": 0.0,
}


def _fibonacci_directions(n: int = 96) -> np.ndarray:
    """``(n, 3)`` unit vectors spread evenly over the sphere (deterministic)."""
    k = np.arange(n, dtype=np.float64) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / n)
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * k
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def build_anatomy(rng: np.random.Generator, size: PhantomSize) -> PhantomAnatomy:
    """Lay out the fixed anatomy and draw the tumours for one case.

    Args:
        rng: the case's random generator (only tumour count, position, radius and SUV are random).
        size: phantom size (anatomy scale, CT z-range the tumours must lie in, tumour radius range).

    Returns:
        The anatomy; ``tumours`` holds one dict per tumour (name, centre LPS mm, radius mm, SUVmax, HU, location).
    """
    s = size.body_scale
    lung_semi = (58 * s, 80 * s, 130 * s)
    vertebra_r, vertebra_h, disc = max(17 * s, 10.0), max(24 * s, 14.0), max(6 * s, 4.0)
    z_lo = -200.0 * s
    n_vert = int(math.ceil(400.0 * s / (vertebra_h + disc)))
    vertebrae = tuple(
        EllipticCylinder((0.0, 88 * s), (vertebra_r, vertebra_r), z_lo + n * (vertebra_h + disc),
                         z_lo + n * (vertebra_h + disc) + vertebra_h)
        for n in range(n_vert)
    )
    heart_c = (20 * s, -30 * s, -60 * s)
    heart_semi = (62 * s, 52 * s, 55 * s)
    wall = max(14 * s, 10.0)
    node_r = max(9 * s, 8.0)
    if size.whole_body:
        body_shapes, mediastinum_z = _whole_body_outline(s), (-120 * s, 150 * s)
    else:  # a thorax of unbounded length: the grid's z-range cuts it
        body_shapes, mediastinum_z = (EllipticCylinder((0.0, 0.0), (165 * s, 115 * s)),), (-math.inf, math.inf)
    structures = [
        Structure("body", "anatomy", body_shapes, _HU["body"], _SUV["body"]),
        Structure("lung_right", "anatomy", (Ellipsoid((-78 * s, 5 * s, 15 * s), lung_semi),),
                  _HU["lung"], _SUV["lung"]),
        Structure("lung_left", "anatomy", (Ellipsoid((78 * s, 5 * s, 15 * s), lung_semi),),
                  _HU["lung"], _SUV["lung"]),
        # The liver dome shapes the right lung base: the strongest cranio-caudal landmark both modalities share.
        Structure("liver", "anatomy", (Ellipsoid((-45 * s, 5 * s, -200 * s), (115 * s, 95 * s, 100 * s)),),
                  _HU["liver"], _SUV["liver"]),
        Structure("mediastinum", "anatomy", (EllipticCylinder((0.0, -5 * s), (32 * s, 75 * s), *mediastinum_z),),
                  _HU["mediastinum"], _SUV["mediastinum"]),
        Structure("vertebrae", "anatomy", vertebrae, _HU["bone"], _SUV["bone"]),
        Structure("myocardium", "anatomy", (Ellipsoid(heart_c, heart_semi),), _HU["myocardium"], _SUV["myocardium"]),
        Structure("heart_blood_pool", "anatomy",
                  (Ellipsoid(heart_c, tuple(a - wall for a in heart_semi)),), _HU["blood"], _SUV["blood"]),
        Structure("lymph_node", "trap", (Ellipsoid((-12 * s, -20 * s, 40 * s), (node_r,) * 3),),
                  _HU["node"], _SUV["node"]),
        Structure("brown_fat", "trap",
                  (Ellipsoid((35 * s, 96 * s, 30 * s), (max(11 * s, 8.5), max(8 * s, 8.0), max(20 * s, 10.0))),),
                  _HU["brown_fat"], _SUV["brown_fat"]),
    ]
    if size.whole_body:
        structures.extend(_whole_body_organs(s))
    anatomy = PhantomAnatomy(structures)
    _add_tumours(anatomy, rng, size)
    return anatomy


def _whole_body_outline(s: float) -> tuple[Shape, ...]:
    """Head, neck, trunk, pelvis and both thighs (LPS mm; z = 0 near the carina, head at +z)."""
    return (
        Ellipsoid((0.0, 5 * s, 325 * s), (80 * s, 100 * s, 110 * s)),  # head, vertex at z = 435 mm
        EllipticCylinder((0.0, 15 * s), (60 * s, 55 * s), 200 * s, 260 * s),  # neck
        EllipticCylinder((0.0, 0.0), (165 * s, 115 * s), -360 * s, 200 * s),  # chest and abdomen
        EllipticCylinder((0.0, 0.0), (170 * s, 110 * s), -470 * s, -360 * s),  # pelvis
        EllipticCylinder((-90 * s, 0.0), (75 * s, 75 * s), -700 * s, -470 * s),  # right thigh
        EllipticCylinder((90 * s, 0.0), (75 * s, 75 * s), -700 * s, -470 * s),  # left thigh
    )


def _whole_body_organs(s: float) -> list[Structure]:
    """The structures of a whole-body study outside the thorax, with their physiological uptake.

    Air inside the body outside the lungs (trachea, a gastric bubble, bowel gas) is there on purpose: it is what a
    lung finder must not take for lung.
    """
    def organ(name: str, tissue: str, *shapes: Shape, kind: str = "anatomy") -> Structure:
        return Structure(name, kind, shapes, _HU[tissue], _SUV[tissue])

    return [
        organ("skull", "skull", Ellipsoid((0.0, 5 * s, 330 * s), (72 * s, 92 * s, 100 * s))),
        organ("brain", "brain", Ellipsoid((0.0, 5 * s, 335 * s), (64 * s, 84 * s, 88 * s))),
        organ("trachea", "air", EllipticCylinder((0.0, -10 * s), (9 * s, 9 * s), 130 * s, 240 * s)),
        organ("kidney_right", "kidney", Ellipsoid((-75 * s, 60 * s, -190 * s), (30 * s, 25 * s, 55 * s))),
        organ("kidney_left", "kidney", Ellipsoid((75 * s, 60 * s, -170 * s), (30 * s, 25 * s, 55 * s))),
        organ("stomach_gas", "air", Ellipsoid((65 * s, -30 * s, -150 * s), (30 * s, 22 * s, 18 * s))),
        organ("bowel", "bowel", Ellipsoid((0.0, -40 * s, -320 * s), (120 * s, 55 * s, 45 * s))),
        organ("bowel_gas", "air", Ellipsoid((45 * s, -55 * s, -310 * s), (18 * s, 14 * s, 14 * s)),
              Ellipsoid((-50 * s, -45 * s, -335 * s), (15 * s, 12 * s, 12 * s))),
        organ("bladder", "bladder", Ellipsoid((0.0, -45 * s, -430 * s), (45 * s, 35 * s, 35 * s)), kind="trap"),
    ]


def _add_tumours(anatomy: PhantomAnatomy, rng: np.random.Generator, size: PhantomSize) -> None:
    """Draw non-overlapping lung tumours by rejection sampling against the analytic anatomy.

    Tumour 1 leans on the mediastinum (centre in lung, 25-60 % of its surface inside the mediastinum, HU of the
    mediastinum); the others lie wholly inside one lung. Every tumour stays >= 8 mm from hot structures and other
    tumours (so its SUVmax is not contaminated after resampling) and inside both the CT and PET z-ranges.
    """
    s = size.body_scale
    directions = _fibonacci_directions()
    hot = {anatomy.index(n) for n in ("myocardium", "heart_blood_pool", "lymph_node", "brown_fat")}
    z_ct = size.ct.axes()[2]
    z_pet = size.pet.axes()[2]
    z_min = max(z_ct[0], z_pet[0])
    z_max = min(z_ct[-1], z_pet[-1])
    n_tumours = int(rng.integers(size.tumour_count[0], size.tumour_count[1] + 1))
    mediastinum = anatomy.index("mediastinum")
    n_fixed = len(anatomy.structures)
    for t in range(n_tumours):
        juxta = t == 0
        for _attempt in range(5000):
            radius = float(np.round(rng.uniform(*size.tumour_radius_mm), 1))
            side = "right" if rng.random() < 0.5 else "left"
            sign = -1.0 if side == "right" else 1.0
            lung = anatomy.index(f"lung_{side}")
            margin_z = radius + 4.0
            if z_max - z_min <= 2 * margin_z:
                raise RuntimeError(f"phantom size {size.name!r}: z-range too short for a {radius} mm tumour")
            z = float(rng.uniform(z_min + margin_z, z_max - margin_z))
            if juxta:
                y = float(rng.uniform(-30 * s, 30 * s))
                edge = 32 * s * math.sqrt(max(0.0, 1.0 - ((y + 5 * s) / (75 * s)) ** 2))
                x = sign * (edge + 0.4 * radius)
            else:
                x = float(sign * rng.uniform(20 * s, 136 * s))
                y = float(rng.uniform(-75 * s, 85 * s))
            centre = np.array([x, y, z])
            if anatomy.labels_at(centre[None])[0] != lung:
                continue
            surface = anatomy.labels_at(centre + radius * directions)
            halo = anatomy.labels_at(centre + (radius + 8.0) * directions)
            # Labels above n_fixed are the tumours placed so far.
            if np.isin(halo, list(hot)).any() or (halo > n_fixed).any():
                continue
            if juxta:
                share = float(np.mean(surface == mediastinum))
                if not (0.25 <= share <= 0.6) or not np.isin(surface, [lung, mediastinum]).all():
                    continue
            elif not (surface == lung).all():
                continue
            break
        else:  # pragma: no cover - the anatomy always leaves room; this guards future edits
            raise RuntimeError(f"could not place tumour {t + 1} in phantom size {size.name!r}")
        suv = float(np.round(rng.uniform(3.0, 15.0), 1))
        hu = _HU["mediastinum"] if juxta else _HU["tumour"]
        name = f"tumour_{t + 1}"
        sphere = Ellipsoid((float(centre[0]), float(centre[1]), float(centre[2])), (radius, radius, radius))
        anatomy.structures.append(Structure(name, "tumour", (sphere,), hu, suv))
        anatomy.tumours.append({
            "name": name,
            "location": "juxta-mediastinal" if juxta else "peripheral",
            "side": side,
            "centre_lps_mm": [round(float(v), 6) for v in centre],
            "radius_mm": radius,
            "suv_max": suv,
            "suv_mean": suv,
            "hu": hu,
            "volume_ml": 4.0 / 3.0 * math.pi * radius**3 / 1000.0,
        })
