"""A 3-D image with its geometry: the one currency passed between readers, preprocessing and writers.

Conventions (the same as NIfTI / nibabel, so that writing a :class:`Volume` needs no reordering):

* ``array`` is indexed ``[i, j, k]`` where ``i`` runs along the image columns, ``j`` along the rows and ``k`` along
  the slices (for DICOM: ``i`` follows the first ImageOrientationPatient vector, ``j`` the second, ``k`` the slice
  normal in the direction slices were sorted).
* ``affine`` maps a voxel index ``(i, j, k, 1)`` to **RAS+** millimetres, as nibabel does.

ITK works in LPS and its numpy view is ``[k, j, i]``; MONAI's ``MetaTensor`` uses ``[i, j, k]`` with a RAS affine.
The conversion helpers below are the only place where those flips happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Volume", "LPS_TO_RAS", "axial_axis", "axial_orientation"]

#: diag(-1, -1, 1, 1): flips x and y between DICOM/ITK patient space (LPS) and NIfTI world space (RAS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def axial_orientation(affine: np.ndarray) -> tuple[int, bool]:
    """The voxel axis (0, 1 or 2) nearest to the patient's superior-inferior axis, and whether its index runs
    inferior to superior.

    Args:
        affine: ``(4, 4)`` voxel-to-RAS matrix.
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64)[:4, :4])
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, bool(ornt[axis, 1] > 0)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) nearest to the patient's superior-inferior axis (``k`` for ordinary axial CT).

    Args:
        affine: ``(4, 4)`` voxel-to-RAS matrix.
    """
    return axial_orientation(affine)[0]


@dataclass
class Volume:
    """Voxel data plus a voxel-to-RAS affine.

    Args:
        array: ``(I, J, K)`` voxel values (or ``(I, J, K, C)`` for a multi-channel image).
        affine: ``(4, 4)`` voxel-index to RAS-mm matrix.
        meta: free-form provenance (source files, units, series UIDs...). Never used for geometry.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Volume array must be 3-D (I, J, K) or 4-D (I, J, K, C), got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``i``, ``j``, ``k``."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel indices to ``(..., 3)`` RAS millimetres."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    # ------------------------------------------------------------------ conversions
    def to_nifti(self):  # -> nibabel.Nifti1Image
        """A ``nibabel.Nifti1Image`` with qform and sform both set to ``affine``."""
        import nibabel as nib

        img = nib.Nifti1Image(self.array, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img

    @classmethod
    def from_nifti(cls, img: Any, meta: dict[str, Any] | None = None) -> "Volume":
        """Build from a loaded ``nibabel`` image (data read as stored, with scaling applied)."""
        return cls(np.asanyarray(img.dataobj), img.affine, dict(meta or {}))

    def to_itk(self):  # -> itk.Image
        """A 3-D ``itk.Image`` in LPS with the same physical geometry (single-channel volumes only)."""
        import itk

        if self.array.ndim != 3:
            raise ValueError("only single-channel volumes convert to ITK images")
        lps = LPS_TO_RAS @ self.affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        image = itk.image_from_array(np.ascontiguousarray(np.transpose(self.array, (2, 1, 0))))
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in lps[:3, 3]])
        image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        return image

    @classmethod
    def from_itk(cls, image: Any, meta: dict[str, Any] | None = None) -> "Volume":
        """Build from a 3-D ``itk.Image`` (LPS) without copying geometry through any other convention."""
        import itk

        array = np.transpose(itk.array_from_image(image), (2, 1, 0))
        direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
        lps = np.eye(4)
        lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
        lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
        return cls(array, LPS_TO_RAS @ lps, dict(meta or {}))

    def to_metatensor(self):  # -> monai.data.MetaTensor
        """A channel-first ``MetaTensor`` ``(C, I, J, K)`` carrying the RAS affine, as MONAI's ``LoadImage`` gives."""
        import torch
        from monai.data import MetaTensor

        data = self.array[None] if self.array.ndim == 3 else np.moveaxis(self.array, -1, 0)
        return MetaTensor(torch.as_tensor(np.ascontiguousarray(data)), affine=torch.as_tensor(self.affine))
